"""Fuzz target: virtio-balloon's queues (virtio/balloon.py, balloon_requests.py).

    python -m tests.fuzz.fuzz_balloon [libFuzzer flags] [tests/fuzz/corpus/fuzz_balloon]

Every feature negotiated (queues inflateq 0, deflateq 1, statsq 2, reporting_vq 3); the input
picks the queue, and the ring of tests/fuzz/rings.py gets pfn arrays (mostly pages of the 64 KiB
of RAM, some beyond it, some garbage) or statistics planted in its buffers.  The memory the device
frees is recorded, not punched.  Asserts:
  * process_queue never raises, and sets NEEDS_RESET exactly when the ring is broken;
  * the device writes nothing in guest memory but the used ring (a balloon never writes buffers);
  * every range it frees is whole 4 KiB pages of guest RAM: for inflateq, pages the chain's pfns
    name; for reporting_vq, inside a device-writable buffer of a well-formed chain; deflateq and
    statsq free nothing;
  * each used element is a head made available, of length 0.
"""

from __future__ import annotations

import struct

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import RAM_SIZE, decode_ring, memories, plant, reference_walk
    from tests.fuzz.virtio_setup import attach, broken, check_used, start
    from virtio.balloon import (VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_PAGE_REPORTING,
                                VIRTIO_BALLOON_F_STATS_VQ, VirtioBalloon)
    from virtio.balloon_requests import BALLOON_PAGE, STAT
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET

FEATURES = (1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
PAGES = RAM_SIZE // BALLOON_PAGE


class RecordingRam:
    def __init__(self):
        self.ranges: list[tuple[int, int]] = []

    def discard(self, ranges):
        ranges = list(ranges)
        self.ranges.extend(ranges)
        return sum(n for _, n in ranges)


class _Balloon(VirtioBalloon):
    """No I/O thread, no timer: the target calls process_queue itself."""

    def activate(self) -> None:
        self._roles = ["inflateq", "deflateq", "statsq", "reporting_vq"]

    def deactivate(self) -> None:
        pass


def _payload(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeBool():
        return b"".join(STAT.pack(fdp.ConsumeIntInRange(0, 20), fdp.ConsumeIntInRange(0, 1 << 40))
                        for _ in range(fdp.ConsumeIntInRange(0, 12)))
    pfns = [fdp.ConsumeIntInRange(0, PAGES + 2) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            for _ in range(fdp.ConsumeIntInRange(0, 24))]
    return struct.pack(f"<{len(pfns)}I", *pfns)


MEMORIES = memories()


def _inside(span: tuple[int, int], spans) -> bool:
    return any(a <= span[0] and span[0] + span[1] <= a + n for a, n in spans)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = MEMORIES[fdp.ConsumeIntInRange(0, 1)]
    index = fdp.ConsumeIntInRange(0, 3)
    ram = RecordingRam()
    dev = _Balloon(mem, ram, stats_interval=1, free_page_reporting=True, deflate_on_oom=True)
    ring = decode_ring(fdp, mem)
    plant(fdp, mem, ring, _payload)
    refs = {head: reference_walk(mem, ring, head) for head in ring.heads}
    attach(dev.queues[index], ring)
    start(dev, ring, FEATURES)
    before = mem.snapshot()
    dev.process_queue(index)
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    check(needs_reset == broken(ring), f"NEEDS_RESET is {needs_reset}, the ring is broken: {broken(ring)}")
    mem.check_writes(before, [ring.used_area()], "virtio-balloon")
    ram_spans = [(mem.skew, mem.ram_size)]  # memfd offsets of guest RAM
    good = [r for r in refs.values() if r is not None]
    for offset, length in ram.ranges:
        check(length > 0 and offset % BALLOON_PAGE == mem.skew % BALLOON_PAGE and length % BALLOON_PAGE == 0,
              f"freed {offset:#x}+{length:#x}: not whole pages")
        check(_inside((offset, length), ram_spans), f"freed {offset:#x}+{length:#x}: outside guest RAM")
        if index == 3:
            writable = [(gpa + mem.skew, n) for r in good for gpa, n in r.writable]
            check(_inside((offset, length), writable), f"freed {offset:#x}+{length:#x}: not a reported buffer")
    check(index in (0, 3) or not ram.ranges, f"queue {index} freed memory")
    for head, length in check_used(mem, ring, refs):
        check(length == 0, f"chain {head}: used length {length}, a balloon writes nothing")
    dev.close()


if __name__ == "__main__":
    harness.main(one_input)
