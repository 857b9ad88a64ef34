"""virtio-blk's ring path: one per queue, from its available ring to the disk and back.

`BlkPath.drain()` completes every request the driver made available, then leaves the driver's
notifications on (the lost-kick-free pattern of Queue.drain).  After a busy spell (POLL_AFTER
requests or more) it first watches avail.idx for up to POLL_SECONDS: a driver that has just been
handed its completions refills the ring at once, and found by polling its requests cost it no
kick (a VM exit) and us no wake-up - with the driver guest at 32 in flight, this is the
difference between a wake-up per batch and none.  Two ways, chosen per request:

  * batches: the next available chains walked together (virtio/batch.py's BatchReader, in
    numpy); the longest prefix of them that are plain reads or plain writes of the usual shape
    (below) has its headers read and checked as columns, its requests moved by one call of the
    backend's batch I/O (virtio/backends/raw_batch.py: io_uring), its status bytes and used
    elements written as columns, and is handed to the driver at once (used.idx, and an
    interrupt as EVENT_IDX allows);
  * one chain at a time (Queue.pop, and the device's complete_request) for the chain after such
    a prefix: every other request type (FLUSH, GET_ID, DISCARD...), every other shape, all that
    the device must refuse (IOERR, UNSUPP), and big requests (more than PUBLISH_EARLY_BYTES of
    data, handed back one by one so that the driver refills the queue while the next moves);
    and the ALONE_AFTER_UNUSUAL chains after it, without a walk, as the next are likely alike.

The usual shape: a 16-byte device-readable header buffer; for VIRTIO_BLK_T_IN one or more
device-writable data buffers, for VIRTIO_BLK_T_OUT (a writable disk) one or more
device-readable ones; a 1-byte device-writable status buffer last; at most
MAX_BATCH_DESCRIPTORS buffers in all; data a non-zero multiple of 512 bytes, up to
PUBLISH_EARLY_BYTES, inside the disk.  For exactly such a chain the one-chain path moves the same
bytes between the same buffers and the same disk offset and writes the same status and used
length; tests/unit/test_blk_path.py checks that chain by chain on random and hostile rings.  The
header is read once, into our own copy, so a driver rewriting it meanwhile changes nothing.

One batch call moves only reads or only writes: the requests of a call may run in any order (as
a disk's requests in flight do), but a read made available after a write of the same sectors
must see what it wrote.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .backends.raw_batch import BlockBatchIO
from .batch import MAX_BATCH_DESCRIPTORS, BatchReader
from .counters import QueueCounters
from .blk import (
    PUBLISH_EARLY_BYTES,
    REQ_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from .queue import ChainError, DescriptorChain, Queue

# struct virtio_blk_req's header as numpy reads it (REQ_HEADER's fields)
REQ_HEADER_DTYPE = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])
assert REQ_HEADER_DTYPE.itemsize == REQ_HEADER.size
_FRAME = REQ_HEADER.size + 1  # a request's bytes beyond its data: the header and the status byte
ALONE_AFTER_UNUSUAL = 16
# After a drain that completed POLL_AFTER requests or more, the ring is watched this long before
# the driver is asked for a kick (_poll).
POLL_AFTER = 16
POLL_SECONDS = 100e-6
_EMPTY = -1  # (a step's result) the ring is empty
_UNUSUAL = -2  # (a step's result) the next chain is not of the batch shape
_U64 = np.uint64
_ONE = _U64(1)
_HEADER_LEN = _U64(REQ_HEADER.size)
# data of 512 to PUBLISH_EARLY_BYTES bytes in whole sectors: data - 512 has no bits but these
assert PUBLISH_EARLY_BYTES & (PUBLISH_EARLY_BYTES - 1) == 0
_DATA_BITS = PUBLISH_EARLY_BYTES - SECTOR_SIZE
assert (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR) == (0, 1)  # a failed request's status is its failure as a byte


class BlkPath:
    """The requests of one virtio-blk queue (its I/O thread's; not thread-safe).

    `io` is the backend's batch I/O for this queue (None: one chain at a time only); `counters`
    the queue's (virtio/counters.py), counted here for batches and by `complete` for the rest;
    `complete(chain, counters)` is the device's one-chain path (runs a request, writes its status
    byte, returns its used length); `chain_error(err)` handles a chain the queue could not walk (may
    raise QueueError); `publish()` hands the used elements to the driver and interrupts it if it
    asked; `io_error(errno)` says a batch request failed in the backend (VIRTIO_BLK_S_IOERR)."""

    def __init__(self, queue: Queue, io: BlockBatchIO | None, *, capacity: int, read_only: bool,
                 counters: QueueCounters, complete: Callable[[DescriptorChain, QueueCounters], int],
                 chain_error: Callable[[ChainError], None],
                 publish: Callable[[], None], io_error: Callable[[int], None]):
        self.queue = queue
        self._io = io
        self._reader = BatchReader(queue) if io is not None and queue.ready else None
        self._capacity = _U64(capacity)
        self._writes_ok = not read_only
        self.counters = counters
        self._complete = complete
        self._chain_error = chain_error
        self._publish = publish
        self._io_error = io_error
        self._published = queue.next_used
        self.batched = self.single = 0  # requests completed by batches / one chain at a time
        self._alone = 0  # chains to take one at a time before walking a batch again
        self._rows = np.arange(queue.size, dtype=np.int64)
        self._status_only = np.ones(queue.size, dtype=np.int64)  # a write's used length: the status byte

    @property
    def batches(self) -> bool:
        return self._reader is not None

    def close(self) -> None:
        """Let go of the ring and of the backend's batch I/O (before the backend closes)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._io is not None:
            self._io.close()
            self._io = None

    def drain(self) -> None:
        """Complete every available request; publish and notify.  Raises QueueError when the ring
        is broken (the device then fails the queue), once the requests completed before are
        handed over."""
        queue = self.queue
        queue.set_notification(False)
        done = 0
        try:
            while True:
                step = self._batch() if self._reader is not None and not self._alone else _UNUSUAL
                if step == _UNUSUAL:
                    step = self._one()
                if step != _EMPTY:
                    done += step
                    continue
                self._hand_over()
                if done >= POLL_AFTER and self._poll():
                    done = 0
                    continue
                if not queue.enable_notification():
                    break
                queue.set_notification(False)
        finally:
            self._hand_over()

    def _poll(self) -> bool:
        """The ring ran dry after a busy spell: watch avail.idx for up to POLL_SECONDS before
        asking for a kick, as a driver just handed a batch back is likely refilling the ring
        (a kick costs it an exit, and us a wake-up).  True when chains came."""
        available, clock = self.queue.available, time.perf_counter
        deadline = clock() + POLL_SECONDS
        while clock() < deadline:
            if available():
                return True
        return False

    def _hand_over(self) -> None:
        if self.queue.next_used != self._published:
            self._published = self.queue.next_used
            self._publish()

    # -- one chain at a time ------------------------------------------------------------------
    def _one(self) -> int:
        queue = self.queue
        try:
            chain = queue.pop()
        except ChainError as err:
            self._chain_error(err)
            return 1
        if chain is None:
            return _EMPTY
        queue.add_used(chain.head, self._complete(chain, self.counters))
        self.single += 1
        self._alone = max(self._alone - 1, 0)
        if chain.readable_len + chain.writable_len >= PUBLISH_EARLY_BYTES:
            # a big request took a while: hand it back now, so the driver can refill the queue
            # while we work on the rest (no bubble between batches)
            self._hand_over()
        return 1

    # -- batches ------------------------------------------------------------------------------
    def _unusual(self) -> int:
        """The next chain is not a batch's: it, and the ALONE_AFTER_UNUSUAL after it, go one at a
        time without a walk (a stream of big requests, of long chains or of buffers above the
        4 GiB hole would otherwise pay for a batch walk each and use none)."""
        self._alone = ALONE_AFTER_UNUSUAL + 1
        return _UNUSUAL

    def _batch(self) -> int:
        """Run the longest prefix of the available chains that are usual requests, all reads or
        all writes: the chains taken, _EMPTY, or _UNUSUAL when the next chain must go alone."""
        reader = self._reader
        batch = reader.peek(self.queue.size, writable=None, min_first=REQ_HEADER.size,
                            max_buffers=MAX_BATCH_DESCRIPTORS)
        if batch is None:
            return _EMPTY
        n = len(batch)
        if not n:
            return self._unusual()
        header = reader.read(batch.first, REQ_HEADER_DTYPE)  # our copy
        rtype, sector = header["type"], header["sector"]
        kind = int(rtype[0])  # the batch's kind: the first request's
        if kind == VIRTIO_BLK_T_OUT and self._writes_ok:
            write = True
        elif kind == VIRTIO_BLK_T_IN:
            write = False
        else:
            return self._unusual()
        iov, readable, width = batch.iov, batch.readable, batch.width
        if width:  # (every chain has `width` buffers: columns, not a gather)
            if width < 3:
                return self._unusual()
            last = width - 1
            status_len = iov[:, last, 1]
            shape = readable == (last if write else 1)  # header, then data one way, then status
        else:
            last = batch.counts - 1
            status_len = iov[self._rows[:n], last, 1]
            shape = (readable == (last if write else 1)) & (last >= 2)
        data = batch.lengths - _FRAME
        capacity = self._capacity
        usual = (
            shape
            & (rtype == kind)
            & (iov[:, 0, 1] == _HEADER_LEN)
            & (status_len == _ONE)
            & ((data - SECTOR_SIZE) & ~_DATA_BITS == 0)  # 512 <= data <= PUBLISH_EARLY_BYTES, whole sectors
            & (np.minimum(sector, capacity) + (data >> SECTOR_SHIFT).view(np.uint64) <= capacity)
        )
        m = n if np.count_nonzero(usual) == n else int(usual.argmin())
        if not m:
            return self._unusual()
        reader.consume(m)
        if m < n:
            data, sector, last = data[:m], sector[:m], last if width else last[:m]
        errors = self._io.transfer(write, batch.iov_addresses[:m] + _U64(16), batch.counts[:m] - 2,
                                   sector << _U64(SECTOR_SHIFT), data)
        status_at = (iov[:m, last, 0] if width else iov[self._rows[:m], last, 0]) - _U64(reader.host_base)
        used = self._status_only[:m] if write else data + 1
        failed = errors != 0
        counters = self.counters
        counters.requests += m
        if np.count_nonzero(failed):
            reader.write_u8(status_at, failed.view(np.uint8))  # VIRTIO_BLK_S_IOERR (1) or _OK (0)
            used = np.where(failed, 1, used)
            self._io_error(-int(errors[failed][0]))
            counters.errors += int(np.count_nonzero(failed))
            counters.bytes += int(data[~failed].sum())
        else:
            reader.write_u8(status_at, VIRTIO_BLK_S_OK)
            counters.bytes += int(data.sum())
        reader.complete(batch.heads[:m], used)
        self.batched += m
        self._hand_over()
        return m
