/* Entry from pyvmm's boot_program: 64-bit user mode, RDI = vCPU index, RSI = vCPU count,
   RSP = this vCPU's stack (16-byte aligned). vCPU 0 runs the job; the others wait. */
    .globl _start
    .text
_start:
    test %rdi, %rdi
    jnz 1f
    and $-16, %rsp
    xor %ebp, %ebp
    call main
    ud2
1:  pause
    jmp 1b
    .section .note.GNU-stack, "", @progbits
