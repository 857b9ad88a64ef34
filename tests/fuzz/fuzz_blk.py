"""Fuzz target: virtio-blk requests (virtio/blk.py: process_queue over a whole ring).

    python -m tests.fuzz.fuzz_blk [libFuzzer flags] [tests/fuzz/corpus/fuzz_blk]

The ring of tests/fuzz/rings.py with request headers (any type, sectors near the end of a
64 KiB disk) and DISCARD / WRITE_ZEROES segments planted in its buffers; the disk is a
MemDisk (tests/fuzz/fakes.py) that fails with EIO / ENOSPC when the input says; read-only or
not, with or without EVENT_IDX / indirect.  Asserts:
  * process_queue never raises, and sets NEEDS_RESET exactly when the ring is broken (avail.idx
    too far ahead, or a head the used ring cannot name);
  * the device writes guest memory only inside the device-writable buffers of well-formed
    chains and the used ring; the disk's buffers lie inside the chain's buffers of the right
    direction (reads into writable ones, writes from readable ones), within the disk;
  * each used element is a head made available, with a length no more than its chain's
    writable length (0 for a malformed chain), and (buffers not shared) a status byte of OK,
    IOERR or UNSUPP.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.fakes import INJECTED_ERRORS, MemDisk
    from tests.fuzz.rings import decode_ring, memories, plant, reference_walk
    from tests.fuzz.virtio_setup import aliased, attach, broken, check_used, start
    from virtio.blk import DISCARD_SEGMENT, REQ_HEADER, VirtioBlk
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET

DISK_SIZE = 0x10000
REQUEST_TYPES = (0, 1, 4, 8, 10, 11, 13)  # IN, OUT, FLUSH, GET_ID, GET_LIFETIME, DISCARD, WRITE_ZEROES


class _Blk(VirtioBlk):
    """No I/O threads: the target calls process_queue itself."""

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass


def _device(mem, read_only: bool) -> _Blk:
    return _Blk(mem, MemDisk(mem, DISK_SIZE), queue_size=64, serial="fuzz", read_only=read_only)


MEMORIES = memories()
DEVICES = {(m, ro): _device(MEMORIES[m], ro) for m in range(2) for ro in (False, True)}


def _request(fdp: atheris.FuzzedDataProvider) -> bytes:
    rtype = REQUEST_TYPES[fdp.ConsumeIntInRange(0, len(REQUEST_TYPES) - 1)] if fdp.ConsumeIntInRange(0, 7) \
        else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    sector = fdp.ConsumeIntInRange(0, DISK_SIZE // 512 + 2) if fdp.ConsumeIntInRange(0, 7) \
        else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
    out = REQ_HEADER.pack(rtype, 0, sector)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        out += DISCARD_SEGMENT.pack(fdp.ConsumeIntInRange(0, DISK_SIZE // 512 + 2), fdp.ConsumeIntInRange(0, 300),
                                    fdp.ConsumeIntInRange(0, 3))
    return out


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which, read_only = fdp.ConsumeIntInRange(0, 1), fdp.ConsumeBool()
    mem, dev = MEMORIES[which], DEVICES[(which, read_only)]
    ring = decode_ring(fdp, mem)
    plant(fdp, mem, ring, _request)
    disk = dev.backend
    disk.fail = INJECTED_ERRORS[fdp.ConsumeIntInRange(0, len(INJECTED_ERRORS) - 1)] if fdp.ConsumeIntInRange(0, 3) == 0 else 0
    refs = {head: reference_walk(mem, ring, head) for head in ring.heads}
    good = [r for r in refs.values() if r is not None]
    disk.readable = [b for r in good for b in r.readable]
    disk.writable = [b for r in good for b in r.writable]
    dev.reset()
    attach(dev.queues[0], ring)
    start(dev, ring)
    before = mem.snapshot()
    dev.process_queue(0)
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    check(needs_reset == broken(ring), f"NEEDS_RESET is {needs_reset}, the ring is broken: {broken(ring)}")
    mem.check_writes(before, disk.writable + [ring.used_area()], "virtio-blk")
    statuses = not aliased(ring.heads, disk.writable)
    for head, _ in check_used(mem, ring, refs):
        ref = refs[head]
        if statuses and ref is not None and ref.writable:
            gpa, n = ref.writable[-1]
            check(mem.read(gpa + n - 1, 1)[0] in (0, 1, 2), f"chain {head}: status byte is not OK/IOERR/UNSUPP")


if __name__ == "__main__":
    harness.main(one_input)
