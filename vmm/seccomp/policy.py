"""What the filter denies once a VM is set up, and why; `build_filter`, the BPF program that says so.

    program = build_filter(SECCOMP_RET_KILL_PROCESS)   # [SockFilter, ...] for seccomp(2)

Everything else is allowed: a deny list, not an allow list.  What pyvmm does while a VM runs
(KVM ioctls, eventfds, epoll, preadv/pwritev, io_uring, taps, threads, files it writes, a new VM
when the guest reboots with --on-reboot restart) stays open, so a new code path never dies of a
call nobody listed; what is shut is what a VMM never needs once running and what an attacker
who took over the process would want next: run another program, reach other processes, change
the host's mounts, kernel, clock or namespaces, or open network sockets.

The program, for each system call:
  1. arch != AUDIT_ARCH_X86_64 (an i386 call through int 0x80): denied.  Numbers mean other
     calls there, so no rule below would hold.
  2. nr >= X32_SYSCALL_BIT (x32 calls, and -1): denied, for the same reason.
  3. clone: allowed only with CLONE_THREAD in its flags (a thread of this process; fork is clone
     without it).  clone3: ENOSYS whatever the mode, because its flags are in memory a filter
     cannot read; glibc's pthread_create (2.34+) then falls back to clone, which rule 3 checks.
  4. socket: allowed only for AF_UNIX (glibc's NSS may use one; virtio-console's --port listens on
     one, made before the filter, and accepts its clients with accept4; so does the management API
     (vmm/api/server.py), whose clients it serves with recv, send and epoll; --vsock's device listens on a
     Unix socket and connects to PATH_<port> for the guest at run time: bind, listen, accept4, connect,
     sendmsg, recvmsg and shutdown are not denied, whatever the socket).
  5. DENIED: the deny action.
  6. anything else: allowed.
Arguments are compared on their low 32 bits, the `int` the kernel uses (clone's flags, socket's family).

Not covered: what io_uring does for a process is not filtered (an IORING_OP_SOCKET or OPENAT in
a ring bypasses seccomp), and pyvmm needs io_uring_setup at run time (a NIC's rings are made
when the guest's driver starts it); io_uring has no exec, mount or ptrace operation.
"""

from __future__ import annotations

import errno

from .abi import (AUDIT_ARCH_X86_64, BPF_JEQ, BPF_JGE, BPF_JSET, SECCOMP_DATA_ARCH, SECCOMP_DATA_NR,
                  SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SockFilter, arg_low)
from .bpf import Assembler
from .syscalls import AF_UNIX, CLONE_THREAD, NR, X32_SYSCALL_BIT

# The denied calls, by why a running VMM never makes them.
DENIED: dict[str, tuple[str, ...]] = {
    "run another program": ("execve", "execveat"),
    "make another process (threads are made with clone and CLONE_THREAD)": ("fork", "vfork"),
    "reach into another process": ("ptrace", "process_vm_readv", "process_vm_writev", "process_madvise",
                                   "pidfd_getfd"),
    "change mounts, the root or namespaces": ("mount", "umount2", "pivot_root", "chroot", "open_tree",
                                              "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
                                              "mount_setattr", "setns", "unshare", "open_by_handle_at"),
    "load or replace kernel code": ("kexec_load", "kexec_file_load", "init_module", "finit_module",
                                    "delete_module", "bpf"),
    "change or observe the host as a whole": ("reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
                                              "settimeofday", "clock_settime", "sethostname", "setdomainname",
                                              "perf_event_open", "iopl", "ioperm"),
    "reach the kernel's keyrings": ("add_key", "request_key", "keyctl"),
    "weaken the process (READ_IMPLIES_EXEC, no ASLR)": ("personality",),
    "stall the kernel on a page fault, a classic help to exploit its races": ("userfaultfd",),
}
# The calls with rules of their own (rules 3 and 4 above).
CLONE_ONLY_THREADS, CLONE3_ENOSYS, SOCKET_ONLY_UNIX = "clone", "clone3", "socket"


def denied_names() -> list[str]:
    """Every call of DENIED, by name."""
    return [name for names in DENIED.values() for name in names]


def build_filter(deny: int) -> list[SockFilter]:
    """The filter's classic-BPF program; `deny` is the SECCOMP_RET_* action of a denied call."""
    a = Assembler()
    a.load(SECCOMP_DATA_ARCH)
    a.jump(BPF_JEQ, AUDIT_ARCH_X86_64, None, "deny")
    a.load(SECCOMP_DATA_NR)
    a.jump(BPF_JGE, X32_SYSCALL_BIT, "deny")
    a.jump(BPF_JEQ, NR[CLONE_ONLY_THREADS], "clone")
    a.jump(BPF_JEQ, NR[CLONE3_ENOSYS], "enosys")
    a.jump(BPF_JEQ, NR[SOCKET_ONLY_UNIX], "socket")
    for name in denied_names():
        a.jump(BPF_JEQ, NR[name], "deny")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("clone")
    a.load(arg_low(0))
    a.jump(BPF_JSET, CLONE_THREAD, "allow", "deny")
    a.label("socket")
    a.load(arg_low(0))
    a.jump(BPF_JEQ, AF_UNIX, "allow", "deny")
    a.label("enosys")
    a.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("deny")
    a.ret(deny)
    return a.assemble()
