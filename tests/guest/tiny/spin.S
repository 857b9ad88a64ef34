/* Say so on the report port, then spin forever: for stopping tests. */
#include "common.inc"
    .globl _start
    .text
_start:
    mov %edi, %eax
    report
1:  pause
    jmp 1b
