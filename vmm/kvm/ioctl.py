"""The ioctl(2) system call through ctypes, and Linux's _IO/_IOR/_IOW/_IOWR numbers.

ctypes releases the GIL around foreign calls, so a vCPU thread blocked in
KVM_RUN lets every other Python thread run.  (The fcntl module would not.)
"""

from __future__ import annotations

import ctypes
import errno
import os

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _size(struct) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(struct))


def _IOW(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(struct))


def _IOWR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(struct))


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int


class IoctlError(OSError):
    """An ioctl failed; the message names it and the errno."""

    def __init__(self, name: str, err: int):
        super().__init__(err, f"{name}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        self.name = name


def ioctl(fd: int, request: int, arg=0, *, name: str = "ioctl") -> int:
    """ioctl(fd, request, arg); arg is an int or a ctypes object (passed by reference)."""
    if isinstance(arg, int):
        carg = ctypes.c_ulong(arg)
    else:
        carg = ctypes.byref(arg)
    ret = _libc_ioctl(fd, ctypes.c_ulong(request), carg)
    if ret < 0:
        raise IoctlError(name, ctypes.get_errno())
    return ret
