/* Count and read the clock forever: for pause tests.  The host points vCPU 0's kvm-clock
   (MSR_KVM_SYSTEM_TIME_NEW) at PVCLOCK; the guest increments the 64-bit counter at COUNTER and
   writes kvm-clock's time in ns, computed from the pvclock_vcpu_time_info there and RDTSC as
   Linux's pvclock_clocksource_read does, to CLOCK_NS. */
#include "common.inc"
    .set PVCLOCK, 0x310000           /* struct pvclock_vcpu_time_info: version 0, tsc_timestamp 8, */
    .set COUNTER, 0x320000           /* system_time 16, tsc_to_system_mul 24, tsc_shift 28 */
    .set CLOCK_NS, 0x320008
    .globl _start
    .text
_start:
    mov $PVCLOCK, %rbx
    mov $COUNTER, %rsi
    mov $0x434c4f43, %eax            /* "CLOC": started */
    report
1:  incq (%rsi)
    mov (%rbx), %r8d                 /* version: odd while the host updates it */
    test $1, %r8d
    jnz 1b
    lfence
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub 8(%rbx), %rax                /* delta = tsc - tsc_timestamp */
    movsbl 28(%rbx), %ecx
    test %ecx, %ecx
    js 2f
    shl %cl, %rax
    jmp 3f
2:  neg %ecx
    shr %cl, %rax
3:  mov 24(%rbx), %edx
    mul %rdx                         /* rdx:rax = delta * mul */
    shrd $32, %rdx, %rax
    add 16(%rbx), %rax               /* + system_time */
    lfence
    mov (%rbx), %r9d
    cmp %r8d, %r9d
    jne 1b                           /* updated meanwhile: read again */
    mov %rax, 8(%rsi)
    jmp 1b
