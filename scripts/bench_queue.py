"""Micro-benchmark of the virtqueue hot path: chains per second, device side only.

The ring is filled once with blk-style 3-descriptor chains (16-byte header,
4 KiB data, 1-byte status: readable, writable, writable); each round the
"driver" just moves avail.idx on by a full ring, so only the device's work is
timed: pop (walk + validate), optionally building the memoryviews, add_used,
and one publish_used + needs_notification per ring-full.

    python scripts/bench_queue.py [--seconds 1.0] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.support.mockqueue import Buf, MockSplitQueue  # noqa: E402
from vmm.memory import GuestMemory, MiB  # noqa: E402


def setup(mem: GuestMemory, size: int, *, indirect: bool, event_idx: bool):
    mq = MockSplitQueue(mem, size, base=0x10000, data_base=1 * MiB)
    q = mq.create_queue(indirect=indirect, event_idx=event_idx)
    per_chain = 1 if indirect else 3
    for _ in range(size // per_chain):
        bufs = [Buf(mq.alloc(16), 16), Buf(mq.alloc(4096, 4096), 4096, write=True), Buf(mq.alloc(1), 1, write=True)]
        if indirect:
            mq.add_indirect_chain(bufs, publish=False)
        else:
            mq.add_chain(bufs, publish=False)
    mq.publish_avail()
    return mq, q, (mq.avail_idx - mq.start_idx) & 0xFFFF


def run(mem, size, seconds, *, indirect=False, event_idx=False, views=False, use_drain=False) -> float:
    mq, q, per_round = setup(mem, size, indirect=indirect, event_idx=event_idx)
    chains = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            if use_drain:
                for chain in q.drain():
                    if views:
                        chain.readable_views()
                        chain.writable_views()
                    q.add_used(chain.head, chain.writable_len)
            else:
                while (chain := q.pop()) is not None:
                    if views:
                        chain.readable_views()
                        chain.writable_views()
                    q.add_used(chain.head, chain.writable_len)
            q.publish_used()
            q.needs_notification()
            chains += per_round
            # The driver "re-adds" the same chains: the ring still holds them.
            mq.publish_avail(mq.avail_idx + per_round)
    return chains / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, queue size {args.size}, 3-descriptor blk-style chains")
    with GuestMemory(64 * MiB) as mem:
        for label, kw in [
            ("pop + add_used", {}),
            ("pop + views + add_used", {"views": True}),
            ("drain() + views + add_used", {"views": True, "use_drain": True}),
            ("pop + add_used, EVENT_IDX", {"event_idx": True}),
            ("pop + add_used, indirect", {"indirect": True}),
        ]:
            rate = run(mem, args.size, args.seconds, **kw)
            print(f"  {label:32s} {rate / 1e3:8.1f} k chains/s   {1e6 / rate:5.2f} us/chain")


if __name__ == "__main__":
    main()
