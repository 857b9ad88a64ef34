"""Batch I/O on a tap queue: many frames per call, each a row of struct iovec over guest memory.

    batch_io = tap.open_batch_io(0)          # a TapBatchIO, or None on a kernel that cannot
    results = batch_io.read_batch(iov_addresses, counts)   # bytes per frame, or -errno

`NetBatchIO` is what virtio-net's ring paths (net_rx.py, net_tx.py) need of a backend's
queue; `TapBatchIO` gives it through io_uring (vmm/io_uring.py), `IovecLoop` as a plain loop
over one-frame readv / writev (a test's fake).  Apart from tap.py so that numpy and io_uring
are loaded only when a device takes the batch path (a VM without a NIC never loads them).
"""

from __future__ import annotations

import ctypes
import errno
from typing import Callable, Protocol, Sequence

import numpy as np

from vmm.io_uring import IORING_OP_READV, IORING_OP_WRITEV, IoUring

from .iovec import iovec_views

BATCH_RING_ENTRIES = 256  # io_uring submission queue of a tap queue's batch I/O

_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.readv  # (over an iovec array a caller built: os.readv wants a list of buffers)
_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_readv.restype = ctypes.c_ssize_t


class NetBatchIO(Protocol):
    """Many frames per call: what a device's batch paths need of a backend's queue.

    A frame is a row of `struct iovec` (16 bytes: address, length) that the device built over
    guest memory; `iov_addresses[i]` is the address of frame i's first iovec, `counts[i]` how
    many it has.  Results are per frame, in order: the bytes read / written, or -errno
    (-EAGAIN: the queue was empty / full; nothing waits).  0 from a read is end of file.
    """

    def read_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One readv per row, in row order; their results (int64)."""
        ...

    def write_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One writev per row, in row order; their results (int64)."""
        ...

    def readv_at(self, iov_address: int, count: int) -> int:
        """One readv over `count` iovecs at `iov_address`; the bytes read, or -errno."""
        ...

    def close(self) -> None: ...


class IovecLoop:
    """NetBatchIO over one-frame readv / writev callables (memoryviews in, bytes out, OSError):
    a plain loop, one call per frame.  For backends without a kernel interface for batches (a
    test's fake); errors come back per frame like io_uring's."""

    def __init__(self, readv: Callable[[Sequence[memoryview]], int], writev: Callable[[Sequence[memoryview]], int]):
        self._readv, self._writev = readv, writev

    def read_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return self._each(self._readv, iov_addresses, counts)

    def write_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return self._each(self._writev, iov_addresses, counts)

    def readv_at(self, iov_address: int, count: int) -> int:
        return self._one(self._readv, iov_address, count)

    def close(self) -> None:
        pass

    def _each(self, op, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        results = [self._one(op, a, c) for a, c in zip(iov_addresses.tolist(), counts.tolist())]
        return np.array(results, dtype=np.int64)

    @staticmethod
    def _one(op, iov_address: int, count: int) -> int:
        try:
            return op(iovec_views(iov_address, count))
        except BlockingIOError:
            return -errno.EAGAIN
        except OSError as err:
            return -(err.errno or errno.EIO)


class TapBatchIO:
    """NetBatchIO on a tap queue's fd: reads and writes through two io_urings (vmm/io_uring.py),
    RWF_NOWAIT so an empty or full queue answers -EAGAIN at once, all of a batch in one
    io_uring_enter; readv_at is a plain readv(2).  Raises OSError where io_uring cannot be had
    (an old kernel, a sandbox) or refuses RWF_NOWAIT on a tap (Linux 6.1: -EOPNOTSUPP)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._reads: IoUring | None = None
        self._writes: IoUring | None = None
        try:
            self._writes = IoUring(BATCH_RING_ENTRIES)
            self._writes.prefill(IORING_OP_WRITEV, fd)
            self._reads = IoUring(BATCH_RING_ENTRIES)
            self._reads.prefill(IORING_OP_READV, fd)
            # On a tap an empty request moves no frame (IoUring.probe).
            if any(ring.probe() == -errno.EOPNOTSUPP for ring in (self._writes, self._reads)):
                raise OSError(errno.EOPNOTSUPP, "this kernel's io_uring refuses non-blocking (RWF_NOWAIT) tap I/O")
        except BaseException:
            self.close()
            raise

    def read_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return self._reads.submit_rw(iov_addresses, counts)

    def write_batch(self, iov_addresses: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return self._writes.submit_rw(iov_addresses, counts)

    def readv_at(self, iov_address: int, count: int) -> int:
        n = _readv(self._fd, iov_address, count)
        return n if n >= 0 else -ctypes.get_errno()

    def close(self) -> None:
        for ring in (self._reads, self._writes):
            if ring is not None:
                ring.close()
        self._reads = self._writes = None
