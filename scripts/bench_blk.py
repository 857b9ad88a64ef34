#!/usr/bin/env python3
"""Micro-benchmark: 4 KiB virtio-blk requests per second through the request path, without KVM.

A mock driver (tests/support/mockqueue.py) fills the queue with `--batch` chains
(header, one 4 KiB data buffer, status byte) at random 4 KiB-aligned sectors; the
device completes them against a raw image on /dev/shm (so the disk costs little
and the Python per-request work shows).  Chains are built as Linux builds them
with VIRTIO_F_INDIRECT_DESC: one descriptor pointing at a table of three
(--direct: three chained descriptors).  Two ways of driving the device:

  * inline: the benchmark calls device.process_queue(0) itself; the time counted
    is only that call (pop, parse, preadv/pwritev, status, used ring);
  * thread: the device's own I/O thread, woken through the queue's eventfd as
    KVM's ioeventfd would; the driver sleeps until the interrupt (EVENT_IDX:
    after the batch's last request), as a vCPU in KVM_RUN would; the time
    counted is from the kick to the interrupt (thread wake-ups and GIL
    hand-overs included).

Each way is measured twice: one chain at a time (VirtioBlk(batches=False), the path every
request took before the batch path) and through the batch path (virtio/blk_path.py).

    python3 scripts/bench_blk.py [--seconds 2] [--batch 32] [--cache writeback|none]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.mockqueue import Buf, MockSplitQueue  # noqa: E402
from virtio.backends.raw import RawImage  # noqa: E402
from virtio.blk import REQ_HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk  # noqa: E402
from virtio.device import (  # noqa: E402
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)
from virtio.queue import VIRTQ_DESC_F_INDIRECT  # noqa: E402
from vmm.memory import MiB, GuestMemory  # noqa: E402

IMAGE_SIZE = 256 * MiB
BLOCK = 4096
QUEUE_SIZE = 256


class Bench:
    def __init__(self, path: str, batch: int, cache: str, rtype: int, indirect: bool, batches: bool = True):
        self.mem = GuestMemory(64 * MiB)
        self.dev = VirtioBlk(self.mem, RawImage.open(path, cache=cache), queue_size=QUEUE_SIZE, batches=batches)
        self.mq = MockSplitQueue(self.mem, QUEUE_SIZE)
        q = self.dev.queues[0]
        q.size, q.desc_table, q.avail_ring, q.used_ring = QUEUE_SIZE, self.mq.desc_table, self.mq.avail_ring, self.mq.used_ring
        self.queue = q
        self.rng = random.Random(0)
        self.blocks = IMAGE_SIZE // BLOCK
        self.headers, self.heads = [], []
        for _ in range(batch):
            header = self.mq.alloc(16, 16)
            data = self.mq.alloc(BLOCK, BLOCK)
            status = self.mq.alloc(1)
            self.mem.write(header, REQ_HEADER.pack(rtype, 0, 0))
            reading = rtype == VIRTIO_BLK_T_IN
            if not reading:
                self.mem.write(data, os.urandom(BLOCK))
            bufs = [Buf(header, 16), Buf(data, BLOCK, write=reading), Buf(status, 1, write=True)]
            if indirect:  # as Linux does for any multi-buffer request when it has VIRTIO_F_INDIRECT_DESC
                table = self.mq.alloc(16 * len(bufs), 16)
                self.mq.write_chain(bufs, list(range(len(bufs))), table=table)
                (index,) = self.mq._take_descs(1)
                self.mq.write_desc(index, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            else:
                indices = self.mq._take_descs(len(bufs))
                self.mq.write_chain(bufs, indices)
                index = indices[0]
            self.headers.append(header)
            self.heads.append(index)
        self.rtype = rtype

    def post(self) -> None:
        """The driver's part: new sectors, make every chain available again."""
        pack, mem, rand = REQ_HEADER.pack, self.mem, self.rng.randrange
        for header, head in zip(self.headers, self.heads):
            mem.write(header, pack(self.rtype, 0, rand(self.blocks) * (BLOCK // 512)))
            self.mq.add_head(head, publish=False)
        self.mq.publish_avail()

    def reap(self) -> None:
        entries = self.mq.used_entries()
        assert len(entries) == len(self.heads), entries

    def run_inline(self, seconds: float) -> tuple[float, float]:
        """(requests per second of wall time, of this thread's CPU time: the second holds up better
        on a machine that others share)."""
        self.queue.indirect = True
        self.queue.ready = True
        done, busy, cpu = 0, 0.0, 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.post()
            t0, c0 = time.perf_counter(), time.thread_time()
            self.dev.process_queue(0)
            busy += time.perf_counter() - t0
            cpu += time.thread_time() - c0
            self.reap()
            done += len(self.heads)
        return done / busy, done / cpu

    def run_thread(self, seconds: float) -> float:
        dev = self.dev
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        dev.driver_features = dev.device_features
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
        self.queue.ready = True
        dev.set_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
        )
        # The driver sleeps until the interrupt, as a vCPU in KVM_RUN would (not holding the GIL).
        interrupt = threading.Event()
        dev.set_interrupt(lambda kind: interrupt.set())
        done, busy = 0, 0.0
        end = time.perf_counter() + seconds
        try:
            while time.perf_counter() < end:
                self.post()
                target = self.mq.avail_idx
                self.mq.set_used_event(target - 1)  # EVENT_IDX: interrupt me after the last one
                interrupt.clear()
                t0 = time.perf_counter()
                os.eventfd_write(dev.queue_events[0], 1)
                if not interrupt.wait(5):
                    raise RuntimeError("no interrupt")
                busy += time.perf_counter() - t0
                assert self.mq.used_idx == target
                self.reap()
                done += len(self.heads)
        finally:
            dev.set_status(0)
        return done / busy

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


def baseline(path: str, seconds: float) -> float:
    """Plain os.preadv of 4 KiB at random offsets, for scale."""
    fd = os.open(path, os.O_RDONLY)
    buf = [memoryview(bytearray(BLOCK))]
    rng = random.Random(0)
    blocks = IMAGE_SIZE // BLOCK
    n = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(256):
            os.preadv(fd, buf, rng.randrange(blocks) * BLOCK)
        n += 256
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=32, help="requests per kick (queue depth)")
    ap.add_argument("--cache", default="writeback", choices=["writeback", "none"])
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--direct", action="store_true", help="direct chains of 3 descriptors, not indirect tables")
    args = ap.parse_args()
    limit = QUEUE_SIZE // 3 if args.direct else QUEUE_SIZE
    if not 1 <= args.batch <= limit:
        ap.error(f"--batch must be from 1 to {limit}")

    path = os.path.join(args.dir, f"pyvmm-bench-{os.getpid()}.img")
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for off in range(0, IMAGE_SIZE, 16 * MiB):  # allocate it, so reads are not of holes
            f.write(b"\xa5" * 16 * MiB)
    try:
        print(f"image {path} ({IMAGE_SIZE // MiB} MiB), cache={args.cache}, batch={args.batch}")
        print(f"  os.preadv alone:          {baseline(path, args.seconds):>10,.0f} /s")
        for mode in ("inline", "thread"):
            for name, rtype in (("read", VIRTIO_BLK_T_IN), ("write", VIRTIO_BLK_T_OUT)):
                for way, batches in (("one chain", False), ("batches", True)):
                    bench = Bench(path, args.batch, args.cache, rtype, not args.direct, batches)
                    try:
                        if mode == "inline":
                            rate, cpu_rate = bench.run_inline(args.seconds)
                            cpu = f", {1e6 / cpu_rate:.1f} us of CPU"
                        else:
                            rate, cpu = bench.run_thread(args.seconds), ""
                    finally:
                        bench.close()
                    print(f"  4 KiB {name:5} ({mode:6}, {way:9}): {rate:>10,.0f} requests/s  ({1e6 / rate:.1f} us each{cpu})")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
