"""Rows of `struct iovec` (16 bytes: address, length) that a device built over guest memory.

A batch backend (tap_batch.py, raw_batch.py) hands each row to the kernel as it is; where one
request must go the one-at-a-time way (a fallback, a retry), `iovec_views` gives its buffers
as memoryviews, without a copy.
"""

from __future__ import annotations

import ctypes


def iovec_views(iov_address: int, count: int) -> list[memoryview]:
    """The buffers of `count` struct iovecs at `iov_address`, as memoryviews (no copy)."""
    rows = (ctypes.c_uint64 * (2 * count)).from_address(iov_address)
    return [memoryview((ctypes.c_char * rows[2 * i + 1]).from_address(rows[2 * i])).cast("B") for i in range(count)]
