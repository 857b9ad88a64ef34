/* A console the host can type into: say "echo> ", then send every byte received on COM1
   back, upper-cased (a-z), polling the UART as a driver without interrupts does. */
#include "common.inc"
    .set COM1_LSR_DR, 0x01
    .globl _start
    .text
_start:
    lea prompt(%rip), %rsi
1:  lodsb
    test %al, %al
    jz loop
    mov %al, %bl
    call putc
    jmp 1b
loop:
    mov $COM1_LSR, %dx
    in (%dx), %al
    test $COM1_LSR_DR, %al
    jz loop
    mov $COM1, %dx
    in (%dx), %al
    movzbl %al, %ebx
    cmp $'a', %bl
    jb 2f
    cmp $'z', %bl
    ja 2f
    sub $0x20, %bl
2:  call putc
    jmp loop

putc:                           /* %bl out on COM1 once the transmitter is empty */
    mov $COM1_LSR, %dx
3:  in (%dx), %al
    test $LSR_THRE, %al
    jz 3b
    mov $COM1, %dx
    mov %bl, %al
    out %al, (%dx)
    ret
    .data
prompt:
    .asciz "echo> "
