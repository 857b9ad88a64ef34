"""Split virtqueue (virtio/queue.py): chains, used ring, notifications, hostile drivers."""

from __future__ import annotations

import pytest

from tests.support.mockqueue import Buf, MockSplitQueue, SkewedGuestMemory
from virtio.queue import (
    MAX_INDIRECT_LEN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    ChainError,
    DescriptorChain,
    Queue,
    QueueError,
    vring_need_event,
)
from vmm.memory import MiB, GuestMemory

RAM = 1 * MiB
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem():
    with GuestMemory(RAM) as m:
        yield m


@pytest.fixture
def mq(mem):
    return MockSplitQueue(mem, 16, base=0x1000)


def snapshot(mem: GuestMemory) -> bytes:
    return bytes(mem.buffer)


def assert_only_used_ring_changed(mem: GuestMemory, before: bytes, mq: MockSplitQueue) -> None:
    """Every byte of guest memory outside the used ring is as it was."""
    after = bytes(mem.buffer)
    start = mem.offset(mq.used_ring, 0)
    end = start + 6 + 8 * mq.size
    assert after[:start] == before[:start]
    assert after[end:] == before[end:]


# -- good chains ----------------------------------------------------------------


def test_single_direct_descriptor(mem, mq):
    q = mq.create_queue()
    buf = mq.alloc(64)
    mem.write(buf, b"x" * 64)
    head = mq.add_chain([Buf(buf, 64)])
    chain = q.pop()
    assert isinstance(chain, DescriptorChain)
    assert chain.head == head
    assert chain.readable == [(buf, 64)] and chain.writable == []
    assert chain.readable_len == 64 and chain.writable_len == 0
    assert [bytes(v) for v in chain.readable_views()] == [b"x" * 64]
    assert q.pop() is None
    assert q.next_avail == 1


def test_blk_style_three_descriptor_chain(mem, mq):
    q = mq.create_queue()
    hdr, data, status = mq.alloc(16), mq.alloc(4096), mq.alloc(1)
    head = mq.add_chain([Buf(hdr, 16), Buf(data, 4096, write=True), Buf(status, 1, write=True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.readable == [(hdr, 16)]
    assert chain.writable == [(data, 4096), (status, 1)]
    assert (chain.readable_len, chain.writable_len) == (16, 4097)
    assert [len(v) for v in chain.writable_views()] == [4096, 1]


def test_chain_follows_next_not_table_order(mem, mq):
    q = mq.create_queue()
    a, b, c = mq.alloc(8), mq.alloc(8), mq.alloc(8)
    mq.write_desc(5, a, 8, NEXT, 2)
    mq.write_desc(2, b, 8, NEXT | WRITE, 9)
    mq.write_desc(9, c, 8, WRITE)
    mq.add_head(5)
    chain = q.pop()
    assert chain.head == 5
    assert chain.readable == [(a, 8)] and chain.writable == [(b, 8), (c, 8)]


def test_zero_length_descriptors_are_skipped(mem, mq):
    q = mq.create_queue()
    a = mq.alloc(8)
    # A zero-length buffer's address is never used, so it is not checked either.
    mq.add_chain([Buf(a, 8), Buf(RAM * 4, 0), Buf(a, 0, write=True), Buf(a, 8, write=True)])
    chain = q.pop()
    assert chain.readable == [(a, 8)] and chain.writable == [(a, 8)]


def test_indirect_chain(mem, mq):
    q = mq.create_queue(indirect=True)
    hdr, data, status = mq.alloc(16), mq.alloc(512), mq.alloc(1)
    head = mq.add_indirect_chain([Buf(hdr, 16), Buf(data, 512, write=True), Buf(status, 1, write=True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.readable == [(hdr, 16)]
    assert chain.writable == [(data, 512), (status, 1)]


def test_indirect_after_direct_descriptors(mem, mq):
    q = mq.create_queue(indirect=True)
    hdr, data = mq.alloc(16), mq.alloc(512)
    head = mq.add_indirect_chain([Buf(data, 512, write=True)], direct=[Buf(hdr, 16)])
    chain = q.pop()
    assert chain.head == head
    assert chain.readable == [(hdr, 16)] and chain.writable == [(data, 512)]


def test_indirect_descriptor_write_flag_is_ignored(mem, mq):
    q = mq.create_queue(indirect=True)
    table, a = mq.alloc(16, 16), mq.alloc(8)
    mq.write_desc(0, a, 8, 0, table=table)
    mq.write_desc(0, table, 16, INDIRECT | WRITE)
    mq.add_head(0)
    assert q.pop().readable == [(a, 8)]


def test_views_alias_guest_memory(mem, mq):
    q = mq.create_queue()
    src, dst = mq.alloc(5), mq.alloc(5)
    mem.write(src, b"hello")
    mq.add_chain([Buf(src, 5), Buf(dst, 5, write=True)])
    chain = q.pop()
    (rv,), (wv,) = chain.readable_views(), chain.writable_views()
    wv[:] = rv  # the device copies request to response, in guest memory
    assert mem.read(dst, 5) == b"hello"
    mem.write(src, b"HELLO")
    assert bytes(rv) == b"HELLO"  # no copy was taken at pop time


def test_views_work_in_the_high_region():
    # RAM split around a (small) hole: gpa 4 GiB is buffer offset 64 KiB.
    with GuestMemory(128 * 1024, hole_start=64 * 1024) as mem:
        hi = 4 << 30
        mq = MockSplitQueue(mem, 8, base=hi, data_base=hi + 0x8000)
        q = mq.create_queue()
        buf = mq.alloc(4)
        mq.add_chain([Buf(buf, 4, write=True)])
        (view,) = q.pop().writable_views()
        view[:] = b"abcd"
        assert mem.read(buf, 4) == b"abcd"
        assert mem.buffer[0x10000 + 0x8000 : 0x10000 + 0x8004] == b"abcd"


def test_skewed_memory_catches_no_bypass():
    """All access goes through mem.offset: with RAM stored at gpa + skew, still correct."""
    mem = SkewedGuestMemory(256 * 1024)
    try:
        mq = MockSplitQueue(mem, 8, base=0)
        q = mq.create_queue(indirect=True, event_idx=True)
        a, b = mq.alloc(4), mq.alloc(4)
        mem.write(a, b"ping")
        mq.add_chain([Buf(a, 4), Buf(b, 4, write=True)])
        mq.add_indirect_chain([Buf(a, 4), Buf(b, 4, write=True)])
        for chain in q.drain():
            (src,), (dst,) = chain.readable_views(), chain.writable_views()
            dst[:] = src
            q.add_used(chain.head, 4)
        q.publish_used()
        assert q.needs_notification()
        assert mq.used_entries() == [(0, 4), (2, 4)]
        assert mem.read(b, 4) == b"ping"
        assert mem.canary_intact()
    finally:
        mem.close()


# -- the used ring --------------------------------------------------------------


def test_add_used_then_publish(mem, mq):
    q = mq.create_queue()
    heads = [mq.add_chain([Buf(mq.alloc(8), 8, write=True)]) for _ in range(3)]
    chains = [q.pop() for _ in range(3)]
    for chain, n in zip(chains, (8, 4, 0)):
        q.add_used(chain.head, n)
    # Elements are written, but the driver cannot see them yet.
    assert mq.used_idx == 0
    assert [mq.used_elem(i) for i in range(3)] == [(heads[0], 8), (heads[1], 4), (heads[2], 0)]
    q.publish_used()
    assert mq.used_idx == 3
    assert mq.used_entries() == [(heads[0], 8), (heads[1], 4), (heads[2], 0)]


def test_add_used_checks_its_arguments(mem, mq):
    q = mq.create_queue()
    with pytest.raises(QueueError):
        q.add_used(16, 0)
    with pytest.raises(QueueError):
        q.add_used(-1, 0)
    with pytest.raises(QueueError):
        q.add_used(0, 1 << 32)
    q.ready = False
    with pytest.raises(QueueError):
        q.add_used(0, 0)


def test_sixteen_bit_wraparound(mem):
    mq = MockSplitQueue(mem, 4, base=0x1000, start_idx=65534)
    q = mq.create_queue()
    bufs = [mq.alloc(8) for _ in range(6)]
    seen = []
    for round_ in range(2):  # two batches of three: 65534, 65535, 0 | 1, 2, 3
        heads = [mq.add_chain([Buf(bufs[3 * round_ + i], 8, write=True)]) for i in range(3)]
        for chain in q.drain():
            assert chain.writable == [(bufs[3 * round_ + len(seen) % 3], 8)]
            seen.append(chain.head)
            q.add_used(chain.head, 8)
        q.publish_used()
        assert mq.used_entries() == [(h, 8) for h in heads]
    assert q.next_avail == q.next_used == mq.used_idx == 4


def test_driver_chooses_a_smaller_size_than_max(mem):
    # The device offers 256 entries; the driver uses 8.  Ring slots are idx % 8.
    mq = MockSplitQueue(mem, 8, base=0x1000, start_idx=6)
    q = mq.create_queue(max_size=256)
    heads = [mq.add_chain([Buf(mq.alloc(8), 8, write=True)]) for _ in range(5)]
    before = snapshot(mem)
    for chain in q.drain():
        q.add_used(chain.head, 1)
    q.publish_used()
    assert mq.used_entries() == [(h, 1) for h in heads]
    assert [mq.used_elem(i) for i in range(6, 11)] == [(h, 1) for h in heads]
    assert_only_used_ring_changed(mem, before, mq)
    with pytest.raises(QueueError):
        q.add_used(8, 0)


def test_avail_idx_read_once_per_batch(mem, mq):
    q = mq.create_queue()
    for _ in range(2):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    assert q.pop() is not None
    mq.publish_avail(0x8000)  # the driver goes mad after the device read idx
    assert q.pop() is not None  # still the batch counted from the first read
    with pytest.raises(QueueError, match="ahead"):
        q.pop()


def test_undo_pop(mem, mq):
    q = mq.create_queue()
    head = mq.add_chain([Buf(mq.alloc(8), 8)])
    assert q.pop().head == head
    q.undo_pop()
    assert q.pop().head == head
    assert q.pop() is None


# -- notifications ----------------------------------------------------------------


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        (0, 1, 0, True),  # the driver wants to know when entry 0 is used
        (0, 5, 0, True),
        (1, 1, 0, False),  # not yet: only entry 0 was used
        (4, 5, 0, True),
        (5, 5, 0, False),
        (3, 3, 3, False),  # nothing new
        (0, 2, 1, False),  # event already passed before this batch
        (65535, 0, 65535, True),  # wrap: entry 65535 used, idx now 0
        (65535, 2, 65534, True),
        (0, 2, 65534, True),
        (2, 2, 65534, False),
        (65533, 2, 65534, False),
    ],
)
def test_vring_need_event(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def complete_all(q: Queue) -> None:
    for chain in q.drain():
        q.add_used(chain.head, 0)
    q.publish_used()


def test_event_idx_notification(mem, mq):
    q = mq.create_queue(event_idx=True)
    mq.set_used_event(1)  # interrupt me once used.idx passes 1, i.e. after the 2nd chain
    mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert not q.needs_notification()  # used.idx 0 -> 1
    mq.add_chain([Buf(mq.alloc(8), 8)])
    mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert q.needs_notification()  # 1 -> 3 passes 1
    assert not q.needs_notification()  # nothing published since


def test_event_idx_notification_across_wrap(mem):
    mq = MockSplitQueue(mem, 8, base=0x1000, start_idx=65533)
    q = mq.create_queue(event_idx=True)
    mq.set_used_event(65535)
    for _ in range(2):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert not q.needs_notification()  # 65533 -> 65535 does not pass 65535
    for _ in range(3):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert mq.used_idx == 2
    assert q.needs_notification()  # 65535 -> 2 passes 65535


def test_event_idx_ignores_no_interrupt_flag(mem, mq):
    q = mq.create_queue(event_idx=True)
    mq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    mq.set_used_event(0)
    mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert q.needs_notification()


def test_no_interrupt_flag(mem, mq):
    q = mq.create_queue()
    assert not q.needs_notification()  # nothing published
    mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert q.needs_notification()
    mq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    mq.add_chain([Buf(mq.alloc(8), 8)])
    complete_all(q)
    assert not q.needs_notification()


def test_set_notification_without_event_idx(mem, mq):
    q = mq.create_queue()
    q.set_notification(False)
    assert mq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    q.set_notification(True)
    assert mq.used_flags == 0


def test_set_notification_with_event_idx_writes_avail_event(mem):
    mq = MockSplitQueue(mem, 8, base=0x1000, start_idx=65535)
    q = mq.create_queue(event_idx=True)
    for _ in range(3):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    while q.pop():
        pass
    q.set_notification(True)
    assert mq.avail_event == q.next_avail == 2
    q.set_notification(False)  # leaves avail_event behind, which stops kicks
    assert mq.used_flags == 0 and mq.avail_event == 2


def test_enable_notification_past_chains_left_in_the_ring(mem):
    """A device that looked at the available chains and left them (too few for what it needs)
    asks for a kick when the driver adds more: avail_event past them, not at next_avail (a
    driver that passed next_avail long ago would never kick)."""
    mq = MockSplitQueue(mem, 8, base=0x1000, start_idx=65534)
    q = mq.create_queue(event_idx=True)
    for _ in range(3):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    assert q.available() == 3
    assert not q.enable_notification(3)  # nothing beyond them yet: wait
    assert mq.avail_event == 1 == (q.next_avail + 3) & 0xFFFF
    mq.add_chain([Buf(mq.alloc(8), 8)])
    assert q.enable_notification(3)


def test_drain_disables_notifications_while_it_works(mem, mq):
    q = mq.create_queue()
    for _ in range(3):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    flags_seen = []
    for chain in q.drain():
        flags_seen.append(mq.used_flags)
        q.add_used(chain.head, 0)
    assert flags_seen == [VIRTQ_USED_F_NO_NOTIFY] * 3
    assert mq.used_flags == 0


class RacingQueue(Queue):
    """A Queue whose driver makes a chain available just before notifications come back on."""

    __slots__ = ("before_enable",)

    def set_notification(self, enabled, seen=0):
        if enabled and self.before_enable:
            self.before_enable.pop()()
        super().set_notification(enabled, seen)


@pytest.mark.parametrize("event_idx", [False, True])
def test_drain_does_not_miss_a_chain_added_while_notifications_were_off(mem, mq, event_idx):
    """The race drain() exists for: the driver adds a chain after the device saw an
    empty ring but before it re-enabled notifications, so the driver does not kick."""
    q = mq.create_queue(event_idx=event_idx, cls=RacingQueue)
    first = mq.add_chain([Buf(mq.alloc(8), 8)])
    late = mq.alloc(8)
    added = []
    q.before_enable = [lambda: added.append(mq.add_chain([Buf(late, 8)]))]
    heads = [chain.head for chain in q.drain()]
    assert added and heads == [first, added[0]]
    # ... and drain() returned with notifications on and the ring empty.
    assert q.available() == 0
    if event_idx:
        assert mq.avail_event == q.next_avail == 2
    else:
        assert mq.used_flags == 0


def test_drain_completes_bad_chains_and_goes_on(mem, mq):
    q = mq.create_queue()
    good1 = mq.add_chain([Buf(mq.alloc(8), 8)])
    mq.write_desc(15, RAM, 8)  # a chain whose descriptor points outside RAM
    mq.add_head(15)
    mq.add_head(99)  # a head that is not a descriptor: cannot be returned
    good2 = mq.add_chain([Buf(mq.alloc(8), 8)])
    heads = [chain.head for chain in q.drain()]
    assert heads == [good1, good2]
    q.publish_used()
    assert mq.used_entries() == [(15, 0)]


def test_drain_on_error_hook(mem, mq):
    q = mq.create_queue()
    mq.write_desc(3, 0, 8, NEXT, 3)  # a loop
    mq.add_head(3)
    errors = []
    assert list(q.drain(on_error=errors.append)) == []
    assert [(e.head, e.completable) for e in errors] == [(3, True)]
    assert "loops" in errors[0].reason

    def fail(err):
        raise QueueError(str(err))

    mq.add_head(3)
    with pytest.raises(QueueError):
        list(q.drain(on_error=fail))


def test_drain_stopped_early_reenables_notifications(mem, mq):
    q = mq.create_queue()
    for _ in range(3):
        mq.add_chain([Buf(mq.alloc(8), 8)])
    it = q.drain()
    next(it)
    assert mq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    it.close()
    assert mq.used_flags == 0
    assert q.available() == 2


# -- queue setup ------------------------------------------------------------------


def configure(mem, size=16, desc=0x1000, avail=0x2000, used=0x3000, max_size=256):
    q = Queue(mem, max_size)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, desc, avail, used
    return q


def test_valid_setup_and_reset(mem):
    q = configure(mem)
    q.ready = True
    assert q.ready
    q.next_avail = q.next_used = 7
    q.reset()
    assert not q.ready
    assert (q.size, q.desc_table, q.next_avail, q.next_used, q.event_idx) == (256, 0, 0, 0, False)
    assert q.pop() is None  # not ready: nothing to pop
    q.set_notification(True)  # not ready: no-op
    assert not q.needs_notification()


@pytest.mark.parametrize("size", [0, 3, 12, 255, 512, 1 << 16])
def test_bad_queue_size(mem, size):
    q = configure(mem, size=size)
    with pytest.raises(QueueError, match="power of 2"):
        q.ready = True
    assert not q.ready


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("desc_table", 0x1008, "aligned"),
        ("avail_ring", 0x2001, "aligned"),
        ("used_ring", 0x3002, "aligned"),
        ("desc_table", RAM - 16 * 16 + 16, "not in guest RAM"),
        ("avail_ring", RAM - (6 + 2 * 16) + 2, "not in guest RAM"),
        ("used_ring", RAM - (6 + 8 * 16) + 4 - 2, "not in guest RAM"),
        ("used_ring", RAM, "not in guest RAM"),
        ("desc_table", 1 << 64, "not in guest RAM"),
        ("desc_table", (1 << 64) - 16, "not in guest RAM"),
    ],
)
def test_bad_ring_addresses(mem, field, value, match):
    q = configure(mem)
    setattr(q, field, value)
    with pytest.raises(QueueError, match=match):
        q.ready = True
    assert not q.ready


def test_rings_may_end_exactly_at_end_of_ram(mem):
    q = configure(mem, desc=RAM - 16 * 16, avail=RAM - 16 * 16 - 40, used=RAM - 16 * 16 - 40 - 136)
    q.ready = True


def test_avail_idx_jumping_more_than_size(mem, mq):
    q = mq.create_queue()
    mq.publish_avail(17)
    before = snapshot(mem)
    with pytest.raises(QueueError, match="17 entries ahead"):
        q.pop()
    assert snapshot(mem) == before
    mq.publish_avail(16)  # exactly a full ring is fine
    assert q.available() == 16


def test_max_size_must_be_power_of_two(mem):
    with pytest.raises(ValueError):
        Queue(mem, 100)
    with pytest.raises(ValueError):
        Queue(mem, 65536)


# -- hostile chains -----------------------------------------------------------------
# Each case writes one bad chain and makes it available; it returns
# (head, completable, match).  The test pops it, expects ChainError, completes
# it if it can, checks the queue still serves the next good chain, and that
# nothing outside the used ring was written.


def bad_head(mq):
    mq.add_head(16)
    return 16, False, "head index"


def bad_head_max(mq):
    mq.add_head(0xFFFF)
    return 0xFFFF, False, "head index"


def bad_next(mq):
    mq.write_desc(8, 0x10000, 8, NEXT, 16)
    mq.add_head(8)
    return 8, True, "next index 16"


def two_descriptor_loop(mq):
    mq.write_desc(4, 0x10000, 8, NEXT, 5)
    mq.write_desc(5, 0x10000, 8, NEXT, 4)
    mq.add_head(4)
    return 4, True, "loops or is longer than the queue"


def self_loop(mq):
    mq.write_desc(6, 0x10000, 8, NEXT, 6)
    mq.add_head(6)
    return 6, True, "loops or is longer"


def chain_longer_than_queue(mq):
    # A cycle through descriptors 2..15: every step is valid, but the walk
    # goes on past the queue size.
    for i in range(2, 16):
        mq.write_desc(i, 0x10000, 8, NEXT, i + 1 if i < 15 else 2)
    mq.add_head(2)
    return 2, True, "loops or is longer than the queue \\(16\\)"


def addr_beyond_ram(mq):
    mq.write_desc(9, RAM, 1)
    mq.add_head(9)
    return 9, True, "not in guest RAM"


def len_past_end_of_ram(mq):
    mq.write_desc(9, RAM - 16, 17, WRITE)
    mq.add_head(9)
    return 9, True, "not in guest RAM"


def addr_plus_len_wraps(mq):
    mq.write_desc(9, (1 << 64) - 8, 16)
    mq.add_head(9)
    return 9, True, "not in guest RAM"


def huge_len(mq):
    mq.write_desc(9, 0, 0xFFFFFFFF, WRITE)
    mq.add_head(9)
    return 9, True, "not in guest RAM"


def bad_second_descriptor(mq):
    mq.write_desc(9, 0x10000, 8, NEXT, 10)
    mq.write_desc(10, (1 << 64) - 1, 1, WRITE)
    mq.add_head(9)
    return 9, True, "not in guest RAM"


def readable_after_writable(mq):
    mq.add_chain([Buf(0x10000, 8, write=True), Buf(0x10100, 8)])
    return 0, True, "readable descriptor after a device-writable"


def zero_length_readable_after_writable(mq):
    mq.add_chain([Buf(0x10000, 8, write=True), Buf(0x10100, 0)])
    return 0, True, "readable descriptor after"


def readable_after_writable_across_indirect(mq):
    table = 0x20000
    mq.add_indirect_chain([Buf(0x10100, 8)], table, direct=[Buf(0x10000, 8, write=True)])
    return 0, True, "readable descriptor after"


def indirect_not_negotiated(mq):
    mq.add_indirect_chain([Buf(0x10000, 8)], 0x20000)
    return 0, True, "not negotiated"


def indirect_in_indirect(mq):
    mq.write_desc(0, 0x20100, 16, INDIRECT, table=0x20000)
    mq.write_desc(0, 0x10000, 8, table=0x20100)
    mq.write_desc(3, 0x20000, 16, INDIRECT)
    mq.add_head(3)
    return 3, True, "indirect descriptor inside an indirect table"


def indirect_with_next(mq):
    mq.write_desc(0, 0x10000, 8, table=0x20000)
    mq.write_desc(3, 0x20000, 16, INDIRECT | NEXT, 4)
    mq.write_desc(4, 0x10000, 8)
    mq.add_head(3)
    return 3, True, "both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"


def _indirect_len(length):
    def case(mq):
        mq.write_desc(3, 0x20000, length, INDIRECT)
        mq.add_head(3)
        return 3, True, "indirect table length"

    case.__name__ = f"indirect_len_{length:#x}"
    return case


def indirect_table_outside_ram(mq):
    mq.write_desc(3, RAM - 16, 32, INDIRECT)
    mq.add_head(3)
    return 3, True, "indirect table .* is not in guest RAM"


def indirect_bad_next(mq):
    mq.write_desc(0, 0x10000, 8, NEXT, 2, table=0x20000)  # the table has 2 entries
    mq.write_desc(3, 0x20000, 32, INDIRECT)
    mq.add_head(3)
    return 3, True, "next index 2 is not below the indirect table size 2"


def indirect_loop(mq):
    mq.write_desc(0, 0x10000, 8, NEXT, 1, table=0x20000)
    mq.write_desc(1, 0x10000, 8, NEXT, 0, table=0x20000)
    mq.write_desc(3, 0x20000, 32, INDIRECT)
    mq.add_head(3)
    return 3, True, "loops or is longer than the indirect table \\(2\\)"


def indirect_bad_buffer(mq):
    mq.write_desc(0, 0x10000, 8, NEXT | WRITE, 1, table=0x20000)
    mq.write_desc(1, RAM - 4, 8, WRITE, table=0x20000)
    mq.write_desc(3, 0x20000, 32, INDIRECT)
    mq.add_head(3)
    return 3, True, "not in guest RAM"


HOSTILE = [
    bad_head,
    bad_head_max,
    bad_next,
    two_descriptor_loop,
    self_loop,
    chain_longer_than_queue,
    addr_beyond_ram,
    len_past_end_of_ram,
    addr_plus_len_wraps,
    huge_len,
    bad_second_descriptor,
    readable_after_writable,
    zero_length_readable_after_writable,
    readable_after_writable_across_indirect,
    indirect_in_indirect,
    indirect_with_next,
    indirect_table_outside_ram,
    indirect_bad_next,
    indirect_loop,
    indirect_bad_buffer,
    *(_indirect_len(n) for n in (0, 8, 17, 24, MAX_INDIRECT_LEN + 16, 0xFFFFFFF0)),
]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.__name__)
def test_hostile_chain(mem, case):
    mq = MockSplitQueue(mem, 16, base=0x1000)
    q = mq.create_queue(indirect=True)
    head, completable, match = case(mq)
    good = mq.add_chain([Buf(0x30000, 8), Buf(0x30008, 8, write=True)])
    before = snapshot(mem)

    with pytest.raises(ChainError, match=match) as info:
        q.pop()
    err = info.value
    assert (err.head, err.completable) == (head, completable)
    if err.completable:
        q.add_used(err.head, 0)
    chain = q.pop()  # the queue goes on
    assert chain.head == good and chain.readable == [(0x30000, 8)]
    q.add_used(chain.head, 0)
    q.publish_used()
    expected = ([(head, 0)] if completable else []) + [(good, 0)]
    assert mq.used_entries() == expected
    assert_only_used_ring_changed(mem, before, mq)


def test_indirect_not_negotiated(mem):
    mq = MockSplitQueue(mem, 16, base=0x1000)
    q = mq.create_queue(indirect=False)
    head, _, match = indirect_not_negotiated(mq)
    with pytest.raises(ChainError, match=match) as info:
        q.pop()
    assert info.value.head == head


def test_chain_longer_than_four_gib_total():
    # A 1 MiB direct buffer then an indirect table of 4096 1 MiB buffers: every
    # buffer is in RAM but the chain adds up to more than 2^32 bytes.
    with GuestMemory(2 * MiB) as mem:
        mq = MockSplitQueue(mem, 16, base=0x1000)
        q = mq.create_queue(indirect=True)
        n = MAX_INDIRECT_LEN // 16
        mq.add_indirect_chain([Buf(0x100000, MiB, write=True)] * n, 0x10000, direct=[Buf(0x100000, MiB)])
        with pytest.raises(ChainError, match="2\\^32"):
            q.pop()
        # One buffer fewer is exactly 2^32 bytes: fine.
        mq.add_indirect_chain([Buf(0x100000, MiB, write=True)] * n, 0x10000)
        chain = q.pop()
        assert chain.writable_len == 1 << 32 and len(chain.writable) == n


def test_add_used_to_a_bad_head_is_refused(mem, mq):
    q = mq.create_queue()
    mq.add_head(20)
    with pytest.raises(ChainError) as info:
        q.pop()
    assert not info.value.completable
    with pytest.raises(QueueError):
        q.add_used(info.value.head, 0)
