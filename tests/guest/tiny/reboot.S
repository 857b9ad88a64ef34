/* Say "boot" on COM1, then reset through the keyboard controller: for --on-reboot tests. */
#include "common.inc"
    .globl _start
    .text
_start:
    lea message(%rip), %rsi
1:  movzbl (%rsi), %eax
    test %eax, %eax
    jz 2f
    mov $COM1, %dx
    out %al, (%dx)
    inc %rsi
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
3:  pause
    jmp 3b
    .data
message:
    .asciz "boot\n"
