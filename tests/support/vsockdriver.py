"""A guest's virtio-vsock driver, enough for tests: the three queues on MockSplitQueues, packets
sent on tx and read back from rx in any layout of header and payload across descriptors.

    g = GuestVsock(mem, dev, layout="split")     # negotiated, DRIVER_OK, rx buffers posted
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=1234, dst_port=5000)
    pkt = g.expect(lambda p: p.hdr.op == VIRTIO_VSOCK_OP_RESPONSE)

LAYOUTS: "joined" (header and payload in one buffer: Linux before 6.1.63 / 6.3), "split"
(header, then payload: later ones), "ragged" (cut at odd offsets, the header across three).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                           VIRTIO_CONFIG_S_FEATURES_OK)
from virtio.vsock import EVENT, RX, TX
from virtio.vsock_packet import HDR_SIZE, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, VSOCK_HDR, Header

LAYOUTS = ("joined", "split", "ragged")
RX_PAYLOAD = 4096  # what Linux gives per rx buffer
OK = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK


def cut(total: int, layout: str) -> list[int]:
    """Buffer lengths for `total` bytes (header first) in a layout."""
    if layout == "joined" or total <= HDR_SIZE and layout == "split":
        return [total]
    if layout == "split":
        return [HDR_SIZE, total - HDR_SIZE]
    parts, left = [], total
    for n in (7, 30, 9, 1):
        if left <= n:
            break
        parts.append(n)
        left -= n
    return parts + [left]


@dataclass
class Packet:
    hdr: Header
    payload: bytes


class GuestVsock:
    def __init__(self, mem, dev, *, cid: int = 3, layout: str = "split", size: int = 64, rx_buffers: int = 32,
                 buf_alloc: int = 256 << 10):
        self.mem, self.dev, self.cid, self.layout = mem, dev, cid, layout
        self.buf_alloc = buf_alloc
        self.mqs = []
        for index in (RX, TX, EVENT):
            base = index * 0x1000000
            mq = MockSplitQueue(mem, size, base=base, data_base=base + 0x10000)
            q = dev.queues[index]
            q.size, q.desc_table, q.avail_ring, q.used_ring = size, mq.desc_table, mq.avail_ring, mq.used_ring
            self.mqs.append(mq)
        self.rx_chains: dict[int, list[Buf]] = {}
        self.event_chains: dict[int, list[Buf]] = {}
        self.received: list[Packet] = []
        self.tx_done: list[tuple[int, int]] = []  # tx used elements reaped and not yet asked for
        self.events: list[int] = []
        self.fwd_cnt: dict[tuple[int, int], int] = {}  # bytes consumed per (our port, host port)
        self.start(rx_buffers)

    def start(self, rx_buffers: int = 32) -> None:
        dev = self.dev
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        dev.driver_features = dev.device_features
        dev.set_status(OK)
        for q in dev.queues:
            q.ready = True
        per_chain = len(cut(HDR_SIZE + RX_PAYLOAD, self.layout))
        for _ in range(min(rx_buffers, self.mqs[RX].size // per_chain)):  # each descriptor in one chain
            self.post_rx()
        self.post_event()
        dev.set_status(OK | VIRTIO_CONFIG_S_DRIVER_OK)

    def restart(self, rx_buffers: int = 32) -> None:
        """Reset the device and set it up again on fresh rings (as a driver's re-probe)."""
        self.dev.set_status(0)
        for index, old in enumerate(self.mqs):
            mq = MockSplitQueue(self.mem, old.size, base=index * 0x1000000 + 0x800000,
                                data_base=index * 0x1000000 + 0x810000)
            q = self.dev.queues[index]
            q.size, q.desc_table, q.avail_ring, q.used_ring = old.size, mq.desc_table, mq.avail_ring, mq.used_ring
            self.mqs[index] = mq
        self.rx_chains.clear()
        self.event_chains.clear()
        self.start(rx_buffers)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.dev.queue_events[index], 1)

    # -- rx -----------------------------------------------------------------------------------
    def post_rx(self, lengths: list[int] | None = None, *, write: bool = True, kick: bool = True) -> int:
        mq = self.mqs[RX]
        bufs = [Buf(mq.alloc(n), n, write=write) for n in (lengths or cut(HDR_SIZE + RX_PAYLOAD, self.layout))]
        head = mq.add_chain(bufs)
        self.rx_chains[head] = bufs
        if kick:
            self.kick(RX)
        return head

    def poll(self) -> list[Packet]:
        """Packets the device put in rx since the last call (their buffers posted again)."""
        mq = self.mqs[RX]
        new = []
        for head, length in mq.used_entries():
            bufs = self.rx_chains.pop(head)
            data = b"".join(self.mem.read(b.addr, b.length) for b in bufs)[:length]
            if length >= HDR_SIZE:
                hdr = Header(*VSOCK_HDR.unpack(data[:HDR_SIZE]))
                new.append(Packet(hdr, data[HDR_SIZE:]))
            head2 = mq.add_chain(bufs)
            self.rx_chains[head2] = bufs
        if new or mq.avail_idx != mq.used_idx:
            self.kick(RX)
        self.received += new
        return new

    def expect(self, match, timeout: float = 5.0) -> Packet:
        """The first packet received (now or within `timeout`) that `match`es; it is taken out."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.received:
                if match(p):
                    self.received.remove(p)
                    return p
            if time.monotonic() > deadline:
                raise AssertionError(f"no such packet within {timeout} s; got {[p.hdr for p in self.received]}")
            self.poll()
            time.sleep(0.001)

    def read_stream(self, port: int, peer: int, nbytes: int, *, timeout: float = 10.0, credit: bool = True) -> bytes:
        """RW payloads for (port, peer) until nbytes came, sending CREDIT_UPDATEs as a reader would."""
        out = bytearray()
        while len(out) < nbytes:
            p = self.expect(lambda p: p.hdr.dst_port == port and p.hdr.src_port == peer, timeout)
            assert p.hdr.op == 5, p.hdr  # RW
            assert p.hdr.len == len(p.payload)
            out += p.payload
            self.consume(port, peer, len(p.payload), update=credit)
        return bytes(out)

    def consume(self, port: int, peer: int, n: int, *, update: bool = True) -> None:
        self.fwd_cnt[(port, peer)] = self.fwd_cnt.get((port, peer), 0) + n
        if update:
            self.send(op=6, src_port=port, dst_port=peer)  # CREDIT_UPDATE

    # -- tx -------------------------------------------------------------------------------------
    def header(self, **fields) -> Header:
        port, peer = fields.get("src_port", 0), fields.get("dst_port", 0)
        values = dict(src_cid=self.cid, dst_cid=VMADDR_CID_HOST, src_port=port, dst_port=peer, len=0,
                      type=VIRTIO_VSOCK_TYPE_STREAM, op=0, flags=0, buf_alloc=self.buf_alloc,
                      fwd_cnt=self.fwd_cnt.get((port, peer), 0))
        values.update(fields)
        return Header(**values)

    def send(self, payload: bytes = b"", *, layout: str | None = None, extra: list[Buf] = (), kick: bool = True,
             **fields) -> int:
        """A tx packet (len defaults to the payload's); returns its head."""
        fields.setdefault("len", len(payload))
        data = self.header(**fields).pack() + payload
        mq = self.mqs[TX]
        bufs, pos = [], 0
        for n in cut(len(data), layout or self.layout):
            gpa = mq.alloc(n)
            self.mem.write(gpa, data[pos : pos + n])
            bufs.append(Buf(gpa, n))
            pos += n
        self._room_in_tx(len(bufs) + len(extra))
        head = mq.add_chain(bufs + list(extra))
        if kick:
            self.kick(TX)
        return head

    def _room_in_tx(self, descriptors: int, timeout: float = 5.0) -> None:
        """Wait until the device gave back enough tx chains for `descriptors` more (as a driver does)."""
        mq = self.mqs[TX]
        deadline = time.monotonic() + timeout
        while True:
            self.tx_done += mq.used_entries()
            if sum(len(d) for d in mq._held.values()) + descriptors <= mq.size:
                return
            assert time.monotonic() < deadline, "the device does not take tx packets"
            time.sleep(0.0005)

    def tx_used(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        mq = self.mqs[TX]
        deadline = time.monotonic() + timeout
        while mq.used_idx != mq.avail_idx and time.monotonic() < deadline:
            time.sleep(0.001)
        done, self.tx_done = self.tx_done + mq.used_entries(), []
        return done

    # -- events ------------------------------------------------------------------------------------
    def post_event(self, length: int = 4, *, write: bool = True) -> None:
        mq = self.mqs[EVENT]
        bufs = [Buf(mq.alloc(length), length, write=write)]
        self.event_chains[mq.add_chain(bufs)] = bufs
        self.kick(EVENT)

    def poll_events(self) -> list[tuple[int, int]]:
        return self.mqs[EVENT].used_entries()
