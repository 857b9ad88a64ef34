"""Batch I/O on a raw image (virtio/backends/raw_batch.py): both engines, and the requests that
the one-request methods finish (short transfers, unaligned O_DIRECT, errors)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import random

import numpy as np
import pytest

from virtio.backends import raw_batch
from virtio.backends.raw import ImageLockedError, RawImage
from virtio.backends.raw_batch import FileBlockIO, LoopBlockIO

# What the host kernel offers here is what these check: they also run on Debian 12's 6.1 in the nested KVM.
pytestmark = pytest.mark.debian12

SIZE = 1 << 20
CONTENT = random.Random(3).randbytes(SIZE)
ENGINES = {"io_uring": (True, True), "loop": (False, False), "uring-reads": (True, False)}


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(CONTENT)
    return path


class Requests:
    """Requests as a device hands them over: rows of struct iovec over a buffer of ours."""

    def __init__(self, pieces, offset_in_buffer=0):
        """pieces: per request, the lengths of its buffers."""
        total = sum(map(sum, pieces))
        self.map = mmap.mmap(-1, total + offset_in_buffer + 4096)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map)) + offset_in_buffer
        self.iov = np.zeros((len(pieces), max(map(len, pieces)), 2), dtype=np.uint64)
        pos = 0
        self.spans = []
        for i, lengths in enumerate(pieces):
            start = pos
            for j, n in enumerate(lengths):
                self.iov[i, j] = (self.base + pos, n)
                pos += n
            self.spans.append((start + offset_in_buffer, pos + offset_in_buffer))
        self.addresses = self.iov.ctypes.data + np.arange(len(pieces), dtype=np.uint64) * np.uint64(self.iov.strides[0])
        self.counts = np.array([len(p) for p in pieces], dtype=np.uint64)
        self.lengths = np.array([sum(p) for p in pieces], dtype=np.int64)

    def data(self, i):
        start, end = self.spans[i]
        return self.map[start:end]

    def fill(self, i, data):
        start, end = self.spans[i]
        self.map[start:end] = data

    def run(self, io, write, offsets):
        return io.transfer(write, self.addresses, self.counts, np.array(offsets, dtype=np.uint64), self.lengths)


def engine(image, name):
    reads, writes = ENGINES[name]
    try:
        return FileBlockIO(image, image.fd, uring_reads=reads, uring_writes=writes)
    except OSError as err:
        pytest.skip(f"io_uring cannot be had here: {err}")


@pytest.mark.parametrize("name", ENGINES)
def test_reads_and_writes_move_the_bytes(image_path, name):
    image = RawImage.open(image_path)
    io = engine(image, name)
    try:
        reqs = Requests([[4096], [512, 3584], [1000, 24, 3072], [512]])
        offsets = [0, 8192, 65536, SIZE - 512]
        assert list(reqs.run(io, False, offsets)) == [0, 0, 0, 0]
        for i, off in enumerate(offsets):
            assert reqs.data(i) == CONTENT[off : off + int(reqs.lengths[i])]
        for i in range(4):
            reqs.fill(i, bytes([i + 1]) * int(reqs.lengths[i]))
        assert list(reqs.run(io, True, offsets)) == [0, 0, 0, 0]
    finally:
        io.close()
        image.close()
    after = image_path.read_bytes()
    for i, off in enumerate(offsets):
        assert after[off : off + int(reqs.lengths[i])] == bytes([i + 1]) * int(reqs.lengths[i])
    assert after[4096:8192] == CONTENT[4096:8192]


@pytest.mark.parametrize("name", ENGINES)
def test_short_transfers_are_finished(image_path, name, monkeypatch):
    """The kernel may move less than asked (a signal, a filesystem's whim): the rest is moved."""
    image = RawImage.open(image_path)
    io = engine(image, name)
    if io._ring is not None:  # the ring says it moved only part of each request
        real = io._ring.submit_rw
        monkeypatch.setattr(io._ring, "submit_rw", lambda *args: np.minimum(real(*args), 700))
    for call in ("_preadv", "_pwritev"):  # at most 700 bytes, from the first buffer only
        real_call = getattr(raw_batch, call)
        monkeypatch.setattr(raw_batch, call, lambda fd, iov, count, off, real_call=real_call: min(
            700, real_call(fd, iov, 1, off)))
    try:
        reqs = Requests([[4096], [512, 3584]])
        assert list(reqs.run(io, False, [4096, 12288])) == [0, 0]
        assert reqs.data(0) == CONTENT[4096:8192] and reqs.data(1) == CONTENT[12288:16384]
        reqs.fill(0, b"\x11" * 4096)
        reqs.fill(1, b"\x22" * 4096)
        assert list(reqs.run(io, True, [0, 8192])) == [0, 0]
    finally:
        io.close()
        image.close()
    after = image_path.read_bytes()
    assert after[:4096] == b"\x11" * 4096 and after[8192:12288] == b"\x22" * 4096


@pytest.mark.parametrize("name", ENGINES)
def test_a_failing_request_fails_alone(image_path, name):
    """A read past the end of the image: -EIO for it, the others done."""
    image = RawImage.open(image_path)
    io = engine(image, name)
    try:
        reqs = Requests([[512], [1024], [512]])
        assert list(reqs.run(io, False, [0, SIZE - 512, 512])) == [0, -errno.EIO, 0]
        assert reqs.data(2) == CONTENT[512:1024]
    finally:
        io.close()
        image.close()


@pytest.mark.parametrize("name", ENGINES)
def test_writes_to_a_read_only_image_are_refused(image_path, name):
    image = RawImage.open(image_path, read_only=True)
    io = engine(image, name)
    try:
        assert list(Requests([[512]]).run(io, True, [0])) == [-errno.EROFS]
    finally:
        io.close()
        image.close()
    assert image_path.read_bytes() == CONTENT


@pytest.mark.parametrize("name", ENGINES)
def test_unaligned_requests_on_o_direct_go_through_the_bounce_buffer(tmp_path, name):
    path = tmp_path / "direct.img"
    path.write_bytes(CONTENT)
    image = RawImage.open(path, cache="none")
    if not image.direct:
        image.close()
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    io = engine(image, name)
    try:
        reqs = Requests([[4096], [4096]], offset_in_buffer=8)  # buffers 8 bytes past a page
        assert list(reqs.run(io, False, [0, 8192])) == [0, 0]
        assert reqs.data(0) == CONTENT[:4096] and reqs.data(1) == CONTENT[8192:12288]
        reqs.fill(0, b"\x33" * 4096)
        assert list(reqs.run(io, True, [4096, 16384])) == [0, 0]
        assert image.bounced >= 3
    finally:
        io.close()
        image.close()
    assert path.read_bytes()[4096:8192] == b"\x33" * 4096


def test_the_nowait_probe_leaves_the_image_as_it_was(image_path, tmp_path):
    for cache in ("writeback", "none"):
        image = RawImage.open(image_path, cache=cache)
        try:
            assert isinstance(image.nowait_reads, bool) and isinstance(image.nowait_writes, bool)
        finally:
            image.close()
        assert image_path.read_bytes() == CONTENT
    image = RawImage.open(image_path, read_only=True)
    image.close()
    assert not image.nowait_writes


def test_the_loop_over_any_backend(image_path):
    """LoopBlockIO: a backend's own readv / writev per request (a backend that is not a file)."""
    image = RawImage.open(image_path)
    io = LoopBlockIO(image)
    try:
        reqs = Requests([[512, 512], [2048]])
        assert list(reqs.run(io, False, [1024, SIZE - 1024])) == [0, -errno.EIO]
        assert reqs.data(0) == CONTENT[1024:2048]
    finally:
        io.close()
        image.close()


def test_closing_the_batch_io_gives_the_image_back(image_path):
    """An io_uring holds its registered file, and so the image's lock, until it is closed."""
    image = RawImage.open(image_path)
    io = engine(image, "io_uring")
    image.close()
    with pytest.raises(ImageLockedError):
        RawImage.open(image_path)
    io.close()
    RawImage.open(image_path).close()
