"""Fuzz target: virtio-vsock's guest-facing paths (virtio/vsock.py over virtio/vsock_packet.py and
virtio/vsock_mux.py): the tx queue's packets, the rx queue's buffers, the event queue's.

    python -m tests.fuzz.fuzz_vsock [libFuzzer flags] [tests/fuzz/corpus/fuzz_vsock]

The ring of tests/fuzz/rings.py is the tx, rx or event queue, as the input says.  Packet headers
(ops, types, CIDs, ports and lengths biased to what a driver sends, with raw values mixed in) are
planted in its buffers; the host side is fake (a connection to an even port is accepted, an odd
one refused; a host stream takes what it is given and reads the input's bytes).  Before an rx
pass the connection table holds connections with host data and control packets to send.
Asserts:
  * a pass raises nothing, and sets NEEDS_RESET only when the ring is broken (a tx pass, which
    takes every chain, exactly then; rx and event buffers are taken only as they are needed);
  * guest memory changes only in the used ring and, on rx / event, in the device-writable
    buffers of well-formed chains; every payload view handed to a host stream lies in the
    device-readable buffers of well-formed chains; what host streams read goes into writable ones;
  * each used element names a head made available, with a length within its chain's writable
    length: 0 for tx, 0 or at least the 44-byte header for rx, 0 or 4 for events.
"""

from __future__ import annotations

import errno

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.rings import fuzzed_ring, memories, plant
    from tests.fuzz.virtio_setup import attach, broken, check_used, start
    from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET
    from virtio.vsock import EVENT, RX, TX, VirtioVsock
    from virtio.vsock_mux import VsockMuxer
    from virtio.vsock_packet import HDR_SIZE, VSOCK_HDR, Header

CID = 3
PORTS = (1, 2, 1024, 1025)


class FakeStream:
    def __init__(self, fd: int, fdp=None, mem=None, readable=(), writable=()):
        self.fd, self.fdp, self.mem, self.readable, self.writable = fd, fdp, mem, readable, writable

    def fileno(self) -> int:
        return self.fd

    def send(self, views) -> int:
        if self.mem is not None:
            self.mem.check_views([v for v in views if isinstance(v, memoryview) and self.mem.in_mapping(v)],
                                 self.readable, "payload sent to the host")
        total = sum(len(v) for v in views)
        return min(total, self.fdp.ConsumeIntInRange(0, total)) if self.fdp else total

    def recv_into(self, views) -> int | None:
        if self.mem is not None:
            self.mem.check_views(views, self.writable, "rx buffer the host reads into")
        room = sum(len(v) for v in views)
        n = self.fdp.ConsumeIntInRange(0, room) if self.fdp else room
        return n if n or not self.fdp or self.fdp.ConsumeBool() else None

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeBackend:
    path = "fuzz"

    def __init__(self):
        self.next_fd = 100
        self.stream_args = {}

    def fileno(self) -> int:
        return 99

    def accept(self):
        return None

    def connect(self, port: int) -> FakeStream:
        if port % 2:
            raise OSError(errno.ECONNREFUSED, "refused")
        self.next_fd += 1
        return FakeStream(self.next_fd, **self.stream_args)

    def reply_ok(self, stream, port) -> None:
        pass

    def close(self) -> None:
        pass


class NullWatcher:
    def add(self, fd, handler, events) -> None:
        pass

    def modify(self, fd, events) -> None:
        pass

    def remove(self, fd) -> None:
        pass


class _Vsock(VirtioVsock):
    """No I/O thread: the target runs the passes itself."""

    def activate(self) -> None:
        self.mux = VsockMuxer(self.backend, self.guest_cid, NullWatcher())

    def deactivate(self) -> None:
        pass


MEMORIES = memories()
DEVICES = [_Vsock(m, FakeBackend(), guest_cid=CID, queue_size=64) for m in MEMORIES]


def _header(fdp: atheris.FuzzedDataProvider) -> bytes:
    def pick(choices, bits):
        return choices[fdp.ConsumeIntInRange(0, len(choices) - 1)] if fdp.ConsumeIntInRange(0, 7) \
            else fdp.ConsumeIntInRange(0, (1 << bits) - 1)

    return VSOCK_HDR.pack(pick((CID,), 64), pick((2, 2, 4), 64), pick(PORTS, 32), pick(PORTS, 32),
                          pick((0, 1, 16, 100, 4096), 32), pick((1, 1, 2), 16), pick(tuple(range(8)), 16),
                          pick((0, 1, 2, 3), 32), pick((0, 64, 1 << 18), 32), pick((0, 16), 32))


def _prime(dev: _Vsock, fdp: atheris.FuzzedDataProvider) -> None:
    """Connections with host data and control packets waiting, for an rx pass."""
    mux = dev.mux
    for port in range(fdp.ConsumeIntInRange(0, 3)):
        hdr = Header(CID, 2, 1000 + port, 2 * port, 0, 1, 1, 0, fdp.ConsumeIntInRange(0, 1 << 18), 0)
        mux.on_guest_packet(hdr, [])
        conn = mux.conns.get((2 * port, 1000 + port))
        if conn is not None and fdp.ConsumeBool():
            mux._start_reading(conn)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(MEMORIES) - 1)
    mem, dev = MEMORIES[which], DEVICES[which]
    queue = (TX, RX, EVENT)[fdp.ConsumeIntInRange(0, 2)]
    _, ring, refs = fuzzed_ring(fdp, [mem])
    plant(fdp, mem, ring, _header)
    good = [r for r in refs.values() if r is not None]
    readable = [b for r in good for b in r.readable]
    writable = [b for r in good for b in r.writable]
    dev.backend.stream_args = dict(fdp=fdp, mem=mem, readable=readable, writable=writable)
    dev.reset()
    attach(dev.queues[queue], ring)
    start(dev, ring)
    dev._event_due = queue == EVENT
    if queue == RX:
        _prime(dev, fdp)
    before = mem.snapshot()
    {TX: dev._take_tx, RX: dev._fill_rx, EVENT: dev._send_event}[queue]()
    needs_reset = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
    # tx is drained whole; rx and event buffers are taken only as packets and events need them
    if queue == TX or needs_reset:
        check(needs_reset == broken(ring), f"NEEDS_RESET is {needs_reset}, the ring is broken: {broken(ring)}")
    mem.check_writes(before, ([] if queue == TX else writable) + [ring.used_area()], "virtio-vsock")
    for head, length in check_used(mem, ring, refs):
        if queue == TX:
            check(length == 0, f"tx chain {head} used with length {length}")
        elif queue == RX:
            check(length == 0 or length >= HDR_SIZE, f"rx chain {head} used with {length} bytes, no header")
        else:
            check(length in (0, 4), f"event chain {head} used with length {length}")


if __name__ == "__main__":
    harness.main(one_input)
