"""The raw image backend (virtio/backends/raw.py): opening, locking, I/O, cache=none."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import subprocess
import sys
import textwrap

import pytest

from virtio.backends import raw
from virtio.backends.raw import ImageError, ImageLockedError, RawImage

# What the host kernel offers here is what these check: they also run on Debian 12's 6.1 in the nested KVM.
pytestmark = pytest.mark.debian12

SIZE = 1 << 20


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(2).randbytes(SIZE))
    return path


@pytest.fixture
def opened():
    images = []

    def open_(*args, **kwargs):
        image = RawImage.open(*args, **kwargs)
        images.append(image)
        return image

    yield open_
    for image in images:
        image.close()


def aligned_buffer(length, offset=0):
    """A writable view of an anonymous mapping (page-aligned), starting `offset` bytes in."""
    m = mmap.mmap(-1, length + offset + 4096)
    return memoryview(m)[offset : offset + length]


# -- opening ---------------------------------------------------------------------------------


def test_open_reports_size_and_blocks(opened, image_path):
    image = opened(image_path)
    assert image.size == SIZE
    assert not image.read_only and not image.direct and image.cache == "writeback"
    assert image.logical_block_size == 512
    assert image.physical_block_size >= 512
    assert image.physical_block_size & (image.physical_block_size - 1) == 0
    assert image.fd >= 0 and not os.get_inheritable(image.fd)


def test_missing_image(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        RawImage.open(tmp_path / "nope.img")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        RawImage.open(tmp_path)


def test_character_device_is_not_an_image():
    with pytest.raises(ImageError, match="not a regular file or a block device"):
        RawImage.open("/dev/null")


def test_permission_denied(image_path, monkeypatch):
    real_open = os.open

    def no_write_permission(path, flags, *args):  # as for a non-root user and a 0444 file
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_write_permission)
    with pytest.raises(ImageError, match="no permission to open disk image .*readonly=on"):
        RawImage.open(image_path)
    RawImage.open(image_path, read_only=True).close()


def test_bad_cache_mode(image_path):
    with pytest.raises(ValueError, match="cache mode"):
        RawImage.open(image_path, cache="unsafe")


def test_size_not_a_multiple_of_512(opened, tmp_path, caplog):
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * (4096 + 100))
    with caplog.at_level(logging.WARNING):
        image = opened(path)
    assert image.size == 4096
    assert "not a multiple of 512" in caplog.text


# -- locking -----------------------------------------------------------------------------------


def test_two_writers_conflict(opened, image_path):
    opened(image_path)
    with pytest.raises(ImageLockedError, match="in use by another VM"):
        RawImage.open(image_path)


def test_readers_share(opened, image_path):
    opened(image_path, read_only=True)
    opened(image_path, read_only=True)


def test_writer_and_reader_conflict(opened, image_path):
    writer = opened(image_path)
    with pytest.raises(ImageLockedError):
        RawImage.open(image_path, read_only=True)
    writer.close()
    opened(image_path, read_only=True)
    with pytest.raises(ImageLockedError):
        RawImage.open(image_path)


def test_lock_released_on_close(image_path):
    RawImage.open(image_path).close()
    RawImage.open(image_path).close()


def test_lock_across_processes(opened, image_path):
    opened(image_path)
    code = textwrap.dedent(
        f"""
        import sys
        from virtio.backends.raw import RawImage, ImageLockedError
        try:
            RawImage.open({str(image_path)!r}, read_only=True)
        except ImageLockedError as err:
            print(err)
            sys.exit(3)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "in use by another VM" in result.stdout


def test_failed_lock_leaves_no_fd(opened, image_path):
    opened(image_path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ImageLockedError):
            RawImage.open(image_path)
    assert len(os.listdir("/proc/self/fd")) == before


# -- I/O ------------------------------------------------------------------------------------------


def test_readv_writev_roundtrip(opened, image_path):
    image = opened(image_path)
    data = os.urandom(3000)
    views = [memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:1001])), memoryview(bytearray(data[1001:]))]
    image.writev(views, 12345)
    assert image_path.read_bytes()[12345 : 12345 + 3000] == data
    out = [memoryview(bytearray(n)) for n in (7, 2000, 993)]
    image.readv(out, 12345)
    assert b"".join(bytes(v) for v in out) == data


def test_short_transfers_are_retried(opened, image_path, monkeypatch):
    image = opened(image_path)
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def short(real):
        def call(fd, views, offset):
            calls.append(len(views))
            return real(fd, [views[0][:333]], offset)

        return call

    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    data = os.urandom(4096)
    image.writev([memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:]))], 512)
    out = [memoryview(bytearray(4000)), memoryview(bytearray(96))]
    image.readv(out, 512)
    monkeypatch.undo()
    assert len(calls) > 20
    assert b"".join(bytes(v) for v in out) == data
    assert image_path.read_bytes()[512 : 512 + 4096] == data


def test_more_views_than_iov_max(opened, image_path):
    image = opened(image_path)
    n = raw.IOV_MAX + 300
    data = os.urandom(n * 8)
    image.writev([memoryview(bytearray(data[i * 8 : i * 8 + 8])) for i in range(n)], 0)
    assert image_path.read_bytes()[: n * 8] == data
    out = [memoryview(bytearray(8)) for _ in range(n)]
    image.readv(out, 0)
    assert b"".join(bytes(v) for v in out) == data


def test_read_past_the_end_is_an_error(opened, image_path):
    image = opened(image_path)
    with pytest.raises(OSError) as info:
        image.readv([memoryview(bytearray(1024))], SIZE - 512)
    assert info.value.errno == errno.EIO


def test_flush_is_fdatasync(opened, image_path, monkeypatch):
    image = opened(image_path)
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    image.flush()
    assert synced == [image.fd]


def test_read_only_image_refuses_writes(opened, image_path):
    image = opened(image_path, read_only=True)
    assert image.read_only and not image.supports_discard
    for call in (
        lambda: image.writev([memoryview(bytearray(512))], 0),
        lambda: image.discard(0, 4096),
        lambda: image.write_zeroes(0, 4096, False),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EROFS
    image.flush()  # nothing to flush, not an error


def test_discard_punches_a_hole(opened, image_path):
    image = opened(image_path)
    if not image.supports_discard:
        pytest.skip("the filesystem of tmp_path cannot punch holes")
    before = os.stat(image_path).st_blocks
    image.discard(65536, 262144)
    assert os.stat(image_path).st_blocks * 512 <= before * 512 - 262144
    assert os.path.getsize(image_path) == SIZE
    assert image_path.read_bytes()[65536 : 65536 + 262144] == bytes(262144)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(opened, image_path, unmap):
    image = opened(image_path)
    before = image_path.read_bytes()
    image.write_zeroes(1000, 70000, unmap)
    after = image_path.read_bytes()
    assert after[1000:71000] == bytes(70000)
    assert after[:1000] == before[:1000] and after[71000:] == before[71000:]


def test_write_zeroes_without_fallocate(opened, image_path, monkeypatch):
    def no_fallocate(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    image = opened(image_path)
    monkeypatch.setattr(raw, "fallocate", no_fallocate)
    monkeypatch.setattr(raw, "BOUNCE_SIZE", 8192)  # several pieces
    image.write_zeroes(512, 50000, True)
    assert image_path.read_bytes()[512:50512] == bytes(50000)
    assert not image.supports_discard  # learnt
    image.discard(0, 4096)  # a hint that cannot be followed: no error, nothing happens


# -- cache=none (O_DIRECT) -------------------------------------------------------------------------


@pytest.fixture
def direct_image(opened, image_path):
    image = opened(image_path, cache="none")
    if not image.direct:
        pytest.skip("tmp_path does not do O_DIRECT")
    return image


def test_direct_aligned_request_goes_straight(direct_image, image_path):
    data = os.urandom(8192)
    buf = aligned_buffer(8192)
    buf[:] = data
    direct_image.writev([buf[:4096], buf[4096:]], 4096)
    out = aligned_buffer(8192)
    direct_image.readv([out], 4096)
    assert bytes(out) == data
    assert direct_image.bounced == 0
    assert image_path.read_bytes()[4096:12288] == data


def test_direct_unaligned_memory_bounces(direct_image, image_path):
    data = os.urandom(4096)
    src = aligned_buffer(4096, offset=1)
    src[:] = data
    direct_image.writev([src], 8192)
    assert direct_image.bounced == 1
    out = aligned_buffer(4096, offset=3)
    direct_image.readv([out], 8192)
    assert direct_image.bounced == 2
    assert bytes(out) == data
    assert image_path.read_bytes()[8192 : 8192 + 4096] == data


def test_direct_read_only_source_bounces(direct_image, image_path):
    direct_image.writev([memoryview(b"\x5a" * 4096)], 0)
    assert direct_image.bounced == 1
    assert image_path.read_bytes()[:4096] == b"\x5a" * 4096


def test_direct_unaligned_ranges_match_buffered(opened, direct_image, tmp_path, image_path, monkeypatch):
    """Random unaligned reads and writes through the bounce buffer (several pieces each) agree with a model."""
    monkeypatch.setattr(raw, "BOUNCE_SIZE", 16384)
    direct_image._bounce = None
    model = bytearray(image_path.read_bytes())
    rng = random.Random(3)
    for _ in range(60):
        offset = rng.randrange(0, SIZE - 40000)
        length = rng.randrange(1, 40000)
        cuts = sorted(rng.sample(range(1, length), min(3, length - 1))) if length > 1 else []
        bounds = [0, *cuts, length]
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            views = [memoryview(bytearray(data[a:b])) for a, b in zip(bounds, bounds[1:])]
            direct_image.writev(views, offset)
            model[offset : offset + length] = data
        else:
            views = [memoryview(bytearray(b - a)) for a, b in zip(bounds, bounds[1:])]
            direct_image.readv(views, offset)
            assert b"".join(bytes(v) for v in views) == model[offset : offset + length]
    assert direct_image.bounced == 60
    assert image_path.read_bytes() == bytes(model)


def test_direct_size_rounded_to_the_alignment(opened, tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\1" * (65536 + 512))
    image = opened(path, cache="none")
    if not image.direct:
        pytest.skip("tmp_path does not do O_DIRECT")
    assert image.size % image.offset_align == 0
    assert image.size in (65536, 65536 + 512)


def test_direct_refused_falls_back_to_buffered(opened, image_path, monkeypatch, caplog):
    """tmpfs (/dev/shm) before Linux 6.6 answers O_DIRECT with EINVAL: buffered I/O, with a warning."""
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING):
        image = opened(image_path, cache="none")
    assert not image.direct and image.cache == "writeback"
    assert "does not support O_DIRECT" in caplog.text
    data = os.urandom(1000)
    image.writev([memoryview(bytearray(data))], 7)
    assert image_path.read_bytes()[7:1007] == data


def test_dev_shm_cache_none():
    """On /dev/shm cache=none works: O_DIRECT where tmpfs has it (Linux 6.6+), else buffered."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/pyvmm-test-{os.getpid()}.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    try:
        with RawImage.open(path, cache="none") as image:
            data = os.urandom(5000)
            image.writev([memoryview(bytearray(data))], 100)  # unaligned: bounced if direct
            out = memoryview(bytearray(5000))
            image.readv([out], 100)
            assert bytes(out) == data
            assert image.cache == ("none" if image.direct else "writeback")
    finally:
        os.unlink(path)
