"""virtio-net's receive path: one per queue pair, from its backend queue to its receiveq.

`RxPath.fill(budget)` moves frames while the driver has posted buffers for them and says how
it stopped (`RxOutcome`).  Frames land in the guest's buffers as the backend reads them (readv
into memoryviews / iovec rows of guest memory: zero copy); the path writes only num_buffers
(and clears flags when the driver did not accept GUEST_CSUM).  Nothing is read unless buffers
for it are in hand, so a frame is never read and then dropped for want of guest buffers.

Strategies, each a private method (the first that applies, per step of fill()):

  * pending frames (_deliver_pending): frames a batch set aside whole (below) are copied, in
    order, into the chains held and taken next, before anything else is read;
  * batches (_batch), where the backend has batch I/O: the next available chains of the usual
    shape walked together (BatchReader), one read per chain submitted in one call.  A read
    that gets -EAGAIN leaves its chain in the ring (or, before a chain that did get a frame,
    holds it for the one-chain way).  With MRG_RXBUF each read goes on past its chain into a
    spill row of host memory: a frame longer than its chain (and the frames after it, to keep
    their order) is set aside whole, its chain held (_set_aside), and waits as a pending frame;
    when the driver has not posted enough yet, the backend is not read until its kick;
  * long-frame batches (_merge_batch), with MRG_RXBUF once a batch has seen a frame longer
    than its chain: one readv per frame over as many available chains as a largest frame
    needs (their buffers as one iovec array); the frame takes the chains it filled and the
    next read starts after them.  After RX_SHORT_RUN frames in a row that fitted one chain,
    the batches of one read per chain come back;
  * one chain at a time (_one_frame): chains are popped and held until a largest frame fits
    (with MRG_RXBUF: 12 + 65550 bytes with GUEST_TSO*/UFO, else 12 + 18 + mtu; without, one
    chain whatever its size) and one readv fills them, with one scratch byte after the
    guest's buffers to tell a cut frame (dropped, counted in rx_truncated; its buffers stay).

Back-pressure: when the driver has posted too few buffers, fill() returns NO_BUFFERS with the
driver's notifications on (no lost kick): the device stops polling the backend until the kick.
End of file from the backend (a socket backend closed) sets `eof`.  The path never touches a
file descriptor, and knows nothing of epoll or interrupts but the `notify` it is given
(publish-and-notify of its queue, for the hand-overs in the middle of a long batch).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from vmm.memory import GuestMemory
from .backends.tap_batch import NetBatchIO
from .batch import IOV_MAX, MAX_BATCH, MAX_BATCH_DESCRIPTORS, Batch
from .batch import BatchReader
from .net_common import PUBLISH_EVERY, NetStats, PathContext
from .net_hdr import NET_HDR_SIZE, NUM_BUFFERS_OFFSET
from .queue import ChainError, Queue

RX_BATCH_READS = 256  # the most reads an RX batch submits (and spill rows with MRG_RXBUF)
RX_HINT_MIN = 8  # the fewest reads an RX batch submits
# With MRG_RXBUF, frames in a row that fit one chain before long-frame reads give way to batches.
RX_SHORT_RUN = 256
# ...and the chains they fill before those frames are handed over (used.idx) while more are read.
RX_PUBLISH_CHAINS = 64
RX_BATCH_BUFFERS = min(IOV_MAX, MAX_BATCH_DESCRIPTORS) - 1  # and the scratch byte
_IOVEC_SIZE = 16  # struct iovec
_BUFFER_INDEX = np.arange(MAX_BATCH_DESCRIPTORS)
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class RxOutcome(Enum):
    """How fill() stopped (TAP_EMPTY, NO_BUFFERS, BUDGET_SPENT), or what a step says comes next."""

    MORE = "more frames may wait"
    TAP_EMPTY = "the backend has no frame now (or failed)"
    NO_BUFFERS = "too few buffers posted: wait for the driver's kick"
    UNUSUAL = "the next chain is not of the batch shape: one frame the one-chain way"
    BUDGET_SPENT = "the budget is spent and frames may wait"


class _Chain(NamedTuple):
    """An RX chain held for the frames to come."""

    head: int
    views: list[memoryview]  # without MRG_RXBUF, ending with the scratch byte
    capacity: int  # device-writable bytes
    descriptors: int  # descriptor-table entries it occupies


@dataclass
class _MergeRun:
    """One long-frame batch (_merge_batch): the chains walked, and how far the reads are."""

    count: int  # chains
    ends: list[int]  # the bytes chains[:i + 1] hold
    starts: list[int] | None  # chain i's first row in the flat iovec array (None: row i)
    first: list[int]  # each chain's header address
    used0: int  # the used ring index of chain 0
    pos: int = 0  # the next chain to read into
    before: int = 0  # the bytes of the chains before pos
    published: int = 0  # chains handed over so far
    frames: int = 0
    dropped: int = 0
    received: int = 0  # frame bytes, headers excluded


class RxPath:
    """The receiveq of one queue pair (its I/O thread's, under the pair's lock)."""

    def __init__(self, queue: Queue, recv: Callable[[list[memoryview]], int], batch_io: NetBatchIO | None,
                 stats: NetStats, ctx: PathContext, *, mem: GuestMemory, mrg: bool, guest_csum: bool, need: int,
                 notify: Callable[[], None]):
        self.queue = queue
        self.stats = stats
        self.eof = False  # the backend said end of file: not read again
        self.buffers_found = False  # (per fill) buffers were in hand or taken: not waiting for a kick
        self._recv = recv  # one frame (NetBackend.reader)
        self._batch_io = batch_io
        self._ctx = ctx
        self._mem = mem.bytes_view
        self._mrg, self._guest_csum, self._need = mrg, guest_csum, need
        self._notify = notify
        self._kicks_on = True  # whether the driver is asked to notify the receiveq
        self._frames = 0  # (per fill) frames moved or dropped
        # Chains held for the frames to come, in ring order, their total bytes and table entries.
        self._held: deque[_Chain] = deque()
        self._capacity = self._descriptors = 0
        self._scratch = memoryview(bytearray(1))  # the byte a readv reaches only with a frame too long
        scratch = np.frombuffer(self._scratch, dtype=np.uint8)
        self._scratch_iov = np.array([scratch.ctypes.data, 1], dtype=np.uint64)  # (struct iovec)
        self._iov: list[memoryview] = [self._scratch]  # with MRG_RXBUF: every held view, then scratch
        self._pending: deque[memoryview] = deque()  # frames read, set aside whole, in order
        self._reader: BatchReader | None = None
        self._spill: mmap.mmap | None = None
        self._hint = RX_HINT_MIN  # how many reads the next batch submits (grows while the backend keeps up)
        self._long = False  # reading long frames (_merge_batch)
        self._short_run = 0
        if batch_io is not None and queue.ready:
            self._open_batches()

    def _open_batches(self) -> None:
        self._reader = BatchReader(self.queue)
        if not self._mrg:
            return
        # A row of `need` bytes per read of a batch, where the part of a frame past its chain lands
        # (anonymous memory: only the rows a long frame reaches are ever touched).
        self._spill = mmap.mmap(-1, RX_BATCH_READS * self._need)
        base = np.frombuffer(self._spill, dtype=np.uint8, count=1).ctypes.data
        self._spill_addresses = base + np.arange(RX_BATCH_READS, dtype=np.uint64) * np.uint64(self._need)
        # _merge_batch's iovec array: every buffer of a peek, and a row for the scratch byte
        # (after IOV_MAX - 1 tiny buffers); as 64-bit words; its address
        self._flat = np.zeros((MAX_BATCH * MAX_BATCH_DESCRIPTORS + 1, 2), dtype=np.uint64)
        self._flat_words = memoryview(self._flat).cast("B").cast("Q")
        self._flat_address = self._flat.ctypes.data

    # -- what the device sees -----------------------------------------------------------------
    @property
    def batches(self) -> bool:
        return self._reader is not None

    @property
    def pending(self) -> int:
        """Frames read and set aside, waiting for buffers."""
        return len(self._pending)

    @property
    def reading_long_frames(self) -> bool:
        return self._long

    def close(self) -> None:
        """Forget the held chains and pending frames (the driver gets its buffers back by resetting
        the queue), and the batch state."""
        self._pending.clear()  # (their views of the spill go first)
        self._held.clear()
        del self._iov[:-1]
        self._capacity = self._descriptors = 0
        self._long = False
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._spill is not None:
            self._flat_words = self._flat = self._spill_addresses = None
            self._spill.close()
            self._spill = None

    def fill(self, budget: int) -> RxOutcome:
        """Move up to `budget` frames (dropped ones count too) from the backend into the ring;
        TAP_EMPTY, NO_BUFFERS (the driver's kick will bring more) or BUDGET_SPENT.  Raises
        QueueError when the ring is broken."""
        queue = self.queue
        first_used = queue.next_used
        self.buffers_found = False
        self._frames = 0
        outcome = RxOutcome.BUDGET_SPENT
        while self._frames < budget:
            outcome = self._step(budget - self._frames)
            if outcome is not RxOutcome.MORE:
                break
        else:
            outcome = RxOutcome.BUDGET_SPENT
        if queue.next_used != first_used:
            queue.publish_used()
        return outcome

    def _step(self, budget: int) -> RxOutcome:
        if self._pending:  # frames a batch read first (MRG_RXBUF), waiting for buffers
            delivered, done = self._deliver_pending()
            self._frames += delivered
            return RxOutcome.MORE if done else RxOutcome.NO_BUFFERS
        if self._reader is not None and not self._held:
            take = self._merge_batch if self._long else self._batch
            got, outcome = take(budget)
            if outcome is RxOutcome.NO_BUFFERS:
                return outcome
            self.buffers_found = True
            if got:
                self._frames += got
                self.queue.publish_used()
            if outcome is not RxOutcome.UNUSUAL:
                return outcome
        return self._one_frame()

    # -- driver notifications -------------------------------------------------------------------
    def _ask_for_kicks(self, seen: int = 0) -> bool:
        """Ask the driver to kick when it adds buffers beyond the `seen` available ones; True if
        it did meanwhile (look again: no lost kick)."""
        self._kicks_on = True
        return self.queue.enable_notification(seen)

    def _kicks_off(self) -> None:
        """Buffers in hand: the driver need not tell us about more."""
        if self._kicks_on:
            self.queue.set_notification(False)
            self._kicks_on = False

    # -- one chain at a time ----------------------------------------------------------------------
    def _one_frame(self) -> RxOutcome:
        """Read one frame into the chains held (popping more until a frame surely fits)."""
        if self._capacity < (self._need if self._mrg else 1) and not self._take_buffers():
            return RxOutcome.NO_BUFFERS
        self.buffers_found = True
        if not self._receive():
            return RxOutcome.TAP_EMPTY
        self._frames += 1
        if not self._frames % PUBLISH_EVERY:
            self.queue.publish_used()
        return RxOutcome.MORE

    def _pop_chain(self, min_capacity: int = 1) -> _Chain | None:
        """The next available chain of min_capacity+ device-writable bytes in under IOV_MAX
        buffers; None when there is none (the driver is then asked for a kick).  A malformed
        chain goes to the device's chain_error; one of the wrong shape is returned empty."""
        queue, ctx = self.queue, self._ctx
        while True:
            try:
                chain = queue.pop_buffers()
            except ChainError as err:
                self.stats.rx_bad_chains += 1
                ctx.chain_error(queue, err)
                continue
            if chain is None:
                if self._ask_for_kicks():
                    continue
                return None
            head, views, capacity, writable, descriptors = chain
            if writable and capacity >= min_capacity and len(views) < IOV_MAX:
                return _Chain(head, views, capacity, descriptors)
            self.stats.rx_bad_chains += 1
            ctx.guest_error("%s: RX chain %d is not %d+ device-writable bytes in under %d buffers: returned empty",
                            ctx.name, head, min_capacity, IOV_MAX)
            queue.add_used(head, 0)

    def _take_buffers(self, need: int | None = None) -> bool:
        """Pop chains until a frame surely fits, or one of `need` bytes (or the ring is empty);
        False if there are none (with MRG_RXBUF: too few, and the driver can add more)."""
        if need is None:
            need = self._need if self._mrg else 1  # without MRG_RXBUF one chain takes any frame it can
        while self._capacity < need:
            chain = self._pop_chain(NET_HDR_SIZE)
            if chain is None:
                break
            self._hold(chain)
        else:
            self._kicks_off()
            return True
        # The ring ran dry first.  Reading now could take a frame too big for what we hold and
        # drop it: wait for the driver's kick instead (armed above) - unless we hold the whole
        # descriptor table, so the driver cannot give more (its choice: then the biggest frames
        # cannot fit, and are counted in rx_truncated).
        if self._mrg and self._descriptors < self.queue.size:
            return False
        return bool(self._held)

    def _hold(self, chain: _Chain) -> None:
        """Keep an RX chain for the frames to come (after those held already)."""
        if self._mrg:
            self._iov[-1:-1] = chain.views
        else:
            chain.views.append(self._scratch)
        self._held.append(chain)
        self._capacity += chain.capacity
        self._descriptors += chain.descriptors

    def _read_iov(self) -> tuple[list[memoryview], int]:
        """What the next read goes into, ending with the scratch byte, and the bytes before it."""
        if not self._mrg:
            return self._held[0].views, self._held[0].capacity
        if len(self._iov) <= IOV_MAX:
            return self._iov, self._capacity
        iov: list[memoryview] = []  # more views held than one readv takes: the first chains
        capacity = 0
        for chain in self._held:
            if capacity and (capacity >= self._need or len(iov) + len(chain.views) >= IOV_MAX):
                break
            iov += chain.views
            capacity += chain.capacity
        iov.append(self._scratch)
        return iov, capacity

    def _receive(self) -> bool:
        """Read one frame from the backend into the buffers in hand; False if it had none."""
        iov, capacity = self._read_iov()
        ctx = self._ctx
        try:
            n = self._recv(iov)
        except BlockingIOError:
            return False
        except OSError as err:
            ctx.backend_error("%s: reading tap %s: %s", ctx.name, ctx.backend, err)
            return False
        if n == 0:  # end of file: not from a tap (a frame has its header), but a socket backend closed
            self.eof = True
            return False
        if n > capacity or n < NET_HDR_SIZE:
            self.stats.rx_truncated += 1
            ctx.backend_error("%s: a frame from tap %s did not fit the %d bytes of receive buffers in hand: dropped",
                              ctx.name, ctx.backend, capacity)
            return True
        self._hand_over(n)
        return True

    def _hand_over(self, n: int) -> None:
        """The first `n` bytes of the chains held are a frame: the chains it filled are the
        driver's, each with the bytes it got, num_buffers in the header says how many."""
        first_views = self._held[0].views  # the header is in the first chain (NET_HDR_SIZE bytes or more)
        count = used_views = 0
        remaining = n
        while remaining > 0:
            chain = self._held.popleft()
            got = min(chain.capacity, remaining)
            self.queue.add_used(chain.head, got)
            self._capacity -= chain.capacity
            self._descriptors -= chain.descriptors
            used_views += len(chain.views)
            remaining -= got
            count += 1
        if self._mrg:
            del self._iov[:used_views]
        _patch_header(first_views, count, None if self._guest_csum else 0)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += n - NET_HDR_SIZE

    # -- frames set aside -----------------------------------------------------------------------
    def _set_aside(self, batch: Batch, row: int, length: int) -> None:
        """Frame `row` of a batch cannot be handed over yet (MRG_RXBUF: it, or one before it, is
        longer than its chain): the frame goes to the end of the pending frames, whole, and its
        chain is held with the others, for whichever frame comes first.  A frame longer than its
        chain has the rest in its spill row from the chain's capacity on: the chain's bytes go
        before it (a view of the row, not a copy: no batch reads into the spill while frames are
        pending)."""
        views = self._reader.views(batch, row)
        capacity = int(batch.lengths[row])
        if length > capacity:
            start = row * self._need
            frame = memoryview(self._spill)[start : start + length]
        else:
            frame = memoryview(bytearray(length))
        _copy(views, frame, length, into_views=False)
        self._pending.append(frame)
        self._hold(_Chain(int(batch.heads[row]), views, capacity, int(batch.counts[row])))

    def _deliver_pending(self) -> tuple[int, bool]:
        """Hand over the pending frames in order, each copied into the chains held and, when those
        hold too little, chains taken from the ring now; (frames handed over, whether all were).
        When the ring runs dry the driver is asked for a kick and the rest wait; when what is held
        is the whole table and still too little, the frame is longer than the driver's ring can
        take: dropped, counted."""
        delivered = 0
        while self._pending:
            frame = self._pending[0]
            length = len(frame)
            if self._capacity < length and not self._take_buffers(length):
                return delivered, False  # the driver's kick brings more
            self._pending.popleft()
            if self._capacity < length:
                self.stats.rx_truncated += 1
                ctx = self._ctx
                ctx.backend_error("%s: a frame of %d bytes from tap %s is longer than the whole receive ring: dropped",
                                  ctx.name, length, ctx.backend)
                continue
            _copy(self._iov, frame, length, into_views=True)
            self._hand_over(length)
            delivered += 1
        return delivered, True

    # -- batches of one read per chain ------------------------------------------------------------
    def _batch(self, limit: int) -> tuple[int, RxOutcome]:
        """Read frames into a batch of chains; (frames received or dropped, MORE, TAP_EMPTY,
        NO_BUFFERS or UNUSUAL).

        Up to `_hint` chains of the usual shape, one read each (into its buffers, then - with
        MRG_RXBUF - its spill row, then the scratch byte) in one batch call; each returns a
        frame or -EAGAIN at once.  The chains that got a frame are completed together; a chain
        before the last one that got a frame but did not is held for the one-chain way; those
        after it stay in the ring.  The hint doubles while every read gets a frame and falls
        back to twice the frames of a batch that emptied the backend, so a trickle does not
        cost a ring of failed reads."""
        batch = self._peek(min(limit, self._hint))
        if batch is None:
            return 0, RxOutcome.NO_BUFFERS
        count = len(batch)
        if not count:
            return 0, RxOutcome.UNUSUAL
        results, fits = self._submit_reads(batch)
        got = (results >= NET_HDR_SIZE) & (results <= fits)
        rows = np.arange(count)
        dropped, tap_empty = 0, False
        if np.count_nonzero(got) != count:  # not a frame for every chain
            dropped, tap_empty = self._batch_shortfall(batch, results, fits, got)
            rows = rows[got]
        else:
            self._reader.consume(count)
        frames, pending = self._complete_batch(batch, rows, results[rows])
        if pending:
            delivered, done = self._deliver_pending()
            if not done:
                return frames + delivered, RxOutcome.NO_BUFFERS
            frames += delivered
        if self.eof or tap_empty or dropped < 0:
            self._hint = max(RX_HINT_MIN, min(2 * frames, RX_BATCH_READS))
            return frames + max(dropped, 0), RxOutcome.TAP_EMPTY
        self._hint = min(2 * self._hint, RX_BATCH_READS)
        return frames + dropped, RxOutcome.MORE

    def _peek(self, limit: int) -> Batch | None:
        """The next chains of the usual shape (an empty batch: the next one is not); None when the
        ring is empty (the driver then asked for a kick)."""
        shape = dict(writable=True, min_first=NET_HDR_SIZE, max_buffers=RX_BATCH_BUFFERS - self._mrg)
        batch = self._reader.peek(limit, **shape)
        if batch is None:
            if not self._ask_for_kicks():
                return None
            batch = self._reader.peek(limit, **shape)
            if batch is None:
                return None
        self._kicks_off()
        return batch

    def _submit_reads(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """One read per chain, all submitted together; (results, the bytes each could take)."""
        count = len(batch)
        rows = np.arange(count)
        capacity = batch.lengths
        if not self._mrg:
            batch.iov[rows, batch.counts] = self._scratch_iov  # a frame longer than the chain reaches it
            return self._batch_io.read_batch(batch.iov_addresses, batch.counts + 1), capacity
        # then the spill row (a frame longer than need still reaches the scratch byte)
        spill = np.maximum(self._need - capacity, 0)
        batch.iov[rows, batch.counts, 0] = self._spill_addresses[:count] + capacity.astype(np.uint64)
        batch.iov[rows, batch.counts, 1] = spill
        batch.iov[rows, batch.counts + 1] = self._scratch_iov
        return self._batch_io.read_batch(batch.iov_addresses, batch.counts + 2), capacity + spill

    def _batch_shortfall(self, batch: Batch, results: np.ndarray, fits: np.ndarray,
                         got: np.ndarray) -> tuple[int, bool]:
        """Some reads got no frame that fits: take the chains up to the last that did, hold
        those passed over; (frames dropped or -1 if a read failed, whether the backend was empty)."""
        empty = results == -errno.EAGAIN
        tap_empty = bool(np.count_nonzero(empty))
        dropped = 0
        if np.count_nonzero(got | empty) != len(batch):
            dropped = self._batch_trouble(results, fits)
        frames = np.flatnonzero(got)
        used = int(frames[-1]) + 1 if len(frames) else 0
        reader = self._reader
        reader.consume(used)
        for i in np.flatnonzero(~got[:used]):  # chains passed over: held, in order, for the one-chain way
            self._hold(_Chain(int(batch.heads[i]), reader.views(batch, i), int(batch.lengths[i]), int(batch.counts[i])))
        return dropped, tap_empty

    def _batch_trouble(self, results: np.ndarray, capacity: np.ndarray) -> int:
        """The reads of a batch that got neither a frame that fits nor -EAGAIN: the frames
        dropped, or -1 if a read failed (the backend is not read further in this fill)."""
        ctx = self._ctx
        if (results == 0).any():  # end of file: a socket backend closed (a tap frame has its header)
            self.eof = True
        bad = (results > capacity) | ((results > 0) & (results < NET_HDR_SIZE))
        if bad.any():
            self.stats.rx_truncated += int(bad.sum())
            ctx.backend_error("%s: a frame from tap %s did not fit the %d bytes of a receive chain: dropped",
                              ctx.name, ctx.backend, int(capacity[np.flatnonzero(bad)[0]]))
        errors = (results < 0) & (results != -errno.EAGAIN)
        if errors.any():
            err = -int(results[np.flatnonzero(errors)[0]])
            ctx.backend_error("%s: reading tap %s: %s", ctx.name, ctx.backend, os.strerror(err))
            return -1
        return -1 if self.eof else int(bad.sum())

    def _complete_batch(self, batch: Batch, rows: np.ndarray, lengths: np.ndarray) -> tuple[int, bool]:
        """Hand over the frames read into chains `rows` (in order); with MRG_RXBUF, from the first
        frame its chain does not hold, set them aside (and read long frames from now on);
        (frames handed over, whether some were set aside)."""
        heads, first, capacity = batch.heads[rows], batch.first[rows], batch.lengths[rows]
        frames, pending = len(rows), False
        if self._mrg and frames:
            longer = np.flatnonzero(lengths > capacity)
            if len(longer):
                self._long, self._short_run = True, 0
                k = int(longer[0])
                for i in range(k, frames):
                    self._set_aside(batch, int(rows[i]), int(lengths[i]))
                heads, first, lengths, frames, pending = heads[:k], first[:k], lengths[:k], k, True
        if frames:
            reader = self._reader
            reader.write_u16(first + np.uint64(NUM_BUFFERS_OFFSET), 1)
            if not self._guest_csum:
                reader.write_u8(first, 0)
            reader.complete(heads, lengths)
            self.stats.rx_frames += frames
            self.stats.rx_bytes += int(lengths.sum()) - NET_HDR_SIZE * frames
        return frames, pending

    # -- long frames: one read over as many chains as a largest frame needs ---------------------
    def _merge_batch(self, limit: int) -> tuple[int, RxOutcome]:
        """With MRG_RXBUF, while frames longer than a chain come (a TCP stream with GUEST_TSO: up
        to 64 KiB in 2-4 KiB buffers): every available chain walked at once, and each frame read
        straight into as many of them as the largest frame and one byte more need (a frame that
        fills all of them may have been cut short: dropped); the frame uses the chains it filled
        (num_buffers of them), the next read starts after them.  The used elements are staged
        for every chain with all it holds before the reads, and the last chain of each frame
        gets its length as the frame is read; returns what _batch does.

        Reads go one call each (a read's start depends on the last one's length), which a frame
        of tens of KiB well pays for.  Chains beyond the last frame stay in the ring; when those
        available cannot hold a largest frame, the driver is asked for a kick and nothing is read
        meanwhile.  Every RX_PUBLISH_CHAINS chains filled, the frames read so far are handed over
        (and the driver notified if it asked): it refills those while the rest are read."""
        batch = self._peek_for_merge()
        if isinstance(batch, RxOutcome):
            return 0, batch
        run = self._merge_run(batch)
        state = RxOutcome.MORE
        while run.frames + run.dropped < limit:
            state = self._merge_read(run)
            if state is not RxOutcome.MORE:
                break
            if run.pos - run.published >= RX_PUBLISH_CHAINS:  # hand these over now: the driver refills meanwhile
                self._merge_publish(run)
        return self._merge_end(run, state)

    def _peek_for_merge(self) -> Batch | RxOutcome:
        """Every available chain, once they hold a largest frame and a byte; else NO_BUFFERS (the
        driver asked for a kick) or UNUSUAL (the one-chain way sees to what comes next)."""
        reader, queue = self._reader, self.queue
        while True:
            seen = min(queue.available(), MAX_BATCH)  # (what peek walks: the driver may add more meanwhile)
            batch = reader.peek(seen, writable=True, min_first=NET_HDR_SIZE)
            if batch is None:
                if self._ask_for_kicks():
                    continue
                return RxOutcome.NO_BUFFERS
            count = len(batch)
            if count and int(np.cumsum(batch.lengths)[-1]) > self._need:
                break
            if count < seen or int(batch.counts.sum()) >= queue.size:
                # an unusual chain comes next, or all we see may be the whole table: the one-chain
                # way sees to it (it reads into what the driver can give, or says what is wrong)
                return RxOutcome.UNUSUAL
            if not self._ask_for_kicks(seen):  # (a kick when the driver adds to those: they stay in the ring)
                return RxOutcome.NO_BUFFERS
        self._kicks_off()
        return batch

    def _merge_run(self, batch: Batch) -> _MergeRun:
        """Lay the batch's buffers out as one iovec array and stage every chain's used element
        with all it holds (what it gets unless it is the last of a frame: that one's length is
        written when its frame is read).  (Slots past used.idx: the driver reads none of them.)"""
        counts = batch.counts
        count = len(batch)
        if np.count_nonzero(counts - 1):
            widest = int(counts.max())
            buffers = batch.iov[:, :widest][_BUFFER_INDEX[:widest] < counts[:, None]]
            self._flat[: len(buffers)] = buffers
            starts = (np.cumsum(counts) - counts).tolist() + [len(buffers)]
        else:  # (the usual: one buffer per chain)
            self._flat[:count] = batch.iov[:, 0]
            starts = None
        run = _MergeRun(count, np.cumsum(batch.lengths).tolist(), starts, batch.first.tolist(), self.queue.next_used)
        self._reader.stage(batch.heads, batch.lengths)
        return run

    def _merge_read(self, run: _MergeRun) -> RxOutcome:
        """Read the next frame into the chains from run.pos on: MORE, TAP_EMPTY or NO_BUFFERS."""
        end = bisect.bisect_left(run.ends, run.before + self._need + 1, run.pos)  # completes the window
        if end == run.count:
            return RxOutcome.NO_BUFFERS  # (unless the driver added some meanwhile: _merge_end)
        n, room = self._merge_readv(run, end)
        ctx = self._ctx
        if n <= 0:
            if n == 0:  # end of file: a socket backend closed
                self.eof = True
            elif -n not in (errno.EAGAIN, errno.EWOULDBLOCK):
                ctx.backend_error("%s: reading tap %s: %s", ctx.name, ctx.backend, os.strerror(-n))
            return RxOutcome.TAP_EMPTY
        if n > room or n < NET_HDR_SIZE:  # its chains stay for the next frame
            self.stats.rx_truncated += 1
            run.dropped += 1
            ctx.backend_error("%s: a frame from tap %s did not fit the %d bytes of a receive chain: dropped",
                              ctx.name, ctx.backend, room)
            return RxOutcome.MORE
        self._merge_frame(run, n)
        return RxOutcome.NO_BUFFERS if run.pos == run.count else RxOutcome.MORE

    def _merge_readv(self, run: _MergeRun, end: int) -> tuple[int, int]:
        """One readv over chains run.pos..end; (its result, the bytes before the last one's last)."""
        first_row, end_row = (run.pos, end + 1) if run.starts is None else (run.starts[run.pos], run.starts[end + 1])
        rows = end_row - first_row
        if rows >= IOV_MAX:  # (tiny buffers: what one readv takes)
            return self._read_tiny(first_row)
        return self._batch_io.readv_at(self._flat_address + _IOVEC_SIZE * first_row, rows), run.ends[end] - run.before - 1

    def _read_tiny(self, first_row: int) -> tuple[int, int]:
        """A long-frame read over more buffers than one readv takes (tiny ones): into the first
        IOV_MAX - 1 from the flat row `first_row`, then the scratch byte (in the row after them
        for this read); (the result, the bytes those buffers hold)."""
        rows = IOV_MAX - 1
        room = int(self._flat[first_row : first_row + rows, 1].sum())
        words, w = self._flat_words, 2 * (first_row + rows)
        saved = words[w], words[w + 1]
        words[w], words[w + 1] = int(self._scratch_iov[0]), 1
        n = self._batch_io.readv_at(self._flat_address + _IOVEC_SIZE * first_row, rows + 1)
        words[w], words[w + 1] = saved
        return n, room

    def _merge_frame(self, run: _MergeRun, n: int) -> None:
        """A frame of `n` bytes from chain run.pos on: its last chain's used length, num_buffers."""
        ends, mem = run.ends, self._mem
        last = bisect.bisect_left(ends, run.before + n, run.pos)  # the chain that holds its last byte
        reader = self._reader
        slot = reader.used_len_base + 8 * ((run.used0 + last) & reader.used_mask)
        _U32.pack_into(mem, slot, run.before + n - (ends[last - 1] if last else 0))
        header = run.first[run.pos]
        _U16.pack_into(mem, header + NUM_BUFFERS_OFFSET, last - run.pos + 1)
        if not self._guest_csum:
            mem[header] = 0
        run.received += n - NET_HDR_SIZE
        run.frames += 1
        run.pos, run.before = last + 1, ends[last]

    def _merge_publish(self, run: _MergeRun) -> None:
        """Hand over the chains filled since the last time, and notify the driver if it asked."""
        k = run.pos - run.published
        self._reader.consume(k)
        self._reader.commit(k)
        self._notify()  # (a driver that waits for an interrupt to look)
        run.published = run.pos

    def _merge_end(self, run: _MergeRun, state: RxOutcome) -> tuple[int, RxOutcome]:
        if run.pos > run.published:
            self._reader.consume(run.pos - run.published)
            self._reader.commit(run.pos - run.published)
        if run.frames:
            self.stats.rx_frames += run.frames
            self.stats.rx_bytes += run.received
            if run.pos > run.frames:  # (a frame took more than one chain)
                self._short_run = 0
            else:
                self._short_run += run.frames
                self._long = self._short_run < RX_SHORT_RUN
        if self.eof:
            state = RxOutcome.TAP_EMPTY
        elif state is RxOutcome.NO_BUFFERS and self._ask_for_kicks(run.count - run.pos):
            state = RxOutcome.MORE  # (the chains left hold too little, but more came)
        return run.frames + run.dropped, state


def _copy(views: list[memoryview], frame: memoryview, length: int, *, into_views: bool) -> None:
    """Copy the first `length` bytes between `frame` and the buffers `views` (in order)."""
    offset = 0
    for v in views:
        n = min(len(v), length - offset)
        if into_views:
            v[:n] = frame[offset : offset + n]
        else:
            frame[offset : offset + n] = v[:n]
        offset += n
        if offset == length:
            break


def _patch_header(views: list[memoryview], num_buffers: int, flags: int | None) -> None:
    """Write num_buffers (and, unless None, flags) into the header at the start of `views`."""
    first = views[0]
    if len(first) >= NET_HDR_SIZE:  # the usual case: the header is in one buffer
        _U16.pack_into(first, NUM_BUFFERS_OFFSET, num_buffers)
        if flags is not None:
            first[0] = flags
        return
    patches = [(NUM_BUFFERS_OFFSET, _U16.pack(num_buffers))]
    if flags is not None:
        patches.append((0, bytes([flags])))
    for offset, data in patches:
        pos = 0
        for view in views:
            for i, byte in enumerate(data):
                j = offset + i - pos
                if 0 <= j < len(view):
                    view[j] = byte
            pos += len(view)
            if pos >= offset + len(data):
                break
