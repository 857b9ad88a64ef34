"""The kernel's seccomp and classic-BPF ABI, as ctypes and constants under their kernel names.

<linux/seccomp.h> (operations, flags, return actions, struct seccomp_data), <linux/audit.h>
(AUDIT_ARCH_X86_64), <linux/filter.h> and <linux/bpf_common.h> (struct sock_filter,
struct sock_fprog, the opcode bits), <linux/prctl.h>.  A classic-BPF seccomp program reads
struct seccomp_data with 32-bit absolute loads (BPF_LD|BPF_W|BPF_ABS) and ends in BPF_RET with
one of the SECCOMP_RET_* actions; the kernel runs it on every system call of every thread that
has it (Documentation/userspace-api/seccomp_filter.rst).
"""

from __future__ import annotations

import ctypes

# <linux/bpf_common.h>: instruction classes, sizes, modes, ALU/JMP operations, sources
BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JEQ, BPF_JGE, BPF_JSET = 0x10, 0x30, 0x40
BPF_K = 0x00
BPF_MAXINSNS = 4096  # <linux/bpf_common.h>: the most instructions a classic program may have

# <linux/seccomp.h>: seccomp(2) operations and SECCOMP_SET_MODE_FILTER flags
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2  # Linux 4.14
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0  # every thread of the process gets the filter (Linux 3.17)
SECCOMP_MODE_DISABLED, SECCOMP_MODE_FILTER = 0, 2  # what PR_GET_SECCOMP answers

# <linux/seccomp.h>: return actions (the high 16 bits; the low 16 are SECCOMP_RET_DATA)
SECCOMP_RET_KILL_PROCESS = 0x80000000  # Linux 4.14
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ERRNO = 0x00050000  # | errno
SECCOMP_RET_LOG = 0x7FFC0000  # allowed, and logged (Linux 4.14)
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# <linux/audit.h>: struct seccomp_data's arch for x86-64 (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE)
AUDIT_ARCH_X86_64 = 62 | 0x80000000 | 0x40000000

# <linux/prctl.h>
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38


class SeccompData(ctypes.Structure):
    """struct seccomp_data: what a filter sees of a system call (offsets are what it loads)."""

    _fields_ = [("nr", ctypes.c_int32), ("arch", ctypes.c_uint32), ("instruction_pointer", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


SECCOMP_DATA_NR = SeccompData.nr.offset  # 0
SECCOMP_DATA_ARCH = SeccompData.arch.offset  # 4
SECCOMP_DATA_ARGS = SeccompData.args.offset  # 16: args[i] at 16 + 8 i, its low 32 bits first (little-endian)


def arg_low(i: int) -> int:
    """The offset of the low 32 bits of system call argument `i` in struct seccomp_data (x86-64 is
    little-endian).  An `int` argument (socket's family) is only those bits: the kernel ignores the rest."""
    return SECCOMP_DATA_ARGS + 8 * i


class SockFilter(ctypes.Structure):
    """struct sock_filter: one classic-BPF instruction."""

    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    def __repr__(self) -> str:
        return f"SockFilter(code={self.code:#06x}, jt={self.jt}, jf={self.jf}, k={self.k:#x})"


class SockFprog(ctypes.Structure):
    """struct sock_fprog: the program handed to seccomp(SECCOMP_SET_MODE_FILTER)."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


assert ctypes.sizeof(SeccompData) == 64 and ctypes.sizeof(SockFilter) == 8 and ctypes.sizeof(SockFprog) == 16
