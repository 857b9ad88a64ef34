/* Port and MMIO exits in both directions and at 1, 2 and 4 bytes. The host's test device
   answers reads at IO_PORT / MMIO_ADDR and records writes. */
#include "common.inc"
    .set IO_PORT, 0x510
    .set MMIO_ADDR, 0xd0000000
    .globl _start
    .text
_start:
    mov $IO_PORT, %dx
    in (%dx), %al
    inc %al
    out %al, (%dx)
    in (%dx), %ax
    inc %ax
    out %ax, (%dx)
    in (%dx), %eax
    inc %eax
    out %eax, (%dx)
    mov $MMIO_ADDR, %rbx
    movb (%rbx), %al
    inc %al
    movb %al, 1(%rbx)
    movw (%rbx), %ax
    inc %ax
    movw %ax, 2(%rbx)
    movl (%rbx), %eax
    inc %eax
    movl %eax, 4(%rbx)
    movq (%rbx), %rax
    inc %rax
    movq %rax, 8(%rbx)
    poweroff
