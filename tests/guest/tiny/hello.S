/* Print a line on COM1 the way a polling driver does, then power off. */
#include "common.inc"
    .globl _start
    .text
_start:
    lea message(%rip), %rsi
next:
    movzbl (%rsi), %ebx
    test %ebx, %ebx
    jz done
wait_thre:
    mov $COM1_LSR, %dx
    in (%dx), %al
    test $LSR_THRE, %al
    jz wait_thre
    mov $COM1, %dx
    mov %bl, %al
    out %al, (%dx)
    inc %rsi
    jmp next
done:
    poweroff
    .data
message:
    .asciz "hello from a guest in user mode\n"
