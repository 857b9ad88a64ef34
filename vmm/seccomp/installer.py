"""Installing the filter: probing what the kernel offers, then seccomp(2) for every thread.

    note = install("kill")      # for good, on every thread of the process; None, or a fallback to tell
    install("off")              # nothing

Modes (--seccomp): what a denied call gets.
  kill   SECCOMP_RET_KILL_PROCESS: the process dies of SIGSYS (the kernel logs the call: audit
         type=1326).  Before Linux 4.14, SECCOMP_RET_KILL_THREAD: only the calling thread dies
         (returned as a note).
  errno  SECCOMP_RET_ERRNO | EPERM: the call fails with EPERM and pyvmm goes on.
  log    SECCOMP_RET_LOG: the call is allowed and the kernel logs it (Linux 4.14): what kill would stop.
  off    no filter.

The order is prctl(PR_SET_NO_NEW_PRIVS) (which lets a process without CAP_SYS_ADMIN install a
filter), then seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC): the threads already
running (device I/O threads, background loads) get it too, and every thread made later inherits
it.  A filter cannot be removed: install once the process does only what it will do from then on.
Where the kernel cannot (no CONFIG_SECCOMP_FILTER, no seccomp(2) before Linux 3.17, a container
that forbids it), SeccompUnavailable says why in one line.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .abi import (PR_GET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_GET_ACTION_AVAIL,
                  SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD, SECCOMP_RET_LOG,
                  SECCOMP_SET_MODE_FILTER, SockFilter, SockFprog)
from .policy import build_filter
from .syscalls import NR

MODES = ("kill", "errno", "log", "off")  # the first is the default

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_libc_prctl = _libc.prctl
_libc_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc_prctl.restype = ctypes.c_int

_installed: str | None = None  # the mode installed in this process


class SeccompUnavailable(Exception):
    """The kernel cannot install the filter; the message is the reason, one line."""


def _prctl(option: int, arg: int) -> tuple[int, int]:
    """prctl(option, arg, 0, 0, 0) -> (return value, errno)."""
    ret = _libc_prctl(option, arg, 0, 0, 0)
    return ret, ctypes.get_errno() if ret < 0 else 0


def _seccomp(op: int, flags: int, arg) -> tuple[int, int]:
    """seccomp(op, flags, arg) -> (return value, errno).  (glibc 2.36 has no wrapper: syscall(2).)"""
    ret = _syscall(ctypes.c_long(NR["seccomp"]), ctypes.c_uint(op), ctypes.c_uint(flags), arg)
    return ret, ctypes.get_errno() if ret < 0 else 0


def action_available(action: int) -> bool:
    """Whether the kernel knows the return action (SECCOMP_GET_ACTION_AVAIL, Linux 4.14; an older
    kernel does not know the operation: EINVAL, then only its original actions are there)."""
    value = ctypes.c_uint32(action)
    ret, err = _seccomp(SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(value))
    if ret == 0:
        return True
    if err == errno.ENOSYS:
        raise SeccompUnavailable("this kernel has no seccomp(2) system call (Linux 3.17)")
    return False


def deny_action(mode: str) -> tuple[int, str | None]:
    """The SECCOMP_RET_* a denied call gets in `mode` on this kernel, and a note if it falls back."""
    if mode == "kill":
        if action_available(SECCOMP_RET_KILL_PROCESS):
            return SECCOMP_RET_KILL_PROCESS, None
        return SECCOMP_RET_KILL_THREAD, ("this kernel cannot kill a process from a seccomp filter (Linux 4.14): "
                                         "a denied system call ends only the thread that made it")
    if mode == "errno":
        action_available(SECCOMP_RET_ERRNO)  # (only to find out that there is no seccomp(2) at all)
        return SECCOMP_RET_ERRNO | errno.EPERM, None
    if mode == "log":
        if action_available(SECCOMP_RET_LOG):
            return SECCOMP_RET_LOG, None
        raise SeccompUnavailable("this kernel cannot log from a seccomp filter (SECCOMP_RET_LOG: Linux 4.14)")
    raise ValueError(f"unknown seccomp mode {mode!r} (known: {', '.join(MODES)})")


def installed() -> str | None:
    """The mode install() put in place in this process, or None."""
    return _installed


def install(mode: str) -> str | None:
    """Install the filter for `mode` (one of MODES) on every thread of this process, once: a
    second call does nothing.  Returns a note for the user when the kernel made it fall back, else
    None; raises SeccompUnavailable when the kernel cannot filter (nothing is installed then)."""
    global _installed
    if mode == "off" or _installed is not None:
        return None
    ret, err = _prctl(PR_GET_SECCOMP, 0)
    if ret < 0 and err == errno.EINVAL:
        raise SeccompUnavailable("this kernel was built without seccomp (CONFIG_SECCOMP)")
    action, note = deny_action(mode)
    program = build_filter(action)
    insns = (SockFilter * len(program))(*program)
    prog = SockFprog(len(program), ctypes.cast(insns, ctypes.POINTER(SockFilter)))
    ret, err = _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if ret < 0:
        raise SeccompUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)} (Linux 3.5)")
    ret, err = _seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(prog))
    if ret > 0:  # TSYNC: the id of a thread that could not take it (it has a filter of its own)
        raise SeccompUnavailable(f"thread {ret} of this process has a seccomp filter of its own: none installed")
    if ret < 0:
        raise SeccompUnavailable(_refusal(err))
    _installed = mode
    return note


def _refusal(err: int) -> str:
    if err == errno.ENOSYS:
        return "this kernel has no seccomp(2) system call (Linux 3.17)"
    if err == errno.EINVAL:
        return "this kernel refused the filter (EINVAL): it was built without CONFIG_SECCOMP_FILTER"
    return f"seccomp(SECCOMP_SET_MODE_FILTER) failed: {os.strerror(err)}"
