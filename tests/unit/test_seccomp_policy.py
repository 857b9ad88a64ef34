"""The seccomp filter's BPF program (vmm/seccomp/policy.py), run through a classic-BPF interpreter
written here from the kernel's rules, and its numbers against the kernel's headers."""

import errno
import re
import struct
from pathlib import Path

import pytest

from vmm.seccomp import abi, policy
from vmm.seccomp.bpf import Assembler, BpfError
from vmm.seccomp.syscalls import AF_UNIX, NR

DENY = abi.SECCOMP_RET_ERRNO | 99  # a deny action no other verdict can be
ALLOW, ENOSYS = abi.SECCOMP_RET_ALLOW, abi.SECCOMP_RET_ERRNO | errno.ENOSYS
AUDIT_ARCH_I386 = 3 | 0x40000000  # EM_386 | __AUDIT_ARCH_LE
# glibc 2.36: pthread_create's clone flags (CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|
# CHILD_CLEARTID), and fork's (CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD)
PTHREAD_CLONE_FLAGS, FORK_CLONE_FLAGS = 0x3D0F00, 0x01200011
AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK = 2, 10, 16, 17, 40


def run_filter(program, nr, *args, arch=abi.AUDIT_ARCH_X86_64):
    """What the kernel would return for one system call (struct seccomp_data as it lays it out)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0x401000, *(list(args) + [0] * (6 - len(args))))
    a, pc = 0, 0
    while True:
        insn = program[pc]
        cls = insn.code & 0x07
        if insn.code == abi.BPF_LD | abi.BPF_W | abi.BPF_ABS:
            assert insn.k % 4 == 0 and insn.k + 4 <= len(data), insn
            a = struct.unpack_from("<I", data, insn.k)[0]
        elif cls == abi.BPF_JMP:
            op = insn.code & 0xF0
            taken = {abi.BPF_JEQ: a == insn.k, abi.BPF_JGE: a >= insn.k, abi.BPF_JSET: bool(a & insn.k)}[op]
            pc += insn.jt if taken else insn.jf
        elif insn.code == abi.BPF_RET | abi.BPF_K:
            return insn.k
        else:
            raise AssertionError(f"instruction the filter should not use: {insn}")
        pc += 1


@pytest.fixture(scope="module")
def program():
    return policy.build_filter(DENY)


def test_every_listed_call_is_denied(program):
    for name in policy.denied_names():
        assert run_filter(program, NR[name]) == DENY, name
    assert {"execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "mount",
            "umount2", "pivot_root", "chroot", "kexec_load", "kexec_file_load", "init_module", "finit_module",
            "delete_module", "bpf", "perf_event_open", "reboot", "swapon", "swapoff", "setns", "unshare", "keyctl",
            "add_key", "request_key", "personality", "userfaultfd"} <= set(policy.denied_names())


@pytest.mark.parametrize("name, nr", [("read", 0), ("write", 1), ("close", 3), ("mmap", 9), ("ioctl", 16),
                                      ("preadv", 295), ("pwritev", 296), ("fdatasync", 75), ("openat", 257),
                                      ("eventfd2", 290), ("epoll_wait", 232), ("tgkill", 234), ("futex", 202),
                                      ("io_uring_setup", 425), ("io_uring_enter", 426), ("prctl", 157),
                                      ("rt_sigaction", 13), ("exit_group", 231), ("fallocate", 285),
                                      ("flock", 73), ("sendfile", 40), ("memfd_create", 319), ("socketpair", 53),
                                      ("getrandom", 318), ("timerfd_create", 283), ("timerfd_settime", 286),
                                      ("madvise", 28)])
def test_what_a_running_vmm_does_is_allowed(program, name, nr):
    assert run_filter(program, nr, 3, 0xAE80, 0) == ALLOW


def test_threads_may_be_made_but_not_processes(program):
    assert run_filter(program, NR["clone"], PTHREAD_CLONE_FLAGS) == ALLOW
    assert run_filter(program, NR["clone"], FORK_CLONE_FLAGS) == DENY
    assert run_filter(program, NR["clone"], 0x4111) == DENY  # CLONE_VM|CLONE_VFORK|SIGCHLD: posix_spawn
    # the kernel reads the low 32 bits of clone's flags: so does the filter
    assert run_filter(program, NR["clone"], 0xFFFF_FFFF_0000_0000 | FORK_CLONE_FLAGS) == DENY
    assert run_filter(program, NR["clone"], 0xFFFF_FFFF_0000_0000 | PTHREAD_CLONE_FLAGS) == ALLOW
    # clone3's flags are in memory: ENOSYS in every mode, and glibc falls back to clone
    assert run_filter(program, NR["clone3"], 0x1000, 88) == ENOSYS
    assert run_filter(policy.build_filter(abi.SECCOMP_RET_KILL_PROCESS), NR["clone3"]) == ENOSYS


def test_only_local_sockets(program):
    assert run_filter(program, NR["socket"], AF_UNIX, 1, 0) == ALLOW
    for family in (AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK, 0, 0xFFFF):
        assert run_filter(program, NR["socket"], family, 1, 0) == DENY, family
    # socket's family is an int: the high half of the register does not count, for the kernel or the filter
    assert run_filter(program, NR["socket"], 0x1_0000_0000 | AF_UNIX) == ALLOW
    assert run_filter(program, NR["socket"], 0x1_0000_0000 | AF_INET) == DENY


def test_other_architectures_and_x32_are_denied(program):
    assert run_filter(program, 1, arch=AUDIT_ARCH_I386) == DENY  # i386's exit, and every other i386 call
    assert run_filter(program, 39, arch=AUDIT_ARCH_I386) == DENY
    assert run_filter(program, 0x40000000 | 39) == DENY  # x32 getpid
    assert run_filter(program, 0x40000000 | 59) == DENY
    assert run_filter(program, -1) == DENY


def test_the_deny_action_is_what_the_mode_asks(program):
    for action in (abi.SECCOMP_RET_KILL_PROCESS, abi.SECCOMP_RET_KILL_THREAD, abi.SECCOMP_RET_LOG,
                   abi.SECCOMP_RET_ERRNO | errno.EPERM):
        prog = policy.build_filter(action)
        assert run_filter(prog, NR["execve"]) == action
        assert run_filter(prog, NR["socket"], AF_INET) == action
        assert run_filter(prog, 0) == ALLOW
    assert len(program) < abi.BPF_MAXINSNS


def test_syscall_numbers_match_the_kernel_headers():
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip("no <asm/unistd_64.h> (linux-libc-dev)")
    defined = {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+) (\d+)", header.read_text())}
    for name, nr in NR.items():
        assert defined.get(name) == nr, name


def test_constants_match_the_kernel_headers():
    headers = [Path("/usr/include/linux/seccomp.h"), Path("/usr/include/linux/prctl.h")]
    if not all(h.exists() for h in headers):
        pytest.skip("no <linux/seccomp.h> (linux-libc-dev)")
    text = "".join(h.read_text() for h in headers)
    defined = {m[0]: int(m[1], 0) for m in re.findall(r"#define (\w+)\s+(0x[0-9a-fA-F]+|\d+)U?\b", text)}
    for name in ("SECCOMP_SET_MODE_FILTER", "SECCOMP_GET_ACTION_AVAIL", "SECCOMP_RET_KILL_PROCESS",
                 "SECCOMP_RET_KILL_THREAD", "SECCOMP_RET_ERRNO", "SECCOMP_RET_LOG", "SECCOMP_RET_ALLOW",
                 "SECCOMP_MODE_FILTER", "PR_GET_SECCOMP", "PR_SET_NO_NEW_PRIVS"):
        assert defined[name] == getattr(abi, name), name
    assert abi.SECCOMP_FILTER_FLAG_TSYNC == 1


def test_the_assembler_jumps_forward_only_and_not_too_far():
    a = Assembler()
    a.label("back")
    a.jump(abi.BPF_JEQ, 1, "back")
    with pytest.raises(BpfError, match="0 to 255"):
        a.assemble()
    a = Assembler()
    a.jump(abi.BPF_JEQ, 1, "far")
    for _ in range(256):
        a.ret(0)
    a.label("far")
    a.ret(0)
    with pytest.raises(BpfError, match="0 to 255"):
        a.assemble()
    a = Assembler()
    a.jump(abi.BPF_JEQ, 1, "nowhere")
    with pytest.raises(BpfError, match="undefined"):
        a.assemble()


@pytest.mark.parametrize("name, nr", [("connect", 42), ("accept4", 288), ("bind", 49), ("listen", 50),
                                      ("sendmsg", 46), ("recvmsg", 47), ("recvfrom", 45), ("shutdown", 48)])
def test_what_virtio_vsock_does_at_run_time_is_allowed(program, name, nr):
    """--vsock's device (virtio/backends/vsock_unix.py) accepts host programs on its Unix socket, connects
    to PATH_<port> for the guest, and moves bytes with sendmsg / recvmsg, all after the filter is in."""
    assert run_filter(program, NR["socket"], AF_UNIX, 0x80801, 0) == ALLOW  # SOCK_STREAM|NONBLOCK|CLOEXEC
    assert run_filter(program, nr, 7, 0, 0) == ALLOW
