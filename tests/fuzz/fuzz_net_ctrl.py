"""Fuzz target: virtio-net's control queue (virtio/net.py: process_ctrl) on a started device.

    python -m tests.fuzz.fuzz_net_ctrl [libFuzzer flags] [tests/fuzz/corpus/fuzz_net_ctrl]

A VirtioNet of 1 or 3 queue pairs on a tap that moves nothing (tests/fuzz/netfakes.py), the
features the input picks of those offered (with CTRL_VQ), and a control ring from
tests/fuzz/rings.py whose buffers hold commands (MQ VQ_PAIRS_SET, RX, MAC TABLE_SET /
ADDR_SET, classes not supported, garbage).  Asserts:
  * process_ctrl raises nothing, and sets NEEDS_RESET exactly when the ring is broken;
  * the device writes only the ack byte, inside the device-writable buffers of well-formed
    chains, and the used ring; each used length is 0 or 1, within the chain's writable length,
    and the ack is VIRTIO_NET_OK or VIRTIO_NET_ERR;
  * the state stays what a driver may make it: 1 <= active pairs <= the pairs offered (1
    without MQ), a 6-byte unicast-or-not MAC, MAC tables of 6-byte entries.
"""

from __future__ import annotations

import struct

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.netfakes import NullTap
    from tests.fuzz.rings import decode_ring, memories, plant, reference_walk
    from tests.fuzz.virtio_setup import attach, broken, check_used, start
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET
    from virtio.net import FEATURE_REQUIREMENTS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VirtioNet

MEMORIES = memories()
PAIRS = (1, 3)
DEVICES = {(m, p): VirtioNet(MEMORIES[m], NullTap(p), mac=b"\x52\x54\x00\x12\x34\x56", queue_pairs=p,
                             queue_size=64, io_threads=False, batches=False)
           for m in range(len(MEMORIES)) for p in PAIRS}
COMMANDS = ((4, 0), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0), (5, 0))  # (class, command)


def _command(fdp: atheris.FuzzedDataProvider) -> bytes:
    cls, cmd = COMMANDS[fdp.ConsumeIntInRange(0, len(COMMANDS) - 1)]
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:  # MQ pairs
        data = struct.pack("<H", fdp.ConsumeIntInRange(0, 5))
    elif kind == 1:  # a MAC table: two counts and their entries, maybe cut or padded
        uni, multi = fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 3)
        data = struct.pack("<I", uni) + bytes(6 * uni) + struct.pack("<I", multi) + b"\x01" * 6 * multi
        data = data[: fdp.ConsumeIntInRange(0, len(data) + 2)] if fdp.ConsumeBool() else data
    else:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
    return bytes([cls, cmd]) + data


def _acceptable(features: int) -> int:
    """`features` less those whose requirements are missing (what a driver may accept)."""
    while True:
        drop = [bit for bit, needs in FEATURE_REQUIREMENTS
                if features >> bit & 1 and not any(features >> n & 1 for n in needs)]
        if not drop:
            return features
        for bit in drop:
            features &= ~(1 << bit)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which, pairs = fdp.ConsumeIntInRange(0, 1), PAIRS[fdp.ConsumeIntInRange(0, 1)]
    mem, dev = MEMORIES[which], DEVICES[(which, pairs)]
    features = _acceptable((fdp.ConsumeIntInRange(0, (1 << 32) - 1) & dev.device_features) | 1 << VIRTIO_NET_F_CTRL_VQ)
    ring = decode_ring(fdp, mem)
    plant(fdp, mem, ring, _command)
    refs = {head: reference_walk(mem, ring, head) for head in ring.heads}
    writable = [b for r in refs.values() if r is not None for b in r.writable]
    dev.reset()
    mq = bool(features >> VIRTIO_NET_F_MQ & 1)
    attach(dev.queues[2 * pairs if mq else 2], ring)
    start(dev, ring, features)
    before = mem.snapshot()
    dev.process_ctrl()
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    check(needs_reset == broken(ring), f"NEEDS_RESET is {needs_reset}, the ring is broken: {broken(ring)}")
    mem.check_writes(before, writable + [ring.used_area()], "the control queue")
    for head, length in check_used(mem, ring, refs):
        ref = refs[head]
        check(length in (0, 1), f"control command {head}: used length {length}")
        if length:
            check(mem.read(ref.writable[0][0], 1)[0] in (0, 1), f"control command {head}: ack is not OK/ERR")
    check(1 <= dev.active_pairs <= (pairs if mq else 1), f"active pairs {dev.active_pairs} of {pairs}")
    check(len(dev.mac) == 6 and all(len(m) == 6 for table in dev.mac_table for m in table), "a MAC is not 6 bytes")


if __name__ == "__main__":
    harness.main(one_input)
