"""The name the host sees for a thread (`top -H`, `ps -L`, /proc/PID/task/TID/comm).

Python's threading names live in Python only; prctl(PR_SET_NAME) gives the
kernel's copy, so a user can see which thread is vcpu0 and which a device's
I/O thread, and pin them (taskset -p) as one pins QEMU's "CPU 0/KVM".
"""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15  # <linux/prctl.h>
TASK_COMM_LEN = 16  # with its NUL

_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def set_os_thread_name(name: str) -> None:
    """Name the calling thread for the host (cut to 15 bytes; failure is harmless and ignored)."""
    _prctl(PR_SET_NAME, name.encode("utf-8", "replace")[: TASK_COMM_LEN - 1], 0, 0, 0)
