/* Exit to the VMM forever: a port write (to a port nothing decodes) per loop, counted in memory
   at COUNTER, for tests that watch a running VM's exits and pause it. */
#include "common.inc"
    .set BUSY_PORT, 0x510
    .set COUNTER, 0x320000
    .globl _start
    .text
_start:
    mov $COUNTER, %rsi
    mov $BUSY_PORT, %dx
1:  incq (%rsi)
    out %al, (%dx)
    jmp 1b
