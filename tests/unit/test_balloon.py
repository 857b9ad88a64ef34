"""virtio-balloon (virtio/balloon.py, balloon_requests.py) on mock queues: inflate punches holes in
the memfd for real, deflate, free page reporting, statistics on a timer, the config space and the
target; hostile requests (pfns outside RAM, odd lengths, the wrong direction) fail alone; --balloon."""

from __future__ import annotations

import os
import struct
import time

import pytest

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.backends.ramdiscard import RamDiscard
from virtio.balloon import (VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_PAGE_REPORTING,
                            VIRTIO_BALLOON_F_STATS_VQ, VirtioBalloon)
from virtio.balloon_requests import MAX_PFNS, STAT
from virtio.device import (CONFIG, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                           VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
                           VIRTIO_ID_BALLOON)
from vmm.config import BalloonSpec, ConfigError, VmConfig, parse_balloon_spec
from vmm.memory import GuestMemory, MiB

STARTED = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
PAGE = 4096
RAM = 16 * MiB


class FakeRam:
    def __init__(self):
        self.ranges = []

    def discard(self, ranges):
        ranges = list(ranges)
        self.ranges.extend(ranges)
        return sum(n for _, n in ranges)


@pytest.fixture
def mem():
    with GuestMemory(RAM) as m:
        yield m


class Driver:
    """The driver's side: each queue a MockSplitQueue in its own 64 KiB of guest memory."""

    def __init__(self, mem, dev, features):
        self.mem, self.dev = mem, dev
        self.interrupts = []
        dev.set_interrupt(self.interrupts.append)
        self.mqs = []
        for i, q in enumerate(dev.queues):
            mq = MockSplitQueue(mem, 16, base=i * 0x10000, data_base=0x100000 + i * 0x10000)
            q.size, q.desc_table, q.avail_ring, q.used_ring = 16, mq.desc_table, mq.avail_ring, mq.used_ring
            q.ready = True
            self.mqs.append(mq)
        dev.driver_features = 1 << VIRTIO_F_VERSION_1 | features
        dev.set_status(STARTED)
        assert dev.status == STARTED

    def send(self, index, data, *, write=False, pieces=1):
        mq = self.mqs[index]
        gpa = mq.alloc(max(len(data), 1))
        self.mem.write(gpa, data)
        step = -(-len(data) // pieces) if data else 0
        bufs = [Buf(gpa + k, min(step, len(data) - k), write=write) for k in range(0, len(data), step)] if data \
            else [Buf(gpa, 0, write=write)]
        return mq.add_chain(bufs)

    def pfns(self, index, pfns, **kw):
        return self.send(index, struct.pack(f"<{len(pfns)}I", *pfns), **kw)

    def run(self, index):
        self.dev.process_queue(index)
        return self.mqs[index].used_entries()


def make(mem, ram=None, features=0, **kw):
    dev = VirtioBalloon(mem, ram or FakeRam(), **kw)
    return dev, Driver(mem, dev, features)


def test_features_queues_and_config(mem):
    dev = VirtioBalloon(mem, FakeRam())
    assert dev.device_id == VIRTIO_ID_BALLOON == 5 and len(dev.queues) == 2
    assert dev.device_features & 0xFFFFFF == 0
    assert dev.config_bytes() == struct.pack("<II", 0, 0)
    dev.close()
    dev = VirtioBalloon(mem, FakeRam(), target=8 * MiB, stats_interval=1, free_page_reporting=True,
                        deflate_on_oom=True)
    assert len(dev.queues) == 4
    assert dev.device_features & 0xFF == (1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                                          | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING)
    assert dev.read_config(0, 4) == 8 * MiB // PAGE
    dev.close()
    with pytest.raises(ValueError):
        VirtioBalloon(mem, FakeRam(), target=RAM + PAGE)


def test_set_target_raises_a_config_interrupt_and_actual_is_the_drivers(mem):
    dev, drv = make(mem)
    dev.set_target(4 * MiB + 100)  # rounded down to pages
    assert dev.read_config(0, 4) == 1024 and drv.interrupts == [CONFIG]
    dev.write_config(4, 4, 1000)
    assert dev.actual == 1000 and dev.read_config(4, 4) == 1000
    dev.write_config(6, 2, 1)  # the high half alone
    assert dev.actual == 1000 + 65536
    dev.write_config(0, 4, 77)  # num_pages is the device's: ignored
    dev.write_config(8, 4, 77)  # beyond the config: ignored
    assert dev.read_config(0, 4) == 1024 and dev.config_bytes() == struct.pack("<II", 1024, 66536)
    with pytest.raises(ValueError):
        dev.set_target(RAM + PAGE)
    dev.close()


def test_inflate_coalesces_runs_and_deflate_frees_nothing(mem):
    ram = FakeRam()
    dev, drv = make(mem, ram)
    head = drv.pfns(0, [0x300, 0x301, 0x100, 0x302, 0x101, 0x500, 0x300])
    assert drv.run(0) == [(head, 0)]
    assert ram.ranges == [(0x100000, 2 * PAGE), (0x300000, 3 * PAGE), (0x500000, PAGE)]
    assert dev.inflated == 6 * PAGE
    head = drv.pfns(1, [0x100, 0x101], pieces=2)  # split across two descriptors
    assert drv.run(1) == [(head, 0)] and dev.deflated == 2 * PAGE and len(ram.ranges) == 3
    dev.close()


def test_inflate_punches_holes_in_the_memfd(mem):
    for off in range(4 * MiB, 8 * MiB, PAGE):
        mem.buffer[off] = 1
    dev, drv = make(mem, RamDiscard(mem.fd))
    drv.pfns(0, list(range(4 * MiB // PAGE, 6 * MiB // PAGE)))  # 512 pages: 2 MiB
    before = os.fstat(mem.fd).st_blocks * 512
    drv.run(0)
    freed = before - os.fstat(mem.fd).st_blocks * 512
    assert freed == 2 * MiB
    assert mem.read(4 * MiB, 2 * MiB) == bytes(2 * MiB) and mem.read(6 * MiB, 1) == b"\x01"
    mem.buffer[4 * MiB] = 7  # the guest may use it again: it faults in
    assert mem.read(4 * MiB, 1) == b"\x07"
    dev.close()


@pytest.mark.parametrize("case", ["pfn-outside-ram", "pfn-huge", "odd-length", "writable", "too-long", "empty"])
@pytest.mark.parametrize("queue", [0, 1])
def test_hostile_inflate_and_deflate_requests_fail_alone(mem, case, queue):
    ram = FakeRam()
    dev, drv = make(mem, ram)
    last = RAM // PAGE
    bad = {"pfn-outside-ram": lambda: drv.pfns(queue, [0x200, last]),
           "pfn-huge": lambda: drv.pfns(queue, [0xFFFFFFFF]),
           "odd-length": lambda: drv.send(queue, struct.pack("<II", 0x200, 0x201)[:6]),
           "writable": lambda: drv.pfns(queue, [0x200], write=True),
           "too-long": lambda: drv.pfns(queue, [0x200] * (MAX_PFNS + 1)),
           "empty": lambda: drv.send(queue, b"")}[case]()
    good = drv.pfns(queue, [0x210])
    assert drv.run(queue) == [(bad, 0), (good, 0)]
    if queue == 0:
        assert ram.ranges == [(0x210 * PAGE, PAGE)]  # nothing of the bad request was freed
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_free_page_reports_are_punched_and_hostile_ones_fail(mem):
    ram = FakeRam()
    dev, drv = make(mem, ram, features=1 << VIRTIO_BALLOON_F_PAGE_REPORTING, free_page_reporting=True)
    assert len(dev.queues) == 3  # reporting_vq is queue 2 without statistics
    mq = drv.mqs[2]
    good = mq.add_chain([Buf(0x400000, 2 * MiB, write=True), Buf(0x800000, 4 * MiB, write=True)])
    readable = mq.add_chain([Buf(0x400000, 2 * MiB)])
    unaligned = mq.add_chain([Buf(0x400800, PAGE, write=True)])
    outside = mq.add_chain([Buf(RAM - PAGE, 2 * PAGE, write=True)])
    assert drv.run(2) == [(good, 0), (readable, 0), (unaligned, 0), (outside, 0)]
    assert ram.ranges == [(0x400000, 2 * MiB), (0x800000, 4 * MiB)] and dev.reported == 6 * MiB
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_queues_are_numbered_by_the_negotiated_features(mem):
    ram = FakeRam()
    dev, drv = make(mem, ram, features=1 << VIRTIO_BALLOON_F_PAGE_REPORTING, stats_interval=3600,
                    free_page_reporting=True)
    head = drv.mqs[2].add_chain([Buf(0x400000, PAGE, write=True)])  # no statistics: queue 2 reports
    assert drv.run(2) == [(head, 0)] and ram.ranges == [(0x400000, PAGE)]
    assert drv.run(3) == []  # (a queue beyond the negotiated ones is not served)
    dev.close()


def stats_buffer(**values):
    tags = {"free": 4, "total": 5, "available": 6}
    return b"".join(STAT.pack(tags[k], v) for k, v in values.items())


def test_statistics_are_held_and_returned_by_the_timer(mem):
    dev, drv = make(mem, features=1 << VIRTIO_BALLOON_F_STATS_VQ, stats_interval=0.1)
    first = drv.send(2, stats_buffer(free=100, total=1000))
    os.eventfd_write(dev.queue_events[2], 1)
    deadline = time.monotonic() + 3
    used = []
    while not used and time.monotonic() < deadline:
        time.sleep(0.01)
        used = drv.mqs[2].used_entries()
    assert used == [(first, 0)]  # returned by the timer: the driver sends fresh statistics
    stats = dev.stats()
    assert stats["free-memory"] == 100 and stats["total-memory"] == 1000 and len(stats["updates"]) == 1
    second = drv.send(2, stats_buffer(free=50, total=1000, available=70))
    os.eventfd_write(dev.queue_events[2], 1)
    time.sleep(0.35)
    assert drv.mqs[2].used_entries() == [(second, 0)]
    stats = dev.stats()
    assert stats["free-memory"] == 50 and stats["available-memory"] == 70 and len(stats["updates"]) == 2
    dev.close()


def test_hostile_statistics_are_ignored(mem):
    dev, drv = make(mem, features=1 << VIRTIO_BALLOON_F_STATS_VQ, stats_interval=3600)
    odd = drv.send(2, stats_buffer(free=1)[:7])
    assert drv.run(2) == []  # held (and returned on the next tick), never parsed
    writable = drv.send(2, stats_buffer(free=1), write=True)
    assert drv.run(2) == [(odd, 0)]  # a second buffer: the first goes back
    assert dev.stats() == {"updates": []}
    assert drv.run(2) == [] and writable is not None
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_a_broken_ring_needs_reset(mem):
    dev, drv = make(mem)
    drv.mqs[0].publish_avail(drv.mqs[0].avail_idx + 17)
    drv.run(0)
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_balloon_options():
    assert parse_balloon_spec("") == BalloonSpec()
    assert parse_balloon_spec("size=256M,stats=2,free-page-reporting=on,deflate-on-oom=yes") == \
        BalloonSpec(size=256 * MiB, stats_interval=2, free_page_reporting=True, deflate_on_oom=True)
    assert VmConfig.from_dict({"balloon": {"free_page_reporting": True}}).balloon == \
        BalloonSpec(free_page_reporting=True)
    assert VmConfig.from_dict({"balloon": ""}).balloon == BalloonSpec()
    for bad in ("size=1000", "stats=0", "stats=x", "free-page-reporting=maybe", "size=1G,size=2G", "colour=red"):
        with pytest.raises(ConfigError):
            parse_balloon_spec(bad)
    with pytest.raises(ConfigError, match="more than the guest's RAM"):
        VmConfig.from_dict({"mem": "256M", "balloon": "size=512M"})
