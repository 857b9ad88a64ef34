"""x86-64 system call numbers the filter names (arch/x86/entry/syscalls/syscall_64.tbl, as in
<asm/unistd_64.h>: tests/unit/test_seccomp_policy.py checks them against the header where it is
installed), and the argument values its rules test."""

from __future__ import annotations

NR = {
    "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "ptrace": 101,
    "syslog": 103, "personality": 135, "pivot_root": 155, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "unshare": 272, "perf_event_open": 298, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "seccomp": 317,
    "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
}

# <asm/unistd.h>: the bit that marks an x32 system call (same arch, AUDIT_ARCH_X86_64, other table)
X32_SYSCALL_BIT = 0x40000000

CLONE_THREAD = 0x00010000  # <linux/sched.h>: clone() makes a thread of the caller's process
AF_UNIX = 1  # <sys/socket.h>: local sockets (glibc's NSS, nscd; virtio-console's --port)
