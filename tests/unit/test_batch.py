"""virtio/batch.py: the numpy walk of many chains at once, against the one-chain walk.

The property test gives BatchReader.peek() the same random hostile rings as
tests/unit/test_queue_fuzz.py and checks that every chain it takes is one that
Queue.pop() accepts, going the asked way, with iovec entries at exactly that
chain's buffers; the examples check that a well-behaved driver's chains are all
taken and that complete() writes the used ring as add_used() would.
"""

from __future__ import annotations

import ctypes
from functools import partial

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.support.mockqueue import Buf, MockSplitQueue
from tests.unit.test_queue_fuzz import FUZZ, HI, REGION, clear, memories, overlapping, scenario, write_scenario  # noqa: F401
from virtio.batch import MAX_BATCH_DESCRIPTORS, BatchReader
from virtio.queue import ChainError, QueueError

KiB = 1024


def host_base(mem) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mem.buffer))


def add_styled(mq, style, bufs):
    """A chain of `bufs`: direct, indirect (the table out of order), or in-order (as Linux lays a
    table out); (its head, bufs)."""
    head = mq.add_chain(bufs) if style == "direct" else mq.add_indirect_chain(bufs, in_order=style == "in-order")
    return head, bufs


def assert_taken_as_built(batch, expected, mem):
    """The batch is all the (head, bufs) chains, in order, with iovecs at their buffers."""
    assert len(batch) == len(expected)
    base = host_base(mem)
    for i, (head, bufs) in enumerate(expected):
        assert batch.heads[i] == head
        assert [(int(a) - base, int(n)) for a, n in batch.iov[i, : batch.counts[i]]] == [(b.addr, b.length) for b in bufs]


def chain_ranges(chain, writable):
    """The buffers a peek(writable=...) row must name for this popped chain, and its readable count;
    None if that peek must not take it (it goes the other way, or both ways for a one-way peek)."""
    if writable is None:
        return chain.readable + chain.writable, len(chain.readable)
    if chain.readable if writable else chain.writable:
        return None
    return (chain.writable if writable else chain.readable), None


@settings(FUZZ, max_examples=1000)
@given(s=scenario(), writable=st.sampled_from([False, True, None]), limit=st.integers(1, 16))
def test_peek_takes_only_chains_pop_accepts(memories, s, writable, limit):
    kind, size = s["kind"], s["size"]
    mem = memories[kind]
    clear(mem, kind)
    mq = write_scenario(mem, s)
    if mq is None or s["desc"] % 16 or s["avail"] % 2 or s["used"] % 4 or overlapping(s):
        return
    q = mq.create_queue(16, event_idx=s["event_idx"], indirect=s["indirect"])
    full = mq.create_queue(16, event_idx=s["event_idx"], indirect=s["indirect"])  # reads only
    reader = BatchReader(q)
    try:
        if (s["avail_idx"] - s["start"]) & 0xFFFF > size:
            with pytest.raises(QueueError):
                reader.peek(limit, writable=writable)
            return
        before = bytes(mem.buffer)
        batch = reader.peek(limit, writable=writable)
        if batch is None:
            assert full.pop() is None
            return
        base = host_base(mem)
        for i in range(len(batch)):
            chain = full.pop()  # raises ChainError if the batch took a bad chain
            taken = chain_ranges(chain, writable)
            assert taken is not None, "the batch took a chain of the other way"
            ranges, readable = taken
            assert batch.heads[i] == chain.head
            count = int(batch.counts[i])
            assert [(int(a) - base, int(n)) for a, n in batch.iov[i, :count]] == [(mem.offset(g, n), n) for g, n in ranges]
            assert batch.lengths[i] == sum(n for _, n in ranges)
            assert batch.first[i] == ranges[0][0]
            if writable is None:
                assert batch.readable[i] == readable
            if batch.width:
                assert count == batch.width
        event(f"took {len(batch)} of {min(limit, (s['avail_idx'] - s['start']) & 0xFFFF)}")
        reader.consume(len(batch))
        assert q.next_avail == full.next_avail
        assert bytes(mem.buffer) == before
    except ChainError as err:
        pytest.fail(f"the batch took a chain pop() rejects: {err}")
    finally:
        reader.close()


@given(
    chains=st.lists(
        st.tuples(st.sampled_from(["direct", "indirect", "in-order"]), st.lists(st.integers(1, 300), min_size=1, max_size=3)),
        min_size=1,
        max_size=8,
    ),
    start=st.one_of(st.integers(65528, 65535), st.integers(0, 0xFFFF)),
    writable=st.booleans(),
)
@FUZZ
def test_well_behaved_chains_are_all_taken_and_completed(memories, chains, start, writable):
    """Every one-way chain of a well-behaved driver (low RAM, direct or one aligned indirect
    table) is taken; complete() writes what add_used() would, in order."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 32, base=REGION - 8 * KiB, data_base=0x4000, start_idx=start)
    q = mq.create_queue(event_idx=True, indirect=True)
    expected = [add_styled(mq, style, [Buf(mq.alloc(n), n, writable) for n in lengths]) for style, lengths in chains]
    reader = BatchReader(q)
    try:
        batch = reader.peek(32, writable=writable)
        assert_taken_as_built(batch, expected, mem)
        # the other way: nothing taken
        assert len(reader.peek(32, writable=not writable)) == 0
        reader.consume(len(batch))
        reader.complete(batch.heads, batch.lengths)
        q.publish_used()
        assert mq.used_entries() == [(head, sum(b.length for b in bufs)) for head, bufs in expected]
        assert q.next_avail == q.next_used == (start + len(chains)) & 0xFFFF
        assert reader.peek(32, writable=writable) is None
    finally:
        reader.close()


@settings(FUZZ, max_examples=600)
@given(
    chains=st.lists(
        st.tuples(st.sampled_from(["direct", "indirect", "in-order"]), st.lists(st.integers(1, 300), min_size=1, max_size=3)),
        min_size=1,
        max_size=6,
    ),
    writable=st.sampled_from([False, True, None]),
    target=st.integers(0, 63),
    field=st.sampled_from(["addr", "len", "flags", "next", "head"]),
    value=st.one_of(
        st.integers(0, 40),
        st.sampled_from([16, 4096, REGION - 1, REGION, HI, 2**32 - 1, 2**63, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    ),
)
def test_one_corrupted_field_never_gets_a_bad_chain_taken(memories, chains, writable, target, field, value):
    """A well-behaved ring with one descriptor field (direct or in an indirect table) or one
    available-ring entry overwritten: whatever peek() takes, pop() accepts, at the same buffers."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 32, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    full = mq.create_queue(event_idx=True, indirect=True)
    for style, lengths in chains:
        # (mixed: the first buffer device-readable, the others device-writable, as a block read)
        add_styled(mq, style, [Buf(mq.alloc(n), n, writable if writable is not None else k > 0) for k, n in enumerate(lengths)])
    if field == "head":
        mq.set_avail_entry(target % len(chains), value & 0xFFFF)
    else:
        a, n, f, nx = mq.read_desc(target % 32)
        if f & 4 and target % 2:  # now and then, inside the indirect table that descriptor points at
            table, index = a, target % max(1, n // 16)
            a, n, f, nx = mq.read_desc(index, table=table)
        else:
            table, index = None, target % 32
        new = {"addr": (value, n, f, nx), "len": (a, value & 0xFFFFFFFF, f, nx), "flags": (a, n, value & 0xFFFF, nx),
               "next": (a, n, f, value & 0xFFFF)}[field]
        mq.write_desc(index, *new, table=table)
    reader = BatchReader(q)
    try:
        batch = reader.peek(32, writable=writable)
        base = host_base(mem)
        for i in range(len(batch)):
            try:
                chain = full.pop()
            except ChainError as err:
                pytest.fail(f"the batch took chain {batch.heads[i]}, which pop() rejects: {err}")
            taken = chain_ranges(chain, writable)
            assert taken is not None, "the batch took a chain of the other way"
            ranges, readable = taken
            if writable is None:
                assert batch.readable[i] == readable
            assert batch.heads[i] == chain.head
            assert [(int(a) - base, int(n)) for a, n in batch.iov[i, : batch.counts[i]]] == [
                (mem.offset(g, n), n) for g, n in ranges
            ]
        event(f"took {len(batch)} of {len(chains)}")
    finally:
        reader.close()


def test_long_chains_and_high_ram_are_left_to_the_one_chain_walk(memories):
    """A chain longer than MAX_BATCH_DESCRIPTORS, or with a buffer above the 4 GiB hole, ends
    the batch: pop_buffers() serves it (it is valid)."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 64, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    mq.add_chain([Buf(mq.alloc(10), 10, False)])
    mq.add_indirect_chain([Buf(mq.alloc(4), 4, False) for _ in range(MAX_BATCH_DESCRIPTORS + 1)])
    mq.add_chain([Buf(HI + 0x100, 10, False)])
    reader = BatchReader(q)
    try:
        batch = reader.peek(8, writable=False)
        assert len(batch) == 1
        reader.consume(1)
        assert len(reader.peek(8, writable=False)) == 0
        head, views, length, writable, _ = q.pop_buffers()
        assert (len(views), length, writable) == (MAX_BATCH_DESCRIPTORS + 1, 4 * (MAX_BATCH_DESCRIPTORS + 1), False)
        assert len(reader.peek(8, writable=False)) == 0
        assert q.pop_buffers()[2] == 10
        assert reader.peek(8, writable=False) is None
    finally:
        reader.close()


def test_device_limits_end_the_batch(memories):
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 16, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    mq.add_chain([Buf(mq.alloc(12), 12, True), Buf(mq.alloc(100), 100, True)])
    mq.add_chain([Buf(mq.alloc(8), 8, True), Buf(mq.alloc(100), 100, True)])  # first buffer too short
    reader = BatchReader(q)
    try:
        batch = reader.peek(8, writable=True, min_first=12)
        assert len(batch) == 1 and batch.lengths[0] == 112
        assert len(reader.peek(8, writable=True, min_length=200)) == 0
        assert len(reader.peek(8, writable=True, max_length=100)) == 0
        assert len(reader.peek(8, writable=True, max_buffers=1)) == 0
        assert len(reader.peek(8, writable=True)) == 2
        addresses = batch.first + np.uint64(10)
        reader.write_u16(addresses, 0x1234)
        assert mem.read(int(batch.first[0]) + 10, 2) == b"\x34\x12"
    finally:
        reader.close()


@pytest.mark.parametrize("start", [0, 13], ids=["from-0", "round-the-end"])
def test_staged_used_elements_count_only_once_committed(memories, start):
    """stage() writes used elements past used.idx without handing them over; a length rewritten at
    used_len_base + 8 * slot before commit() is what the driver gets; commit(k) hands over k."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 16, base=REGION - 8 * KiB, data_base=0x4000, start_idx=start)
    q = mq.create_queue(event_idx=True)
    heads = [mq.add_chain([Buf(mq.alloc(64), 64, True)]) for _ in range(6)]
    reader = BatchReader(q)
    try:
        batch = reader.peek(16, writable=True)
        assert len(batch) == 6
        reader.consume(6)
        used0 = q.next_used
        reader.stage(batch.heads, batch.lengths)
        assert q.next_used == used0  # nothing counted yet
        q.publish_used()
        assert mq.used_entries() == []
        slot = reader.used_len_base + 8 * ((used0 + 1) & reader.used_mask)
        mem.buffer[slot : slot + 4] = (17).to_bytes(4, "little")
        reader.commit(2)
        q.publish_used()
        assert mq.used_entries() == [(heads[0], 64), (heads[1], 17)]
        reader.commit(4)
        q.publish_used()
        assert mq.used_entries() == [(heads[2], 64), (heads[3], 64), (heads[4], 64), (heads[5], 64)]
    finally:
        reader.close()


@given(
    chains=st.lists(
        st.tuples(st.sampled_from(["direct", "indirect", "in-order"]), st.integers(0, 3), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
)
@FUZZ
def test_mixed_chains_are_taken_with_their_readable_count(memories, chains):
    """writable=None (a block device's chains): device-readable buffers then device-writable ones are
    taken, Batch.readable says how many of each row's buffers are device-readable."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 64, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    expected = [
        add_styled(mq, style, [Buf(mq.alloc(16 + k), 16 + k, k >= reads) for k in range(reads + writes)] or [Buf(mq.alloc(8), 8)])
        for style, reads, writes in chains
    ]
    reader = BatchReader(q)
    try:
        batch = reader.peek(64, writable=None)
        assert_taken_as_built(batch, expected, mem)
        for i, (head, bufs) in enumerate(expected):
            assert batch.readable[i] == sum(not b.write for b in bufs)
    finally:
        reader.close()


@pytest.mark.parametrize("style", ["direct", "indirect", "in-order"])
def test_readable_after_writable_ends_a_mixed_batch(memories, style):
    """The one ordering rule a mixed peek adds: no device-readable buffer after a device-writable one."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 16, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    add = mq.add_chain if style == "direct" else partial(mq.add_indirect_chain, in_order=style == "in-order")
    add([Buf(mq.alloc(16), 16), Buf(mq.alloc(8), 8, True)])
    add([Buf(mq.alloc(16), 16), Buf(mq.alloc(8), 8, True), Buf(mq.alloc(8), 8)])
    reader = BatchReader(q)
    try:
        assert len(reader.peek(8, writable=None)) == 1
        reader.consume(1)
        assert len(reader.peek(8, writable=None)) == 0
        with pytest.raises(ChainError, match="readable descriptor after a device-writable"):
            q.pop()
    finally:
        reader.close()


def test_in_order_tables_go_as_one_block_and_others_step_by_step(memories):
    """Chains that are each one indirect table in table order, all of one size, come back with their
    width; a table of another order or size among them sends the batch the step-by-step way, which
    takes them all just the same."""
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 64, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)

    def request(in_order=True, data=2):
        bufs = [Buf(mq.alloc(16), 16)] + [Buf(mq.alloc(512), 512, True) for _ in range(data)] + [Buf(mq.alloc(1), 1, True)]
        return mq.add_indirect_chain(bufs, in_order=in_order)

    reader = BatchReader(q)
    try:
        heads = [request() for _ in range(5)]
        batch = reader.peek(64, writable=None)
        assert (len(batch), batch.width) == (5, 4)
        assert list(batch.heads) == heads and list(batch.readable) == [1] * 5 and list(batch.lengths) == [1041] * 5
        reader.consume(5)
        request(), request(in_order=False), request(data=1)
        batch = reader.peek(64, writable=None)
        assert (len(batch), batch.width) == (3, 0)
        assert list(batch.counts) == [4, 4, 3] and list(batch.readable) == [1, 1, 1]
    finally:
        reader.close()


@pytest.mark.parametrize(
    "entry,field,value,taken,valid",
    [
        (1, "next", 0, 0, False),  # back to entry 0: a loop
        (1, "next", 7, 0, False),  # past the table
        (1, "next", 3, 1, True),  # skips entry 2: a valid chain of another order (the step-by-step walk)
        (1, "flags", 1 | 2 | 4, 0, False),  # an indirect descriptor in the table
        (3, "flags", 2 | 1, 0, False),  # the last one goes on, back to entry 0
        (2, "len", 0, 0, True),  # an empty buffer: valid, but not a batch's (the one-chain walk's)
        (2, "addr", 2**64 - 256, 0, False),  # a buffer that wraps
        (0, "addr", REGION - 8, 0, False),  # a header that runs past RAM's end
    ],
)
def test_a_bad_in_order_table_is_never_taken_as_one(memories, entry, field, value, taken, valid):
    mem = memories["split"]
    clear(mem, "split")
    mq = MockSplitQueue(mem, 16, base=REGION - 8 * KiB, data_base=0x4000)
    q = mq.create_queue(event_idx=True, indirect=True)
    full = mq.create_queue(event_idx=True, indirect=True)
    table = mq.alloc(64, 16)
    bufs = [Buf(mq.alloc(16), 16), Buf(mq.alloc(512), 512, True), Buf(mq.alloc(512), 512, True), Buf(mq.alloc(1), 1, True)]
    mq.add_indirect_chain(bufs, table, in_order=True)
    a, n, f, nx = mq.read_desc(entry, table=table)
    mq.write_desc(entry, **{"addr": a, "length": n, "flags": f, "next": nx, **{"length" if field == "len" else field: value}},
                  table=table)
    reader = BatchReader(q)
    try:
        batch = reader.peek(8, writable=None)
        assert len(batch) == taken
        if valid:
            chain = full.pop()
            if taken:
                assert [(int(a) - host_base(mem), int(n)) for a, n in batch.iov[0, : batch.counts[0]]] == [
                    (mem.offset(g, n), n) for g, n in chain.readable + chain.writable
                ]
        else:
            with pytest.raises(ChainError):
                full.pop()
    finally:
        reader.close()
