"""virtio-net's transmit path: one per queue pair, from its transmitq to its backend queue.

`TxPath.drain(budget)` sends what the driver made available and says how it stopped
(`TxOutcome`).  Each chain is one frame (header first), written as it is (its readable
memoryviews: zero copy); its used length is 0.  Two ways, chosen per chain:

  * batches, where the backend has batch I/O (`NetBatchIO`): the next available chains of the
    usual shape walked together (virtio/batch.py's BatchReader, rows of struct iovec into guest
    RAM) and written with one call; a write the backend refused for want of room (-EAGAIN)
    waits in the retry list and goes first once there is room (the rest of its batch is sent
    meanwhile: that frame may arrive late, none is lost);
  * one chain at a time (Queue.pop_buffers, one writev) for a chain of another shape and for
    backends without batches; a full backend puts the chain back in the ring (undo_pop).

A chain with device-writable buffers, without a full header, longer than 12 + 65550 bytes or
of more than IOV_MAX buffers is completed unsent (a rate-limited log line).  A frame the
backend refuses (EINVAL: a bad header; EIO: the link is down) is counted and completed.  The
path never touches a file descriptor, and knows nothing of epoll: `blocked` tells the device
to wait for room (EPOLLOUT) and call `unblock()`.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

import numpy as np

from .backends.tap_batch import NetBatchIO
from .batch import IOV_MAX, MAX_BATCH_DESCRIPTORS, Batch, BatchReader
from .net_common import MAX_BUFFER, PUBLISH_EVERY, NetStats, PathContext
from .net_hdr import NET_HDR_SIZE
from .queue import ChainError, Queue

TX_BATCH_BUFFERS = min(IOV_MAX, MAX_BATCH_DESCRIPTORS)
_EMPTY = -1  # (a step's result) the ring is empty
_UNUSUAL = -2  # (a step's result) the next chain is not of the batch shape


class TxOutcome(Enum):
    """How drain() stopped."""

    EMPTY = "the ring is empty; the driver's notifications are on"
    BLOCKED = "the backend is full: waiting for room"
    BUDGET_SPENT = "the budget is spent and chains may be left"


class _Unsent(NamedTuple):
    """A chain of a batch whose write found the backend full, sent first when it has room."""

    head: int
    views: list[memoryview]


class TxPath:
    """The transmitq of one queue pair (its I/O thread's, under the pair's lock)."""

    def __init__(self, queue: Queue, send: Callable[[list[memoryview]], int], batch_io: NetBatchIO | None,
                 stats: NetStats, ctx: PathContext):
        self.queue = queue
        self.stats = stats
        self.blocked = False  # the backend was full: nothing is sent until unblock()
        self._send = send  # one frame (NetBackend.writer)
        self._batch_io = batch_io
        self._reader = BatchReader(queue) if batch_io is not None and queue.ready else None
        self._ctx = ctx
        self._unsent: deque[_Unsent] = deque()
        self._done = 0  # chains completed in this drain()

    @property
    def batches(self) -> bool:
        return self._reader is not None

    @property
    def unsent(self) -> int:
        """Chains of a batch waiting for room in the backend."""
        return len(self._unsent)

    def unblock(self) -> None:
        """The backend has room again (EPOLLOUT)."""
        self.blocked = False

    def close(self) -> None:
        self._unsent.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def drain(self, budget: int) -> TxOutcome:
        """Send up to `budget` chains, those a full backend sent back first; complete them and
        publish used.idx.  Raises QueueError when the ring is broken.  Not when blocked."""
        queue = self.queue
        first_used = queue.next_used
        queue.set_notification(False)
        self._done = 0
        if self._unsent:
            self._send_unsent()
        outcome = self._drain(budget)
        if queue.next_used != first_used:
            queue.publish_used()
        return outcome

    def _drain(self, budget: int) -> TxOutcome:
        while not self.blocked:
            if self._done >= budget:
                return TxOutcome.BUDGET_SPENT
            step = self._send_batch(budget - self._done) if self._reader is not None else _UNUSUAL
            if step == _UNUSUAL:
                step = self._send_one()
            if step == _EMPTY and not self._more_came():
                return TxOutcome.EMPTY
        return TxOutcome.BLOCKED

    def _more_came(self) -> bool:
        """The ring looked empty: ask the driver for kicks, then look once more (no lost kick);
        True, with the kicks off again, when chains came meanwhile."""
        if not self.queue.enable_notification():
            return False
        self.queue.set_notification(False)
        return True

    def _block(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.stats.tx_blocked += 1

    def _sent(self, length: int) -> None:
        self.stats.tx_frames += 1
        self.stats.tx_bytes += length - NET_HDR_SIZE

    # -- one chain at a time ----------------------------------------------------------------
    def _send_one(self) -> int:
        """Send the next chain alone: 1 (done), 0 (the backend is full: back in the ring), _EMPTY."""
        queue = self.queue
        try:
            chain = queue.pop_buffers()
        except ChainError as err:  # malformed, or with device-writable buffers
            self.stats.tx_dropped += 1
            self._ctx.chain_error(queue, err)
            self._done += 1
            return 1
        if chain is None:
            return _EMPTY
        head, views, length, writable, _ = chain
        if writable or not NET_HDR_SIZE <= length <= MAX_BUFFER or len(views) > IOV_MAX:
            self._drop(head, length, writable)
        else:
            try:
                self._send(views)
            except BlockingIOError:
                queue.undo_pop()  # this chain goes first when the backend has room
                self._block()
                return 0
            except OSError as err:
                self._refused(length, err)
            else:
                self._sent(length)
        queue.add_used(head, 0)
        self._done += 1
        if not self._done % PUBLISH_EVERY:
            queue.publish_used()  # the driver may reuse these while we go on
        return 1

    def _drop(self, head: int, length: int, writable: bool) -> None:
        """A TX chain that is no frame: completed unsent."""
        self.stats.tx_dropped += 1
        name, say = self._ctx.name, self._ctx.guest_error
        if writable:
            say("%s: TX chain %d has device-writable buffers: dropped", name, head)
        elif not NET_HDR_SIZE <= length <= MAX_BUFFER:
            say("%s: TX chain %d is %d bytes, not %d to %d: dropped", name, head, length, NET_HDR_SIZE, MAX_BUFFER)
        else:
            say("%s: TX chain %d has more than %d buffers: dropped", name, head, IOV_MAX)

    def _refused(self, length: int, err: OSError) -> None:
        """The backend refused a frame: EINVAL, the kernel did not like its header (a bad
        gso_type...); EIO, the host side is down.  Counted; the chain is completed all the same."""
        self.stats.tx_errors += 1
        ctx = self._ctx
        ctx.backend_error("%s: tap %s refused a frame of %d bytes: %s", ctx.name, ctx.backend, length, err)

    def _send_unsent(self) -> None:
        """Send the chains a full backend sent back, in order; stop (blocked again) if it still is."""
        while self._unsent:
            head, views = self._unsent[0]
            try:
                length = self._send(views)
            except BlockingIOError:
                self._block()
                return
            except OSError as err:
                self._refused(sum(len(v) for v in views), err)
            else:
                self._sent(length)
            self._unsent.popleft()
            self.queue.add_used(head, 0)

    # -- batches ----------------------------------------------------------------------------
    def _send_batch(self, limit: int) -> int:
        """Send up to `limit` chains of the usual shape with one batch write: the chains taken,
        _EMPTY, or _UNUSUAL when the next chain must go alone."""
        batch = self._reader.peek(limit, writable=False, min_length=NET_HDR_SIZE, max_length=MAX_BUFFER,
                                  max_buffers=TX_BATCH_BUFFERS)
        if batch is None:
            return _EMPTY
        count = len(batch)
        if not count:
            return _UNUSUAL
        self._write_batch(batch)
        self._done += count
        self.queue.publish_used()  # the driver may reuse these while we go on
        return count

    def _write_batch(self, batch: Batch) -> None:
        """Write the batch's chains in ring order and complete them, but for those that found the
        backend full (-EAGAIN): those wait in the unsent list."""
        reader, count = self._reader, len(batch)
        reader.consume(count)
        results = self._batch_io.write_batch(batch.iov_addresses, batch.counts)
        sent = results >= 0
        stats = self.stats
        if np.count_nonzero(sent) == count:  # the usual: all written
            reader.complete(batch.heads, np.zeros(count, dtype=np.uint32))
        else:
            again = results == -errno.EAGAIN
            for i in np.flatnonzero(again):
                self._unsent.append(_Unsent(int(batch.heads[i]), reader.views(batch, i)))
            if np.count_nonzero(again):
                self._block()
            for i in np.flatnonzero(~again & ~sent):
                err = -int(results[i])
                self._refused(int(batch.lengths[i]), OSError(err, os.strerror(err)))
            done = ~again
            reader.complete(batch.heads[done], np.zeros(int(done.sum()), dtype=np.uint32))
        frames = int(np.count_nonzero(sent))
        stats.tx_frames += frames
        stats.tx_bytes += int(batch.lengths[sent].sum()) - NET_HDR_SIZE * frames
