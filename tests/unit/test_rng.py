"""virtio-rng (virtio/rng.py) on mock queues: requests filled from the entropy source, hostile
chains failed alone, the rate limit held on a fake clock; getrandom into guest memory; --rng."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.backends.entropy import HostEntropy
from virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                           VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
                           VIRTIO_ID_RNG)
from virtio.queue import VIRTIO_F_INDIRECT_DESC, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtio.rng import MAX_REQUEST_BYTES, VirtioRng
from vmm.config import ConfigError, RngSpec, VmConfig, parse_rng_spec
from vmm.memory import GuestMemory, MiB

STARTED = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
UNTOUCHED = 0xEE


class CountingEntropy:
    """Fills with 0x5A and counts what it was asked for."""

    def __init__(self):
        self.calls = []

    def fill(self, views):
        self.calls.append([len(v) for v in views])
        for v in views:
            v[:] = b"\x5a" * len(v)
        return sum(len(v) for v in views)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def mem():
    with GuestMemory(8 * MiB) as m:
        yield m


def started(mem, rate=None, clock=time.monotonic, size=16):
    dev = VirtioRng(mem, CountingEntropy(), rate=rate, queue_size=size, clock=clock)
    mq = MockSplitQueue(mem, size, data_base=0x10000)
    q = dev.queues[0]
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, mq.desc_table, mq.avail_ring, mq.used_ring
    q.ready = True
    dev.driver_features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
    dev.set_status(STARTED)
    assert dev.status == STARTED
    return dev, mq


def buffer(mem, mq, n):
    gpa = mq.alloc(n)
    mem.fill(gpa, n, UNTOUCHED)
    return gpa


def test_identity_and_no_features(mem):
    dev = VirtioRng(mem, CountingEntropy())
    assert dev.device_id == VIRTIO_ID_RNG == 4 and len(dev.queues) == 1 and dev.config_bytes() == b""
    assert dev.device_features == dev.device_features & ~0xFFFFFF  # no device-specific bits
    dev.close()


def test_fills_writable_buffers_and_returns_the_length(mem):
    dev, mq = started(mem)
    a, b = buffer(mem, mq, 64), buffer(mem, mq, 100)
    head = mq.add_chain([Buf(a, 64, write=True), Buf(b, 100, write=True)])
    ind = buffer(mem, mq, 32)
    head2 = mq.add_indirect_chain([Buf(ind, 32, write=True)])
    dev.process_queue()
    assert mq.used_entries() == [(head, 164), (head2, 32)]
    assert mem.read(a, 64) == b"\x5a" * 64 and mem.read(b, 100) == b"\x5a" * 100 and mem.read(ind, 32) == b"\x5a" * 32
    assert dev.delivered == 196
    dev.close()


@pytest.mark.parametrize("bufs", [
    "readable-only", "readable-then-writable", "zero-length",
])
def test_hostile_requests_fail_alone(mem, bufs):
    dev, mq = started(mem)
    a = buffer(mem, mq, 64)
    chain = {"readable-only": [Buf(a, 64)], "readable-then-writable": [Buf(a, 16), Buf(a + 16, 48, write=True)],
             "zero-length": [Buf(a, 0, write=True)]}[bufs]
    bad = mq.add_chain(chain)
    good_gpa = buffer(mem, mq, 8)
    good = mq.add_chain([Buf(good_gpa, 8, write=True)])
    dev.process_queue()
    assert mq.used_entries() == [(bad, 0), (good, 8)]
    assert mem.read(a, 64) == bytes([UNTOUCHED]) * 64  # nothing written into a failed request
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_a_chain_outside_ram_or_looping_fails_alone(mem):
    dev, mq = started(mem)
    outside = mq.add_chain([Buf(mem.size - 8, 64, write=True)])
    loop = mq.add_chain([Buf(buffer(mem, mq, 8), 8, write=True)])
    mq.write_desc(loop, buffer(mem, mq, 8), 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, loop)
    dev.process_queue()
    assert mq.used_entries() == [(outside, 0), (loop, 0)]
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_a_huge_chain_gets_at_most_max_request_bytes(mem):
    dev, mq = started(mem)
    a = buffer(mem, mq, 2 * MAX_REQUEST_BYTES)
    head = mq.add_chain([Buf(a, 2 * MAX_REQUEST_BYTES, write=True)])
    dev.process_queue()
    assert mq.used_entries() == [(head, MAX_REQUEST_BYTES)]
    assert mem.read(a + MAX_REQUEST_BYTES, 16) == bytes([UNTOUCHED]) * 16
    dev.close()


def test_a_broken_ring_needs_reset(mem):
    dev, mq = started(mem)
    mq.publish_avail(mq.avail_idx + 17)  # avail.idx further ahead than the queue is long
    dev.process_queue()
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.close()


def test_the_rate_limit_holds_on_a_fake_clock(mem):
    clock = FakeClock()
    rate = 1000  # bytes a second: a bucket of 250
    dev, mq = started(mem, rate=rate, clock=clock, size=64)
    heads = [mq.add_chain([Buf(buffer(mem, mq, 64), 64, write=True)]) for _ in range(40)]
    dev.process_queue()
    first = mq.used_entries()
    assert [n for _, n in first] == [64, 64, 64]  # the burst: 250 bytes, and a request waits for all of its 64
    served = sum(n for _, n in first)
    for _ in range(20):  # 20 steps of 0.1 s: 100 bytes each step, never more
        clock.now += 0.1
        dev.process_queue()
        step = sum(n for _, n in mq.used_entries())
        assert step <= 128  # 100 accrued, and at most the 58 left from before
        served += step
    assert served <= 250 + 2.0 * rate + 1
    assert served >= 2.0 * rate - 64  # and it does not hold back more than it must
    assert served < 64 * len(heads)  # (requests were still waiting at the end)
    dev.close()


def test_a_held_request_is_served_when_the_timer_fires(mem):
    dev, mq = started(mem, rate=4096)  # real clock and timerfd: a bucket of 1024 bytes
    gpas = [buffer(mem, mq, 1024) for _ in range(3)]
    for gpa in gpas:
        mq.add_chain([Buf(gpa, 1024, write=True)])
    os.eventfd_write(dev.queue_events[0], 1)  # the driver's kick: the I/O thread serves it
    start = time.monotonic()
    served = 0
    while served < 3 * 1024 and time.monotonic() - start < 5:
        served += sum(n for _, n in mq.used_entries())
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    assert served == 3 * 1024
    assert 0.45 <= elapsed < 2.0, elapsed  # 2048 bytes beyond the burst at 4096 a second: 0.5 s
    dev.close()


def test_host_entropy_fills_views_of_guest_memory(mem):
    mem.fill(0x1000, 4096, 0)
    views = [mem.view(0x1000, 4000), mem.view(0x1FA0, 96), mem.view(0x3000, 0)]
    assert HostEntropy().fill(views) == 4096
    data = mem.read(0x1000, 4096)
    assert data.count(0) < 64 and len(set(data)) > 200  # random, and all of it written
    for v in views:
        v.release()


def test_rng_options():
    assert parse_rng_spec("") == RngSpec()
    assert parse_rng_spec("rate=64K") == RngSpec(rate=65536)
    assert parse_rng_spec("rate=16384/s") == RngSpec(rate=16384)
    assert VmConfig.from_dict({"rng": ""}).rng == RngSpec()
    assert VmConfig.from_dict({"rng": {"rate": 100}}).rng == RngSpec(rate=100)
    assert VmConfig.from_dict({}).rng is None
    for bad in ("rate=0", "rate=2G", "rate=fast", "speed=1", "rate"):
        with pytest.raises(ConfigError):
            parse_rng_spec(bad)
