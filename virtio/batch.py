"""Many available chains walked at once: a split virtqueue's batch path, in numpy.

`Queue.pop_buffers()` walks one chain per call; a device that moves small
frames spends most of its time in that walk.  `BatchReader.peek(n, ...)` walks
the next n available chains together, one numpy operation per step of the
chains instead of a Python loop per descriptor, and returns their buffers as
an iovec array (`struct iovec`: host address, length), ready for the kernel:
each row is one chain's readv or writev (see vmm/io_uring.py).  `complete()`
then writes their used elements in one operation.

The same rules as Queue._read_chain, checked column-wise on every chain (the
guest is hostile):
  * the head and every `next` below the table's size (the queue's, or an
    indirect table's), at most that many descriptors per chain (no loops);
  * an indirect head has exactly VIRTQ_DESC_F_INDIRECT, the feature was
    negotiated, its table is a non-zero multiple of 16 bytes up to
    MAX_INDIRECT_LEN, in RAM; its descriptors are not indirect;
  * every buffer non-empty and wholly in RAM;
  * the chain goes one way (all device-readable, or all device-writable), or, where the
    device asks for both (`writable=None`, virtio-blk), its device-readable buffers all
    come before its device-writable ones.
Only the usual shape is taken here: direct chains or one 16-byte aligned
indirect table, buffers in the RAM below `GuestMemory.direct_limit` (where a
guest address is the offset in the mapping), at most MAX_BATCH_DESCRIPTORS
per chain, and the device's own limits (total length, first buffer, iovec
entries).  `peek` returns the longest *prefix* of chains that are all of that
shape; the device hands the chain after it to the one-at-a-time path
(pop_buffers), which either serves an unusual but valid chain or says what is
wrong with a bad one.  So every rule still lives in queue.py, and this module
only ever says "usual" for chains the full walk would accept.

Guest memory is read once per descriptor into our arrays; the iovecs are built
from those copies, so a driver that rewrites a descriptor after the check
cannot steer the kernel anywhere but where the check allowed.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from .queue import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_LEN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
)

# struct virtq_desc (2.7.5)
VIRTQ_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
assert VIRTQ_DESC.itemsize == DESC_SIZE
# Chains with more descriptors than this go the one-at-a-time way (a frame is rarely over 3).
MAX_BATCH_DESCRIPTORS = 20
MAX_BATCH = 1024  # chains per peek
# The most iovec entries one readv / writev takes.
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
# as numpy scalars of the fields' types (an operation with a Python int costs more)
_U64 = np.uint64
_ONE = _U64(1)
# a descriptor's second word (len | flags << 32 | next << 48): its parts
_LEN = _U64(0xFFFFFFFF)
_FLAGS_LEN = _U64(0xFFFF_FFFFFFFF)
_WRITE_WORD = _U64(VIRTQ_DESC_F_WRITE << 32)
_F_NEXT, _F_WRITE, _F_INDIRECT = (np.uint16(f) for f in (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT))
_WRITABLE = _F_NEXT | _F_WRITE


@dataclass
class Batch:
    """The next `len(heads)` available chains, all of the usual shape (see the module)."""

    heads: np.ndarray  # descriptor-table index of each chain's head
    iov: np.ndarray  # (chains, MAX_BATCH_DESCRIPTORS, 2) uint64: host address, length per buffer
    counts: np.ndarray  # buffers per chain (the first counts[i] iovec entries of row i)
    lengths: np.ndarray  # total bytes per chain
    first: np.ndarray  # guest address of each chain's first buffer
    iov_addresses: np.ndarray  # host address of each chain's iovec row (an SQE's addr)
    readable: np.ndarray | None = None  # (writable=None) device-readable buffers per chain: the first ones
    width: int = 0  # buffers in every chain, where all have as many (else 0)

    def __len__(self) -> int:
        return len(self.heads)


class BatchReader:
    """Batch access to one ready queue (built after the driver set it ready; close() before
    the guest memory goes).  Not thread-safe: the queue's worker owns it, as it owns the queue."""

    def __init__(self, queue: Queue):
        if not queue.ready:
            raise ValueError("BatchReader on a queue that is not ready")
        mem = queue.mem
        buf = mem.buffer
        self.queue = queue
        self.direct = mem.direct_limit - mem.direct_limit % DESC_SIZE
        self._direct = np.uint64(self.direct)
        self.host_base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self._host_base = np.uint64(self.host_base)
        size = queue.size
        self._size = np.uint16(size)  # (a queue has at most 32768 entries)
        self._mask = size - 1
        # The whole mapping as descriptors (an indirect table at a 16-aligned guest address below
        # direct is rows addr/16...), as bytes, and the queue's rings.
        self._ram = np.frombuffer(buf, dtype=VIRTQ_DESC, count=len(buf) // DESC_SIZE)
        self._ram64 = self._ram.view(np.uint64).reshape(-1, 2)  # the same, as words: addr, len | flags << 32 | next << 48
        self._bytes = np.frombuffer(buf, dtype=np.uint8)
        desc_off, avail_off, used_off = queue.ring_offsets()
        # The descriptor table is 16-aligned in guest memory; in the mapping too, unless a
        # region's offset is odd (never, but then nothing is taken here).
        self._table = desc_off // DESC_SIZE if desc_off % DESC_SIZE == 0 else None
        self._avail = np.frombuffer(buf, dtype="<u2", count=size, offset=avail_off + 4)
        self._used = np.frombuffer(buf, dtype="<u4", count=2 * size, offset=used_off + 4).reshape(size, 2)
        # where used ring slot i's `len` is in the mapping: used_len_base + 8 * (i & used_mask)
        self.used_len_base = used_off + 8  # (struct virtq_used: flags, idx, then ring[] of (id, len))
        self.used_mask = self._mask
        self._arange = np.arange(2 * MAX_BATCH, dtype=np.int64)
        self._ones = np.ones(MAX_BATCH, dtype=np.int64)
        self._byte_index = np.arange(64, dtype=np.uint64)  # (read)
        self._shapes: dict = {}  # (_table_shape)
        self._widths = [np.full(MAX_BATCH, w, dtype=np.int64) for w in range(MAX_BATCH_DESCRIPTORS + 1)]
        self._iov = np.zeros((MAX_BATCH, MAX_BATCH_DESCRIPTORS, 2), dtype=np.uint64)
        self._iov_addresses = self._iov.ctypes.data + self._arange[:MAX_BATCH].astype(np.uint64) * np.uint64(
            self._iov.strides[0]
        )
        nothing = np.zeros(0, dtype=np.int64)
        self._empty = Batch(nothing, self._iov[:0], nothing, nothing, nothing.astype(np.uint64), self._iov_addresses[:0],
                            nothing)

    def close(self) -> None:
        self._ram = self._ram64 = self._bytes = self._avail = self._used = None

    def peek(
        self,
        limit: int,
        *,
        writable: bool | None,
        min_length: int = 1,
        max_length: int = MAX_CHAIN_BYTES,
        min_first: int = 1,
        max_buffers: int = MAX_BATCH_DESCRIPTORS,
    ) -> Batch | None:
        """Walk up to `limit` available chains (not consuming them); the longest prefix that is
        of the usual shape, one way (`writable`; None: device-readable buffers, then
        device-writable ones, counted in Batch.readable), with min_length..max_length bytes in
        all, a first buffer of min_first bytes or more, and at most max_buffers buffers.  None when no
        chain is available; an empty Batch when the first chain is not of that shape.  Raises
        QueueError for a broken available ring (as Queue.available does).

        Only the prefix counts, so a row's figures may be anything once it is not `ok`: the
        walk tracks `ok` (every check so far passed) and `active` (ok, and it goes on)."""
        queue = self.queue
        n = min(limit, queue.available(), MAX_BATCH)
        if n == 0:
            return None
        if self._table is None:
            return self._empty
        size = queue.size
        start = queue.next_avail & self._mask
        heads = self._avail.take(self._arange[start : start + n], mode="wrap")  # our copy of the ring's entries
        ok = heads < self._size
        d = self._ram[self._table : self._table + size].take(heads, mode="clip")  # (a bad head: not ok)
        if d[0]["flags"] == VIRTQ_DESC_F_INDIRECT and queue.indirect:  # (the first chain's head says)
            whole = self._peek_tables(heads, ok, d, writable, min_length, max_length, min_first, max_buffers)
            if whole is not None:
                return whole
        flags, addr, length = d["flags"], d["addr"], d["len"]
        fetch = None

        if np.count_nonzero(flags & _F_INDIRECT):  # (count_nonzero: a cheaper any())
            indirect = (flags & _F_INDIRECT) != 0
            direct = self.direct
            table_ok = (
                (flags == VIRTQ_DESC_F_INDIRECT)
                & queue.indirect
                & (length > 0)
                & (length <= MAX_INDIRECT_LEN)
                & (length % DESC_SIZE == 0)
                & (addr % DESC_SIZE == 0)
                & (addr < direct)
                & (length <= direct - addr)
            )
            ok &= ~indirect | table_ok
            use = indirect & ok
            base = np.where(use, addr // DESC_SIZE, self._table).astype(np.int64)
            limits = np.where(use, length // DESC_SIZE, size).astype(np.int64)
            fetch = self._fetcher(limits, base)
            d = fetch(np.where(use | ~ok, 0, heads))
            flags, addr, length = d["flags"], d["addr"], d["len"]
        else:
            limits = size

        mixed = writable is None
        way = _WRITABLE if writable or mixed else _F_NEXT
        ignore = _WRITABLE if mixed else _F_NEXT  # the flags a buffer may have either way
        iov = self._iov[:n]
        first_addr = addr
        ok &= self._buffer_ok(flags, addr, length, way, ignore) & (length >= np.uint32(min_first))
        iov[:, 0, 0] = addr + self._host_base
        iov[:, 0, 1] = length
        lengths = length.astype(np.int64)
        counts = self._ones[:n].copy()
        if mixed:
            seen_writable = (flags & _F_WRITE) != 0
            readable = (~seen_writable).astype(np.int64)
        active = ok & ((flags & _F_NEXT) != 0)
        k = 1
        while np.count_nonzero(active):
            if fetch is None:
                fetch = self._fetcher(size)
            if k == MAX_BATCH_DESCRIPTORS:
                ok &= ~active  # longer than we take here
                break
            nxt = d["next"]
            bad = active & ((nxt >= limits) | (counts >= limits))  # a bad next, or a loop
            ok &= ~bad
            active &= ~bad
            d = fetch(np.where(active, nxt, 0))
            flags, addr, length = d["flags"], d["addr"], d["len"]
            good = self._buffer_ok(flags, addr, length, way, ignore)
            if mixed:  # no device-readable buffer after a device-writable one
                now_writable = (flags & _F_WRITE) != 0
                good &= now_writable | ~seen_writable
            ok &= good | ~active
            active &= good
            if mixed:
                seen_writable |= now_writable
                readable += active & ~now_writable
            iov[:, k, 0] = addr + self._host_base
            iov[:, k, 1] = length
            counts += active
            lengths += length * active
            active &= (flags & _F_NEXT) != 0
            k += 1
        # (with one buffer per chain and the defaults, nothing to check: each is non-empty, under 4 GiB)
        if k > 1 or min_length > 1 or max_length < MAX_CHAIN_BYTES:
            ok &= (lengths >= np.int64(min_length)) & (lengths <= np.int64(max_length))
        if k > max_buffers:
            ok &= counts <= max_buffers
        m = n if np.count_nonzero(ok) == n else int(ok.argmin())
        return Batch(heads[:m], iov[:m], counts[:m], lengths[:m], first_addr[:m], self._iov_addresses[:m],
                     readable[:m] if mixed else None)

    def _peek_tables(self, heads, ok, d, writable, min_length, max_length, min_first, max_buffers) -> Batch | None:
        """peek() for chains that are each one indirect table of the first chain's size, all of
        whose descriptors form the chain in table order (entry j's next is j + 1, the last has no
        NEXT), as a driver fills a table it allocated for one request (Linux does).  The tables
        are read as one (chains, entries) block of raw descriptor words and checked against the
        shape with a few operations on the whole block, not a step per descriptor.  A Batch of
        all the chains, or None when not every one is such a chain within the limits (then the
        step-by-step walk decides: it takes any chain order, and finds the prefix)."""
        table_len = int(d[0]["len"])
        width, rest = divmod(table_len, DESC_SIZE)
        if rest or not 0 < width <= min(max_buffers, MAX_BATCH_DESCRIPTORS) or table_len > self.direct:
            return None
        # the heads: the first one's flags and length exactly (the driver's `next` is not read),
        # each table 16-aligned and wholly below direct
        head = d.view(np.uint64).reshape(-1, 2)  # the head descriptors as words
        table_addr = head[:, 0]
        ok = ok & ((head[:, 1] & _FLAGS_LEN) == head[0, 1] & _FLAGS_LEN)  # (not in place: peek's, if None)
        ok &= (table_addr & _U64(DESC_SIZE - 1) == 0) & (table_addr <= self._direct - _U64(table_len))
        m = len(ok)
        if np.count_nonzero(ok) != m:
            return None
        block = self._ram64[(table_addr >> _U64(4)).astype(np.int64)[:, None] + self._arange[:width]]
        addr, word = block[:, :, 0], block[:, :, 1]
        mask, expect, either = self._table_shape(width, writable)
        key = word >> _U64(32)  # flags | next << 16
        if either:
            key = key | either
        length = word & _LEN
        good = ((key & mask) == expect) & (length - _ONE < self._direct - np.minimum(addr, self._direct))
        row_ok = good.all(axis=1)
        lengths = length.sum(axis=1).view(np.int64)
        row_ok &= length[:, 0] >= _U64(min_first)
        if min_length > 1 or max_length < MAX_CHAIN_BYTES:
            row_ok &= (lengths >= min_length) & (lengths <= max_length)
        readable = None
        if writable is None:  # device-readable buffers first: WRITE never goes from set to clear
            written = (word & _WRITE_WORD) != 0
            if width > 1:
                row_ok &= ~(written[:, :-1] > written[:, 1:]).any(axis=1)
            readable = width - written.sum(axis=1)
        if np.count_nonzero(row_ok) != m:
            return None
        iov = self._iov[:m]
        iov[:, :width, 0] = addr + self._host_base
        iov[:, :width, 1] = length
        return Batch(heads, iov, self._widths[width][:m], lengths, addr[:, 0], self._iov_addresses[:m], readable,
                     width)

    def _table_shape(self, width: int, writable: bool | None) -> tuple[np.ndarray, np.ndarray, np.uint64]:
        """(mask, expected, either) for the `flags | next << 16` of a table's entries (or'ed
        with `either` first): all but the last go on to the next entry, with exactly NEXT and
        the way's WRITE; the last has exactly the way's WRITE (its next is not looked at).
        Mixed (writable None): WRITE either way (`either` sets it before the comparison)."""
        key = (width, writable)
        shape = self._shapes.get(key)
        if shape is None:
            way = VIRTQ_DESC_F_WRITE if writable or writable is None else 0
            mask = np.full(width, 0xFFFFFFFF, dtype=np.uint64)
            expect = np.array([way | VIRTQ_DESC_F_NEXT | (j + 1) << 16 for j in range(width)], dtype=np.uint64)
            mask[-1], expect[-1] = 0xFFFF, way
            shape = self._shapes[key] = (mask, expect, _U64(VIRTQ_DESC_F_WRITE if writable is None else 0))
        return shape

    def _buffer_ok(self, flags: np.ndarray, addr: np.ndarray, length: np.ndarray, way, ignore) -> np.ndarray:
        """Each descriptor goes `way` (its flags, but for those in `ignore`, are exactly that) and
        describes a non-empty buffer wholly below direct: length - 1 < direct - addr, in 64 bits
        where a length of 0 wraps to the largest value and an address past direct clamps to no room."""
        room = self._direct - np.minimum(addr, self._direct)
        return ((flags | ignore) == way) & (length - _ONE < room)

    def _fetcher(self, limits, base=None):
        """What reads each row's next descriptor: from the queue's table (`limits` its size),
        or, with indirect tables about, row i's from the table at descriptor row base[i]
        (`index` is checked against limits first; a row that is not active reads index 0)."""
        if base is None:
            table = self._ram[self._table : self._table + limits]
            return lambda index: table.take(index, mode="clip")
        return lambda index: self._ram[base + index]

    def views(self, batch: Batch, row: int) -> list[memoryview]:
        """Chain `row` of a batch as memoryviews of guest RAM (for the one-chain path's readv / writev)."""
        whole, host = self.queue.mem.bytes_view, self.host_base
        return [whole[int(a) - host : int(a) - host + int(n)] for a, n in batch.iov[row, : batch.counts[row]]]

    def consume(self, count: int) -> None:
        """The next `count` chains (a peeked prefix) are the device's now."""
        self.queue.skip(count)

    def complete(self, heads: np.ndarray, lengths: np.ndarray) -> None:
        """Used elements (head, bytes written) for these chains, in order; used.idx is not
        written (Queue.publish_used)."""
        self.stage(heads, lengths)
        self.commit(len(heads))

    def stage(self, heads: np.ndarray, lengths: np.ndarray) -> None:
        """Write used elements for these chains in the slots from next_used on, without counting
        them yet (commit): a device that learns a length later rewrites it there (slot
        next_used + k's `len` is at used_len_base + 8 * ((next_used + k) & used_mask)).  Those
        slots are free: a driver has at most the queue's size of chains out, so the used
        elements it has yet to read are in other slots (a hostile one only garbles its own)."""
        queue = self.queue
        count = len(heads)
        start = queue.next_used & self._mask
        if start + count <= queue.size:
            used = self._used[start : start + count]
            used[:, 0] = heads
            used[:, 1] = lengths
        else:  # round the end of the ring
            slots = (start + self._arange[:count]) & self._mask
            self._used[slots, 0] = heads
            self._used[slots, 1] = lengths

    def commit(self, count: int) -> None:
        """The next `count` staged used elements are done (still unpublished: publish_used)."""
        self.queue.next_used = (self.queue.next_used + count) & 0xFFFF

    def read(self, addresses: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """A copy of one `dtype` record at each guest address (below direct, checked by peek: a
        chain's first buffer, min_first bytes or more)."""
        index = addresses[:, None] + self._byte_index[: dtype.itemsize]
        return self._bytes[index].view(dtype)[:, 0]

    def write_u16(self, addresses: np.ndarray, value: int) -> None:
        """Store a little-endian 16-bit `value` at each guest address (below direct, checked by
        peek: a chain's first buffer with room for it)."""
        self._bytes[addresses] = value & 0xFF
        self._bytes[addresses + 1] = value >> 8

    def write_u8(self, addresses: np.ndarray, value: int | np.ndarray) -> None:
        """Store a byte at each guest address (below direct, checked by peek), or value[i] at the i-th."""
        self._bytes[addresses] = value
