/* Write a 64-bit pattern (address ^ 0x5a5a5a5a_a5a5a5a5) at each address in the list the host
   put at 0x300000 (count, then addresses), read it back, report low and high halves. */
#include "common.inc"
    .globl _start
    .text
_start:
    mov $0x300000, %rbx
    mov (%rbx), %rcx              /* count */
    add $8, %rbx
1:  test %rcx, %rcx
    jz 2f
    mov (%rbx), %rdi              /* address */
    mov $0x5a5a5a5aa5a5a5a5, %rax
    xor %rdi, %rax
    mov %rax, (%rdi)
    mov (%rdi), %r8
    mov %r8d, %eax
    report
    mov %r8, %rax
    shr $32, %rax
    report
    add $8, %rbx
    dec %rcx
    jmp 1b
2:  poweroff
