"""Property tests for virtio/queue.py: a driver that writes anything at all.

Random descriptor tables, indirect tables, available rings and indices, in
small guest memories with the rings right at the end of RAM.  The queue may
only ever raise QueueError or ChainError; every buffer it returns is RAM and
agrees with a simple reference walk; and draining and completing writes no
byte of guest memory outside the used ring.

Two memories guard against code that reaches the mapping without
`mem.offset`: one split around a (small) MMIO hole, whose upper half is guest
address 4 GiB but buffer offset 64 KiB, and one that stores guest address g at
buffer offset g + 4096 behind a canary.
"""

from __future__ import annotations

import ctypes
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.mockqueue import Buf, MockSplitQueue, SkewedGuestMemory
from virtio.queue import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_LEN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    Queue,
    QueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from vmm.memory import GuestMemory

KiB = 1024
HI = 4 << 30  # guest address of the split memory's upper region
REGION = 64 * KiB

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def memories():
    split = GuestMemory(2 * REGION, hole_start=REGION)
    skewed = SkewedGuestMemory(REGION)
    yield {"split": split, "skewed": skewed}
    split.close()
    skewed.close()


def ram_ranges(kind: str) -> list[tuple[int, int]]:
    return [(0, REGION), (HI, HI + REGION)] if kind == "split" else [(0, REGION)]


def clear(mem: GuestMemory, kind: str) -> None:
    for start, end in ram_ranges(kind):
        mem.fill(start, end - start, 0)


def in_ram(kind: str, gpa: int, length: int) -> bool:
    return any(start <= gpa and gpa + length <= end for start, end in ram_ranges(kind))


# -- what a hostile driver writes ---------------------------------------------------

# Where the indirect tables live (both memories have RAM there).
TABLES = (0x2000, 0x3000)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)


def mostly(common, rare, weight: int = 4):
    """`common` about `weight` times as often as `rare`."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda pick: common if pick else rare)


def interesting_addr():
    edges = []
    for base in (0, REGION, HI, HI + REGION, 2**64):
        for delta in (-4097, -17, -16, -8, -1, 0, 1, 8):
            if 0 <= base + delta < 2**64:
                edges.append(base + delta)
    return st.one_of(
        st.sampled_from(edges),
        st.sampled_from(TABLES),
        st.integers(0, REGION),
        st.integers(0, REGION),
        st.integers(HI, HI + REGION),
        u64,
    )


def interesting_len():
    return mostly(
        st.one_of(st.sampled_from([0, 1, 16, 32, 48, 64, 128]), st.integers(0, 256)),
        st.one_of(st.sampled_from([15, 17, 4096, REGION, MAX_INDIRECT_LEN, 0xFFFFFFFF, 0xFFFFFFF0]), u32),
        weight=3,
    )


def flags():
    return mostly(st.integers(0, 7), u16)


@st.composite
def wild_descriptor(draw, nexts):
    return (draw(interesting_addr()), draw(interesting_len()), draw(flags()), draw(nexts))


@st.composite
def plausible_descriptor(draw, nexts):
    """What a driver might really write (so that long and indirect chains happen)."""
    if draw(st.sampled_from([False, False, False, True])):
        return (draw(st.sampled_from(TABLES)), 16 * draw(st.integers(1, 8)), VIRTQ_DESC_F_INDIRECT, 0)
    region = draw(st.sampled_from([0, HI]))
    flags = draw(st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]))
    return (region + draw(st.integers(0, REGION - 512)), draw(st.integers(0, 512)), flags, draw(nexts))


def descriptor(nexts):
    return mostly(plausible_descriptor(nexts), wild_descriptor(nexts), weight=2)


@st.composite
def scenario(draw):
    kind = draw(st.sampled_from(["split", "skewed"]))
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    # Rings at the very end of a RAM region: used ring last, then avail, then the table.
    region_end = draw(st.sampled_from([REGION, HI + REGION] if kind == "split" else [REGION]))
    slack = draw(st.integers(0, 3))
    used = (region_end - used_ring_size(size) - 4 * slack) & ~3
    avail = (used - avail_ring_size(size)) & ~1
    desc = (avail - desc_table_size(size)) & ~15
    if draw(st.integers(0, 9)) == 0:  # sometimes, a driver that cannot place its rings
        which = draw(st.sampled_from(["desc", "avail", "used"]))
        bad = draw(st.one_of(st.integers(-8, 8).map(lambda d: region_end - 4 + d), interesting_addr()))
        desc, avail, used = (bad if which == "desc" else desc, bad if which == "avail" else avail, bad if which == "used" else used)
    nexts = mostly(st.integers(0, size - 1), st.one_of(st.integers(size, size + 1), u16))
    table = draw(st.lists(descriptor(nexts), min_size=size, max_size=size))
    itable_nexts = mostly(st.integers(0, 7), st.one_of(st.integers(8, 9), u16))
    itables = [draw(st.lists(descriptor(itable_nexts), max_size=8)) for _ in TABLES]
    heads = mostly(st.integers(0, size - 1), st.one_of(st.integers(size, size + 1), u16), weight=8)
    ring = draw(st.lists(heads, min_size=size, max_size=size))
    start = draw(st.one_of(st.integers(0, 4), st.integers(65530, 65535), u16))
    ahead = draw(mostly(st.integers(0, size), st.one_of(st.integers(size + 1, size + 2), u16), weight=8))
    return {
        "kind": kind,
        "size": size,
        "desc": desc,
        "avail": avail,
        "used": used,
        "table": table,
        "itables": itables,
        "ring": ring,
        "start": start,
        "avail_idx": (start + ahead) & 0xFFFF,
        "avail_flags": draw(u16),
        "used_event": draw(u16),
        "event_idx": draw(st.booleans()),
        "indirect": draw(mostly(st.just(True), st.just(False), weight=3)),
    }


def write_scenario(mem, s) -> MockSplitQueue | None:
    """Lay the scenario out in guest memory; None if its rings are not all RAM."""
    size, kind = s["size"], s["kind"]
    areas_ok = all(
        in_ram(kind, gpa, n) and gpa >= 0
        for gpa, n in ((s["desc"], desc_table_size(size)), (s["avail"], avail_ring_size(size)), (s["used"], used_ring_size(size)))
    )
    if not areas_ok:
        return None
    mq = MockSplitQueue(mem, size, desc_table=s["desc"], avail_ring=s["avail"], used_ring=s["used"], start_idx=s["start"])
    for i, d in enumerate(s["table"]):
        mq.write_desc(i, *d)
    for base, entries in zip(TABLES, s["itables"]):
        for i, d in enumerate(entries):
            mq.write_desc(i, *d, table=base)
    for slot, head in enumerate(s["ring"]):
        mq.set_avail_entry(slot, head)
    mq.publish_avail(s["avail_idx"])
    mq.set_avail_flags(s["avail_flags"])
    mq.set_used_event(s["used_event"])
    return mq


# -- a reference walk, written for clarity rather than speed --------------------------


def read_desc(mem, gpa: int) -> tuple[int, int, int, int]:
    raw = mem.read(gpa, 16)
    return (
        int.from_bytes(raw[0:8], "little"),
        int.from_bytes(raw[8:12], "little"),
        int.from_bytes(raw[12:14], "little"),
        int.from_bytes(raw[14:16], "little"),
    )


def reference_chain(kind, mem, size, desc_table, head, indirect_ok):
    """("ok", readable, writable, used_indirect) or ("error", completable)."""
    if head >= size:
        return ("error", False)
    readable, writable = [], []
    saw_write = used_indirect = False

    def walk(table_gpa, entries, first, nested):
        nonlocal saw_write, used_indirect
        index, steps = first, 0
        while True:
            steps += 1
            if steps > entries or index >= entries:
                return "error"
            addr, length, fl, nxt = read_desc(mem, table_gpa + 16 * index)
            if fl & VIRTQ_DESC_F_INDIRECT:
                if nested or not indirect_ok or fl & VIRTQ_DESC_F_NEXT:
                    return "error"
                if length == 0 or length % 16 or length > MAX_INDIRECT_LEN or not in_ram(kind, addr, length):
                    return "error"
                used_indirect = True
                return walk(addr, length // 16, 0, True)
            write = bool(fl & VIRTQ_DESC_F_WRITE)
            if not write and saw_write:
                return "error"
            saw_write |= write
            if length:
                if not in_ram(kind, addr, length):
                    return "error"
                (writable if write else readable).append((addr, length))
            if not fl & VIRTQ_DESC_F_NEXT:
                return "ok"
            index = nxt

    if walk(desc_table, size, head, False) == "error":
        return ("error", True)
    if sum(n for _, n in readable + writable) > MAX_CHAIN_BYTES:
        return ("error", True)
    return ("ok", readable, writable, used_indirect)


# -- the properties --------------------------------------------------------------------


def overlapping(s) -> bool:
    size = s["size"]
    spans = [
        (s["desc"], desc_table_size(size)),
        (s["avail"], avail_ring_size(size)),
        (s["used"], used_ring_size(size)),
        *((base, 16 * len(entries)) for base, entries in zip(TABLES, s["itables"])),
    ]
    return any(
        a < b + m and b < a + n for i, (a, n) in enumerate(spans) for b, m in spans[i + 1 :] if n and m
    )


def assert_only_used_ring_written(mem, s, before: bytes) -> None:
    """Every byte of the mapping outside the used ring (canary included) is unchanged."""
    after = bytes(mem.buffer)
    start = mem.offset(s["used"], used_ring_size(s["size"]))
    end = start + used_ring_size(s["size"])
    assert after[:start] == before[:start]
    assert after[end:] == before[end:]
    if isinstance(mem, SkewedGuestMemory):
        assert mem.canary_intact()


@FUZZ
@given(s=scenario())
def test_hostile_driver(memories, s):
    kind, size = s["kind"], s["size"]
    mem = memories[kind]
    clear(mem, kind)
    mq = write_scenario(mem, s)
    if mq is None:
        # Rings (partly) outside RAM: the queue must refuse them.
        q = Queue(mem, 16)
        q.size, q.desc_table, q.avail_ring, q.used_ring = size, s["desc"], s["avail"], s["used"]
        with pytest.raises(QueueError):
            q.ready = True
        assert not q.ready and q.pop() is None
        event("rings not in RAM")
        return
    q = mq.create_queue(16, event_idx=s["event_idx"], indirect=s["indirect"], ready=False)
    if s["desc"] % 16 or s["avail"] % 2 or s["used"] % 4:
        with pytest.raises(QueueError, match="aligned"):
            q.ready = True
        event("rings misaligned")
        return
    q.ready = True

    before = bytes(mem.buffer)
    if overlapping(s):
        # The driver laid its rings or tables over each other, so the device's
        # used-ring writes can change what it reads next: no exact expectations,
        # only that nothing but QueueError/ChainError escapes and only the used
        # ring is written.
        try:
            for chain in q.drain():
                q.add_used(chain.head, min(chain.writable_len, 0xFFFFFFFF))
            q.publish_used()
            q.needs_notification()
        except QueueError:
            pass
        assert_only_used_ring_written(mem, s, before)
        event("overlapping rings")
        return

    pending = (s["avail_idx"] - s["start"]) & 0xFFFF
    completed = []
    if pending > size:
        event("avail.idx too far ahead")
        with pytest.raises(QueueError):
            q.pop()
    else:
        for n in range(pending):
            slot = (s["start"] + n) % size
            head = s["ring"][slot]
            expected = reference_chain(kind, mem, size, s["desc"], head, s["indirect"])
            try:
                chain = q.pop()
            except ChainError as err:
                assert expected == ("error", err.completable), (err, expected)
                assert err.head == head
                event("ChainError: " + re.sub(r"0x[0-9a-f]+|\d+", "N", err.reason))
                if err.completable:
                    q.add_used(err.head, 0)
                    completed.append((head, 0))
                continue
            assert expected[:3] == ("ok", chain.readable, chain.writable)
            assert chain.head == head
            via = "indirect" if expected[3] else "direct"
            event(f"{via} chain of {len(chain.readable)}r/{len(chain.writable)}w buffers")
            for (gpa, length), view in zip(chain.readable + chain.writable, chain.readable_views() + chain.writable_views()):
                assert length > 0 and in_ram(kind, gpa, length) and mem.contains(gpa, length)
                assert len(view) == length
            assert chain.readable_len == sum(n for _, n in chain.readable)
            assert chain.writable_len == sum(n for _, n in chain.writable)
            written = min(chain.writable_len, 0xFFFFFFFF)
            q.add_used(chain.head, written)
            completed.append((head, written))
        assert q.pop() is None
        assert q.next_avail == s["avail_idx"]

    # Notifications and the whole drain helper, on whatever is left.
    q.publish_used()
    q.needs_notification()
    q.set_notification(False)
    q.set_notification(True)
    try:
        for chain in q.drain():
            pass
    except QueueError:
        assert pending > size

    assert_only_used_ring_written(mem, s, before)
    assert mq.used_idx == q.next_used == (s["start"] + len(completed)) & 0xFFFF
    assert mq.used_entries() == completed


def view_offset(mem, view) -> int:
    """Where in mem.buffer a memoryview of guest RAM starts."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) - ctypes.addressof(ctypes.c_char.from_buffer(mem.buffer))


@FUZZ
@given(s=scenario())
def test_pop_buffers_agrees_with_pop(memories, s):
    """pop_buffers() (a fast walk for one-way chains, the full one otherwise) gives, for every
    chain, what pop() gives - or ChainError for a chain that mixes readable and writable
    buffers - with views of exactly the chain's ranges."""
    kind, size = s["kind"], s["size"]
    mem = memories[kind]
    clear(mem, kind)
    mq = write_scenario(mem, s)
    if mq is None or s["desc"] % 16 or s["avail"] % 2 or s["used"] % 4 or overlapping(s):
        return  # covered by test_hostile_driver
    fast = mq.create_queue(16, event_idx=s["event_idx"], indirect=s["indirect"])
    full = mq.create_queue(16, event_idx=s["event_idx"], indirect=s["indirect"])  # reads only
    if (s["avail_idx"] - s["start"]) & 0xFFFF > size:
        with pytest.raises(QueueError):
            fast.pop_buffers()
        return
    before = bytes(mem.buffer)
    while True:
        try:
            chain = full.pop()
        except ChainError as err:
            with pytest.raises(ChainError) as got:
                fast.pop_buffers()
            assert (got.value.head, got.value.completable) == (err.head, err.completable)
            continue
        if chain is None:
            assert fast.pop_buffers() is None
            break
        if chain.readable and chain.writable:
            with pytest.raises(ChainError, match="mixes") as got:
                fast.pop_buffers()
            assert got.value.head == chain.head and got.value.completable
            event("mixed chain")
            continue
        head, views, length, writable, ring_descriptors = fast.pop_buffers()
        ranges = chain.writable if chain.writable else chain.readable
        assert (head, writable, ring_descriptors) == (chain.head, bool(chain.writable), chain.ring_descriptors)
        assert length == sum(n for _, n in ranges)
        assert [(view_offset(mem, v), len(v)) for v in views] == [(mem.offset(g, n), n) for g, n in ranges]
        event(f"{'writable' if writable else 'readable'} chain of {len(views)} buffers")
    assert fast.next_avail == full.next_avail
    assert bytes(mem.buffer) == before


@st.composite
def good_chains(draw):
    """Chains a well-behaved driver would make: readable buffers before writable ones."""
    n_read = draw(st.integers(0, 3))
    n_write = draw(st.integers(0 if n_read else 1, 3))
    bufs = [(draw(st.integers(1, 300)), False) for _ in range(n_read)]
    bufs += [(draw(st.integers(1, 300)), True) for _ in range(n_write)]
    return draw(st.sampled_from(["direct", "indirect", "mixed"])), bufs


@FUZZ
@given(
    chains=st.lists(good_chains(), min_size=1, max_size=8),
    start=st.one_of(st.integers(65528, 65535), u16),
    event_idx=st.booleans(),
    kind=st.sampled_from(["split", "skewed"]),
)
def test_well_behaved_driver_round_trip(memories, chains, start, event_idx, kind):
    mem = memories[kind]
    clear(mem, kind)
    base = HI if kind == "split" else 0
    mq = MockSplitQueue(mem, 8, base=base + REGION - 4 * KiB, data_base=base + 0x4000, start_idx=start)
    q = mq.create_queue(event_idx=event_idx, indirect=True)
    # Batches of up to 4 chains of at most 2 descriptors each: they fit the 8-entry table.
    batches = [chains[i : i + 4] for i in range(0, len(chains), 4)]
    fill = 0
    for batch in batches:
        expected = []
        for style, spec in batch:
            bufs = [Buf(mq.alloc(n), n, write) for n, write in spec]
            if style == "direct" and len(bufs) <= 2:
                head = mq.add_chain(bufs)
            elif style == "mixed" and len(bufs) > 1:
                head = mq.add_indirect_chain(bufs[1:], direct=bufs[:1])
            else:
                head = mq.add_indirect_chain(bufs)
            expected.append((head, bufs))
        results = []
        for chain in q.drain():
            fill = (fill + 1) & 0xFF
            for view in chain.writable_views():
                view[:] = bytes([fill]) * len(view)
            q.add_used(chain.head, chain.writable_len)
            results.append((chain, fill))
        q.publish_used()
        assert len(results) == len(expected)
        for (head, bufs), (chain, pattern) in zip(expected, results):
            assert chain.head == head
            assert chain.readable == [(b.addr, b.length) for b in bufs if not b.write]
            assert chain.writable == [(b.addr, b.length) for b in bufs if b.write]
            for b in bufs:
                if b.write:
                    assert mem.read(b.addr, b.length) == bytes([pattern]) * b.length
        assert mq.used_entries() == [(c.head, c.writable_len) for c, _ in results]
    assert q.next_avail == q.next_used == (start + len(chains)) & 0xFFFF
    if kind == "skewed":
        assert mem.canary_intact()


@settings(max_examples=500, deadline=None)
@given(event=u16, old=u16, count=st.integers(0, 0xFFFF))
def test_vring_need_event_matches_its_definition(event, old, count):
    """True iff event_idx is one of the indices old, old+1, ..., new-1 (mod 2^16)."""
    new = (old + count) & 0xFFFF
    crossed = (event - old) & 0xFFFF < count
    assert vring_need_event(event, new, old) is crossed
