/* Every vCPU counts to 1<<20 in its own slot at 0x300000 + 64*index, then reports its index
   and spins; the host powers the VM off once all have reported. */
#include "common.inc"
    .globl _start
    .text
_start:
    mov %rdi, %rbx
    shl $6, %rbx
    add $0x300000, %rbx
    xor %ecx, %ecx
1:  inc %rcx
    mov %rcx, (%rbx)
    cmp $(1 << 20), %rcx
    jne 1b
    mov %edi, %eax
    report
2:  pause
    jmp 2b
