"""Split virtqueues, the device side (OASIS virtio 1.2, section 2.7).

A split virtqueue is three areas of guest RAM that the driver allocates and
tells the device about through the transport:

    descriptor table  16 * size bytes, align 16   struct virtq_desc[size]
    available ring     6 + 2 * size,   align 2    flags, idx, ring[size], used_event
    used ring          6 + 8 * size,   align 4    flags, idx, ring[size], avail_event

The driver writes descriptors and the available ring; the device reads them and
writes only the used ring.  Everything the driver writes is untrusted: every
index is bounds-checked, every buffer is checked to lie wholly in guest RAM
with `GuestMemory.offset`, and every chain is bounded in length, so a broken
or hostile driver can make the device fail a request (`ChainError`) or the
whole queue (`QueueError`), but never make it touch memory outside guest RAM,
loop forever, or write anywhere but the used ring.

This module knows nothing of transports or devices.  A transport writes the
driver-set fields (`size`, `desc_table`, `avail_ring`, `used_ring`, and
`ready`, which validates them) and the negotiated features (`event_idx`,
`indirect`); a device pops descriptor chains and completes them.  The intended
device worker, run on every kick (notification) from the driver:

    for chain in queue.drain():                    # bad chains are completed with 0
        written = handle(chain.readable_views(), chain.writable_views())
        queue.add_used(chain.head, written)        # element only
    queue.publish_used()                           # used.idx, once per batch
    if queue.needs_notification():                 # EVENT_IDX / NO_INTERRUPT
        interrupt()

`drain()` turns the driver's notifications off while it works and, when the
ring looks empty, turns them back on and looks once more, so a buffer made
available in between is never left waiting for a kick that will not come.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator

from vmm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# struct virtq_desc flags (2.7.5)
VIRTQ_DESC_F_NEXT = 1  # the chain continues in `next`
VIRTQ_DESC_F_WRITE = 2  # the buffer is device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors (2.7.5.3)

# struct virtq_avail flags (2.7.6) and struct virtq_used flags (2.7.8)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Reserved feature bits for the ring (6), for the transport's feature words.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29

# The largest split queue: the Queue Size field is 16 bits and must be a power of 2.
MAX_QUEUE_SIZE = 32768

# Alignment of the three areas (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

DESC_SIZE = 16
# An indirect table is bounded here at 64 KiB, i.e. 65536 / 16 = 4096
# descriptors: far more than any driver uses (Linux sizes the table to one
# request's scatter-gather list, which the device bounds through seg_max and
# the like), and it bounds the work one chain can cost us.
MAX_INDIRECT_LEN = 65536
# "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total" (2.7.5.2).
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
_pack_used = _USED_ELEM.pack_into

# Byte offsets inside the rings.
_AVAIL_IDX = 2
_AVAIL_RING = 4
_USED_FLAGS = 0
_USED_IDX = 2
_USED_RING = 4


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from old_idx to new_idx crosses event_idx (2.7.7.2).

    True when event_idx is in [old_idx, new_idx) modulo 2^16, i.e. the other
    side asked to be told once the index passes event_idx.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class VirtqueueError(Exception):
    """Base of the errors the driver's ring contents can cause."""


class QueueError(VirtqueueError):
    """The queue as a whole is unusable: the device should set DEVICE_NEEDS_RESET."""


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; the queue can go on.

    The chain's head has been consumed from the available ring.  When
    `completable` the device should return it with `queue.add_used(err.head, 0)`
    (or an error status, if it could find one) so the driver gets it back;
    a head that is not a valid descriptor index (head >= size) cannot be
    returned and `completable` is False.
    """

    def __init__(self, head: int, reason: str, *, completable: bool = True):
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason
        self.completable = completable


class DescriptorChain:
    """One popped request: its head index and its buffers, already validated.

    `readable` (device reads, driver wrote) and `writable` (device writes) are
    lists of (gpa, length) pairs in chain order, each wholly in guest RAM and
    with length > 0 (zero-length descriptors are skipped).  The views methods
    return zero-copy memoryviews of the same ranges, suitable for os.preadv /
    os.pwritev and socket scatter-gather calls.
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "ring_descriptors", "_mem")

    def __init__(
        self,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
        mem: GuestMemory,
        ring_descriptors: int = 1,
    ):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        # entries of the queue's descriptor table the chain occupies (an indirect table counts 1):
        # the driver gets them back only when the chain is used
        self.ring_descriptors = ring_descriptors
        self._mem = mem

    def readable_views(self) -> list[memoryview]:
        view = self._mem.view
        return [view(gpa, length) for gpa, length in self.readable]

    def writable_views(self) -> list[memoryview]:
        view = self._mem.view
        return [view(gpa, length) for gpa, length in self.writable]

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable!r}, "
            f"writable={self.writable!r})"
        )


class Queue:
    """The device's view of one split virtqueue.

    Driver-set fields, written by the transport: `size`, `desc_table`,
    `avail_ring`, `used_ring` (guest physical addresses) and `ready`.  Setting
    `ready = True` validates them and raises QueueError if the driver got them
    wrong.  Negotiated features, set by the transport before the driver sets
    the queue ready: `event_idx` (VIRTIO_F_EVENT_IDX), `indirect`
    (VIRTIO_F_INDIRECT_DESC).

    Device-side state: `next_avail`, the free-running 16-bit index of the next
    available-ring entry to pop, and `next_used`, of the next used-ring entry
    to fill.  Both start at 0; a snapshot restore may set them before `ready`.

    A Queue is not thread-safe: one device worker owns it while it is ready.
    """

    __slots__ = (
        "mem",
        "max_size",
        "size",
        "desc_table",
        "avail_ring",
        "used_ring",
        "event_idx",
        "indirect",
        "next_avail",
        "next_used",
        "_ready",
        "_desc_off",
        "_avail_off",
        "_used_off",
        "_avail_ring_word",
        "_used_ring_off",
        "_pending",
        "_used_idx",
        "_signalled_used",
        "_fence",
    )

    def __init__(self, mem: GuestMemory, max_size: int):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max_size {max_size} is not a power of 2 in [1, {MAX_QUEUE_SIZE}]")
        self.mem = mem
        self.max_size = max_size
        self._fence = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (the driver sets it all up again)."""
        self.size = self.max_size
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        self._ready = False
        # Buffer offsets of the three areas, valid while ready.
        self._desc_off = self._avail_off = self._used_off = 0
        self._avail_ring_word = self._used_ring_off = 0  # avail.ring[0] in mem.u16, used.ring[0] in mem.buffer
        # Entries known to be in the avail ring beyond next_avail (from the last avail.idx read).
        self._pending = 0
        # The value last written to used.idx, and its value at the last needs_notification().
        self._used_idx = 0
        self._signalled_used = 0

    # -- setup -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if value:
            self.activate()
        else:
            self._ready = False
            self._pending = 0

    def activate(self) -> None:
        """Validate the driver's configuration and start using the rings.

        Raises QueueError, leaving the queue not ready, unless the size is a
        power of 2 in [1, max_size] and each area is suitably aligned and lies
        wholly within one region of guest RAM.  Each area's buffer offset is
        computed here once: since the whole area is RAM, any index inside it
        (checked against `size` on every access) stays inside it.
        """
        self._ready = False
        size = self.size
        if not isinstance(size, int) or not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 in [1, {self.max_size}]")
        offsets = []
        for name, gpa, length, align in (
            ("descriptor table", self.desc_table, desc_table_size(size), DESC_ALIGN),
            ("available ring", self.avail_ring, avail_ring_size(size), AVAIL_ALIGN),
            ("used ring", self.used_ring, used_ring_size(size), USED_ALIGN),
        ):
            if gpa % align:
                raise QueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
            try:
                offsets.append(self.mem.offset(gpa, length))
            except GuestMemoryError as err:
                raise QueueError(f"{name} is not in guest RAM: {err}") from None
        self._desc_off, self._avail_off, self._used_off = offsets
        self._avail_ring_word = (self._avail_off + _AVAIL_RING) >> 1
        self._used_ring_off = self._used_off + _USED_RING
        self.next_avail &= 0xFFFF
        self.next_used &= 0xFFFF
        self._pending = 0
        self._used_idx = self.next_used
        self._signalled_used = self.next_used
        self._ready = True

    # -- the available ring --------------------------------------------------------
    def available(self) -> int:
        """Read avail.idx; return how many chains wait beyond next_avail.

        Raises QueueError if the driver claims more than `size` (the index can
        only run ahead of the device by at most the ring's length).
        """
        if not self._ready:
            return 0
        # On x86 loads are not reordered with other loads, so the ring entries
        # read after this see at least what the driver wrote before idx.
        avail_idx = self.mem.u16[(self._avail_off + _AVAIL_IDX) >> 1]
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"avail.idx {avail_idx} is {pending} entries ahead of the device's "
                f"{self.next_avail}, more than the queue size {self.size}"
            )
        self._pending = pending
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if there is none (or the queue is not ready).

        avail.idx is read only when the chains counted at the last read have
        all been popped, so a loop of pops reads it once per batch.  Raises
        ChainError for a malformed chain (its head is consumed all the same)
        and QueueError for a broken available ring.
        """
        if self._pending == 0 and self.available() == 0:
            return None
        slot = self.next_avail & (self.size - 1)
        head = self.mem.u16[(self._avail_off + _AVAIL_RING + 2 * slot) >> 1]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self._pending -= 1
        return self._read_chain(head)

    def pop_buffers(self) -> tuple[int, list[memoryview], int, bool, int] | None:
        """The next available chain as buffers going one way, or None if there is none.

        For devices whose every chain is either all device-readable or all
        device-writable (virtio-net: a transmitq chain is a frame to send, a
        receiveq chain room for one).  Returns (head, views, length, writable,
        ring_descriptors): memoryviews of the buffers in chain order, their total
        bytes, whether they are device-writable, and the descriptor-table entries
        the chain occupies (see DescriptorChain).  A chain that mixes readable and
        writable buffers raises ChainError, as a malformed one does.

        The usual shape - direct descriptors, or one indirect table, each buffer
        non-empty and in the RAM `GuestMemory.direct_limit` covers - is walked here
        in one tight loop with the same bounds (head and every `next` below the
        table's size, at most that many descriptors, so no loop); anything else,
        including every kind of error, is left to the full walk (`_read_chain`),
        so the rules live in one place.
        """
        if self._pending == 0 and self.available() == 0:
            return None
        size = self.size
        mem = self.mem
        next_avail = self.next_avail
        head = mem.u16[self._avail_ring_word + (next_avail & (size - 1))]
        self.next_avail = (next_avail + 1) & 0xFFFF
        self._pending -= 1
        if head < size:
            buf = mem.buffer
            direct = mem.direct_limit
            table = self._desc_off
            unpack = _DESC.unpack_from
            addr, length, flags, index = unpack(buf, table + DESC_SIZE * head)
            limit = size
            ring_descriptors = 0  # direct: the chain's length
            if flags & VIRTQ_DESC_F_INDIRECT:
                if (
                    flags == VIRTQ_DESC_F_INDIRECT
                    and self.indirect
                    and 0 < length <= MAX_INDIRECT_LEN
                    and not length % DESC_SIZE
                    and addr + length <= direct
                ):
                    table, limit, ring_descriptors = addr, length // DESC_SIZE, 1
                    addr, length, flags, index = unpack(buf, table)
            writable = flags & VIRTQ_DESC_F_WRITE
            same_way = writable | VIRTQ_DESC_F_NEXT
            whole = mem.bytes_view
            views = []
            total = count = 0
            while flags | VIRTQ_DESC_F_NEXT == same_way and 0 < length and addr + length <= direct:
                views.append(whole[addr : addr + length])
                total += length
                count += 1
                if not flags & VIRTQ_DESC_F_NEXT:
                    if total > MAX_CHAIN_BYTES:
                        break
                    return head, views, total, bool(writable), ring_descriptors or count
                if index >= limit or count >= limit:  # a bad next, or a loop: the full walk says which
                    break
                addr, length, flags, index = unpack(buf, table + DESC_SIZE * index)
        chain = self._read_chain(head)  # not the usual shape: the full walk (raises ChainError)
        if chain.readable and chain.writable:
            raise ChainError(head, "chain mixes device-readable and device-writable buffers")
        writable = bool(chain.writable)
        views = chain.writable_views() if writable else chain.readable_views()
        return head, views, chain.writable_len if writable else chain.readable_len, writable, chain.ring_descriptors

    def undo_pop(self) -> None:
        """Put the last popped chain back (a device that popped a chain it cannot use yet)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self._pending += 1

    def skip(self, count: int) -> None:
        """Take the next `count` available chains without walking them here (a batch walk,
        virtio/batch.py, has): they are the device's, to complete like popped ones."""
        if not 0 <= count <= self._pending:
            raise ValueError(f"skip {count}: only {self._pending} chains are known to be available")
        self.next_avail = (self.next_avail + count) & 0xFFFF
        self._pending -= count

    def ring_offsets(self) -> tuple[int, int, int]:
        """Offsets in `mem.buffer` of the descriptor table, available ring and used ring (ready only)."""
        if not self._ready:
            raise QueueError("ring_offsets of a queue that is not ready")
        return self._desc_off, self._avail_off, self._used_off

    def drain(self, on_error: Callable[[ChainError], None] | None = None) -> Iterator[DescriptorChain]:
        """Yield every available chain, then leave driver notifications enabled.

        The lost-kick-free pattern: disable notifications, pop until empty,
        re-enable them, and look at avail.idx once more (after a full memory
        barrier); if the driver added chains in between - it may have seen
        notifications still disabled and not kicked - go round again.

        A malformed chain is passed to `on_error`; by default it is returned
        to the driver with length 0 (if it can be).  `on_error` may raise
        (e.g. QueueError, to fail the device instead).  QueueError propagates.
        If the caller stops early, notifications are re-enabled on close.
        """
        notifying = True
        try:
            while True:
                self.set_notification(False)
                notifying = False
                while True:
                    try:
                        chain = self.pop()
                    except ChainError as err:
                        if on_error is not None:
                            on_error(err)
                        else:
                            log.debug("virtqueue: %s", err)
                            if err.completable:
                                self.add_used(err.head, 0)
                        continue
                    if chain is None:
                        break
                    yield chain
                notifying = True
                if not self.enable_notification():
                    return
        finally:
            if not notifying and self._ready:
                self.set_notification(True)

    def _read_chain(self, head: int) -> DescriptorChain:
        """Walk and validate the chain starting at descriptor `head`."""
        size = self.size
        if head >= size:
            raise ChainError(head, f"head index is not below the queue size {size}", completable=False)
        mem = self.mem
        buf = mem.buffer
        offset = mem.offset
        unpack_desc = _DESC.unpack_from
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        readable_len = writable_len = 0
        seen_writable = False

        table = self._desc_off  # buffer offset of the table being walked
        limit = size  # its number of entries: bounds both `next` and the chain length
        in_indirect = False
        ring_descriptors = 0
        index = head
        count = 0
        while True:
            count += 1
            if count > limit:
                where = "indirect table" if in_indirect else "queue"
                raise ChainError(head, f"descriptor chain loops or is longer than the {where} ({limit})")
            addr, length, flags, next_index = unpack_desc(buf, table + DESC_SIZE * index)

            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3: only with the feature, never with NEXT, never nested;
                # its WRITE flag is ignored.  It ends the direct chain.
                if in_indirect:
                    raise ChainError(head, "indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "descriptor has both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT")
                if length == 0 or length % DESC_SIZE or length > MAX_INDIRECT_LEN:
                    raise ChainError(
                        head,
                        f"indirect table length {length} is not a non-zero multiple of "
                        f"{DESC_SIZE} up to {MAX_INDIRECT_LEN}",
                    )
                try:
                    table = offset(addr, length)
                except GuestMemoryError:
                    raise ChainError(head, f"indirect table {addr:#x}+{length:#x} is not in guest RAM") from None
                limit = length // DESC_SIZE
                in_indirect = True
                ring_descriptors = count
                index = 0
                count = 0
                continue

            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                if length:
                    try:
                        offset(addr, length)
                    except GuestMemoryError:
                        raise ChainError(head, f"buffer {addr:#x}+{length:#x} is not in guest RAM") from None
                    writable.append((addr, length))
                    writable_len += length
            else:
                if seen_writable:
                    raise ChainError(head, "device-readable descriptor after a device-writable one")
                if length:
                    try:
                        offset(addr, length)
                    except GuestMemoryError:
                        raise ChainError(head, f"buffer {addr:#x}+{length:#x} is not in guest RAM") from None
                    readable.append((addr, length))
                    readable_len += length

            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = next_index
            if index >= limit:
                where = "indirect table" if in_indirect else "queue"
                raise ChainError(head, f"next index {index} is not below the {where} size {limit}")

        if readable_len + writable_len > MAX_CHAIN_BYTES:
            raise ChainError(head, "descriptor chain is longer than 2^32 bytes")
        if not in_indirect:
            ring_descriptors = count
        return DescriptorChain(head, readable, writable, readable_len, writable_len, mem, ring_descriptors)

    # -- the used ring -------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Write used.ring[next_used] = (head, length) and advance next_used.

        The driver does not see the element until publish_used() writes used.idx.
        `length` is the number of bytes the device wrote into the chain.
        """
        size = self.size
        if not self._ready:
            raise QueueError("add_used on a queue that is not ready")
        if not 0 <= head < size:
            raise QueueError(f"add_used: head {head} is not below the queue size {size}")
        if not 0 <= length <= 0xFFFFFFFF:
            raise QueueError(f"add_used: length {length} does not fit in 32 bits")
        next_used = self.next_used
        _pack_used(self.mem.buffer, self._used_ring_off + 8 * (next_used & (size - 1)), head, length)
        self.next_used = (next_used + 1) & 0xFFFF

    def publish_used(self) -> None:
        """Write used.idx = next_used, handing every element added so far to the driver.

        The elements must be visible before the index.  x86 does not reorder
        stores with other stores, so writing the elements first and used.idx
        last, as one 16-bit store (GuestMemory.u16), is enough (a weakly
        ordered host would need a store barrier here).
        """
        if not self._ready:
            raise QueueError("publish_used on a queue that is not ready")
        self.mem.u16[(self._used_off + _USED_IDX) >> 1] = self.next_used
        self._used_idx = self.next_used

    # -- notifications -------------------------------------------------------------
    def needs_notification(self) -> bool:
        """After publish_used(): should the device interrupt the driver? (2.7.7.2)

        With EVENT_IDX, yes if used.idx moved past the driver's used_event since
        the last call; without, yes if anything was published since the last
        call and the driver has not set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        if not self._ready:
            return False
        old = self._signalled_used
        new = self._used_idx
        self._signalled_used = new
        if old == new:
            return False
        # used.idx (a store) must be visible before we read the driver's
        # used_event / flags (a load), or we may miss the driver's update.
        self._full_barrier()
        u16 = self.mem.u16
        if self.event_idx:
            used_event = u16[(self._avail_off + _AVAIL_RING + 2 * self.size) >> 1]
            return vring_need_event(used_event, new, old)
        flags = u16[self._avail_off >> 1]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool, seen: int = 0) -> None:
        """Ask the driver to (not) notify the device when it makes buffers available.

        With EVENT_IDX, enabling writes avail_event = next_avail + seen (kick me
        once you pass what I have seen: `seen` chains past next_avail that the
        device looked at and left in the ring, as too few); disabling leaves
        avail_event behind, which already stops kicks.  Without EVENT_IDX, clears
        or sets VIRTQ_USED_F_NO_NOTIFY in used.flags.  Only a hint to the driver:
        use enable_notification() to re-enable without missing anything.
        """
        if not self._ready:
            return
        u16 = self.mem.u16
        if self.event_idx:
            if enabled:
                u16[(self._used_off + _USED_RING + 8 * self.size) >> 1] = (self.next_avail + seen) & 0xFFFF
        else:
            u16[(self._used_off + _USED_FLAGS) >> 1] = 0 if enabled else VIRTQ_USED_F_NO_NOTIFY

    def enable_notification(self, seen: int = 0) -> bool:
        """Re-enable driver notifications; return True if chains are (still) available,
        beyond the `seen` (see set_notification) the device waits to have more than.

        The driver may have made buffers available while notifications were
        disabled, and not kicked.  After enabling, a full barrier, then
        avail.idx is read again: True means pop again rather than sleep.
        """
        self.set_notification(True, seen)
        self._full_barrier()
        return self.available() > seen

    def _full_barrier(self) -> None:
        """A full memory barrier (x86 mfence semantics) from Python.

        x86 may let a later load pass an earlier store still in the store
        buffer: writing used.idx / avail_event and then reading used_event /
        avail.idx needs a barrier in between, just as the driver has its
        virtio_mb().  Any locked instruction drains the store buffer;
        acquiring and releasing an uncontended lock executes one (glibc's
        sem_trywait / sem_post, which CPython's thread locks use, are
        lock-prefixed compare-and-swaps).  Costs well under a microsecond.
        """
        with self._fence:
            pass

    def __repr__(self) -> str:
        return (
            f"Queue(size={self.size}/{self.max_size}, ready={self._ready}, desc={self.desc_table:#x}, "
            f"avail={self.avail_ring:#x}, used={self.used_ring:#x}, next_avail={self.next_avail}, "
            f"next_used={self.next_used})"
        )
