"""virtio/blk_path.py: the batch path against the one-chain path, request by request.

Two devices over two copies of one guest memory and one image: one takes batches, the other
(VirtioBlk(batches=False)) completes every request one chain at a time, the path the batch
path must agree with.  The same driver requests - reads and writes in every layout, the other
request types, requests the device must refuse, and rings with one field made hostile - are
made available to both; after process_queue every byte of guest memory (data, status bytes,
the used ring), every byte of the images and the device status must be the same.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.queue import ChainError
from virtio.backends.raw import RawImage
from virtio.blk import (
    REQ_HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from virtio import blk_path
from virtio.blk_path import ALONE_AFTER_UNUSUAL
from vmm.memory import MiB, GuestMemory

SECTORS = 2048  # a 1 MiB image
QUEUE_SIZE = 64
DATA_BASE = 0x10000
IMAGE = random.Random(7).randbytes(SECTORS * 512)


class Pair:
    """The two devices, their memories and images (made once; reset per example)."""

    def __init__(self, tmp):
        self.paths = [os.path.join(tmp, f"disk{i}.img") for i in range(2)]
        self.mems = [GuestMemory(2 * MiB) for _ in range(2)]
        self.devs = []

    def start(self, read_only=False):
        for path in self.paths:
            with open(path, "wb") as f:
                f.write(IMAGE)
        for mem in self.mems:
            mem.buffer[:] = bytes(len(mem.buffer))
        self.devs = [VirtioBlk(mem, RawImage.open(path), batches=batches, read_only=read_only, serial="pair")
                     for mem, path, batches in zip(self.mems, self.paths, (True, False))]
        return self

    def stop(self):
        for dev in self.devs:
            dev.close()
        self.devs = []

    def close(self):
        self.stop()
        for mem in self.mems:
            mem.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(str(tmp_path_factory.mktemp("pair")))
    yield p
    p.close()


def lay_out(mem, requests):
    """The driver's side: each request as a chain.  Returns the MockSplitQueue and the ranges
    (gpa, length) the device reads to know the requests: the headers and indirect tables."""
    mq = MockSplitQueue(mem, QUEUE_SIZE, base=0, data_base=DATA_BASE)
    meta = []
    for r in requests:
        bufs = []
        header = REQ_HEADER.pack(r["type"], 0, r["sector"])
        for piece in r["header_split"]:
            gpa = mq.alloc(piece)
            mem.write(gpa, header[:piece])
            meta.append((gpa, piece))
            header = header[piece:]
            bufs.append(Buf(gpa, piece))
        pos = 0
        data = random.Random(r["sector"]).randbytes(r["length"])
        readable = (r["type"] == VIRTIO_BLK_T_OUT) != r["flip"]
        for piece in r["split"]:
            gpa = mq.alloc(piece, 512 if r["aligned"] else 8)
            if readable:
                mem.write(gpa, data[pos : pos + piece])
            else:
                mem.fill(gpa, piece, 0xEE)
            bufs.append(Buf(gpa, piece, write=not readable))
            pos += piece
        if r["status"]:
            gpa = mq.alloc(r["status"])
            mem.fill(gpa, r["status"], 0xEE)
            bufs.append(Buf(gpa, r["status"], write=True))
        if r["style"] == "direct":
            mq.add_chain(bufs)
        else:
            table = mq.alloc(16 * len(bufs), 16)
            meta.append((table, 16 * len(bufs)))
            mq.add_indirect_chain(bufs, table, in_order=r["style"] == "in-order")
    return mq, meta


def self_modifying(mq, meta) -> bool:
    """Does a request write where the device reads the ring, a header, a table, or where another
    request reads or writes?  (Only a hostile field gets a driver there.)  Then the two paths may
    both be right and still differ: the batch path reads the chains of a batch before it moves
    their data, the one-chain path each chain after the data of the one before."""
    q = mq.create_queue(QUEUE_SIZE, event_idx=True, indirect=True)
    chains = []
    while True:
        try:
            chain = q.pop()
        except ChainError:
            continue
        if chain is None:
            break
        chains.append(chain)
    written = [r for c in chains for r in c.writable]
    read = [(0, DATA_BASE)] + meta + [r for c in chains for r in c.readable]
    overlap = lambda a, b: a[0] < b[0] + b[1] and b[0] < a[0] + a[1]  # noqa: E731
    return any(overlap(w, r) for w in written for r in read) or any(
        overlap(a, b) for i, a in enumerate(written) for b in written[i + 1 :])


def pieces(total):
    """`total` bytes in 1 to 3 buffers."""
    return st.lists(st.integers(1, 4096), max_size=2).map(
        lambda cuts: [n for n in _cut(total, cuts) if n] if total else [])


def _cut(total, cuts):
    out = []
    for c in cuts:
        c = min(c, total - sum(out))
        out.append(c)
    out.append(total - sum(out))
    return out


@st.composite
def request(draw):
    rtype = draw(st.sampled_from([VIRTIO_BLK_T_IN] * 8 + [VIRTIO_BLK_T_OUT] * 8 + [
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, 99]))
    usual = st.sampled_from([512, 4096, 4096, 4096, 8192, 65536, 65536 + 512])
    length = draw(st.one_of(usual, usual, usual, st.integers(0, 9000)))
    return {
        "type": rtype,
        "sector": draw(st.one_of(*[st.integers(0, SECTORS - 9)] * 4,
                                 st.sampled_from([SECTORS - 8, SECTORS - 1, SECTORS, 2**63, 2**64 - 1]))),
        "length": length,
        "split": draw(pieces(length)),
        "header_split": draw(st.sampled_from([[16]] * 14 + [[8, 8], [4, 12]])),
        "status": draw(st.sampled_from([1] * 14 + [0, 2])),
        "flip": draw(st.sampled_from([False] * 9 + [True])),  # data going the other way
        "aligned": draw(st.booleans()),
        "style": draw(st.sampled_from(["direct", "indirect", "in-order", "in-order"])),
    }


def corrupt(mq, target, field, value):
    """One descriptor field (in the queue's table, or in the indirect table it points at) or
    one available-ring entry overwritten, as a hostile driver may."""
    if field == "head":
        mq.set_avail_entry(target % 8, value & 0xFFFF)
        return
    a, n, f, nx = mq.read_desc(target % QUEUE_SIZE)
    table, index = None, target % QUEUE_SIZE
    if f & 4 and target % 2:
        table, index = a, target % max(1, n // 16)
        a, n, f, nx = mq.read_desc(index, table=table)
    new = {"addr": (value, n, f, nx), "len": (a, value, f, nx), "flags": (a, n, value & 0xFFFF, nx),
           "next": (a, n, f, value & 0xFFFF)}[field]
    mq.write_desc(index, *new, table=table)


def same_outcome(pair):
    a, b = pair.mems
    assert a.buffer[:] == b.buffer[:], "guest memory differs"
    images = [open(path, "rb").read() for path in pair.paths]
    assert images[0] == images[1], "the images differ"
    assert pair.devs[0].status == pair.devs[1].status
    counted = [[(c.requests, c.bytes, c.errors) for c in dev.counters] for dev in pair.devs]
    assert counted[0] == counted[1], "the counters differ"  # (the management API's, virtio/counters.py)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests=st.lists(request(), min_size=1, max_size=8), read_only=st.sampled_from([False] * 5 + [True]),
       hostile=st.one_of(st.none(), st.tuples(
           st.integers(0, 63), st.sampled_from(["addr", "len", "flags", "next", "head"]),
           st.one_of(st.integers(0, 40), st.sampled_from([16, 4096, 2 * MiB - 1, 2 * MiB, 2**32 - 1, 2**64 - 1]),
                     st.integers(0, 2**64 - 1)))),
       alone=st.sampled_from([-1, -1, 1, ALONE_AFTER_UNUSUAL]))
def test_the_batch_path_does_what_the_one_chain_path_does(pair, requests, read_only, hostile, alone):
    """(`alone`: the chains after an unusual one that go one at a time; -1: none, so batches are
    tried after every unusual chain.)"""
    pair.start(read_only)
    try:
        blk_path.ALONE_AFTER_UNUSUAL = alone
        for mem in pair.mems:
            mq, meta = lay_out(mem, requests)
            if hostile is not None:
                corrupt(mq, *hostile)
        if hostile is not None and self_modifying(mq, meta):
            event("a request writes where the device reads: not compared")
            return
        for dev in pair.devs:
            dev.queues[0].size = QUEUE_SIZE
            dev.queues[0].desc_table, dev.queues[0].avail_ring, dev.queues[0].used_ring = (
                mq.desc_table, mq.avail_ring, mq.used_ring)
            dev.queues[0].indirect = True
            dev.queues[0].event_idx = True
            dev.queues[0].ready = True
            dev.process_queue(0)
        path = pair.devs[0]._paths[0]
        event(f"requests taken by batches: {min(path.batched, 3) if path is not None else 'no path'}")
        same_outcome(pair)
    finally:
        blk_path.ALONE_AFTER_UNUSUAL = ALONE_AFTER_UNUSUAL
        pair.stop()


# -- examples -----------------------------------------------------------------------------


class Driver:
    """One device's queue, driven by hand (for the examples)."""

    def __init__(self, mem, dev):
        self.mem, self.dev = mem, dev
        self.mq = MockSplitQueue(mem, QUEUE_SIZE, base=0, data_base=DATA_BASE)
        q = dev.queues[0]
        q.size, q.desc_table, q.avail_ring, q.used_ring = QUEUE_SIZE, self.mq.desc_table, self.mq.avail_ring, self.mq.used_ring
        q.indirect = q.event_idx = True
        q.ready = True

    def request(self, rtype, sector, length, *, write_data=b""):
        hdr = self.mq.alloc(16)
        self.mem.write(hdr, REQ_HEADER.pack(rtype, 0, sector))
        data = self.mq.alloc(length, 512)
        if write_data:
            self.mem.write(data, write_data)
        status = self.mq.alloc(1)
        self.mem.fill(status, 1, 0xEE)
        head = self.mq.add_indirect_chain([Buf(hdr, 16), Buf(data, length, rtype == VIRTIO_BLK_T_IN), Buf(status, 1, True)],
                                          in_order=True)
        return head, data, status


@contextmanager
def one_device(tmp_path):
    """(memory, device, Driver, the queue's batch I/O) over a copy of IMAGE."""
    path = tmp_path / "d.img"
    path.write_bytes(IMAGE)
    with GuestMemory(2 * MiB) as mem:
        dev = VirtioBlk(mem, RawImage.open(path))
        try:
            drv = Driver(mem, dev)
            dev.process_queue(0)  # nothing there yet: opens the path
            yield mem, dev, drv, dev._paths[0]._io
        finally:
            dev.close()


def counted(dev, io):
    """Record each batch call (write?, requests) and each flush (the batch calls before it)."""
    calls, flushed = [], []
    real, real_flush = io.transfer, dev.backend.flush
    io.transfer = lambda write, *args: (calls.append((write, len(args[0]))), real(write, *args))[1]
    dev.backend.flush = lambda: (flushed.append(len(calls)), real_flush())
    return calls, flushed


def flush(drv):
    hdr, status = drv.mq.alloc(16), drv.mq.alloc(1)
    drv.mem.write(hdr, REQ_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    return drv.mq.add_chain([Buf(hdr, 16), Buf(status, 1, True)])


def test_batch_calls_are_one_kind_and_in_ring_order(tmp_path):
    with one_device(tmp_path) as (mem, dev, drv, io):
        calls, _ = counted(dev, io)
        for i in range(3):
            drv.request(VIRTIO_BLK_T_OUT, 8 * i, 4096, write_data=bytes([i + 1]) * 4096)
        reads = [drv.request(VIRTIO_BLK_T_IN, 8 * i, 4096) for i in range(3)]
        writes_after = [drv.request(VIRTIO_BLK_T_OUT, 8 * i, 4096, write_data=b"\x77" * 4096) for i in range(2)]
        dev.process_queue(0)
        assert calls == [(True, 3), (False, 3), (True, 2)]
        for i, (head, data, _) in enumerate(reads):  # each read saw the write before it
            assert mem.read(data, 4096) == bytes([i + 1]) * 4096
        used = dict(drv.mq.used_entries())
        assert all(used[h] == 1 for h, _, _ in writes_after)


def test_a_flush_waits_for_the_writes_before_it_and_the_next_chains_go_alone(tmp_path):
    """FLUSH goes one chain at a time, after the batch of writes before it; the
    ALONE_AFTER_UNUSUAL chains after it too, without a walk; then batches again."""
    with one_device(tmp_path) as (mem, dev, drv, io):
        calls, flushed = counted(dev, io)
        for i in range(3):
            drv.request(VIRTIO_BLK_T_OUT, 8 * i, 4096, write_data=bytes([i + 1]) * 4096)
        head = flush(drv)
        after = [drv.request(VIRTIO_BLK_T_IN, 8 * (i % 3), 4096) for i in range(ALONE_AFTER_UNUSUAL + 3)]
        dev.process_queue(0)
        assert flushed == [1]
        assert calls == [(True, 3), (False, 3)]
        path = dev._paths[0]
        assert (path.batched, path.single) == (6, 1 + ALONE_AFTER_UNUSUAL)
        used = dict(drv.mq.used_entries())
        assert used[head] == 1
        for i, (head, data, status) in enumerate(after):
            assert used[head] == 4097 and mem.read(status, 1)[0] == VIRTIO_BLK_S_OK
            assert mem.read(data, 4096) == bytes([i % 3 + 1]) * 4096


def test_a_failed_batch_request_is_ioerr_and_the_others_go_through(tmp_path):
    with one_device(tmp_path) as (mem, dev, drv, io):
        real = io.transfer

        def second_fails(write, addrs, counts, offsets, lengths):
            errors = real(write, addrs, counts, offsets, lengths)
            errors[1] = -5  # EIO
            return errors

        io.transfer = second_fails
        reqs = [drv.request(VIRTIO_BLK_T_IN, 8 * i, 4096) for i in range(3)]
        dev.process_queue(0)
        used = dict(drv.mq.used_entries())
        statuses = [mem.read(s, 1)[0] for _, _, s in reqs]
        assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
        assert [used[h] for h, _, _ in reqs] == [4097, 1, 4097]
        assert mem.read(reqs[2][1], 4096) == IMAGE[8 * 2 * 512 : 8 * 2 * 512 + 4096]
        c = dev.counters[0]
        assert (c.requests, c.bytes, c.errors) == (3, 2 * 4096, 1)


def test_reset_closes_the_path_and_the_image_lock_goes_with_the_device(tmp_path):
    """The batch I/O holds the image's file (an io_uring's registered file): closing the device
    must give it back, or the image would stay locked."""
    path = tmp_path / "d.img"
    path.write_bytes(IMAGE)
    with GuestMemory(2 * MiB) as mem:
        dev = VirtioBlk(mem, RawImage.open(path))
        drv = Driver(mem, dev)
        drv.request(VIRTIO_BLK_T_IN, 0, 4096)
        dev.process_queue(0)
        assert dev._paths[0] is not None
        dev.reset()
        assert dev._paths == [None]
        dev.close()
    RawImage.open(path).close()  # not locked any more


def test_after_a_busy_drain_the_ring_is_watched_before_asking_for_a_kick(tmp_path):
    """_poll: chains already there are taken at once; an empty ring is given up after the window
    (then notifications go back on: avail_event is where the next kick must come from)."""
    with one_device(tmp_path) as (mem, dev, drv, io):
        path = dev._paths[0]
        assert not path._poll()
        drv.request(VIRTIO_BLK_T_IN, 0, 4096)
        assert path._poll()
        reqs = [drv.request(VIRTIO_BLK_T_IN, 8 * i, 4096) for i in range(blk_path.POLL_AFTER)]
        dev.process_queue(0)  # a busy drain: it watches the ring, then asks for a kick
        used = dict(drv.mq.used_entries())
        assert all(used[h] == 4097 for h, _, _ in reqs)
        assert drv.mq.avail_event == dev.queues[0].next_avail
