"""io_uring: many reads and writes submitted, and their results collected, in one system call.

    ring = IoUring(256)
    ring.prefill(IORING_OP_WRITEV, fd)    # every SQE: a writev on fd
    res = ring.submit_rw(iov_addresses, iov_counts)   # one writev per row, all in one system call
                                          # (more when rows outnumber the SQ); bytes or -errno each

What the kernel does is in include/uapi/linux/io_uring.h and io_uring_setup(2) /
io_uring_enter(2).  The submission queue (SQ) is a ring of indexes into an
array of 64-byte submission entries (SQEs); the completion queue (CQ) a ring of
16-byte completion entries (CQEs); both rings and the SQE array are shared with
the kernel through mmap.  The application owns the SQ tail and the CQ head; the
kernel the SQ head and the CQ tail.  On x86 plain loads and stores are ordered
enough (stores are not reordered with stores, loads not with loads): the SQEs
are written before the SQ tail that publishes them, the CQEs read after the CQ
tail that says they are there.

Here SQ slot i always names SQE i (the index array is filled once), so the
entries a batch uses are consecutive in the SQE array (in two runs where the
ring wraps), and a ring does one kind of request on one file (`prefill`), so a
batch writes three columns: the iovec's address, its length, and the row number
(user_data) by which each completion finds its request.  That file is
registered with the ring (IORING_REGISTER_FILES): the kernel looks it up once,
not once per request.

Devices use it to move a whole virtqueue batch with one system call: each SQE
is a readv or writev whose iovec points straight into guest memory, so the
kernel's work per frame is what it would be for os.readv / os.writev, and
Python's per-frame work is none (the SQEs are filled as numpy columns).

(No `fcntl` module: the two system calls through ctypes, like KVM's ioctls.)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

# <asm/unistd_64.h>
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427

# struct io_uring_params offsets for mmap
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0

# io_uring_register opcodes
IORING_REGISTER_FILES = 2
IORING_UNREGISTER_FILES = 3

# io_uring_sqe.flags
IOSQE_FIXED_FILE = 1 << 0  # fd is an index into the ring's registered files

# enum io_uring_op
IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2

# <linux/fs.h> RWF_*: per-request flags of a read or write (an SQE's rw_flags)
RWF_NOWAIT = 0x08  # return -EAGAIN rather than wait (else io_uring waits for the file to be ready)

# A file position of -1: "the current position", what a stream (a tap, a socket) has anyway.
CURRENT_POSITION = (1 << 64) - 1


class _SqringOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqringOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class IoUringParams(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqringOffsets),
        ("cq_off", _CqringOffsets),
    ]


assert ctypes.sizeof(IoUringParams) == 120

# struct io_uring_sqe, the fields readv / writev use (64 bytes)
SQE = np.dtype(
    {
        "names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data"],
        "formats": ["u1", "u1", "<u2", "<i4", "<u8", "<u8", "<u4", "<u4", "<u8"],
        "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32],
        "itemsize": 64,
    }
)
# struct io_uring_cqe (16 bytes)
CQE = np.dtype({"names": ["user_data", "res", "flags"], "formats": ["<u8", "<i4", "<u4"], "itemsize": 16})

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class IoUringError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise IoUringError(err, f"{what}: {os.strerror(err)}")
    return ret


class IoUring:
    """One io_uring instance with `entries` SQ slots (a power of 2) and twice as many CQ slots."""

    def __init__(self, entries: int):
        params = IoUringParams()
        self.fd = _check(_syscall(NR_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(params)), "io_uring_setup")
        self._maps: list[mmap.mmap] = []
        try:
            if not params.features & IORING_FEAT_SINGLE_MMAP:
                raise IoUringError(0, "io_uring: the kernel lacks IORING_FEAT_SINGLE_MMAP (Linux 5.4+)")
            sq, cq = params.sq_off, params.cq_off
            self.sq_entries, self.cq_entries = params.sq_entries, params.cq_entries
            rings_size = max(sq.array + 4 * params.sq_entries, cq.cqes + CQE.itemsize * params.cq_entries)
            rings = self._map(rings_size, IORING_OFF_SQ_RING)
            sqes = self._map(SQE.itemsize * params.sq_entries, IORING_OFF_SQES)
            u32 = np.frombuffer(rings, dtype="<u4")
            self._sq_head, self._sq_tail = u32[sq.head // 4 : sq.head // 4 + 1], u32[sq.tail // 4 : sq.tail // 4 + 1]
            self._cq_head, self._cq_tail = u32[cq.head // 4 : cq.head // 4 + 1], u32[cq.tail // 4 : cq.tail // 4 + 1]
            self._sq_mask = int(u32[sq.ring_mask // 4])
            self._cq_mask = int(u32[cq.ring_mask // 4])
            array = u32[sq.array // 4 : sq.array // 4 + params.sq_entries]
            array[:] = np.arange(params.sq_entries, dtype="<u4")  # slot i -> SQE i, for good
            self.sqes = np.frombuffer(sqes, dtype=SQE)
            self.cqes = np.frombuffer(rings, dtype=CQE, count=params.cq_entries, offset=cq.cqes)
        except BaseException:
            self.close()
            raise
        self._tail = int(self._sq_tail[0])  # ours: the next SQ slot to fill
        self._registered = False
        self._rows = np.arange(self.sq_entries, dtype=np.uint64)

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=offset)
        self._maps.append(m)
        return m

    # -- submission -----------------------------------------------------------------
    def prefill(self, opcode: int, fd: int, rw_flags: int = RWF_NOWAIT, position: int = CURRENT_POSITION) -> None:
        """Make every SQE `opcode` on `fd` with `rw_flags` at `position`: a ring that only ever
        does one kind of request fills in just addr, len and user_data per request (submit_rw).

        RWF_NOWAIT by default: a read of an empty tap, or a write to a full one, completes at
        once with -EAGAIN.  (io_uring ignores a file's O_NONBLOCK where the file can be polled:
        without the flag such a request would wait, armed on the file's poll, for a frame.)

        `fd` becomes the ring's one registered file (the ring holds the file until close() or
        the next prefill)."""
        self._unregister()
        files = (ctypes.c_int32 * 1)(fd)
        _check(_syscall(NR_IO_URING_REGISTER, self.fd, IORING_REGISTER_FILES, files, 1), "IORING_REGISTER_FILES")
        self._registered = True
        self.sqes[:] = np.zeros((), dtype=SQE)
        self.sqes["opcode"] = opcode
        self.sqes["flags"] = IOSQE_FIXED_FILE
        self.sqes["fd"] = 0
        self.sqes["off"] = position
        self.sqes["rw_flags"] = rw_flags

    def probe(self) -> int:
        """Run one prefilled request over an empty iovec array; its result (bytes, or -errno).

        On a tap it moves no frame: a read into no buffers returns 0 (or -EAGAIN) and a write
        shorter than the vnet header is refused (-EINVAL); on a datagram socket it would send or
        consume an empty message, so callers probe taps only.  What it tells is whether the kernel accepts the
        prefilled flags for this file at all: Linux 6.1 (Debian 12) answers -EOPNOTSUPP for
        RWF_NOWAIT on a tap, whose file it does not mark FMODE_NOWAIT; later kernels do."""
        iovec = np.zeros(2, dtype=np.uint64)  # one struct iovec, never read (length 0)
        return int(self.submit_rw(np.array([iovec.ctypes.data], dtype=np.uint64), np.zeros(1, dtype=np.uint64))[0])

    def submit_rw(self, addrs: np.ndarray, lengths: np.ndarray, offsets: np.ndarray | None = None,
                  opcodes: np.ndarray | None = None) -> np.ndarray:
        """Run one prefilled request per row (readv / writev: addr is an iovec array's address,
        len its entries) and wait for them all; their results (bytes, or -errno) in row order.
        `offsets` (file positions) and `opcodes` (IORING_OP_READV / WRITEV), where given, are
        per row too (a disk's requests); else prefill's.

        The requests are issued in row order, as many per io_uring_enter as the SQ has room for;
        with RWF_NOWAIT (prefill's default) each completes at once, -EAGAIN when it would wait.
        (They may run in any order: a caller that needs one before another submits it first.)"""
        count = len(addrs)
        results = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            n = min(count - done, self.sq_entries - ((self._tail - int(self._sq_head[0])) & 0xFFFFFFFF))
            start = self._tail & self._sq_mask
            first = min(n, self.sq_entries - start)  # the SQEs up to the end of the array, then from 0
            for sqes, rows in ((self.sqes[start : start + first], slice(0, first)),
                               (self.sqes[: n - first], slice(first, n))):
                if len(sqes):
                    sqes["addr"] = addrs[done:][rows]
                    sqes["len"] = lengths[done:][rows]
                    sqes["user_data"] = self._rows[rows]  # which of these n requests
                    if offsets is not None:
                        sqes["off"] = offsets[done:][rows]
                    if opcodes is not None:
                        sqes["opcode"] = opcodes[done:][rows]
            self._submit(n, n)
            got = 0
            while got < n:
                cqes = self.completions()
                if not len(cqes):
                    self._submit(0, n - got)  # (not reached with RWF_NOWAIT) wait for the rest
                    continue
                results[done + cqes["user_data"].astype(np.int64)] = cqes["res"]
                got += len(cqes)
                self.consume(len(cqes))
            done += n
        return results

    def _submit(self, count: int, wait: int) -> int:
        """Publish `count` filled SQEs and enter the kernel: submit them, and wait until `wait`
        completions are there.  Returns how many the kernel took."""
        self._tail = (self._tail + count) & 0xFFFFFFFF
        self._sq_tail[0] = self._tail  # after the SQEs: x86 keeps stores in order
        flags = IORING_ENTER_GETEVENTS if wait else 0
        while True:
            ret = _syscall(NR_IO_URING_ENTER, self.fd, count, wait, flags, None, 0)
            if ret >= 0:
                if ret != count:
                    raise IoUringError(0, f"io_uring_enter took {ret} of {count} requests")
                return ret
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise IoUringError(err, f"io_uring_enter: {os.strerror(err)}")

    # -- completion -----------------------------------------------------------------
    def completions(self) -> np.ndarray:
        """The CQEs there now (at most the run up to the end of the CQ array); consume() them."""
        head = int(self._cq_head[0])
        ready = (int(self._cq_tail[0]) - head) & 0xFFFFFFFF
        start = head & self._cq_mask
        return self.cqes[start : start + min(ready, self.cq_entries - start)]

    def consume(self, count: int) -> None:
        self._cq_head[0] = (int(self._cq_head[0]) + count) & 0xFFFFFFFF

    def _unregister(self) -> None:
        """Give the registered file back now (the kernel would at the ring's exit, later)."""
        if self._registered:
            self._registered = False
            _check(_syscall(NR_IO_URING_REGISTER, self.fd, IORING_UNREGISTER_FILES, None, 0), "IORING_UNREGISTER_FILES")

    def close(self) -> None:
        if self.fd >= 0:
            self._unregister()
        self.sqes = self.cqes = None
        self._sq_head = self._sq_tail = self._cq_head = self._cq_tail = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a numpy view still alive somewhere: the mapping goes with it
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
