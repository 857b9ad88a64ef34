/* An invalid opcode with no IDT: the vCPU cannot go on (triple fault). */
    .globl _start
    .text
_start:
    nop
    ud2
