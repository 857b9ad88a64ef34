"""virtio-net's batch paths: many frames per system call (the device, and the
one-chain paths that every unusual chain and every error goes through, are in
virtio/net.py).

With a backend whose fds take one frame per readv / writev (a real tap:
`NetBackend.direct_fds`) each pair has, for its transmitq and its receiveq, a
BatchReader (virtio/batch.py: the next available chains walked together in
numpy, as rows of `struct iovec` pointing into guest RAM) and an io_uring
(vmm/io_uring.py: one writev / readv per row, all submitted in one system call,
RWF_NOWAIT so a full or empty tap answers EAGAIN at once).  Their used elements,
and each RX header's num_buffers, are written together.  Python then does per
batch what it did per frame; the kernel's work per frame stays that of a writev
/ readv.  A chain that is not of the usual shape (virtio/batch.py says which)
ends the batch and goes the one-chain way; so does everything when io_uring
cannot be had (a warning says so).

TX (_tx_batch): a write that finds the tap full waits in `tx_retry` and is sent
first when it has room (the rest of its batch is sent meanwhile: that frame may
arrive late, none is lost).

RX (_rx_batch): a read that gets EAGAIN leaves its chain in the ring (or, before
a chain that did get a frame, holds it for the one-chain path).  With MRG_RXBUF
each read goes on past its chain into a spill row of host memory: a frame longer
than its chain (and the frames after it, to keep their order) is set aside
whole, its chain held, and handed over by copying it into the chains held and
taken next (_rx_set_aside, _rx_deliver_pending); when the driver has not posted
enough yet, those frames wait in `rx_pending` and the tap is not read until its
kick (none is lost; one longer than the whole ring is dropped).

RX with MRG_RXBUF and long frames (_rx_merge_batch): once a batch has seen a
frame longer than its chain, each read is one readv over as many available
chains as a largest frame needs (their buffers laid out as one iovec array:
zero copy), the frame takes the chains it filled and the next read starts after
them; after RX_SHORT_RUN frames in a row that fitted one chain, the batches of
one read per chain come back.

`NetBatches` is a part of VirtioNet (a mixin): its methods use the device's
state and its one-chain helpers (_hold_rx_chain, _take_rx_buffers,
_rx_hand_over, _pop_rx_chain, _tx_block, _tx_error...).
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from .batch import IOV_MAX, MAX_BATCH, MAX_BATCH_DESCRIPTORS, Batch, BatchReader
from .net_hdr import NET_HDR_SIZE, NUM_BUFFERS_OFFSET
from .queue import Queue

if TYPE_CHECKING:
    from .net import _Pair

log = logging.getLogger("virtio.net")

BATCH_RING_ENTRIES = 256  # io_uring submission queue of a batch path
RX_HINT_MIN = 8  # the fewest reads an RX batch submits
# With MRG_RXBUF, frames in a row that fit one chain before long-frame reads give way to batches.
RX_SHORT_RUN = 256
# ...and the chains they fill before those frames are handed over (used.idx) while more are read.
RX_PUBLISH_CHAINS = 64
# What an RX batch says comes next.
MORE, TAP_EMPTY, NO_BUFFERS, UNUSUAL = "more", "tap empty", "no buffers", "unusual chain"
TX_BATCH_BUFFERS = min(IOV_MAX, MAX_BATCH_DESCRIPTORS)
RX_BATCH_BUFFERS = min(IOV_MAX, MAX_BATCH_DESCRIPTORS) - 1  # and the scratch byte

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_IOVEC_SIZE = 16  # struct iovec
_BUFFER_INDEX = np.arange(MAX_BATCH_DESCRIPTORS)


class NetBatches:
    """VirtioNet's batch paths: TX and RX many frames per system call (see the module)."""

    def _open_batches(self, p: _Pair) -> None:
        """Give the pair the batch path for its transmitq and its receiveq (with MRG_RXBUF, and
        a spill row per read for the part of a frame its chain does not hold), over the backend's
        batch I/O (p.batch_io; where it has none the pair goes one chain at a time)."""
        if self.queues[p.tx].ready:
            p.tx_reader = BatchReader(self.queues[p.tx])
        if self.queues[p.rx].ready:
            p.rx_reader = BatchReader(self.queues[p.rx])
            if self._mrg:  # (anonymous memory: only the rows a long frame reaches are ever touched)
                p.rx_spill = mmap.mmap(-1, BATCH_RING_ENTRIES * self._rx_need)
                base = np.frombuffer(p.rx_spill, dtype=np.uint8, count=1).ctypes.data
                p.rx_spill_addresses = base + np.arange(BATCH_RING_ENTRIES, dtype=np.uint64) * np.uint64(self._rx_need)
                # _rx_merge_batch's iovec array: every buffer of a peek, and a row for the scratch byte
                # (after IOV_MAX - 1 tiny buffers)
                p.rx_flat = np.zeros((MAX_BATCH * MAX_BATCH_DESCRIPTORS + 1, 2), dtype=np.uint64)
                p.rx_flat_words = memoryview(p.rx_flat).cast("B").cast("Q")
                p.rx_flat_address = p.rx_flat.ctypes.data

    def _tx_batch(self, p: _Pair, batch: Batch) -> tuple[int, int]:
        """Write a batch of TX chains to the tap, complete them; (frames sent, their bytes).

        The writes are issued in ring order.  One that finds the tap full (EAGAIN: only
        when its socket buffer is limited) is not lost: its chain waits in `tx_retry`
        and goes first once the tap has room; the rest of the batch is sent meanwhile.
        """
        count = len(batch)
        p.tx_reader.consume(count)
        results = p.batch_io.write_batch(batch.iov_addresses, batch.counts)
        sent = results >= 0
        if np.count_nonzero(sent) == count:  # the usual: all written
            p.tx_reader.complete(batch.heads, np.zeros(count, dtype=np.uint32))
            return count, int(batch.lengths.sum())
        again = results == -errno.EAGAIN
        done = ~again
        if np.count_nonzero(again):
            for i in np.flatnonzero(again):
                p.tx_retry.append((int(batch.heads[i]), p.tx_reader.views(batch, i)))
            self._tx_block(p)
        for i in np.flatnonzero(done & ~sent):
            err = -int(results[i])
            self._tx_error(p, int(batch.lengths[i]), OSError(err, os.strerror(err)))
        p.tx_reader.complete(batch.heads[done], np.zeros(int(done.sum()), dtype=np.uint32))
        return int(sent.sum()), int(batch.lengths[sent].sum())

    def _tx_retry(self, p: _Pair, queue: Queue) -> tuple[int, int]:
        """Send the chains a full tap sent back, in order; stop (blocked again) if it is still full."""
        frames = nbytes = 0
        while p.tx_retry:
            head, views = p.tx_retry[0]
            try:
                length = p.send(views)
            except BlockingIOError:
                self._tx_block(p)
                break
            except OSError as err:
                self._tx_error(p, sum(len(v) for v in views), err)
            else:
                frames += 1
                nbytes += length
            p.tx_retry.popleft()
            queue.add_used(head, 0)
        return frames, nbytes

    def _rx_batch(self, p: _Pair, queue: Queue, limit: int) -> tuple[int, str]:
        """Read frames into a batch of RX chains; returns (frames received, what next: MORE,
        TAP_EMPTY, NO_BUFFERS or UNUSUAL).

        Up to `p.rx_hint` chains of the usual shape are walked together and one readv per
        chain (into its buffers, then the scratch byte) is submitted in one io_uring_enter; on
        the non-blocking tap each returns a frame or EAGAIN at once.  The chains that got a
        frame are completed together (num_buffers 1 in each header); a chain before the last
        one that got a frame but did not (a frame too big for it, or EAGAIN just before a frame
        came) is held for the one-chain path, like its chains; those after it stay in the ring.
        The hint doubles while every read gets a frame and falls back to twice the frames of a
        batch that emptied the tap, so a trickle does not cost a ring of failed reads.

        With MRG_RXBUF a chain holds the start of a frame and the frame may need more: each
        readv goes on into the read's spill row (up to rx_need bytes in all) before the scratch
        byte.  A frame that fits its chain (the usual, for frames up to the driver's buffer
        size) is handed over as above; from the first that does not, the frames are set aside
        whole in `rx_pending` and their chains held (_rx_set_aside), then handed over in order
        by _rx_deliver_pending, copied into the chains held and more taken from the ring
        (num_buffers counts them); if the driver has not posted enough yet, they wait (nothing
        more is read meanwhile) for its kick.  Long frames are likely to go on coming: the
        next batches are _rx_merge_batch's.
        """
        reader = p.rx_reader
        mrg = self._mrg
        limit = min(limit, p.rx_hint)
        shape = dict(writable=True, min_first=NET_HDR_SIZE, max_buffers=RX_BATCH_BUFFERS - mrg)
        batch = reader.peek(limit, **shape)
        if batch is None:
            # Ask for a kick when the driver adds buffers, then look once more (no lost kick).
            p.rx_kicks_on = True
            if not queue.enable_notification():
                return 0, NO_BUFFERS
            batch = reader.peek(limit, **shape)
            if batch is None:
                return 0, NO_BUFFERS
        if p.rx_kicks_on:
            queue.set_notification(False)
            p.rx_kicks_on = False
        count = len(batch)
        if not count:
            return 0, UNUSUAL
        rows = np.arange(count)
        capacity = batch.lengths
        fits = capacity
        if mrg:  # then the spill row (a frame longer than rx_need still reaches the scratch byte)
            spill = np.maximum(self._rx_need - capacity, 0)
            batch.iov[rows, batch.counts, 0] = p.rx_spill_addresses[:count] + capacity.astype(np.uint64)
            batch.iov[rows, batch.counts, 1] = spill
            batch.iov[rows, batch.counts + 1] = p.scratch_iov
            results = p.batch_io.read_batch(batch.iov_addresses, batch.counts + 2)
            fits = capacity + spill
        else:
            batch.iov[rows, batch.counts] = p.scratch_iov  # a frame longer than the chain reaches it
            results = p.batch_io.read_batch(batch.iov_addresses, batch.counts + 1)
        got = (results >= NET_HDR_SIZE) & (results <= fits)
        frames = int(np.count_nonzero(got))
        heads, first, lengths = batch.heads, batch.first, results
        dropped, tap_empty = 0, False
        if frames != count:  # not a frame for every chain
            empty = results == -errno.EAGAIN
            tap_empty = bool(np.count_nonzero(empty))
            if np.count_nonzero(got | empty) != count:
                dropped = self._rx_batch_trouble(p, results, fits)
            used = int(np.flatnonzero(got)[-1]) + 1 if frames else 0
            reader.consume(used)
            for i in np.flatnonzero(~got[:used]):  # chains passed over: held, in order, for the one-chain path
                self._hold_rx_chain(p, int(batch.heads[i]), reader.views(batch, i), int(capacity[i]), int(batch.counts[i]))
            heads, first, lengths, capacity, rows = heads[got], first[got], lengths[got], capacity[got], rows[got]
        else:
            reader.consume(count)
        pending = False
        if mrg and frames:
            longer = np.flatnonzero(lengths > capacity)
            if len(longer):  # from the first frame its chain does not hold: in order, the slow way
                p.rx_long, p.rx_short_run = True, 0  # (and the next batches the merging way)
                k = int(longer[0])
                for i in range(k, frames):
                    self._rx_set_aside(p, reader, batch, int(rows[i]), int(lengths[i]))
                heads, first, lengths, frames, pending = heads[:k], first[:k], lengths[:k], k, True
        if frames:
            reader.write_u16(first + np.uint64(NUM_BUFFERS_OFFSET), 1)
            if not self._guest_csum:
                reader.write_u8(first, 0)
            reader.complete(heads, lengths)
            p.stats.rx_frames += frames
            p.stats.rx_bytes += int(lengths.sum()) - NET_HDR_SIZE * frames
        if pending:
            delivered, done = self._rx_deliver_pending(p, queue)
            if not done:
                return frames + delivered, NO_BUFFERS
            frames += delivered
        if p.tap_gone or tap_empty or dropped < 0:
            p.rx_hint = max(RX_HINT_MIN, min(2 * frames, BATCH_RING_ENTRIES))
            return frames + max(dropped, 0), TAP_EMPTY
        p.rx_hint = min(2 * p.rx_hint, BATCH_RING_ENTRIES)
        return frames + dropped, MORE

    def _rx_merge_batch(self, p: _Pair, queue: Queue, limit: int) -> tuple[int, str]:
        """With MRG_RXBUF, while frames longer than a chain come (a TCP stream with GUEST_TSO: up
        to 64 KiB in 2-4 KiB buffers): every available chain is walked at once (BatchReader), and
        each frame is read straight into as many of them as the largest frame and one byte more
        need, one readv whose iovec runs from the next unused chain over the following ones (a
        frame that fills all of them may have been cut short: dropped); the frame uses the chains
        it filled (num_buffers of them), the next read starts after them.  The used elements are
        staged for every chain with all it holds before the reads, and the last chain of each
        frame gets its length as the frame is read; returns the same (frames, what next) as
        _rx_batch.

        Reads here go one system call each (a read's start depends on the last one's length),
        which a frame of tens of KiB well pays for; after RX_SHORT_RUN frames in a row that
        fitted one chain, _rx_batch takes over again.  Chains beyond the last frame stay in
        the ring; when those available cannot hold a largest frame, the driver is asked for a
        kick and nothing is read meanwhile, as in the one-chain path.  Every RX_PUBLISH_CHAINS
        chains filled, the frames read so far are handed over (used.idx, and the interrupt if the
        driver asked for one): it refills those while the rest are read."""
        reader, need = p.rx_reader, self._rx_need
        while True:
            seen = min(queue.available(), MAX_BATCH)  # (what peek walks: the driver may add more meanwhile)
            batch = reader.peek(seen, writable=True, min_first=NET_HDR_SIZE)
            if batch is None:
                p.rx_kicks_on = True
                if queue.enable_notification():
                    continue
                return 0, NO_BUFFERS
            count = len(batch)
            ends = np.cumsum(batch.lengths)  # the bytes chains[:i + 1] hold
            if count and ends[-1] > need:  # (room for a largest frame and a byte: below)
                break
            if count < seen or int(batch.counts.sum()) >= queue.size:
                # an unusual chain comes next, or all we see may be the whole table: the one-chain
                # path sees to it (it reads into what the driver can give, or says what is wrong)
                return 0, UNUSUAL
            p.rx_kicks_on = True  # (a kick when the driver adds to those: they stay in the ring)
            if not queue.enable_notification(seen):
                return 0, NO_BUFFERS
        if p.rx_kicks_on:
            queue.set_notification(False)
            p.rx_kicks_on = False

        # Every chain's buffers in a row: one iovec array (chain i's from row starts[i]).
        counts = batch.counts
        flat = p.rx_flat
        if np.count_nonzero(counts - 1):
            widest = int(counts.max())
            buffers = batch.iov[:, :widest][_BUFFER_INDEX[:widest] < counts[:, None]]
            flat[: len(buffers)] = buffers
            starts = (np.cumsum(counts) - counts).tolist() + [len(buffers)]
        else:  # (the usual: one buffer per chain)
            flat[:count] = batch.iov[:, 0]
            starts = None
        base, readv_at = p.rx_flat_address, p.batch_io.readv_at
        ends_l = ends.tolist()
        # Every chain's used element is written now, with all it holds (what it gets unless it is
        # the last of a frame: that one's length is written when its frame is read); they are
        # handed over as frames fill them.  (Slots past used.idx: the driver reads none of them.)
        used0 = queue.next_used
        reader.stage(batch.heads, batch.lengths)
        used_len, used_mask = reader.used_len_base, reader.used_mask
        first = batch.first.tolist()
        mem, guest_csum = self.mem.bytes_view, self._guest_csum
        window = need + 1  # (a read that fills its window may have been cut short)
        pos = published = frames = dropped = received = before = 0  # before: the bytes of the chains before pos
        state = MORE
        while frames + dropped < limit:
            end = bisect.bisect_left(ends_l, before + window, pos)  # the chain that completes the window
            if end == count:
                state = NO_BUFFERS  # (unless the driver added some meanwhile: below)
                break
            first_row, end_row = (pos, end + 1) if starts is None else (starts[pos], starts[end + 1])
            rows = end_row - first_row
            if rows < IOV_MAX:
                n = readv_at(base + _IOVEC_SIZE * first_row, rows)
                room = ends_l[end] - before - 1
            else:  # (tiny buffers: what one readv takes)
                n, room = self._rx_read_tiny(p, first_row)
            if n <= 0:
                err = -n
                if n == 0:  # end of file: a socket backend closed
                    self._mark_tap_gone(p)
                elif err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self._tap_error("%s: reading tap %s: %s", self.name, self.tap.name, os.strerror(err))
                state = TAP_EMPTY
                break
            if n > room or n < NET_HDR_SIZE:  # its chains stay for the next frame
                p.stats.rx_truncated += 1
                dropped += 1
                self._tap_error("%s: a frame from tap %s did not fit the %d bytes of a receive chain: dropped",
                                self.name, self.tap.name, room)
                continue
            last = bisect.bisect_left(ends_l, before + n, pos)  # the chain that holds its last byte
            _U32.pack_into(mem, used_len + 8 * ((used0 + last) & used_mask), before + n - (ends_l[last - 1] if last else 0))
            header = first[pos]
            _U16.pack_into(mem, header + NUM_BUFFERS_OFFSET, last - pos + 1)
            if not guest_csum:
                mem[header] = 0
            received += n - NET_HDR_SIZE
            frames += 1
            pos, before = last + 1, ends_l[last]
            if pos == count:
                state = NO_BUFFERS
                break
            if pos - published >= RX_PUBLISH_CHAINS:  # hand these over now: the driver refills meanwhile
                reader.consume(pos - published)
                reader.commit(pos - published)
                self.publish_and_notify(p.rx)  # (a driver that waits for an interrupt to look)
                published = pos
        if pos > published:
            reader.consume(pos - published)
            reader.commit(pos - published)
        if frames:
            p.stats.rx_frames += frames
            p.stats.rx_bytes += received
            if pos > frames:  # (a frame took more than one chain)
                p.rx_short_run = 0
            else:
                p.rx_short_run += frames
                p.rx_long = p.rx_short_run < RX_SHORT_RUN
        if p.tap_gone:
            state = TAP_EMPTY
        elif state == NO_BUFFERS:  # the chains left (count - pos) hold too little: any more?
            p.rx_kicks_on = True
            if queue.enable_notification(count - pos):
                state = MORE
        return frames + dropped, state

    def _rx_read_tiny(self, p: _Pair, first_row: int) -> tuple[int, int]:
        """A long-frame read over more buffers than one readv takes (tiny ones): into the first
        IOV_MAX - 1 from rx_flat row `first_row`, then the scratch byte (in the row after them
        for this read); (the result, the bytes those buffers hold)."""
        rows = IOV_MAX - 1
        room = int(p.rx_flat[first_row : first_row + rows, 1].sum())
        words, w = p.rx_flat_words, 2 * (first_row + rows)
        saved = words[w], words[w + 1]
        words[w], words[w + 1] = int(p.scratch_iov[0]), 1
        n = p.batch_io.readv_at(p.rx_flat_address + _IOVEC_SIZE * first_row, rows + 1)
        words[w], words[w + 1] = saved
        return n, room

    def _rx_set_aside(self, p: _Pair, reader: BatchReader, batch: Batch, row: int, length: int) -> None:
        """Frame `row` of an RX batch cannot be handed over yet (MRG_RXBUF: it, or one before it,
        is longer than its chain): the frame goes to the end of `rx_pending`, whole, and its chain
        is held with the others, for whichever frame comes first.  A frame longer than its chain
        has the rest in its spill row from the chain's capacity on: the chain's bytes go before it
        (a view of the row, not a copy: no batch reads into the spill while frames are pending)."""
        views = reader.views(batch, row)
        capacity = int(batch.lengths[row])
        if length > capacity:
            start = row * self._rx_need
            frame = memoryview(p.rx_spill)[start : start + length]
        else:
            frame = memoryview(bytearray(length))
        offset = 0
        for v in views:
            n = min(len(v), length - offset)
            frame[offset : offset + n] = v[:n]
            offset += n
        p.rx_pending.append(frame)
        self._hold_rx_chain(p, int(batch.heads[row]), views, capacity, int(batch.counts[row]))

    def _rx_deliver_pending(self, p: _Pair, queue: Queue) -> tuple[int, bool]:
        """Hand over the frames in `rx_pending` in order, each copied into the chains held and,
        when those hold too little, chains taken from the ring now; (frames handed over, whether
        all were).  When the ring runs dry the driver is asked for a kick and the rest wait;
        when what the device holds is the whole table and still too little, the frame is longer
        than the driver's ring can take: dropped, counted."""
        delivered = 0
        while p.rx_pending:
            frame = p.rx_pending[0]
            length = len(frame)
            if p.rx_capacity < length and not self._take_rx_buffers(p, queue, length):
                return delivered, False  # the driver's kick brings more
            p.rx_pending.popleft()
            if p.rx_capacity < length:
                p.stats.rx_truncated += 1
                self._tap_error("%s: a frame of %d bytes from tap %s is longer than the whole receive ring: dropped",
                                self.name, length, self.tap.name)
                continue
            offset = 0
            for v in p.rx_iov:
                n = min(len(v), length - offset)
                v[:n] = frame[offset : offset + n]
                offset += n
                if offset == length:
                    break
            self._rx_hand_over(p, queue, length)
            delivered += 1
        return delivered, True

    def _rx_batch_trouble(self, p: _Pair, results: np.ndarray, capacity: np.ndarray) -> int:
        """The reads of a batch that got neither a frame that fits nor EAGAIN: the frames
        dropped, or -1 if a read failed (the tap is not read further in this wake-up)."""
        if (results == 0).any():  # end of file: a socket backend closed (a tap frame has its header)
            self._mark_tap_gone(p)
        bad = (results > capacity) | ((results > 0) & (results < NET_HDR_SIZE))
        if bad.any():
            p.stats.rx_truncated += int(bad.sum())
            self._tap_error(
                "%s: a frame from tap %s did not fit the %d bytes of a receive chain: dropped",
                self.name, self.tap.name, int(capacity[np.flatnonzero(bad)[0]]),
            )
        errors = (results < 0) & (results != -errno.EAGAIN)
        if errors.any():
            err = -int(results[np.flatnonzero(errors)[0]])
            self._tap_error("%s: reading tap %s: %s", self.name, self.tap.name, os.strerror(err))
            return -1
        return -1 if p.tap_gone else int(bad.sum())
