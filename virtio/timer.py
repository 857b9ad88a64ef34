"""A timerfd (timerfd_create(2) through ctypes): a timer an IoThread polls like any eventfd.

Python 3.11 has no os.timerfd_*; a device that must act on its own at intervals (virtio-balloon's
statistics requests) or later (virtio-rng waiting for its rate limit) arms one of these and
registers `fd` with its IoThread (`add_fd(timer.fd, handler)`; the handler calls `consume()`).
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1  # <time.h>
TFD_NONBLOCK = os.O_NONBLOCK  # <sys/timerfd.h>
TFD_CLOEXEC = os.O_CLOEXEC
NSEC = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_create = _libc.timerfd_create
_create.argtypes = [ctypes.c_int, ctypes.c_int]
_create.restype = ctypes.c_int
_settime = _libc.timerfd_settime
_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
_settime.restype = ctypes.c_int


def _timespec(seconds: float) -> _Timespec:
    ns = max(0, round(seconds * NSEC))
    return _Timespec(ns // NSEC, ns % NSEC)


class Timer:
    """A monotonic timerfd: `arm(after, every=0)` fires once after `after` seconds (and then every
    `every` seconds), `disarm()` stops it, `consume()` (in the handler) clears the readiness."""

    def __init__(self):
        fd = _create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd

    def arm(self, after: float, every: float = 0.0) -> None:
        """Fire after `after` seconds (at least 1 ns: 0 would disarm), then every `every` (0: once)."""
        spec = _Itimerspec(_timespec(every), _timespec(after))
        if spec.it_value.tv_sec == 0 and spec.it_value.tv_nsec == 0:
            spec.it_value.tv_nsec = 1
        self._set(spec)

    def disarm(self) -> None:
        self._set(_Itimerspec())

    def _set(self, spec: _Itimerspec) -> None:
        if _settime(self.fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def consume(self) -> int:
        """How many times it fired since the last call (0 if it has not)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
