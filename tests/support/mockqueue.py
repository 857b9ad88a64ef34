"""A driver's side of a split virtqueue, for tests (like rust-vmm's MockSplitQueue).

`MockSplitQueue` lays out a descriptor table, an available ring and a used ring
in a GuestMemory, adds descriptor chains the way a driver does (direct,
chained, indirect), and reads back what the device put in the used ring.  It
also has raw accessors for writing deliberately broken rings.  It writes guest
memory only through GuestMemory's checked accessors.

    mq = MockSplitQueue(mem, 16)
    q = mq.create_queue()                              # a ready virtio.queue.Queue
    head = mq.add_chain([Buf(hdr, 16), Buf(data, 512, write=True)])
    chain = q.pop(); q.add_used(chain.head, 512); q.publish_used()
    assert mq.used_entries() == [(head, 512)]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vmm.memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain as the driver describes it."""

    addr: int
    length: int
    write: bool = False


class SkewedGuestMemory(GuestMemory):
    """Guest RAM [0, size) stored at buffer offset gpa + skew, after a canary.

    Code that indexes `mem.buffer` with a guest address instead of going
    through `mem.offset(gpa, n)` reads the wrong bytes (and writes the canary),
    which tests can detect.
    """

    def __init__(self, size: int, skew: int = 4096, canary: int = 0xA5):
        super().__init__(size + skew, name="pyvmm-skewed-ram")
        self.ram_size = size
        self.skew = skew
        self.canary = bytes([canary]) * skew
        self.buffer[:skew] = self.canary
        self.direct_limit = 0  # every access goes through offset()

    def offset(self, gpa: int, length: int) -> int:
        if gpa < 0 or length < 0 or gpa + length > self.ram_size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        return gpa + self.skew

    def canary_intact(self) -> bool:
        return self.buffer[: self.skew] == self.canary


class MockSplitQueue:
    """The three areas of a split queue in guest memory, driven as a driver would.

    By default the areas are packed from `base`: the descriptor table, the
    available ring right after it, the used ring at the next 4-byte boundary.
    Any of them can be placed explicitly.  `start_idx` starts both ring
    indices (and the Queue from create_queue) there, for wrap-around tests.
    `alloc()` hands out data buffers from `data_base` (by default the page
    after the rings).
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        *,
        base: int = 0,
        desc_table: int | None = None,
        avail_ring: int | None = None,
        used_ring: int | None = None,
        start_idx: int = 0,
        data_base: int | None = None,
    ):
        self.mem = mem
        self.size = size
        self.desc_table = base if desc_table is None else desc_table
        self.avail_ring = self.desc_table + desc_table_size(size) if avail_ring is None else avail_ring
        self.used_ring = (
            align_up(self.avail_ring + avail_ring_size(size), 4) if used_ring is None else used_ring
        )
        self.start_idx = start_idx & 0xFFFF
        self.avail_idx = self.start_idx  # the driver's next avail.idx
        self.last_used = self.start_idx  # the driver's last seen used.idx
        self._next_desc = 0
        self._held: dict[int, list[int]] = {}  # head -> its descriptors, until the device uses it
        end = max(
            self.desc_table + desc_table_size(size),
            self.avail_ring + avail_ring_size(size),
            self.used_ring + used_ring_size(size),
        )
        self.end = end
        self._data = align_up(end, 4096) if data_base is None else data_base
        for gpa, length in self.areas():
            if mem.contains(gpa, length):
                mem.fill(gpa, length, 0)
        if mem.contains(self.avail_ring, 4):
            self.publish_avail()
        if mem.contains(self.used_ring, 4):
            mem.pack(U16, self.used_ring + 2, self.start_idx)

    # -- layout ----------------------------------------------------------------
    def areas(self) -> list[tuple[int, int]]:
        """(gpa, length) of the descriptor table, available ring and used ring."""
        return [
            (self.desc_table, desc_table_size(self.size)),
            (self.avail_ring, avail_ring_size(self.size)),
            (self.used_ring, used_ring_size(self.size)),
        ]

    def create_queue(
        self,
        max_size: int | None = None,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        ready: bool = True,
        cls: type[Queue] = Queue,
    ) -> Queue:
        """A Queue (or subclass) configured as a transport would after the driver set this one up."""
        q = cls(self.mem, max_size or max(self.size, 1))
        q.size = self.size
        q.desc_table = self.desc_table
        q.avail_ring = self.avail_ring
        q.used_ring = self.used_ring
        q.event_idx = event_idx
        q.indirect = indirect
        q.next_avail = self.start_idx
        q.next_used = self.start_idx
        if ready:
            q.ready = True
        return q

    def alloc(self, length: int, align: int = 8) -> int:
        """A fresh data buffer's gpa (a bump allocator, never freed)."""
        gpa = align_up(self._data, align)
        self._data = gpa + length
        return gpa

    # -- raw access (for broken rings) -------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0, *, table: int | None = None) -> None:
        """Write descriptor `index` of the queue's table (or of an indirect table at `table`)."""
        base = self.desc_table if table is None else table
        self.mem.pack(DESC, base + 16 * index, addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next & 0xFFFF)

    def read_desc(self, index: int, *, table: int | None = None) -> tuple[int, int, int, int]:
        base = self.desc_table if table is None else table
        return self.mem.unpack(DESC, base + 16 * index)

    def set_avail_entry(self, idx: int, head: int) -> None:
        """avail.ring[idx % size] = head (idx is a free-running index)."""
        self.mem.pack(U16, self.avail_ring + 4 + 2 * (idx % self.size), head & 0xFFFF)

    def publish_avail(self, idx: int | None = None) -> None:
        """Write avail.idx (by default, the driver's own count)."""
        if idx is not None:
            self.avail_idx = idx & 0xFFFF
        self.mem.pack(U16, self.avail_ring + 2, self.avail_idx)

    def add_head(self, head: int, *, publish: bool = True) -> None:
        """Make the chain at `head` available (as the driver's last step)."""
        self.set_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish_avail()

    def set_avail_flags(self, flags: int) -> None:
        self.mem.pack(U16, self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        """avail.used_event: interrupt me once used.idx passes this."""
        self.mem.pack(U16, self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    # -- what the device wrote ---------------------------------------------------
    @property
    def used_flags(self) -> int:
        return self.mem.unpack(U16, self.used_ring)[0]

    @property
    def used_idx(self) -> int:
        return self.mem.unpack(U16, self.used_ring + 2)[0]

    @property
    def avail_event(self) -> int:
        return self.mem.unpack(U16, self.used_ring + 4 + 8 * self.size)[0]

    def used_elem(self, idx: int) -> tuple[int, int]:
        """used.ring[idx % size] as (id, len)."""
        return self.mem.unpack(USED_ELEM, self.used_ring + 4 + 8 * (idx % self.size))

    def used_entries(self) -> list[tuple[int, int]]:
        """The (id, len) elements the device published since the last call, as a driver reaps them."""
        new = self.used_idx
        out = []
        while self.last_used != new:
            out.append(self.used_elem(self.last_used))
            self._held.pop(out[-1][0], None)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # -- adding chains like a driver -----------------------------------------------
    def _take_descs(self, n: int) -> list[int]:
        """n descriptor-table entries, round the table from where the last chain ended, passing
        over those of chains the device has not given back (it may use chains out of order) -
        unless there are not n others: then the next n regardless, as before (tests that never
        reap the used ring)."""
        if n > self.size:
            raise ValueError(f"a chain of {n} descriptors does not fit a queue of {self.size}")
        held = set().union(*self._held.values()) if self._held else set()
        out = [i for i in ((self._next_desc + k) % self.size for k in range(self.size)) if i not in held][:n]
        if len(out) < n:
            out = [(self._next_desc + i) % self.size for i in range(n)]
        self._next_desc = (out[-1] + 1) % self.size
        return out

    def write_chain(self, bufs: Iterable[Buf], indices: list[int], *, table: int | None = None) -> None:
        """Write `bufs` into descriptors `indices`, linked with NEXT in that order."""
        bufs = list(bufs)
        for i, (buf, index) in enumerate(zip(bufs, indices, strict=True)):
            flags = VIRTQ_DESC_F_WRITE if buf.write else 0
            nxt = 0
            if i + 1 < len(bufs):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = indices[i + 1]
            self.write_desc(index, buf.addr, buf.length, flags, nxt, table=table)

    def add_chain(self, bufs: Iterable[Buf], *, publish: bool = True) -> int:
        """A direct chain of `bufs` (readable ones first, as drivers must); returns its head."""
        bufs = list(bufs)
        indices = self._take_descs(len(bufs))
        self.write_chain(bufs, indices)
        self._held[indices[0]] = indices
        self.add_head(indices[0], publish=publish)
        return indices[0]

    def add_indirect_chain(
        self,
        bufs: Iterable[Buf],
        table: int | None = None,
        *,
        direct: Iterable[Buf] = (),
        publish: bool = True,
        in_order: bool = False,
    ) -> int:
        """A chain whose buffers are in an indirect table at `table` (allocated if None).

        `direct` buffers, if any, come first as ordinary descriptors, followed
        by the one VIRTQ_DESC_F_INDIRECT descriptor (the spec's device requirements allow that).
        in_order: the buffers in table order, as Linux lays a table out.
        """
        bufs = list(bufs)
        direct = list(direct)
        if table is None:
            table = self.alloc(16 * len(bufs), 16)
        # The device starts at entry 0; the rest go in descending entries
        # (0, n-1, n-2, ..., 1), to show that it follows `next`, not table order.
        order = [0] + list(range(len(bufs) - 1, 0, -1)) if bufs else []
        if in_order:
            order = list(range(len(bufs)))
        self.write_chain(bufs, order, table=table)
        indices = self._take_descs(len(direct) + 1)
        self.write_chain(direct, indices[:-1])
        if direct:
            addr, length, flags, _ = self.read_desc(indices[-2])
            self.write_desc(indices[-2], addr, length, flags | VIRTQ_DESC_F_NEXT, indices[-1])
        self.write_desc(indices[-1], table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        self._held[indices[0]] = indices
        self.add_head(indices[0], publish=publish)
        return indices[0]
