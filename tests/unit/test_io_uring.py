"""vmm/io_uring.py: batches of readv / writev through a real io_uring, on socketpairs."""

from __future__ import annotations

import ctypes
import functools
import errno
import os
import socket

import numpy as np
import pytest

from vmm.io_uring import IORING_OP_READV, IORING_OP_WRITEV, IoUring

# What the host kernel offers here is what these check: they also run on Debian 12's 6.1 in the nested KVM.
pytestmark = pytest.mark.debian12


def iovecs(buffers: list[list[bytearray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One iovec row per request: (the array, each row's address, each row's entries)."""
    width = max(len(b) for b in buffers)
    iov = np.zeros((len(buffers), width, 2), dtype=np.uint64)
    for i, row in enumerate(buffers):
        for j, buf in enumerate(row):
            iov[i, j] = (ctypes.addressof(ctypes.c_char.from_buffer(buf)), len(buf))
    addrs = iov.ctypes.data + np.arange(len(buffers), dtype=np.uint64) * np.uint64(iov.strides[0])
    return iov, addrs, np.array([len(b) for b in buffers], dtype=np.uint32)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


@functools.lru_cache(maxsize=1)
def kernel_takes_nowait_on_sockets() -> bool:
    """Whether this kernel's io_uring accepts RWF_NOWAIT (prefill's default) for a socket: Linux 6.1
    (Debian 12) refuses it (-EOPNOTSUPP) for files not marked FMODE_NOWAIT, taps and sockets alike;
    later kernels take it.  (A read probe of an empty socket moves nothing.)"""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r = IoUring(2)
    try:
        a.setblocking(False)
        r.prefill(IORING_OP_READV, a.fileno())
        return r.probe() != -errno.EOPNOTSUPP
    finally:
        r.close()
        a.close()
        b.close()


@pytest.fixture
def needs_nowait():
    if not kernel_takes_nowait_on_sockets():
        pytest.skip("this kernel's io_uring refuses RWF_NOWAIT on sockets (Linux 6.1): pyvmm probes it and moves "
                    "frames one system call at a time there (test_a_kernel_that_refuses_nowait_says_so_per_request)")


@pytest.fixture
def ring():
    """A ring of 4 SQEs (fewer than most tests' rows: several io_uring_enter a batch), closed after."""
    r = IoUring(4)
    yield r
    r.close()


def test_writev_batch_sends_each_row_as_one_message_in_order(pair, ring, needs_nowait):
    a, b = pair
    ring.prefill(IORING_OP_WRITEV, a.fileno())
    rows = [[bytearray(b"head%d-" % i), bytearray(b"body" * (i + 1))] for i in range(20)]  # > the SQ
    iov, addrs, counts = iovecs(rows)
    results = ring.submit_rw(addrs, counts)
    assert list(results) == [sum(len(x) for x in r) for r in rows]
    for r in rows:
        assert b.recv(1000) == b"".join(r)


def test_readv_batch_fills_rows_and_says_eagain_when_empty(pair, ring, needs_nowait):
    a, b = pair
    ring.prefill(IORING_OP_READV, a.fileno())
    for i in range(3):
        b.send(b"frame%d" % i + b"x" * i)
    rows = [[bytearray(3), bytearray(20)] for _ in range(6)]
    iov, addrs, counts = iovecs(rows)
    results = ring.submit_rw(addrs, counts)  # six reads, three frames: no waiting
    assert list(results[:3]) == [6, 7, 8]
    assert list(results[3:]) == [-errno.EAGAIN] * 3
    assert [bytes(r[0] + r[1])[: results[i]] for i, r in enumerate(rows[:3])] == [b"frame0", b"frame1x", b"frame2xx"]


def test_errors_come_back_per_request(pair, ring, needs_nowait):
    a, b = pair
    ring.prefill(IORING_OP_WRITEV, a.fileno())
    b.shutdown(socket.SHUT_RD)
    iov, addrs, counts = iovecs([[bytearray(b"x")], [bytearray(b"y")]])
    assert list(ring.submit_rw(addrs, counts)) == [-errno.EPIPE, -errno.EPIPE]


def test_batches_that_wrap_the_ring_keep_row_order(pair, ring, needs_nowait):
    a, b = pair
    ring.prefill(IORING_OP_WRITEV, a.fileno())
    sent = []
    for batch in range(5):  # 3 rows a batch on 4 slots: most batches wrap the SQE array
        rows = [[bytearray(b"b%dr%d" % (batch, i))] for i in range(3)]
        iov, addrs, counts = iovecs(rows)
        assert list(ring.submit_rw(addrs, counts)) == [len(r[0]) for r in rows]
        sent += [bytes(r[0]) for r in rows]
    assert [b.recv(100) for _ in sent] == sent


def test_the_registered_file_is_held_until_close(pair, ring, needs_nowait):
    """prefill registers the file with the ring: the requests work after the caller closed its
    fd, and close() gives the file back (the peer then sees the end)."""
    a, b = pair
    fd = os.dup(a.fileno())
    ring.prefill(IORING_OP_WRITEV, fd)
    os.close(fd)
    a.close()  # no fd of ours is left on this end: only the ring holds it
    rows = [[bytearray(b"still")]]
    iov, addrs, counts = iovecs(rows)
    assert list(ring.submit_rw(addrs, counts)) == [5]
    assert b.recv(100) == b"still"
    ring.close()
    assert b.recv(100) == b""  # the last reference went with the ring


def test_a_kernel_that_refuses_nowait_says_so_per_request(pair, ring):
    """Where the kernel refuses RWF_NOWAIT for the file, each request of a batch comes back
    -EOPNOTSUPP (nothing is sent, nothing hangs): what virtio-net's probe goes by.  Elsewhere a read
    probe of an empty socket completes at once (0 bytes into no buffers, or -EAGAIN)."""
    a, b = pair
    if kernel_takes_nowait_on_sockets():
        ring.prefill(IORING_OP_READV, a.fileno())
        assert ring.probe() in (0, -errno.EAGAIN)
        return
    ring.prefill(IORING_OP_WRITEV, a.fileno())
    iov, addrs, counts = iovecs([[bytearray(b"x")], [bytearray(b"yy")], [bytearray(b"zzz")]])
    assert list(ring.submit_rw(addrs, counts)) == [-errno.EOPNOTSUPP] * 3
    b.settimeout(0.2)
    with pytest.raises(TimeoutError):
        b.recv(100)
