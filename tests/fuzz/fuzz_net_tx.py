"""Fuzz target: virtio-net's transmit path (virtio/net_tx.py: TxPath.drain), one chain at a
time and in batches (BatchReader over IovecLoop), with a backend that accepts, refuses
(EINVAL) or is full (EAGAIN) as the input says.

    python -m tests.fuzz.fuzz_net_tx [libFuzzer flags] [tests/fuzz/corpus/fuzz_net_tx]

Asserts:
  * drain raises nothing but QueueError, and that exactly when the ring is broken;
  * every frame handed to the backend lies inside the device-readable buffers of well-formed
    chains (TX never reads a writable buffer), and nothing in guest memory changes but the
    used ring;
  * every used length is 0, each head is completed at most as often as it was made available,
    and once the ring is empty, every chain is completed;
  * drain stops within its budget; once the backend has room for good (after 64 rounds as
    the input says), the ring empties within 4 rounds per entry.
"""

from __future__ import annotations

from collections import Counter

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.netfakes import ScriptedIo, context
    from tests.fuzz.rings import fuzzed_ring, memories
    from tests.fuzz.virtio_setup import broken, check_used
    from virtio.backends.tap_batch import IovecLoop
    from virtio.net_common import NetStats
    from virtio.net_tx import TxOutcome, TxPath
    from virtio.queue import QueueError

MEMORIES = memories()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem, ring, refs = fuzzed_ring(fdp, MEMORIES)
    q = ring.queue(mem)
    io = ScriptedIo(mem, fdp, [b for r in refs.values() if r is not None for b in r.readable])
    batch_io = IovecLoop(io.readv, io.writev) if fdp.ConsumeBool() else None
    path = TxPath(q, io.writev, batch_io, NetStats(), context())
    budget = fdp.ConsumeIntInRange(1, 64)
    before = mem.snapshot()
    outcome = None
    try:
        for rounds in range(64 + 4 * ring.size + 8):
            if rounds == 64:
                io.scripted = False  # the backend has room from now on: the ring must empty
            done, unsent = q.next_used, path.unsent
            outcome = path.drain(budget)  # (the chains a full backend sent back go first, besides the budget)
            check((q.next_used - done) & 0xFFFF <= budget + unsent, "drain went past its budget")
            if outcome is TxOutcome.BLOCKED:
                path.unblock()
            elif outcome is TxOutcome.EMPTY and not path.unsent:
                break
        check(outcome is TxOutcome.EMPTY and not path.unsent, f"chains left after every round: {outcome}")
        check(not broken(ring), "a broken ring and no QueueError")
    except QueueError:
        check(broken(ring), "QueueError on a good ring")
    path.close()
    mem.check_writes(before, [ring.used_area()], "virtio-net TX")
    used = check_used(mem, ring, refs, once=True)
    check(all(length == 0 for _, length in used), "a TX chain completed with a non-zero length")
    if not broken(ring):
        check(Counter(h for h, _ in used) == Counter(ring.heads), "not every TX chain was completed")


if __name__ == "__main__":
    harness.main(one_input)
