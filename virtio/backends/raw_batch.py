"""Batch I/O on a disk: many requests per call, each a row of struct iovec over guest memory.

    io = image.open_batch_io()      # a FileBlockIO: io_uring, or preadv / pwritev, as the file allows
    errors = io.transfer(write, iov_addresses, counts, offsets, lengths)    # 0 or -errno each

`BlockBatchIO` is what virtio-blk's ring path (virtio/blk_path.py) needs of a disk.  Request i
moves lengths[i] bytes between the disk at byte offsets[i] and the counts[i] iovecs at
iov_addresses[i]; all the requests of a call are reads (disk to memory), or all writes.  Each request is done
whole or failed: a short transfer is finished, and an O_DIRECT request the kernel refused as
unaligned is bounced, by the backend's one-request methods (RawImage.readv / writev), which own
those rules.  Requests of one call may run in any order, as a disk's requests in flight do: a
caller that needs one done before another puts them in separate calls.

  * FileBlockIO, on an image's file: through one io_uring per queue with the image as its
    registered (fixed) file, each request a READV or WRITEV entry, all of a call submitted and
    reaped with one io_uring_enter - where the file does I/O without blocking when asked to
    (RWF_NOWAIT, probed at open: RawImage.nowait_reads / _writes).  Where it does not (tmpfs,
    so /dev/shm; ext4's buffered writes), io_uring would hand every request to a kernel worker
    thread (io-wq), twice the cost of a preadv of our own on a 4 KiB read: there, and where
    io_uring cannot be had, a loop of libc preadv / pwritev on the iovec rows.  The entries do
    not have RWF_NOWAIT: a read of a block the host has not cached waits in the kernel, not in
    a retry here.  Guest RAM is not registered as fixed buffers: that would pin all of it (the
    balloon could no longer give memory back) and count it against RLIMIT_MEMLOCK.
  * LoopBlockIO: the backend's readv / writev once per request (a backend that is not a file,
    a test's fake).

Apart from raw.py so that numpy and io_uring are loaded only when a device takes the batch path.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from typing import Protocol

import numpy as np

from vmm.io_uring import IORING_OP_READV, IORING_OP_WRITEV, IoUring

from . import BlockBackend
from .iovec import iovec_views
from .raw import _advance

log = logging.getLogger(__name__)

BATCH_RING_ENTRIES = 256  # io_uring submission queue of a disk queue (more requests: several enters)
# each SQE's opcode, for a call of reads / of writes
_OPCODES = (np.full(BATCH_RING_ENTRIES, IORING_OP_READV, dtype=np.uint8),
            np.full(BATCH_RING_ENTRIES, IORING_OP_WRITEV, dtype=np.uint8))

_libc = ctypes.CDLL(None)
_preadv, _pwritev = _libc.preadv, _libc.pwritev  # (over an iovec array we have: os.preadv wants buffers)
for _call in (_preadv, _pwritev):
    _call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    _call.restype = ctypes.c_ssize_t


class BlockBatchIO(Protocol):
    """Many disk requests per call (see the module)."""

    def transfer(self, write: bool, iov_addresses: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                 lengths: np.ndarray) -> np.ndarray:
        """Do every request (all reads, or all writes); per request 0 (all of it done) or -errno (int64)."""
        ...

    def close(self) -> None: ...


def _one(backend: BlockBackend, write: bool, iov_address: int, count: int, offset: int, skip: int = 0) -> int:
    """One request by the backend's readv / writev, from byte `skip` of it on: 0 or -errno."""
    views = iovec_views(iov_address, count)
    if skip:
        views = _advance(views, skip)
    try:
        (backend.writev if write else backend.readv)(views, offset + skip)
    except OSError as err:
        return -(err.errno or errno.EIO)
    return 0


class LoopBlockIO:
    """BlockBatchIO as a plain loop: one backend readv / writev per request."""

    def __init__(self, backend: BlockBackend):
        self._backend = backend

    def transfer(self, write: bool, iov_addresses: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                 lengths: np.ndarray) -> np.ndarray:
        backend = self._backend
        rows = zip(iov_addresses.tolist(), counts.tolist(), offsets.tolist())
        return np.array([_one(backend, write, *row) for row in rows], dtype=np.int64)

    def close(self) -> None:
        pass


class FileBlockIO:
    """BlockBatchIO on the image's file descriptor `fd`: reads, and writes, each through an io_uring
    (see the module) where the file does I/O without blocking when asked to (`uring_reads`,
    `uring_writes`: RawImage.nowait_*), else by a loop of preadv / pwritev (libc's, straight on
    the iovec rows).  Where neither goes through io_uring none is made; where one does and
    io_uring cannot be had (an old kernel, a sandbox), raises OSError."""

    def __init__(self, backend: BlockBackend, fd: int, *, uring_reads: bool, uring_writes: bool):
        self._backend = backend
        self._fd = fd
        self._ring: IoUring | None = None
        self._by_ring = (uring_reads, uring_writes)  # by `write`
        if uring_reads or uring_writes:
            self._ring = IoUring(BATCH_RING_ENTRIES)
            try:
                self._ring.prefill(IORING_OP_READV, fd, rw_flags=0)
            except BaseException:
                self.close()
                raise

    @property
    def engine(self) -> str:
        reads, writes = ("io_uring" if ring else "a loop" for ring in self._by_ring)
        return f"{reads} for reads, {writes} for writes"

    def transfer(self, write: bool, iov_addresses: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                 lengths: np.ndarray) -> np.ndarray:
        if self._by_ring[write]:
            opcodes = _OPCODES[write]
            if len(counts) > len(opcodes):
                opcodes = opcodes[:1].repeat(len(counts))
            results = self._ring.submit_rw(iov_addresses, counts, offsets, opcodes)
        else:
            results = self._loop(write, iov_addresses, counts, offsets)
        short = results != lengths
        if not np.count_nonzero(short):
            return results * 0
        return self._finish(write, results, short, iov_addresses, counts, offsets)

    def _loop(self, write: bool, iov_addresses, counts, offsets) -> np.ndarray:
        """Bytes moved per request, -1 for a failure (which _finish does again, and says why)."""
        fd, call = self._fd, _pwritev if write else _preadv
        rows = zip(iov_addresses.tolist(), counts.tolist(), offsets.tolist())
        return np.array([call(fd, address, count, offset) for address, count, offset in rows], dtype=np.int64)

    def _finish(self, write: bool, results, short, iov_addresses, counts, offsets) -> np.ndarray:
        """The requests not done whole (a short transfer; an error, such as EINVAL for an
        unaligned O_DIRECT request): the rest of each by the backend's one-request way."""
        errors = np.zeros(len(results), dtype=np.int64)
        for i in np.flatnonzero(short).tolist():
            errors[i] = _one(self._backend, write, int(iov_addresses[i]), int(counts[i]), int(offsets[i]),
                             max(int(results[i]), 0))
        return errors

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()  # gives the registered file back (and with it the image's lock)
            self._ring = None


_said_path = False


def open_batch_io(backend: BlockBackend, fd: int, *, nowait_reads: bool, nowait_writes: bool) -> FileBlockIO:
    """The batch I/O of one queue over `backend` (whose file is `fd`; see FileBlockIO).  Which way
    a process moves its disks' requests is logged once."""
    global _said_path
    try:
        io = FileBlockIO(backend, fd, uring_reads=nowait_reads, uring_writes=nowait_writes)
        say, why = log.info, ""
    except OSError as err:
        io = FileBlockIO(backend, fd, uring_reads=False, uring_writes=False)
        say, why = log.warning, f" (io_uring unavailable: {err})"
    if not _said_path:
        _said_path = True
        say("disk %s: batches of requests by %s%s", getattr(backend, "path", "?"), io.engine, why)
    return io
