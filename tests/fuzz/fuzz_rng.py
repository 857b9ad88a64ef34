"""Fuzz target: virtio-rng requests (virtio/rng.py: process_queue over a whole ring).

    python -m tests.fuzz.fuzz_rng [libFuzzer flags] [tests/fuzz/corpus/fuzz_rng]

The ring of tests/fuzz/rings.py; no limit, or a rate limit on a clock that does not move.  The
entropy source checks that every view it is handed lies inside a device-writable buffer of a
well-formed chain.  Asserts:
  * process_queue never raises; without a limit it sets NEEDS_RESET exactly when the ring is
    broken (with one, a chain held back may keep it from reaching a broken head: then only
    NEEDS_RESET implies broken);
  * the device writes guest memory only inside the device-writable buffers of well-formed chains
    and the used ring;
  * each used element is a head made available, no longer than its chain's writable length, 0
    for a chain with device-readable buffers; with a limit, no more bytes than the bucket held.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import decode_ring, memories, reference_walk
    from tests.fuzz.virtio_setup import attach, broken, check_used, start
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET
    from virtio.rng import VirtioRng


class CheckingEntropy:
    def __init__(self, mem):
        self.mem = mem
        self.allowed: list[tuple[int, int]] = []

    def fill(self, views):
        self.mem.check_views(views, self.allowed, "entropy buffer")
        for v in views:
            v[:] = b"\x42" * len(v)
        return sum(len(v) for v in views)


class _Rng(VirtioRng):
    """No I/O thread: the target calls process_queue itself."""

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass


MEMORIES = memories()
RATES = (None, 1, 100, 4096)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = MEMORIES[fdp.ConsumeIntInRange(0, 1)]
    rate = RATES[fdp.ConsumeIntInRange(0, len(RATES) - 1)]
    source = CheckingEntropy(mem)
    dev = _Rng(mem, source, rate=rate, clock=lambda: 0.0)
    ring = decode_ring(fdp, mem)
    refs = {head: reference_walk(mem, ring, head) for head in ring.heads}
    source.allowed = [b for r in refs.values() if r is not None for b in r.writable]
    attach(dev.queues[0], ring)
    start(dev, ring)
    before = mem.snapshot()
    dev.process_queue()
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    if rate is None:
        check(needs_reset == broken(ring), f"NEEDS_RESET is {needs_reset}, the ring is broken: {broken(ring)}")
    else:
        check(not needs_reset or broken(ring), "NEEDS_RESET on a ring that is not broken")
        check(dev.delivered <= dev.bucket.capacity, f"{dev.delivered} bytes through a bucket of {dev.bucket.capacity}")
    mem.check_writes(before, source.allowed + [ring.used_area()], "virtio-rng")
    for head, length in check_used(mem, ring, refs):
        ref = refs[head]
        check(not (ref and ref.readable and length), f"chain {head} has readable buffers and got {length} bytes")
    dev.close()


if __name__ == "__main__":
    harness.main(one_input)
