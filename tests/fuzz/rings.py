"""Split virtqueues decoded from fuzz input, and the reference walk of a chain.

`decode_ring(fdp, mem)` lays a whole queue out in a CheckedMemory of RAM_SIZE bytes: a
descriptor table, two indirect tables, an available ring (its entries, idx, flags and
used_event), the used ring's idx, from what the fuzzer chose, biased towards the shapes
drivers use (buffers in the data area, indirect descriptors pointing at the tables) with
raw garbage mixed in.  It returns a `Ring`, whose `queue()` is a virtio.queue.Queue set up
as a transport would.

`fuzzed_ring(fdp, memories)` does both for the usual target: one of `memories()` (RAM at
mapping offset 0, the fast paths' case, or behind a 4 KiB skew), the ring, every head's walk.

`reference_walk(mem, ring, head)` walks one chain by the rules of virtio 1.2, 2.7.5, written
from the spec for this purpose (it does not share code with virtio/queue.py): a `Walked`
(readable and writable (gpa, length) lists, zero-length buffers left out) or None where the
chain is malformed.  The targets compare what the device did against it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import atheris

from tests.fuzz.guestmem import CheckedMemory
from virtio.queue import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_LEN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    used_ring_size,
)

RAM_SIZE = 0x10000
DESC_TABLE, AVAIL_RING, USED_RING = 0x0000, 0x0400, 0x0800  # room for 64 entries each
INDIRECT_TABLES = (0x1000, 0x1400)  # 64 descriptors each
DATA = 0x2000  # buffers from here to RAM_SIZE
MAX_SIZE_LOG2 = 4  # queues of 1..16 entries (64 fit: hand-written seeds may use them)
MAX_INDIRECT_ENTRIES = 8
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")


@dataclass
class Ring:
    size: int
    event_idx: bool
    indirect: bool
    start: int  # the device's next_avail and next_used
    pending: int  # avail.idx - start, as the driver wrote it (may exceed size: a broken ring)
    heads: list[int] = field(default_factory=list)  # the avail entries from start, `pending` of them

    def queue(self, mem) -> Queue:
        q = Queue(mem, 1 << 6)
        q.size, q.desc_table, q.avail_ring, q.used_ring = self.size, DESC_TABLE, AVAIL_RING, USED_RING
        q.event_idx, q.indirect = self.event_idx, self.indirect
        q.next_avail = q.next_used = self.start
        q.ready = True
        return q

    def used_area(self) -> tuple[int, int]:
        return USED_RING, used_ring_size(self.size)

    def used_elements(self, mem, count: int) -> list[tuple[int, int]]:
        """The first `count` used elements from `start` as (id, len)."""
        return [mem.unpack(struct.Struct("<II"), USED_RING + 4 + 8 * ((self.start + k) % self.size))
                for k in range(count)]

    def used_idx(self, mem) -> int:
        return mem.unpack(U16, USED_RING + 2)[0]


def _descriptor(fdp: atheris.FuzzedDataProvider, limit: int) -> tuple[int, int, int, int]:
    """(addr, len, flags, next) of one descriptor in a table of `limit` entries."""
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 4:  # a buffer in the data area (maybe running off the end of RAM)
        addr = DATA + 8 * fdp.ConsumeIntInRange(0, (RAM_SIZE - DATA) // 8)
        length = fdp.ConsumeIntInRange(0, 0x1000)
        flags = fdp.ConsumeIntInRange(0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)
    elif kind <= 6:  # an indirect table (or something much like one)
        addr = INDIRECT_TABLES[fdp.ConsumeIntInRange(0, 1)]
        length = 16 * fdp.ConsumeIntInRange(0, MAX_INDIRECT_ENTRIES + 1) + (fdp.ConsumeIntInRange(0, 15) if kind == 6 else 0)
        flags = VIRTQ_DESC_F_INDIRECT | (fdp.ConsumeIntInRange(0, 3) if kind == 6 else 0)
    else:  # anything at all
        addr = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        length = fdp.ConsumeIntInRange(0, (1 << 32) - 1)
        flags = fdp.ConsumeIntInRange(0, 0xFFFF)
    nxt = fdp.ConsumeIntInRange(0, limit) if kind != 7 else fdp.ConsumeIntInRange(0, 0xFFFF)
    return addr, length, flags, nxt


def decode_ring(fdp: atheris.FuzzedDataProvider, mem, *, broken_avail: bool = True) -> Ring:
    """Lay out a queue from fuzz input (mem is cleared first).  `broken_avail`: avail.idx may
    run more than `size` ahead (a QueueError)."""
    mem.clear()
    size = 1 << fdp.ConsumeIntInRange(0, MAX_SIZE_LOG2)
    ring = Ring(size=size, event_idx=fdp.ConsumeBool(), indirect=fdp.ConsumeBool(),
                start=fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool() else 0, pending=0)
    for i in range(size):
        mem.pack(DESC, DESC_TABLE + 16 * i, *_descriptor(fdp, size))
    for table in INDIRECT_TABLES:
        n = fdp.ConsumeIntInRange(0, MAX_INDIRECT_ENTRIES)
        for i in range(n):
            mem.pack(DESC, table + 16 * i, *_descriptor(fdp, n))
    ring.pending = fdp.ConsumeIntInRange(0, size + (1 if broken_avail else 0))
    if ring.pending > size and fdp.ConsumeBool():
        ring.pending = fdp.ConsumeIntInRange(size, 0xFFFF)
    mem.pack(U16, AVAIL_RING, fdp.ConsumeIntInRange(0, 1))  # flags: NO_INTERRUPT
    for k in range(size):
        head = fdp.ConsumeIntInRange(0, size) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 0xFFFF)
        mem.pack(U16, AVAIL_RING + 4 + 2 * ((ring.start + k) % size), head)
    mem.pack(U16, AVAIL_RING + 2, (ring.start + ring.pending) & 0xFFFF)
    mem.pack(U16, AVAIL_RING + 4 + 2 * size, fdp.ConsumeIntInRange(0, 0xFFFF))  # used_event
    mem.pack(U16, USED_RING + 2, ring.start)
    ring.heads = [mem.unpack(U16, AVAIL_RING + 4 + 2 * ((ring.start + k) % size))[0]
                  for k in range(min(ring.pending, size))]
    return ring


@dataclass
class Walked:
    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    descriptors: int  # entries of the queue's table the chain occupies

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


def memories() -> tuple[CheckedMemory, CheckedMemory]:
    return CheckedMemory(RAM_SIZE), CheckedMemory(RAM_SIZE, skew=4096)


def fuzzed_ring(fdp: atheris.FuzzedDataProvider, mems) -> tuple[CheckedMemory, Ring, dict[int, Walked | None]]:
    """A memory the input picks, a ring laid out in it, and the reference walk of each head."""
    mem = mems[fdp.ConsumeIntInRange(0, len(mems) - 1)]
    ring = decode_ring(fdp, mem)
    return mem, ring, {head: reference_walk(mem, ring, head) for head in ring.heads}


def reference_walk(mem, ring: Ring, head: int) -> Walked | None:
    """The chain at `head` as the spec reads it, or None if the driver broke a rule."""
    if head >= ring.size:
        return None
    out = Walked(head, [], [], 0)
    base, entries, index, steps, nested = DESC_TABLE, ring.size, head, 0, False
    seen_writable = False  # (a zero-length writable descriptor still ends the readable part)
    while True:
        steps += 1
        if steps > entries:  # more descriptors than the table has: a loop
            return None
        addr, length, flags, nxt = mem.unpack(DESC, base + 16 * index)
        if flags & VIRTQ_DESC_F_INDIRECT:
            ok = (not nested and ring.indirect and not flags & VIRTQ_DESC_F_NEXT and length
                  and length % 16 == 0 and length <= MAX_INDIRECT_LEN and mem.contains(addr, length))
            if not ok:
                return None
            out.descriptors = steps
            base, entries, index, steps, nested = addr, length // 16, 0, 0, True
            continue
        if length and not mem.contains(addr, length):
            return None
        if flags & VIRTQ_DESC_F_WRITE:
            seen_writable = True
            if length:
                out.writable.append((addr, length))
        elif seen_writable:
            return None
        elif length:
            out.readable.append((addr, length))
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        index = nxt
        if index >= entries:
            return None
    if not nested:
        out.descriptors = steps
    if out.readable_len + out.writable_len > MAX_CHAIN_BYTES:
        return None
    return out



def plant(fdp: atheris.FuzzedDataProvider, mem, ring: Ring, payload) -> None:
    """Write `payload(fdp)` (a device's header, a command) at the start of up to 8 buffers the
    input picks among the descriptors laid out, as far as RAM goes: without it a device would
    only ever see the fill bytes.  The available and used rings are left alone."""
    tables = [(DESC_TABLE, ring.size)] + [(t, MAX_INDIRECT_ENTRIES) for t in INDIRECT_TABLES]
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        base, entries = tables[fdp.ConsumeIntInRange(0, len(tables) - 1)]
        addr = mem.unpack(DESC, base + 16 * fdp.ConsumeIntInRange(0, entries - 1))[0]
        data = payload(fdp)[: max(RAM_SIZE - addr, 0)]
        if 0 <= addr < RAM_SIZE and not (addr < USED_RING + 0x400 and AVAIL_RING < addr + len(data)):
            mem.write(addr, data)  # (not over the rings' indices and heads: the target has read them)
