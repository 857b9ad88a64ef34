"""Fuzz target: virtio-console's control transmitq (the driver's control messages, parsed by
virtio/console_control.py and acted on by virtio/console.py) and a named port's receiveq and
transmitq, on a started multiport device.

    python -m tests.fuzz.fuzz_console [libFuzzer flags] [tests/fuzz/corpus/fuzz_console]

A VirtioConsole with a console and two named ports, on backends that take all output and give
input the input chose; a ring from tests/fuzz/rings.py as the queue the input picks, its buffers
holding control messages (any port id, event and value, cut or padded) or port data.  Before
the ring, the input may have the driver say DEVICE_READY and PORT_READY through the device's
own handlers.  Asserts:
  * nothing raises, and NEEDS_RESET is set exactly when the ring is broken (and the device
    looked at it: a receiveq is not, while the guest has not opened the port);
  * the device writes only inside the device-writable buffers of well-formed chains (a
    receiveq's) and the used ring; each used length is within the chain's writable length,
    0 on the transmitqs;
  * the ports' state stays what a driver may make it: only added ports ready or open, and
    the device's control messages waiting for buffers never more than the bound.
"""

from __future__ import annotations

import struct

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import decode_ring, memories, plant, reference_walk
    from tests.fuzz.virtio_setup import attach, broken, check_used, start
    from virtio.backends.port import PortBackend
    from virtio.console import CONTROL_TRANSMITQ, VIRTIO_CONSOLE_F_MULTIPORT, VirtioConsole, receiveq
    from virtio.console_control import VIRTIO_CONSOLE_CONTROL, VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_READY
    from virtio.console_paths import MAX_PENDING_CONTROL
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET


class FuzzPort(PortBackend):
    """Takes all output; gives `input` (what the fuzzer chose) in pieces of `piece` bytes."""

    def __init__(self):
        super().__init__()
        self.input, self.piece = b"", 1

    def read_into(self, views):
        total = 0
        for view in views:
            n = min(len(view), self.piece, len(self.input) - total)
            if n <= 0:
                break
            view[:n] = self.input[total:total + n]
            total += n
        self.input = self.input[total:]
        return total


MEMORIES = memories()
PORTS = [(FuzzPort(), [FuzzPort(), FuzzPort()]) for _ in MEMORIES]
DEVICES = [VirtioConsole(mem, console=cons, named=[("a", named[0]), ("b", named[1])], queue_size=64, io_thread=False)
           for mem, (cons, named) in zip(MEMORIES, PORTS)]
QUEUES = (CONTROL_TRANSMITQ, receiveq(1), receiveq(1) + 1)
PORT_IDS = (0, 1, 2, 3, 0xFFFFFFFF)


def _message(fdp: atheris.FuzzedDataProvider) -> bytes:
    port = PORT_IDS[fdp.ConsumeIntInRange(0, len(PORT_IDS) - 1)] if fdp.ConsumeBool() else fdp.ConsumeInt(4) & 0xFFFFFFFF
    data = VIRTIO_CONSOLE_CONTROL.pack(port, fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 2))
    if fdp.ConsumeIntInRange(0, 3) == 0:  # cut or padded
        data = (data + fdp.ConsumeBytes(4))[: fdp.ConsumeIntInRange(0, 12)]
    return data


def _handshake(fdp: atheris.FuzzedDataProvider, dev: VirtioConsole) -> None:
    """What a driver said before the ring (through the device's handler, as its thread would)."""
    from virtio.console_control import ControlMessage

    if fdp.ConsumeBool():
        dev.on_control(ControlMessage(0xFFFFFFFF, VIRTIO_CONSOLE_DEVICE_READY, 1))
        for port in range(fdp.ConsumeIntInRange(0, 3)):
            dev.on_control(ControlMessage(port, VIRTIO_CONSOLE_PORT_READY, 1))
            if fdp.ConsumeBool():
                dev.on_control(ControlMessage(port, 6, 1))  # PORT_OPEN


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 1)
    mem, dev = MEMORIES[which], DEVICES[which]
    index = QUEUES[fdp.ConsumeIntInRange(0, len(QUEUES) - 1)]
    ring = decode_ring(fdp, mem)
    plant(fdp, mem, ring, _message if index == CONTROL_TRANSMITQ else lambda f: f.ConsumeBytes(16))
    refs = {head: reference_walk(mem, ring, head) for head in ring.heads}
    dev.reset()
    attach(dev.queues[index], ring)
    start(dev, ring, 1 << VIRTIO_CONSOLE_F_MULTIPORT)
    _handshake(fdp, dev)
    port = dev.ports[1]
    port.backend.input, port.backend.piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192)), fdp.ConsumeIntInRange(1, 5000)
    before = mem.snapshot()
    if index == CONTROL_TRANSMITQ:
        dev.process_control()
    elif index == receiveq(1):
        dev.fill(port)
    else:
        dev.drain(port)
    receiving = index == receiveq(1)
    looked = not receiving or port.guest_open  # (a port the guest has not opened gets no input)
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    check(needs_reset == (broken(ring) and looked), f"NEEDS_RESET is {needs_reset}, the ring is broken: "
          f"{broken(ring)}, the device looked at it: {looked}")
    writable = [b for r in refs.values() if r is not None and not r.readable for b in r.writable] if receiving else []
    mem.check_writes(before, writable + [ring.used_area()], f"queue {index}")
    for head, length in check_used(mem, ring, refs):
        check(receiving or length == 0, f"queue {index}: chain {head} used with length {length}")
    for p in dev.ports:
        if p is not None:
            check(p.added or not (p.ready or p.guest_open), f"port {p.id} ready or open but never added")
    check(len(dev.control_rx.pending) <= MAX_PENDING_CONTROL, "too many control messages pending")


if __name__ == "__main__":
    harness.main(one_input)
