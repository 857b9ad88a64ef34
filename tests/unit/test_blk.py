"""virtio-blk (virtio/blk.py): config space, every request type against a temp image, the I/O threads."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from dataclasses import dataclass

import pytest

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.backends import raw
from virtio.backends.raw import RawImage
from virtio.blk import (
    DISCARD_SEGMENT,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    REQ_HEADER,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlk,
)
from virtio.device import (
    CONFIG,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
)
from virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from vmm.config import DiskSpec, parse_disk_spec
from vmm.memory import MiB, GuestMemory
from vmm.virtio_devices import build_disk

IMAGE_SECTORS = 2048  # a 1 MiB image
QUEUE_SIZE = 64
UNTOUCHED = 0xEE  # what device-writable buffers hold before the device writes them


@pytest.fixture
def mem():
    with GuestMemory(32 * MiB) as m:
        yield m


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(1).randbytes(IMAGE_SECTORS * 512))
    return path


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def feature(dev, bit):
    return bool(dev.device_features >> bit & 1)


def split_lengths(total, pieces):
    """Lengths `pieces` (a list, or None for one piece), with the remainder as a last piece."""
    out = [p for p in (pieces or []) if p]
    rest = total - sum(out)
    assert rest >= 0
    if rest or not out:
        out.append(rest)
    return [n for n in out if n] if total else []


@dataclass
class Request:
    head: int
    status: int | None  # gpa of the status byte
    data_in: list[tuple[int, int]]  # device-writable data buffers


class Driver:
    """A virtio-blk driver's side of one queue: builds requests as chains (direct or indirect)."""

    def __init__(self, mem, dev, index=0, *, size=QUEUE_SIZE, base=0):
        self.mem = mem
        self.dev = dev
        self.mq = MockSplitQueue(mem, size, base=base, data_base=base + 0x100000)
        q = dev.queues[index]
        q.size, q.desc_table, q.avail_ring, q.used_ring = size, self.mq.desc_table, self.mq.avail_ring, self.mq.used_ring
        q.indirect = True
        self.queue = q
        self.index = index

    def ready(self, *, event_idx=False):
        self.queue.event_idx = event_idx
        self.queue.ready = True
        return self

    def buffer(self, data=None, length=None, *, align=8):
        length = len(data) if data is not None else length
        gpa = self.mq.alloc(length, align)
        if data is not None:
            self.mem.write(gpa, data)
        else:
            self.mem.fill(gpa, length, UNTOUCHED)
        return gpa

    def submit(
        self,
        rtype,
        sector=0,
        *,
        out=b"",
        in_len=0,
        header_split=None,
        out_split=None,
        in_split=None,
        indirect=False,
        status=True,
        header=None,
        align=8,
        publish=True,
    ):
        header = REQ_HEADER.pack(rtype, 0, sector) if header is None else header
        bufs, pos = [], 0
        for n in split_lengths(len(header), header_split):
            bufs.append(Buf(self.buffer(header[pos : pos + n]), n))
            pos += n
        pos = 0
        for n in split_lengths(len(out), out_split):
            bufs.append(Buf(self.buffer(out[pos : pos + n], align=align), n))
            pos += n
        data_in = []
        for n in split_lengths(in_len, in_split):
            gpa = self.buffer(length=n, align=align)
            bufs.append(Buf(gpa, n, write=True))
            data_in.append((gpa, n))
        status_gpa = None
        if status:
            status_gpa = self.buffer(length=1)
            bufs.append(Buf(status_gpa, 1, write=True))
        if indirect:
            head = self.mq.add_indirect_chain(bufs, publish=publish)
        else:
            head = self.mq.add_chain(bufs, publish=publish)
        return Request(head, status_gpa, data_in)

    def data(self, req):
        return b"".join(self.mem.read(gpa, n) for gpa, n in req.data_in)

    def status(self, req):
        return self.mem.read(req.status, 1)[0]

    def run(self, req):
        """Process the queue synchronously; return (status, used length) of `req`."""
        self.dev.process_queue(self.index)
        used = dict(self.mq.used_entries())
        return self.status(req), used[req.head]

    def segments(self, *segs):
        return b"".join(DISCARD_SEGMENT.pack(*s) for s in segs)


@pytest.fixture
def make_dev(mem, image_path):
    devices = []

    def make(path=image_path, *, read_only=False, cache="writeback", backend=None, **kwargs):
        if backend is None:
            backend = RawImage.open(path, read_only=read_only, cache=cache)
        dev = VirtioBlk(mem, backend, read_only=read_only, **kwargs)
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        dev.close()


@pytest.fixture(params=[True, False], ids=["batches", "one-chain"])
def dev(make_dev, request):
    """The device every request test runs on: both ways of completing requests (virtio/blk_path.py)."""
    return make_dev(serial="pyvmm-disk-0", batches=request.param)


@pytest.fixture
def drv(mem, dev):
    return Driver(mem, dev).ready()


class FakeBackend:
    """A backend with chosen properties, for the config space and error paths."""

    def __init__(self, size=1 * MiB, *, read_only=False, logical=512, physical=4096, discard=True, fail=None):
        self.size = size
        self.read_only = read_only
        self.logical_block_size = logical
        self.physical_block_size = physical
        self.supports_discard = discard
        self.supports_write_zeroes = True
        self.fail = fail
        self.calls = []

    def _op(self, name, *args):
        self.calls.append((name, *args))
        if self.fail is not None:
            raise self.fail

    def readv(self, views, offset):
        self._op("readv", offset)

    def writev(self, views, offset):
        self._op("writev", offset)

    def flush(self):
        self._op("flush")

    def discard(self, offset, length):
        self._op("discard", offset, length)

    def write_zeroes(self, offset, length, unmap):
        self._op("write_zeroes", offset, length, unmap)

    def close(self):
        pass


# -- config space and features ------------------------------------------------------------


def config_fields(dev):
    """struct virtio_blk_config read field by field at the spec's offsets."""
    c = dev.config_bytes()
    u8 = lambda o: c[o]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", c, o)[0]  # noqa: E731
    u32 = lambda o: struct.unpack_from("<I", c, o)[0]  # noqa: E731
    return {
        "capacity": struct.unpack_from("<Q", c, 0)[0],
        "size_max": u32(8),
        "seg_max": u32(12),
        "cylinders": u16(16),
        "heads": u8(18),
        "sectors": u8(19),
        "blk_size": u32(20),
        "physical_block_exp": u8(24),
        "alignment_offset": u8(25),
        "min_io_size": u16(26),
        "opt_io_size": u32(28),
        "writeback": u8(32),
        "unused0": u8(33),
        "num_queues": u16(34),
        "max_discard_sectors": u32(36),
        "max_discard_seg": u32(40),
        "discard_sector_alignment": u32(44),
        "max_write_zeroes_sectors": u32(48),
        "max_write_zeroes_seg": u32(52),
        "write_zeroes_may_unmap": u8(56),
        "unused1": c[57:60],
    }


def test_device_id_and_default_features(dev):
    assert dev.device_id == VIRTIO_ID_BLOCK == 2
    for bit in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY):
        assert feature(dev, bit)
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC):
        assert feature(dev, bit)
    assert not feature(dev, VIRTIO_BLK_F_RO)
    assert not feature(dev, VIRTIO_BLK_F_MQ)
    assert feature(dev, VIRTIO_BLK_F_WRITE_ZEROES)
    assert feature(dev, VIRTIO_BLK_F_DISCARD) == dev.backend.supports_discard


def test_config_layout_writable_disk(mem):
    dev = VirtioBlk(mem, FakeBackend(size=3 * MiB + 512), queue_size=128)
    f = config_fields(dev)
    assert len(dev.config_bytes()) == 60
    assert f["capacity"] == (3 * MiB + 512) // 512
    assert f["seg_max"] == 126
    assert f["size_max"] == 0 and (f["cylinders"], f["heads"], f["sectors"]) == (0, 0, 0)
    assert f["blk_size"] == 512
    assert f["physical_block_exp"] == 3 and f["alignment_offset"] == 0  # 4096 = 512 << 3
    assert f["min_io_size"] == 8 and f["opt_io_size"] == 0
    assert f["writeback"] == 1 and f["unused0"] == 0
    assert f["num_queues"] == 1
    assert f["max_discard_sectors"] == MAX_DISCARD_SECTORS
    assert f["max_discard_seg"] == MAX_DISCARD_SEGMENTS
    assert f["discard_sector_alignment"] == 8
    assert f["max_write_zeroes_sectors"] == MAX_DISCARD_SECTORS
    assert f["max_write_zeroes_seg"] == MAX_DISCARD_SEGMENTS
    assert f["write_zeroes_may_unmap"] == 1
    assert f["unused1"] == b"\0\0\0"
    assert feature(dev, VIRTIO_BLK_F_DISCARD) and feature(dev, VIRTIO_BLK_F_WRITE_ZEROES)
    # read_config (what the transport uses) sees the same bytes
    assert dev.read_config(0, 8) == f["capacity"] and dev.read_config(20, 4) == 512


def test_config_read_only_disk(mem):
    dev = VirtioBlk(mem, FakeBackend(), read_only=True)
    f = config_fields(dev)
    assert feature(dev, VIRTIO_BLK_F_RO)
    assert not feature(dev, VIRTIO_BLK_F_DISCARD) and not feature(dev, VIRTIO_BLK_F_WRITE_ZEROES)
    assert f["max_discard_sectors"] == f["max_discard_seg"] == f["discard_sector_alignment"] == 0
    assert f["max_write_zeroes_sectors"] == f["max_write_zeroes_seg"] == f["write_zeroes_may_unmap"] == 0
    # a backend opened read-only makes the device read-only too
    assert feature(VirtioBlk(mem, FakeBackend(read_only=True)), VIRTIO_BLK_F_RO)


def test_config_backend_without_discard(mem):
    dev = VirtioBlk(mem, FakeBackend(discard=False))
    f = config_fields(dev)
    assert not feature(dev, VIRTIO_BLK_F_DISCARD) and feature(dev, VIRTIO_BLK_F_WRITE_ZEROES)
    assert f["max_discard_seg"] == 0 and f["max_write_zeroes_seg"] == MAX_DISCARD_SEGMENTS
    assert f["write_zeroes_may_unmap"] == 0


def test_config_multiqueue(mem):
    dev = VirtioBlk(mem, FakeBackend(), num_queues=4)
    assert feature(dev, VIRTIO_BLK_F_MQ)
    assert config_fields(dev)["num_queues"] == 4
    assert len(dev.queues) == len(dev.queue_events) == 4


def test_config_4k_logical_blocks(mem):
    dev = VirtioBlk(mem, FakeBackend(size=8 * MiB, logical=4096, physical=4096))
    f = config_fields(dev)
    assert f["blk_size"] == 4096
    assert f["capacity"] == 8 * MiB // 512  # always 512-byte sectors
    assert f["physical_block_exp"] == 0 and f["min_io_size"] == 1
    assert f["discard_sector_alignment"] == 8


def test_serial_is_checked(mem):
    with pytest.raises(ValueError, match="20"):
        VirtioBlk(mem, FakeBackend(), serial="x" * 21)
    with pytest.raises(ValueError):
        VirtioBlk(mem, FakeBackend(), serial="dísk")


# -- IN and OUT ------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize(
    "sector,length,split",
    [
        (0, 512, None),
        (1, 4096, None),
        (7, 4096, [512, 1024, 2560]),
        (100, 8192, [4096, 512, 3584]),
        (IMAGE_SECTORS - 8, 4096, [1000, 3000, 96]),  # pieces need not be sector-sized
        (IMAGE_SECTORS - 1, 512, [1, 510, 1]),
        (33, 65536, [4096] * 16),
    ],
)
def test_read(drv, image_path, sector, length, split, indirect):
    req = drv.submit(VIRTIO_BLK_T_IN, sector, in_len=length, in_split=split, indirect=indirect)
    status, used = drv.run(req)
    assert status == VIRTIO_BLK_S_OK
    assert used == length + 1
    assert drv.data(req) == file_bytes(image_path, sector * 512, length)


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize(
    "sector,length,split",
    [
        (0, 512, None),
        (3, 4096, [512, 1024, 2560]),
        (500, 12288, [7, 4089, 4096, 4096]),
        (IMAGE_SECTORS - 16, 8192, [4096]),
        (IMAGE_SECTORS - 1, 512, [256]),
    ],
)
def test_write(drv, image_path, sector, length, split, indirect):
    before = image_path.read_bytes()
    data = os.urandom(length)
    req = drv.submit(VIRTIO_BLK_T_OUT, sector, out=data, out_split=split, indirect=indirect)
    status, used = drv.run(req)
    assert status == VIRTIO_BLK_S_OK
    assert used == 1  # only the status byte is written
    after = image_path.read_bytes()
    off = sector * 512
    assert after[off : off + length] == data
    assert after[:off] == before[:off] and after[off + length :] == before[off + length :]


def test_write_then_read_back(drv):
    data = os.urandom(3 * 4096)
    w = drv.submit(VIRTIO_BLK_T_OUT, 64, out=data, out_split=[4096, 4096])
    r = drv.submit(VIRTIO_BLK_T_IN, 64, in_len=len(data), in_split=[512, 8192])
    drv.dev.process_queue(0)
    assert dict(drv.mq.used_entries()) == {w.head: 1, r.head: len(data) + 1}
    assert drv.status(w) == drv.status(r) == VIRTIO_BLK_S_OK
    assert drv.data(r) == data


@pytest.mark.parametrize("header_split", [[4, 12], [1, 1, 14], [8, 8], [15, 1]])
def test_header_split_across_descriptors(drv, image_path, header_split):
    data = os.urandom(1024)
    w = drv.submit(VIRTIO_BLK_T_OUT, 9, out=data, header_split=header_split)
    assert drv.run(w) == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image_path, 9 * 512, 1024) == data
    r = drv.submit(VIRTIO_BLK_T_IN, 9, in_len=1024, header_split=header_split, indirect=True)
    assert drv.run(r) == (VIRTIO_BLK_S_OK, 1025)
    assert drv.data(r) == data


def test_header_and_data_in_one_descriptor(drv, image_path):
    """The spec lets the driver frame a request any way it likes: header and data may share a buffer."""
    data = os.urandom(2048)
    gpa = drv.buffer(REQ_HEADER.pack(VIRTIO_BLK_T_OUT, 0, 5) + data)
    status = drv.buffer(length=1)
    head = drv.mq.add_chain([Buf(gpa, 16 + 2048), Buf(status, 1, write=True)])
    drv.dev.process_queue(0)
    assert drv.mq.used_entries() == [(head, 1)]
    assert drv.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert file_bytes(image_path, 5 * 512, 2048) == data


def test_data_and_status_in_one_descriptor(drv, image_path):
    """A read whose last device-writable buffer holds data and then the status byte."""
    hdr = drv.buffer(REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 2))
    buf = drv.buffer(length=513)
    head = drv.mq.add_chain([Buf(hdr, 16), Buf(buf, 513, write=True)])
    drv.dev.process_queue(0)
    assert drv.mq.used_entries() == [(head, 513)]
    assert drv.mem.read(buf, 512) == file_bytes(image_path, 1024, 512)
    assert drv.mem.read(buf + 512, 1)[0] == VIRTIO_BLK_S_OK


def test_zero_length_read_and_write_are_ok(drv):
    assert drv.run(drv.submit(VIRTIO_BLK_T_IN, 10)) == (VIRTIO_BLK_S_OK, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 10)) == (VIRTIO_BLK_S_OK, 1)


def test_many_requests_in_one_batch(drv, image_path):
    reqs = [drv.submit(VIRTIO_BLK_T_IN, s * 8, in_len=4096, indirect=bool(s % 2)) for s in range(20)]
    drv.dev.process_queue(0)
    used = dict(drv.mq.used_entries())
    for s, req in enumerate(reqs):
        assert used[req.head] == 4097 and drv.status(req) == VIRTIO_BLK_S_OK
        assert drv.data(req) == file_bytes(image_path, s * 4096, 4096)


# -- request errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sector,length",
    [
        (IMAGE_SECTORS - 1, 1024),  # runs over the end
        (IMAGE_SECTORS, 512),
        (IMAGE_SECTORS + 1, 0),
        (2**64 - 1, 512),  # would wrap
        (2**63, 512),
    ],
)
def test_out_of_range_is_ioerr(drv, image_path, sector, length):
    before = image_path.read_bytes()
    r = drv.submit(VIRTIO_BLK_T_IN, sector, in_len=length)
    assert drv.run(r) == (VIRTIO_BLK_S_IOERR, 1)
    assert all(b == UNTOUCHED for b in drv.data(r))
    w = drv.submit(VIRTIO_BLK_T_OUT, sector, out=b"\x55" * length)
    assert drv.run(w) == (VIRTIO_BLK_S_IOERR, 1)
    assert image_path.read_bytes() == before


@pytest.mark.parametrize("length", [1, 100, 511, 513, 4095])
def test_length_not_a_multiple_of_512_is_ioerr(drv, image_path, length):
    before = image_path.read_bytes()
    assert drv.run(drv.submit(VIRTIO_BLK_T_IN, 0, in_len=length)) == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"x" * length)) == (VIRTIO_BLK_S_IOERR, 1)
    assert image_path.read_bytes() == before


@pytest.mark.parametrize("header_len", [0, 1, 8, 15])
def test_header_too_short_is_ioerr(drv, header_len):
    req = drv.submit(VIRTIO_BLK_T_IN, header=REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)[:header_len], in_len=512)
    assert drv.run(req) == (VIRTIO_BLK_S_IOERR, 1)


def test_read_with_device_readable_data_is_ioerr(drv):
    req = drv.submit(VIRTIO_BLK_T_IN, 0, out=b"\0" * 512, in_len=512)
    assert drv.run(req) == (VIRTIO_BLK_S_IOERR, 1)
    assert all(b == UNTOUCHED for b in drv.data(req))


def test_write_with_device_writable_data_is_ioerr(drv, image_path):
    before = image_path.read_bytes()
    req = drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"\x11" * 512, in_len=512)
    assert drv.run(req) == (VIRTIO_BLK_S_IOERR, 1)
    assert image_path.read_bytes() == before


@pytest.mark.parametrize("rtype", [2, 3, 5, VIRTIO_BLK_T_GET_LIFETIME, 14, 16, 99, 0x80000000, 0xFFFFFFFF])
def test_unknown_type_is_unsupp(drv, rtype):
    req = drv.submit(rtype, 0, in_len=512)
    assert drv.run(req) == (VIRTIO_BLK_S_UNSUPP, 1)


def test_missing_status_byte_does_not_crash(drv, image_path):
    bad = drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"\x22" * 512, status=False)
    good = drv.submit(VIRTIO_BLK_T_IN, 1, in_len=512)
    drv.dev.process_queue(0)
    assert dict(drv.mq.used_entries()) == {bad.head: 0, good.head: 513}
    assert drv.status(good) == VIRTIO_BLK_S_OK
    assert file_bytes(image_path, 0, 512) != b"\x22" * 512


def test_read_only_header_only_chain(drv):
    """Just a header: no status byte to write; returned with length 0."""
    head = drv.mq.add_chain([Buf(drv.buffer(REQ_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)), 16)])
    drv.dev.process_queue(0)
    assert drv.mq.used_entries() == [(head, 0)]


def test_malformed_chain_is_returned_and_the_queue_goes_on(drv, mem):
    """A buffer outside guest RAM: the queue cannot walk the chain; it is returned with length 0."""
    hdr = drv.buffer(REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
    head = drv.mq.add_chain([Buf(hdr, 16), Buf(mem.size + 4096, 512, write=True), Buf(hdr, 1, write=True)])
    good = drv.submit(VIRTIO_BLK_T_IN, 1, in_len=512)
    drv.dev.process_queue(0)
    assert dict(drv.mq.used_entries()) == {head: 0, good.head: 513}
    assert not drv.dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_broken_avail_ring_needs_reset(drv):
    interrupts = []
    drv.dev.set_interrupt(interrupts.append)
    drv.mq.publish_avail(QUEUE_SIZE + 5)  # claims more chains than the ring holds
    drv.dev.process_queue(0)
    assert drv.dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert CONFIG in interrupts
    # that queue is left alone until the driver resets the device
    drv.mq.publish_avail(0)
    req = drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    drv.dev.process_queue(0)
    assert drv.status(req) == UNTOUCHED


def test_backend_error_is_ioerr(mem, caplog):
    backend = FakeBackend(fail=OSError(errno.EIO, "Input/output error"))
    dev = VirtioBlk(mem, backend)
    drv = Driver(mem, dev).ready()
    for _ in range(3):
        assert drv.run(drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)) == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"\0" * 512)) == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_FLUSH)) == (VIRTIO_BLK_S_IOERR, 1)
    # rate-limited: one line for the burst
    assert sum("I/O error" in r.getMessage() for r in caplog.records) == 1


def test_short_transfers_are_retried(make_dev, mem, image_path, monkeypatch):
    """(One chain at a time: RawImage.readv / writev.  The batch path's engines: test_raw_batch.py.)"""
    drv = Driver(mem, make_dev(batches=False)).ready()
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short(real):
        def call(fd, views, offset):  # at most 700 bytes at a time, from the first view only
            return real(fd, [views[0][:700]], offset)

        return call

    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    data = os.urandom(8192)
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 16, out=data, out_split=[512, 3584, 2048])) == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image_path, 16 * 512, 8192) == data
    r = drv.submit(VIRTIO_BLK_T_IN, 16, in_len=8192, in_split=[1000, 5000])
    assert drv.run(r) == (VIRTIO_BLK_S_OK, 8193)
    assert drv.data(r) == data


# -- FLUSH ---------------------------------------------------------------------------------


def test_flush_calls_fdatasync_before_completing(drv, monkeypatch):
    seen = []
    req = None

    def fdatasync(fd):
        seen.append((fd, drv.status(req), drv.mq.used_idx))  # not yet completed while syncing

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    req = drv.submit(VIRTIO_BLK_T_FLUSH)
    assert drv.run(req) == (VIRTIO_BLK_S_OK, 1)
    assert seen == [(drv.dev.backend.fd, UNTOUCHED, 0)]


# -- GET_ID --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "serial,buf_len,split,expect",
    [
        ("pyvmm-disk-0", 20, None, b"pyvmm-disk-0" + b"\0" * 8),
        ("pyvmm-disk-0", 8, None, b"pyvmm-di"),
        ("pyvmm-disk-0", 64, [10], b"pyvmm-disk-0" + b"\0" * 8),
        ("ABCDEFGHIJKLMNOPQRST", 20, [3, 3], b"ABCDEFGHIJKLMNOPQRST"),  # 20 bytes: no NUL
        ("", 20, None, b"\0" * 20),
    ],
)
def test_get_id(make_dev, mem, serial, buf_len, split, expect):
    dev = make_dev(serial=serial)
    drv = Driver(mem, dev).ready()
    req = drv.submit(VIRTIO_BLK_T_GET_ID, in_len=buf_len, in_split=split)
    status, used = drv.run(req)
    assert status == VIRTIO_BLK_S_OK
    assert used == len(expect) + 1
    data = drv.data(req)
    assert data[: len(expect)] == expect
    assert all(b == UNTOUCHED for b in data[len(expect) :])


# -- DISCARD and WRITE_ZEROES ----------------------------------------------------------------


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_discard_frees_blocks(make_dev, mem, image_path):
    dev = make_dev()
    if not dev.backend.supports_discard:
        pytest.skip("the filesystem of tmp_path cannot punch holes")
    drv = Driver(mem, dev).ready()
    before = allocated_bytes(image_path)
    segs = drv.segments((0, 256, 0), (1024, 512, 0))  # 128 KiB + 256 KiB
    req = drv.submit(VIRTIO_BLK_T_DISCARD, out=segs, out_split=[10])
    assert drv.run(req) == (VIRTIO_BLK_S_OK, 1)
    assert allocated_bytes(image_path) <= before - 384 * 1024
    assert os.path.getsize(image_path) == IMAGE_SECTORS * 512  # the size is kept


def test_discard_checks(make_dev, mem, image_path):
    dev = make_dev()
    if not dev.backend.supports_discard:
        pytest.skip("the filesystem of tmp_path cannot punch holes")
    drv = Driver(mem, dev).ready()
    before = image_path.read_bytes()
    seg = drv.segments
    cases = [
        (seg((0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), VIRTIO_BLK_S_UNSUPP),  # unmap: not for discard
        (seg((0, 8, 2)), VIRTIO_BLK_S_UNSUPP),  # reserved flag
        (seg((IMAGE_SECTORS - 4, 8, 0)), VIRTIO_BLK_S_IOERR),  # beyond the capacity
        (seg((2**64 - 1, 8, 0)), VIRTIO_BLK_S_IOERR),
        (seg(*[(i, 1, 0) for i in range(MAX_DISCARD_SEGMENTS + 1)]), VIRTIO_BLK_S_IOERR),  # too many segments
        (b"", VIRTIO_BLK_S_IOERR),  # no segment
        (seg((0, 8, 0))[:15], VIRTIO_BLK_S_IOERR),  # not whole segments
        (seg((0, 8, 0), (8, 8, 4)), VIRTIO_BLK_S_UNSUPP),  # one bad segment fails them all, before any runs
    ]
    for data, status in cases:
        assert drv.run(drv.submit(VIRTIO_BLK_T_DISCARD, out=data)) == (status, 1), data
    assert image_path.read_bytes() == before


def test_write_zeroes(drv, image_path):
    segs = drv.segments((8, 16, 0), (100, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (IMAGE_SECTORS - 8, 8, 0))
    before = image_path.read_bytes()
    req = drv.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=segs, indirect=True)
    assert drv.run(req) == (VIRTIO_BLK_S_OK, 1)
    after = bytearray(before)
    for sector, n in ((8, 16), (100, 1), (IMAGE_SECTORS - 8, 8)):
        after[sector * 512 : (sector + n) * 512] = bytes(n * 512)
    assert image_path.read_bytes() == bytes(after)
    assert os.path.getsize(image_path) == len(before)


def test_write_zeroes_checks(drv, image_path):
    before = image_path.read_bytes()
    seg = drv.segments
    cases = [
        (seg((0, 8, 2)), VIRTIO_BLK_S_UNSUPP),
        (seg((0, 8, 0x80000000)), VIRTIO_BLK_S_UNSUPP),
        (seg((IMAGE_SECTORS, 1, 0)), VIRTIO_BLK_S_IOERR),
        (seg((0, MAX_DISCARD_SECTORS + 1, 0)), VIRTIO_BLK_S_IOERR),
        (seg(*[(i, 1, 0) for i in range(MAX_DISCARD_SEGMENTS + 1)]), VIRTIO_BLK_S_IOERR),
        (b"\0" * 20, VIRTIO_BLK_S_IOERR),
    ]
    for data, status in cases:
        assert drv.run(drv.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=data)) == (status, 1), data
    assert image_path.read_bytes() == before


def test_write_zeroes_falls_back_to_writing_zeroes(drv, image_path, monkeypatch):
    def no_fallocate(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(raw, "fallocate", no_fallocate)
    before = image_path.read_bytes()
    req = drv.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=drv.segments((3, 5, 0), (40, 2000, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
    assert drv.run(req) == (VIRTIO_BLK_S_OK, 1)
    expect = bytearray(before)
    expect[3 * 512 : 8 * 512] = bytes(5 * 512)
    expect[40 * 512 : 2040 * 512] = bytes(2000 * 512)
    assert image_path.read_bytes() == bytes(expect)


# -- read-only disks -------------------------------------------------------------------------


def test_read_only_disk(make_dev, mem, image_path):
    dev = make_dev(read_only=True)
    drv = Driver(mem, dev).ready()
    before = image_path.read_bytes()
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"\x33" * 512)) == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_DISCARD, out=drv.segments((0, 8, 0)))) == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.run(drv.submit(VIRTIO_BLK_T_WRITE_ZEROES, out=drv.segments((0, 8, 0)))) == (VIRTIO_BLK_S_IOERR, 1)
    r = drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert drv.run(r) == (VIRTIO_BLK_S_OK, 513)
    assert drv.data(r) == before[:512]
    assert drv.run(drv.submit(VIRTIO_BLK_T_FLUSH)) == (VIRTIO_BLK_S_OK, 1)
    assert image_path.read_bytes() == before


def test_read_only_device_over_writable_image(make_dev, mem, image_path):
    """readonly is the device's promise even if the backend could write."""
    dev = make_dev(backend=RawImage.open(image_path), read_only=True)
    drv = Driver(mem, dev).ready()
    before = image_path.read_bytes()
    assert drv.run(drv.submit(VIRTIO_BLK_T_OUT, 0, out=b"\x33" * 512)) == (VIRTIO_BLK_S_IOERR, 1)
    assert image_path.read_bytes() == before


# -- cache=none through the device -----------------------------------------------------------


def test_cache_none_aligned_and_unaligned(make_dev, mem, image_path):
    dev = make_dev(cache="none")
    if not dev.backend.direct:
        pytest.skip("tmp_path does not do O_DIRECT")
    drv = Driver(mem, dev).ready()
    data = os.urandom(8192)
    # page-aligned buffers: straight to O_DIRECT
    w = drv.submit(VIRTIO_BLK_T_OUT, 8, out=data, out_split=[4096], align=4096)
    assert drv.run(w) == (VIRTIO_BLK_S_OK, 1)
    assert dev.backend.bounced == 0
    # buffers at odd addresses: through the bounce buffer
    r = drv.submit(VIRTIO_BLK_T_IN, 8, in_len=8192, in_split=[1001, 3000], align=1)
    assert drv.run(r) == (VIRTIO_BLK_S_OK, 8193)
    assert drv.data(r) == data
    w2 = drv.submit(VIRTIO_BLK_T_OUT, 3, out=data[:1536], out_split=[5, 1000], align=1)
    assert drv.run(w2) == (VIRTIO_BLK_S_OK, 1)
    assert dev.backend.bounced >= 1
    assert file_bytes(image_path, 3 * 512, 1536) == data[:1536]


# -- the I/O threads ---------------------------------------------------------------------------


def negotiate(dev, drivers, *, event_idx=True):
    """Feature negotiation and DRIVER_OK, as a driver does through the transport."""
    features = dev.device_features
    if not event_idx:
        features &= ~(1 << VIRTIO_F_EVENT_IDX)
    dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    dev.driver_features = features
    dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    assert dev.status & VIRTIO_CONFIG_S_FEATURES_OK
    for drv in drivers:
        drv.queue.ready = True
    dev.set_status(
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
    )
    assert dev.active


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def kick(dev, index=0):
    os.eventfd_write(dev.queue_events[index], 1)


def blk_threads():
    return [t for t in threading.enumerate() if t.name.startswith("virtio-blk-q")]


def test_io_thread_end_to_end(make_dev, mem, image_path):
    dev = make_dev()
    interrupts = []
    dev.set_interrupt(interrupts.append)
    drv = Driver(mem, dev)
    negotiate(dev, [drv], event_idx=True)
    assert len(blk_threads()) == 1

    reqs = [drv.submit(VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(5)]
    kick(dev)
    assert wait_for(lambda: drv.mq.used_idx == 5)
    assert wait_for(lambda: interrupts == [0])  # used_event 0: interrupt once the used index passes 0
    for i, req in enumerate(reqs):
        assert drv.status(req) == VIRTIO_BLK_S_OK
        assert drv.data(req) == file_bytes(image_path, 4096 * i, 4096)
    assert drv.mq.avail_event == 5  # notifications re-enabled after the batch

    # The driver says: do not interrupt until used.idx passes 100.
    drv.mq.set_used_event(100)
    req = drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    kick(dev)
    assert wait_for(lambda: drv.mq.used_idx == 6)
    time.sleep(0.05)
    assert interrupts == [0]
    assert drv.status(req) == VIRTIO_BLK_S_OK

    # ...and now: interrupt when the next one is used.
    drv.mq.set_used_event(6)
    drv.submit(VIRTIO_BLK_T_FLUSH)
    kick(dev)
    assert wait_for(lambda: interrupts == [0, 0])
    assert drv.mq.used_idx == 7

    dev.set_status(0)  # reset
    assert blk_threads() == []


def test_io_thread_without_event_idx_honours_no_interrupt(make_dev, mem):
    dev = make_dev()
    interrupts = []
    dev.set_interrupt(interrupts.append)
    drv = Driver(mem, dev)
    negotiate(dev, [drv], event_idx=False)
    drv.mq.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    kick(dev)
    assert wait_for(lambda: drv.mq.used_idx == 1)
    time.sleep(0.05)
    assert interrupts == []
    drv.mq.set_avail_flags(0)
    drv.submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    kick(dev)
    assert wait_for(lambda: interrupts == [0])
    dev.set_status(0)


def test_multiqueue_threads(make_dev, mem, image_path):
    dev = make_dev(num_queues=3)
    interrupts = []
    dev.set_interrupt(interrupts.append)
    drivers = [Driver(mem, dev, i, base=i * 0x200000) for i in range(3)]
    negotiate(dev, drivers)
    assert len(blk_threads()) == 3
    data = [os.urandom(4096) for _ in range(3)]
    for i, drv in enumerate(drivers):
        drv.submit(VIRTIO_BLK_T_OUT, 64 * i, out=data[i])
        kick(dev, i)
    assert wait_for(lambda: all(d.mq.used_idx == 1 for d in drivers))
    assert wait_for(lambda: sorted(interrupts) == [0, 1, 2])
    for i in range(3):
        assert file_bytes(image_path, 64 * 512 * i, 4096) == data[i]
    dev.set_status(0)
    assert blk_threads() == []


def test_reset_stops_the_threads(make_dev, mem):
    dev = make_dev(num_queues=2)
    drivers = [Driver(mem, dev, i, base=i * 0x200000) for i in range(2)]
    negotiate(dev, drivers)
    assert len(blk_threads()) == 2
    dev.set_status(0)
    assert blk_threads() == []
    assert not dev.active
    # a kick after the reset is not served by anyone
    req = drivers[0].submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    kick(dev)
    time.sleep(0.05)
    assert drivers[0].mq.used_idx == 0
    assert drivers[0].status(req) == UNTOUCHED
    # and the device can start again after a reset
    drivers = [Driver(mem, dev, i, base=i * 0x200000) for i in range(2)]
    negotiate(dev, drivers)
    req = drivers[1].submit(VIRTIO_BLK_T_IN, 0, in_len=512)
    kick(dev, 1)
    assert wait_for(lambda: drivers[1].mq.used_idx == 1)
    dev.close()
    assert blk_threads() == []


# -- the command line --------------------------------------------------------------------------


def test_parse_disk_spec():
    assert parse_disk_spec("disk.img") == DiskSpec("disk.img")
    assert parse_disk_spec("/images/a.img,readonly=on,serial=ID-1,cache=none,queues=4") == DiskSpec(
        "/images/a.img", read_only=True, serial="ID-1", cache="none", queues=4
    )
    assert parse_disk_spec("a.img,readonly=off").read_only is False
    assert parse_disk_spec("a.img,ro=yes").read_only is True
    assert parse_disk_spec("a.img,cache=writeback").cache == "writeback"
    assert parse_disk_spec("a.img,serial=").serial == ""


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no image path"),
        (",readonly=on", "no image path"),
        ("a.img,readonly", "not KEY=VALUE"),
        ("a.img,readonly=maybe", "not on or off"),
        ("a.img,cache=unsafe", "cache='unsafe' is not one of writeback, none"),
        ("a.img,queues=0", "not a number from 1 to 64"),
        ("a.img,queues=two", "not a number from 1 to 64"),
        ("a.img,queues=65", "not a number from 1 to 64"),
        ("a.img,serial=123456789012345678901", "at most 20"),
        ("a.img,format=qcow2", "unknown option 'format'"),
        ("a.img,cache=none,cache=none", "given twice"),
    ],
)
def test_parse_disk_spec_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_disk_spec(text)


def test_from_spec(mem, image_path):
    dev = build_disk(mem, parse_disk_spec(f"{image_path},readonly=on,serial=S1,queues=2"))
    try:
        assert feature(dev, VIRTIO_BLK_F_RO) and feature(dev, VIRTIO_BLK_F_MQ)
        assert dev.serial == b"S1" and dev.capacity == IMAGE_SECTORS
        assert dev.backend.read_only
    finally:
        dev.close()
    assert dev.backend.fd == -1  # closing the device closes the image
