"""Fuzz target: virtio-net's receive path (virtio/net_rx.py: RxPath.fill), with and without
mergeable buffers, guest checksums, batches (BatchReader over IovecLoop) or one chain at a
time, and frames of any length (cut, empty, longer than the buffers) from the backend.

    python -m tests.fuzz.fuzz_net_rx [libFuzzer flags] [tests/fuzz/corpus/fuzz_net_rx]

Asserts:
  * fill raises nothing but QueueError, and that only when the ring is broken (it may stop
    before it reaches a broken head: no frame, no buffers wanted);
  * every buffer handed to the backend that is guest memory lies inside the device-writable
    buffers of well-formed chains; nothing in guest memory changes outside those and the
    used ring;
  * each used element is for a head made available, at most as often, its length within the
    chain's writable length; with MRG_RXBUF (and buffers that do not overlap) a frame's first
    header says how many buffers it took;
  * fill stops within its budget and the backend is called a bounded number of times.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.netfakes import ScriptedIo, context
    from tests.fuzz.rings import fuzzed_ring, memories
    from tests.fuzz.virtio_setup import aliased, broken, check_used
    from virtio.backends.tap_batch import IovecLoop
    from virtio.net_common import MAX_BUFFER, NetStats
    from virtio.net_hdr import NET_HDR_SIZE
    from virtio.net_rx import RxOutcome, RxPath
    from virtio.queue import QueueError

MEMORIES = memories()
NEEDS = (NET_HDR_SIZE + 14 + 4 + 1500, NET_HDR_SIZE + 14 + 4 + 68, MAX_BUFFER)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem, ring, refs = fuzzed_ring(fdp, MEMORIES)
    q = ring.queue(mem)
    writable = [b for r in refs.values() if r is not None for b in r.writable]
    io = ScriptedIo(mem, fdp, writable)
    batch_io = IovecLoop(io.readv, io.writev) if fdp.ConsumeBool() else None
    mrg = fdp.ConsumeBool()
    path = RxPath(q, io.readv, batch_io, NetStats(), context(), mem=mem, mrg=mrg, guest_csum=fdp.ConsumeBool(),
                  need=NEEDS[fdp.ConsumeIntInRange(0, len(NEEDS) - 1)], notify=q.publish_used)
    budget = fdp.ConsumeIntInRange(1, 64)
    before = mem.snapshot()
    try:
        for _ in range(8):
            done = q.next_used
            outcome = path.fill(budget)
            check((q.next_used - done) & 0xFFFF <= ring.size, "one fill completed more chains than the ring has")
            if outcome is not RxOutcome.BUDGET_SPENT and not fdp.remaining_bytes():
                break
    except QueueError:
        check(broken(ring), "QueueError on a good ring")
    path.close()
    mem.check_writes(before, writable + [ring.used_area()], "virtio-net RX")
    used = check_used(mem, ring, refs, once=True)
    if mrg and not aliased(ring.heads, writable):
        _check_num_buffers(mem, refs, used)



def _check_num_buffers(mem, refs, used) -> None:
    """Frames in the used ring, in order: a first element's header says how many elements the
    frame takes (num_buffers), and the ones it covers follow it."""
    k = 0
    while k < len(used):
        head, length = used[k]
        ref = refs[head]
        if ref is None or length < NET_HDR_SIZE:
            k += 1  # a chain returned empty
            continue
        first, _ = ref.writable[0]
        header = b"".join(mem.read(a, n) for a, n in ref.writable)[:NET_HDR_SIZE]
        num_buffers = int.from_bytes(header[10:12], "little")
        check(1 <= num_buffers <= len(used) - k, f"num_buffers {num_buffers} at used element {k} of {len(used)}")
        k += num_buffers


if __name__ == "__main__":
    harness.main(one_input)
