"""Calls the syscall filter denies (vmm/seccomp/policy.py), for child processes of the tests to try.

    from tests.support.denied import attempt
    attempt("execve")      # prints "trying execve", then "execve ok" or "execve EPERM" (its errno's name)

Each line is flushed before the next call: a process killed by the filter has printed, last,
"trying" and the name of the call that killed it."""

from __future__ import annotations

import ctypes
import errno
import os
import socket

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_CLONE3, NR_PTRACE, NR_UNSHARE = 435, 101, 272
PTRACE_PEEKDATA, CLONE_NEWUTS = 2, 0x04000000
NO_SUCH_PID = 0x3FFFFFFF  # above any pid_max: ptrace answers ESRCH when nothing stops it first


def raw(nr: int, *args: int) -> str:
    """syscall(nr, args...): "ok", or the name of its errno."""
    if _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]) >= 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def _checked(nr: int, *args: int) -> None:
    result = raw(nr, *args)
    if result != "ok":
        raise OSError(getattr(errno, result), result)


CALLS = {
    "execve": lambda: os.execv("/bin/true", ["true"]),
    "fork": lambda: os._exit(0) if os.fork() == 0 else None,
    "inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close(),
    "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close(),
    "unix": lambda: socket.socket(socket.AF_UNIX).close(),
    "ptrace": lambda: _checked(NR_PTRACE, PTRACE_PEEKDATA, NO_SUCH_PID, 0, 0),
    "unshare": lambda: _checked(NR_UNSHARE, CLONE_NEWUTS),  # (allowed unfiltered as root; harmless in a child)
}


def attempt(name: str) -> None:
    """Make the call CALLS names and print what it got."""
    print("trying", name, flush=True)
    try:
        CALLS[name]()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, errno.errorcode[e.errno], flush=True)
