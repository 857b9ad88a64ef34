"""virtio-net (virtio/net.py): features, config space, TX, RX (with and without mergeable buffers),
back-pressure both ways, the control queue, the I/O threads; against a fake tap made of
socketpairs, and end to end against a real tap in a network namespace of the test's own
(tests/unit/test_tap.py's `netns`: every tap and frame stays in it, and it is deleted at the end).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time

import pytest

from tests.support.mockqueue import Buf, MockSplitQueue
from tests.unit.test_tap import (  # noqa: F401  (netns is a fixture)
    ETH_P_IP,
    HOST_MAC,
    PACKET_VNET_HDR,
    SOL_PACKET,
    eth_frame,
    netns,
    recv_frames,
    tcp_gso_frame,
)
from virtio.backends.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, Tap, TapError
from virtio.backends.tap_batch import IovecLoop
from virtio.device import (
    CONFIG,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
)
from virtio.net import (
    MAX_BUFFER,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    tun_offload_flags,
)
from virtio.net_rx import RX_PUBLISH_CHAINS, RX_SHORT_RUN
from virtio.net_hdr import (
    NET_HDR_SIZE,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
)
from virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_USED_F_NO_NOTIFY
from vmm.config import NetSpec, default_mac, format_mac, parse_mac, parse_net_spec
from vmm.memory import MiB, GuestMemory
from vmm.virtio_devices import build_net

QUEUE_SIZE = 64
UNTOUCHED = 0xEE
MAC = bytes.fromhex("525400123456")
GSO_FEATURES = (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN)
# With mergeable buffers and a GUEST_TSO feature, the device reads from the tap only with room for
# a largest frame (12 + 65550 bytes) in hand: 33 buffers of 2048 bytes.
LARGEST_2048 = -(-MAX_BUFFER // 2048)


def bit(*bits):
    return sum(1 << b for b in bits)


class FakeTap:
    """A tap made of AF_UNIX SOCK_SEQPACKET socketpairs: one message is one frame (header first),
    a read into short buffers cuts the frame like a tap does, a full peer answers EAGAIN (after
    net.unix.max_dgram_qlen frames).  The test holds the host ends.  With `batches` it offers
    batch I/O (open_batch_io) as a plain loop over readv / writev, so write_error and the reads
    count cover the batch paths too."""

    def __init__(self, queues=1, name="fake0", *, sndbuf=None, batches=False):
        self.name = name
        self.batches = batches
        self.batch_ios = []  # what open_batch_io gave, by queue
        self.queues = queues
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(queues)]
        for dev_end, host_end in self.pairs:
            dev_end.setblocking(False)
            if sndbuf:  # a small one fills quickly: EAGAIN (the kernel doubles it, 4608 at least)
                dev_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            host_end.settimeout(5)
        self.offload = None
        self.enabled = [True] * queues
        self.write_error = None
        self.reads = 0
        self.closed = False

    # the NetBackend side
    def fileno(self, index=0):
        return self.pairs[index][0].fileno()

    def readv(self, index, views):
        self.reads += 1
        return os.readv(self.fileno(index), views)

    def writev(self, index, views):
        if self.write_error is not None:
            raise OSError(self.write_error, os.strerror(self.write_error))
        return os.writev(self.fileno(index), views)

    def reader(self, index):
        return lambda views: self.readv(index, views)

    def writer(self, index):
        return lambda views: self.writev(index, views)

    def open_batch_io(self, index):
        if not self.batches:
            return None
        batch_io = IovecLoop(self.reader(index), self.writer(index))
        self.batch_ios.append(batch_io)
        return batch_io

    def set_offload(self, flags):
        self.offload = flags

    def set_queue_enabled(self, index, enabled):
        self.enabled[index] = enabled

    def close(self):
        self.closed = True
        for a, b in self.pairs:
            a.close()
            b.close()

    # the host side
    def host(self, index=0):
        return self.pairs[index][1]

    def send(self, data, index=0):
        self.host(index).send(data)

    def recv(self, index=0, timeout=5.0):
        host = self.host(index)
        host.settimeout(timeout)
        return host.recv(1 << 17)

    def received(self, index=0):
        """Every frame waiting on the host side now."""
        out = []
        host = self.host(index)
        while select.select([host], [], [], 0)[0]:
            out.append(host.recv(1 << 17))
        return out

    def device_side_pending(self, index=0):
        """Whether frames wait, unread by the device, on its end."""
        return bool(select.select([self.pairs[index][0]], [], [], 0)[0])


@pytest.fixture
def mem():
    with GuestMemory(96 * MiB) as m:
        yield m


class Driver:
    """A virtio-net driver's side: rings for every queue, buffers from a bump allocator."""

    def __init__(self, mem, dev, *, size=QUEUE_SIZE):
        self.mem = mem
        self.dev = dev
        self.size = size
        self.mqs = []
        for i, q in enumerate(dev.queues):
            mq = MockSplitQueue(mem, size, base=i * 0x10000, data_base=0)
            q.size, q.desc_table, q.avail_ring, q.used_ring = size, mq.desc_table, mq.avail_ring, mq.used_ring
            self.mqs.append(mq)
        self._next = 0x200000
        self.posted = {}  # (queue index, head) -> [(gpa, length)] of the device-writable buffers
        self.interrupts = []
        self.empty_returned = 0  # RX buffers the device gave back with nothing in them
        dev.set_interrupt(self.interrupts.append)

    def alloc(self, length, fill=UNTOUCHED):
        gpa = (self._next + 63) & ~63
        self._next = gpa + length
        assert self._next < self.mem.regions[0].size
        self.mem.fill(gpa, length, fill)
        return gpa

    def negotiate(self, *, drop=(), only=None, event_idx=True):
        dev = self.dev
        features = dev.device_features if only is None else only | bit(VIRTIO_F_VERSION_1)
        features &= ~bit(*drop)
        if not event_idx:
            features &= ~bit(VIRTIO_F_EVENT_IDX)
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        dev.driver_features = features
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
        if not dev.status & VIRTIO_CONFIG_S_FEATURES_OK:
            return False
        for q in dev.queues:
            q.ready = True
        dev.set_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
        )
        assert dev.active
        return True

    # -- queues --------------------------------------------------------------------------
    def rxq(self, pair=0):
        return self.mqs[2 * pair]

    def txq(self, pair=0):
        return self.mqs[2 * pair + 1]

    def ctrlq(self):
        return self.mqs[self.dev.ctrl_index]

    def post_rx(self, sizes, pair=0, *, split=None, publish=True, indirect=False):
        """One RX chain per size (optionally split into pieces of `split` lengths, optionally in
        an indirect table); their heads."""
        mq = self.rxq(pair)
        heads = []
        for size in sizes:
            pieces = list(split or [])
            rest = size - sum(pieces)
            if rest:
                pieces.append(rest)
            bufs = [(self.alloc(n), n) for n in pieces]
            chain = [Buf(g, n, write=True) for g, n in bufs]
            if indirect:
                head = mq.add_indirect_chain(chain, table=self.alloc(16 * len(chain)))
            else:
                head = mq.add_chain(chain, publish=publish)
            self.posted[(2 * pair, head)] = bufs
            heads.append(head)
        return heads

    def send(self, data, pair=0, *, split=None, indirect=False, extra=()):
        """A TX chain with `data` (header included), in pieces; `extra` Bufs are appended."""
        mq = self.txq(pair)
        pieces = list(split or [])
        rest = len(data) - sum(pieces)
        if rest:
            pieces.append(rest)
        bufs, pos = [], 0
        for n in pieces:
            gpa = self.alloc(n)
            self.mem.write(gpa, data[pos : pos + n])
            bufs.append(Buf(gpa, n))
            pos += n
        bufs += list(extra)
        if indirect:
            return mq.add_indirect_chain(bufs)
        return mq.add_chain(bufs)

    def kick(self, index):
        os.eventfd_write(self.dev.queue_events[index], 1)

    def received(self, pair=0):
        """The frames the device completed on receiveq `pair` since the last call: (header, frame)
        as a driver reassembles them with num_buffers."""
        entries = self.rxq(pair).used_entries()
        frames = []
        while entries:
            head, length = entries.pop(0)
            if length == 0:  # a buffer given back empty: dropped, as Linux does (rx_length_errors)
                self.empty_returned += 1
                continue
            data = self._chain_bytes(2 * pair, head, length)
            assert length >= NET_HDR_SIZE, (head, length)
            num_buffers = VIRTIO_NET_HDR.unpack_from(data)[6]
            assert num_buffers >= 1
            for _ in range(num_buffers - 1):
                head, length = entries.pop(0)
                data += self._chain_bytes(2 * pair, head, length)
            frames.append((data[:NET_HDR_SIZE], data[NET_HDR_SIZE:]))
        return frames

    def _chain_bytes(self, qi, head, length):
        out = b""
        for gpa, n in self.posted[(qi, head)]:
            take = min(n, length - len(out))
            if take <= 0:
                break
            out += self.mem.read(gpa, take)
        return out

    def ctrl(self, cls, cmd, data=b"", *, ack=True):
        """Put a control command on the control queue; returns (head, gpa of the ack byte)."""
        cmd_bytes = bytes([cls, cmd]) + data
        gpa = self.alloc(len(cmd_bytes))
        self.mem.write(gpa, cmd_bytes)
        bufs = [Buf(gpa, 2), Buf(gpa + 2, len(data))] if data else [Buf(gpa, 2)]
        ack_gpa = None
        if ack:
            ack_gpa = self.alloc(1)
            bufs.append(Buf(ack_gpa, 1, write=True))
        head = self.ctrlq().add_chain(bufs)
        return head, ack_gpa

    def run_ctrl(self, cls, cmd, data=b""):
        """One command, processed synchronously; its ack."""
        head, ack_gpa = self.ctrl(cls, cmd, data)
        self.dev.process_ctrl()
        assert self.ctrlq().used_entries() == [(head, 1)]
        return self.mem.read(ack_gpa, 1)[0]


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0):
    return VIRTIO_NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def payload(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def frame_of(total_len, seed=0):
    """An Ethernet frame of `total_len` bytes."""
    return eth_frame(payload(total_len - 14, seed), dst=MAC, src=HOST_MAC)


@pytest.fixture(params=[False, True], ids=["one-by-one", "batches"])
def make_dev(mem, request):
    devices = []
    batches = getattr(request, "param", False)

    def make(*, queue_pairs=1, tap=None, io_threads=False, queue_size=256, **kwargs):
        tap = tap or FakeTap(queue_pairs, batches=batches)
        dev = VirtioNet(
            mem, tap, mac=MAC, queue_pairs=queue_pairs, queue_size=queue_size, io_threads=io_threads, **kwargs
        )
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        dev.close()


@pytest.fixture
def dev(make_dev):
    return make_dev()


@pytest.fixture
def drv(mem, dev):
    d = Driver(mem, dev)
    assert d.negotiate()
    return d


def feature(dev, b):
    return bool(dev.device_features >> b & 1)


# -- features and configuration -----------------------------------------------------------------


def test_device_id_features_and_queues(make_dev):
    dev = make_dev()
    assert dev.device_id == VIRTIO_ID_NET == 1
    for b in (
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
    ):
        assert feature(dev, b), b
    assert not feature(dev, VIRTIO_NET_F_MQ)
    assert not feature(dev, VIRTIO_NET_F_GUEST_UFO)
    assert len(dev.queues) == len(dev.queue_events) == 3
    dev4 = make_dev(queue_pairs=4)
    assert feature(dev4, VIRTIO_NET_F_MQ)
    assert len(dev4.queues) == 9


def test_config_layout(make_dev):
    dev = make_dev(queue_pairs=3, mtu=9000)
    c = dev.config_bytes()
    assert len(c) == 12
    assert c[0:6] == MAC
    assert struct.unpack_from("<H", c, 6)[0] == VIRTIO_NET_S_LINK_UP
    assert struct.unpack_from("<H", c, 8)[0] == 3  # max_virtqueue_pairs
    assert struct.unpack_from("<H", c, 10)[0] == 9000  # mtu
    assert dev.read_config(6, 2) == 1
    assert dev.read_config(0, 4) == int.from_bytes(MAC[:4], "little")
    assert dev.read_config(12, 4) == 0  # beyond: reads as 0


def test_constructor_checks(mem):
    with pytest.raises(ValueError, match="unicast"):
        VirtioNet(mem, FakeTap(), mac=bytes.fromhex("535400000001"))
    with pytest.raises(ValueError, match="unicast"):
        VirtioNet(mem, FakeTap(), mac=b"\x52\x54\x00\x00\x01")
    with pytest.raises(ValueError, match="queues"):
        VirtioNet(mem, FakeTap(2), mac=MAC, queue_pairs=1)
    with pytest.raises(ValueError, match="MTU"):
        VirtioNet(mem, FakeTap(), mac=MAC, mtu=67)
    with pytest.raises(ValueError, match="queue pairs"):
        VirtioNet(mem, FakeTap(), mac=MAC, queue_pairs=0)


@pytest.mark.parametrize(
    "features, ok",
    [
        (bit(VIRTIO_NET_F_GUEST_TSO4), False),  # needs GUEST_CSUM
        (bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4), True),
        (bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN), False),  # needs a GUEST_TSO
        (bit(VIRTIO_NET_F_HOST_TSO6), False),  # needs CSUM
        (bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN), True),
        (bit(VIRTIO_NET_F_CTRL_RX), False),  # needs CTRL_VQ
        (bit(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_MQ), True),
        (bit(VIRTIO_NET_F_MQ), False),
        (0, True),
    ],
)
def test_feature_dependencies(make_dev, mem, features, ok):
    dev = make_dev(queue_pairs=2)
    assert Driver(mem, dev).negotiate(only=features) is ok


def test_tun_offload_flags():
    assert tun_offload_flags(0) == 0
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)) == 0  # never TSO without CSUM: the kernel refuses
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)) == TUN_F_CSUM
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4)) == TUN_F_CSUM | TUN_F_TSO4
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN)) == (
        TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN
    )
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN)) == TUN_F_CSUM  # ECN needs TSO
    assert tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_UFO)) == TUN_F_CSUM | TUN_F_UFO
    # host-side features do not concern the tap's reader
    assert tun_offload_flags(bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4)) == 0


@pytest.mark.parametrize(
    "drop, expect",
    [
        ((), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN),
        (GSO_FEATURES, TUN_F_CSUM),
        ((VIRTIO_NET_F_GUEST_CSUM, *GSO_FEATURES), 0),
    ],
)
def test_driver_ok_sets_the_tap_offloads(make_dev, mem, drop, expect):
    dev = make_dev()
    Driver(mem, dev).negotiate(drop=drop)
    assert dev.tap.offload == expect


# -- transmit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split, indirect",
    [(None, False), ([12], False), ([5, 20, 3], False), ([12, 14], True)],
    ids=["one-buffer", "header-apart", "odd-pieces", "indirect"],
)
def test_tx_frame_reaches_the_tap_byte_identical(drv, dev, split, indirect):
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)
    data = header + frame_of(1514)
    head = drv.send(data, split=split, indirect=indirect)
    dev.process_tx(0)
    assert dev.tap.received() == [data]
    assert drv.txq().used_entries() == [(head, 0)]
    assert drv.interrupts == [1]
    stats = dev.stats()
    assert (stats.tx_frames, stats.tx_bytes) == (1, 1514)


def test_tx_batch(drv, dev):
    frames = [hdr() + frame_of(60 + i, seed=i) for i in range(8)]
    heads = [drv.send(f) for f in frames]
    dev.process_tx(0)
    assert dev.tap.received() == frames
    assert drv.txq().used_entries() == [(h, 0) for h in heads]
    assert drv.interrupts == [1]  # one interrupt for the batch
    assert drv.txq().avail_event == 8  # notifications on again after the batch


def test_tx_largest_frame(drv, dev):
    data = hdr() + payload(MAX_BUFFER - NET_HDR_SIZE)
    head = drv.send(data, split=[12, 40000])
    dev.process_tx(0)
    assert dev.tap.received() == [data]
    assert drv.txq().used_entries() == [(head, 0)]


def test_tx_bad_chains_are_completed_unsent(drv, dev, mem):
    good = hdr() + frame_of(100)
    heads = [
        drv.send(good, extra=[Buf(drv.alloc(16), 16, write=True)]),  # device-writable buffer in a TX chain
        drv.send(b"\0" * 11),  # shorter than the header
        drv.send(hdr() + payload(MAX_BUFFER - NET_HDR_SIZE + 1)),  # longer than the largest frame
        drv.send(good),
    ]
    dev.process_tx(0)
    assert dev.tap.received() == [good]
    assert drv.txq().used_entries() == [(h, 0) for h in heads]
    assert dev.stats().tx_dropped == 3
    assert dev.stats().tx_frames == 1


def test_tx_malformed_chain_is_returned(drv, dev):
    mq = drv.txq()
    mq.write_desc(5, 0xFFFF_FFFF_0000, 100)  # not guest RAM
    mq.add_head(5)
    good = drv.send(hdr() + frame_of(60))
    dev.process_tx(0)
    assert mq.used_entries() == [(5, 0), (good, 0)]
    assert len(dev.tap.received()) == 1


def test_tx_refused_by_the_tap_is_counted_and_completed(make_dev, mem):
    dev = make_dev(tap=FakeTap())  # one frame at a time: through writev, where the error is made
    drv = Driver(mem, dev)
    assert drv.negotiate()
    dev.tap.write_error = errno.EINVAL  # what the kernel says of a nonsense gso_type
    head = drv.send(hdr(0, 0x33) + frame_of(100))
    dev.process_tx(0)
    assert drv.txq().used_entries() == [(head, 0)]
    assert dev.stats().tx_errors == 1
    dev.tap.write_error = None
    head = drv.send(hdr() + frame_of(100))
    dev.process_tx(0)
    assert drv.txq().used_entries() == [(head, 0)]
    assert len(dev.tap.received()) == 1


def test_tx_refused_in_a_batch_is_counted_and_completed(make_dev, mem):
    """The batch path: the kernel refuses the writes (here EPIPE: the peer is gone); every chain
    is completed, every refusal counted, nothing is sent or retried."""
    dev = make_dev(tap=FakeTap(batches=True))
    drv = Driver(mem, dev)
    assert drv.negotiate()
    dev.tap.host().shutdown(socket.SHUT_RD)
    heads = [drv.send(hdr() + frame_of(100 + i)) for i in range(5)]
    dev.process_tx(0)
    assert drv.txq().used_entries() == [(h, 0) for h in heads]
    stats = dev.stats()
    assert (stats.tx_errors, stats.tx_frames, stats.tx_blocked) == (5, 0, 0)
    assert dev.pair_state(0).tx_path.unsent == 0


def test_tx_back_pressure(make_dev, mem):
    """A full tap: the chain goes back to the ring, the pair waits for EPOLLOUT; nothing lost, order kept."""
    dev = make_dev(tap=FakeTap(sndbuf=4096))
    drv = Driver(mem, dev)
    assert drv.negotiate()
    frames = [hdr() + frame_of(200, seed=i) for i in range(30)]
    heads = [drv.send(f) for f in frames]
    dev.process_tx(0)
    used = drv.txq().used_entries()
    sent = len(used)
    assert 0 < sent < 30  # the peer's queue filled up
    p = dev.pair_state(0)
    assert p.tx_path.blocked and p.events & select.EPOLLOUT
    assert dev.stats().tx_blocked == 1
    dev.process_tx(0)  # a kick while blocked does nothing
    assert drv.txq().used_entries() == []
    got = []
    rounds = 0
    while len(got) < 30:
        rounds += 1
        assert rounds < 50
        got += dev.tap.received()
        ready = p.ep.poll(0)
        assert ready == [(p.fd, select.EPOLLOUT)] or not p.tx_path.blocked
        dev._tap_event(0)  # what the pair's thread does when the tap fd is ready
        used += drv.txq().used_entries()
    assert got == frames
    assert used == [(h, 0) for h in heads]
    assert not p.tx_path.blocked and not p.events & select.EPOLLOUT


def test_tx_on_a_broken_ring_needs_reset(drv, dev):
    drv.txq().publish_avail(QUEUE_SIZE + 5)  # avail.idx further ahead than the ring is long
    dev.process_tx(0)
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert CONFIG in drv.interrupts
    drv.send(hdr() + frame_of(60))
    dev.process_tx(0)  # that queue is not served until the reset
    assert dev.tap.received() == []


# -- receive ---------------------------------------------------------------------------------------------


RX_SIZES = [60, 1514, 65550]


@pytest.mark.parametrize("length", RX_SIZES)
def test_rx_without_mergeable_buffers(make_dev, mem, length):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate(drop=[VIRTIO_NET_F_MRG_RXBUF])
    big = length > 1514
    heads = drv.post_rx([MAX_BUFFER if big else 1526] * 2, split=[12])  # header apart, as old drivers do
    header = hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0)
    frame = frame_of(length)
    dev.tap.send(header + frame)
    dev.process_rx(0)
    assert drv.rxq().used_entries() == [(heads[0], 12 + length)]
    got = drv._chain_bytes(0, heads[0], 12 + length)
    assert got[NET_HDR_SIZE:] == frame
    assert VIRTIO_NET_HDR.unpack_from(got) == (VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 1)
    assert drv.interrupts == [0]


@pytest.mark.parametrize("length", RX_SIZES)
@pytest.mark.parametrize("buf_size", [1526, 4096])
def test_rx_with_mergeable_buffers(make_dev, mem, length, buf_size):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    heads = drv.post_rx([buf_size] * 60)
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4 if length > 1514 else 0, 54, 1448, 34, 16)
    frame = frame_of(length)
    dev.tap.send(header + frame)
    dev.process_rx(0)
    total = 12 + length
    chains = -(-total // buf_size)
    expect = [(heads[i], min(buf_size, total - i * buf_size)) for i in range(chains)]
    used = drv.rxq().used_entries()
    assert used == expect
    drv.rxq().last_used -= len(used)  # read them again, as the driver reassembles them
    ((h, f),) = drv.received()
    assert f == frame
    assert VIRTIO_NET_HDR.unpack(h) == VIRTIO_NET_HDR.unpack(header)[:6] + (chains,)  # num_buffers
    assert drv.interrupts == [0]
    # the chains not used stay with the device for the next frames: they go first, before the
    # ones the driver posts to replace those used (needed after a largest frame of 1526-byte
    # buffers: the 17 left hold less than the next frame may need, so the device waits for them)
    drv.post_rx([buf_size] * chains)
    dev.tap.send(hdr() + frame_of(60))
    dev.process_rx(0)
    assert drv.rxq().used_entries() == [(heads[chains], 72)]


def test_rx_flags_cleared_without_guest_csum(make_dev, mem):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate(drop=[VIRTIO_NET_F_GUEST_CSUM, *GSO_FEATURES])
    drv.post_rx([1530] * 4)
    dev.tap.send(hdr(VIRTIO_NET_HDR_F_DATA_VALID) + frame_of(100))
    dev.process_rx(0)
    ((h, f),) = drv.received()
    assert h == hdr(0, 0, 0, 0, 0, 0, 1)  # 5.1.6.4.1: flags zero without GUEST_CSUM


def test_rx_header_split_over_descriptors(make_dev, mem):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    drv.post_rx([3000, 3000], split=[5, 4, 1])  # num_buffers straddles two descriptors
    drv.post_rx([4096] * 15)  # with them, room for a largest frame (GUEST_TSO): the device reads
    frame = frame_of(4000)
    dev.tap.send(hdr(VIRTIO_NET_HDR_F_DATA_VALID) + frame)
    dev.process_rx(0)
    ((h, f),) = drv.received()
    assert f == frame
    assert VIRTIO_NET_HDR.unpack(h)[6] == 2


def test_rx_batch_one_interrupt(drv, dev):
    frames = [frame_of(100 + i, seed=i) for i in range(8)]
    drv.post_rx([2048] * (len(frames) + LARGEST_2048))  # room for a largest frame after all of them
    for f in frames:
        dev.tap.send(hdr() + f)
    dev.process_rx(0)
    assert [f for _, f in drv.received()] == frames
    assert drv.interrupts == [0]
    assert dev.stats().rx_frames == 8
    assert not dev.pair_state(0).rx_waiting  # the batch ended with the tap empty, not the buffers


def test_rx_back_pressure(drv, dev):
    """No buffers: nothing is read from the tap; the tap fd is not watched until the driver kicks
    the receiveq.  With too little room for a largest frame (GUEST_TSO: 12 + 65550 bytes) the
    one-chain path reads nothing either (it cannot tell a frame's size before reading it); the
    batch path reads the frames that fit and keeps a longer one until the driver posts more.
    Either way every frame arrives, in order, whole - a 20000-byte one too - and none is lost."""
    frames = [frame_of(500 + i, seed=i) for i in range(3)] + [frame_of(20000, seed=3)]
    frames += [frame_of(500 + i, seed=i) for i in range(4, 6)]
    for f in frames:
        dev.tap.send(hdr() + f)
    p = dev.pair_state(0)
    batches = p.rx_path.batches

    def waiting(avail_event, no_buffers=1, reads=0):
        assert dev.tap.reads == reads and dev.tap.device_side_pending()  # frames still in the tap
        assert p.rx_waiting and not p.events & select.EPOLLIN  # the tap fd is not watched
        assert drv.rxq().avail_event == avail_event  # the driver is asked to kick on its next buffer
        assert dev.stats().rx_no_buffers == no_buffers

    dev.process_rx(0)  # the tap is readable; no buffers
    waiting(0)
    assert drv.rxq().used_entries() == [] and drv.interrupts == []
    drv.post_rx([1530] * 3)  # room for 3 small frames, not for a largest one
    dev.process_rx(0)  # the kick
    got = drv.received()
    if batches:  # the three small frames arrived; the batch path waits again
        assert [f for _, f in got] == frames[:3]
        waiting(3, no_buffers=2, reads=3)  # (the reads of those three: none since)
    else:  # still nothing read
        assert got == [] and drv.interrupts == []
        waiting(3)
    drv.post_rx([2048] * 50)  # now room for a largest frame, with what comes after it
    dev.process_rx(0)  # the kick
    got += drv.received()
    assert [f for _, f in got] == frames
    assert [VIRTIO_NET_HDR.unpack(h)[6] for h, _ in got] == [1, 1, 1, -(-20012 // 2048), 1, 1]  # num_buffers
    assert not dev.tap.device_side_pending()
    assert not p.rx_waiting and p.events & select.EPOLLIN  # room in hand: watching the tap again
    assert drv.interrupts and set(drv.interrupts) == {0}  # the receiveq's
    stats = dev.stats()
    assert (stats.rx_frames, stats.rx_truncated, stats.rx_no_buffers) == (6, 0, 1 + batches)


def test_rx_notifications_off_while_buffers_are_in_hand(make_dev, mem):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate(event_idx=False)
    drv.post_rx([2048] * 40)
    dev.tap.send(hdr() + frame_of(60))
    dev.process_rx(0)
    assert drv.rxq().used_flags == VIRTQ_USED_F_NO_NOTIFY  # enough in hand: no kicks needed
    assert len(drv.received()) == 1


def test_rx_mergeable_with_few_buffers(make_dev, mem):
    """Fewer buffers than a largest frame needs (GUEST_TSO: 12 + 65550 bytes).  The one-chain path
    reads nothing, even the frames that would fit, since it cannot tell a frame's size before
    reading it; the batch path reads a frame per chain, hands over what fits and keeps the rest of
    a longer frame, and the frames after it, until the driver posts more.  Either way it waits for
    the driver's kick, and with enough posted every frame arrives whole, in order."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()  # GUEST_TSO: up to 65562 bytes a frame
    drv.post_rx([2048] * 4)
    frames = [frame_of(100), frame_of(20000, seed=1), frame_of(3000, seed=2)]
    for f in frames:
        dev.tap.send(hdr() + f)
    dev.process_rx(0)
    p = dev.pair_state(0)
    batches = p.rx_path.batches
    assert p.rx_waiting and not p.events & select.EPOLLIN
    assert drv.rxq().avail_event == 4  # a kick is requested for the next buffer
    got = drv.received()
    if batches:  # all three read (three chains); the 100 handed over, the 20000 waits with the 3000
        assert [f for _, f in got] == frames[:1] and not dev.tap.device_side_pending()
        assert p.rx_path.pending == 2
    else:
        assert dev.tap.reads == 0 and dev.tap.device_side_pending()
        assert got == []
    drv.post_rx([4096] * 24)  # room for a largest frame after each of them
    dev.process_rx(0)  # the kick
    got += drv.received()
    assert [f for _, f in got] == frames
    # Either way the 100 bytes in a 2048; the 20000 in the three 2048s left (the batch path: its
    # own, the 3000's, the one left in the ring), then 4096s; the 3000 in a 4096.
    assert [VIRTIO_NET_HDR.unpack(h)[6] for h, _ in got] == [1, 3 + -(-(20012 - 3 * 2048) // 4096), 1]
    assert not dev.tap.device_side_pending()
    assert not p.rx_waiting and p.events & select.EPOLLIN
    assert dev.stats().rx_truncated == 0
    assert dev.stats().rx_frames == 3


def test_rx_mergeable_whole_table_held_in_multi_descriptor_chains(make_dev, mem):
    """Chains of two descriptors each (header apart, no indirect): 4 chains fill an 8-entry table.
    Holding them all, the device must read (the driver cannot post more), not wait forever."""
    dev = make_dev(queue_size=8)
    drv = Driver(mem, dev, size=8)
    assert drv.negotiate(drop=[VIRTIO_F_INDIRECT_DESC])
    drv.post_rx([2048] * 4, split=[12])
    dev.tap.send(hdr() + frame_of(100))
    dev.process_rx(0)
    ((_, f),) = drv.received()
    assert f == frame_of(100)
    assert dev.stats().rx_truncated == 0


def test_rx_mergeable_whole_ring_below_a_largest_frame(make_dev, mem):
    """A driver whose whole ring holds less than a largest frame (8 x 2048 bytes, GUEST_TSO): small
    frames arrive, a frame bigger than the whole ring cannot be delivered (counted).  The one-chain
    path reads once it holds the whole ring, which can never hold more (the frame's buffers stay
    held); the batch path reads a frame per chain, sets the long one and those after it aside, and
    drops the long one once it holds the whole table (those chains then take the frames after it)."""
    dev = make_dev(queue_size=8)
    drv = Driver(mem, dev, size=8)
    assert drv.negotiate()
    p = dev.pair_state(0)
    drv.post_rx([2048] * 7)  # not the whole ring yet: waits for more
    frames = [frame_of(100), frame_of(20000, seed=1), frame_of(3000, seed=2), frame_of(60, seed=3)]
    for f in frames:
        dev.tap.send(hdr() + f)
    dev.process_rx(0)
    if p.rx_path.batches:
        assert [f for _, f in drv.received()] == frames[:1]  # the rest read, the 20000 waiting for room
        assert p.rx_path.pending == 3
        drv.post_rx([2048])
        dev.process_rx(0)
        assert drv.received() == [] and p.rx_waiting and dev.stats().rx_truncated == 0
        drv.post_rx([2048])  # the 100's buffer back: the whole table is held, too little for the 20000
        dev.process_rx(0)
        got = drv.received()
        assert [f for _, f in got] == frames[2:]
        assert [VIRTIO_NET_HDR.unpack(h)[6] for h, _ in got] == [2, 1]
        assert dev.stats().rx_truncated == 1 and drv.empty_returned == 0
    else:
        assert dev.tap.reads == 0 and p.rx_waiting and drv.rxq().used_entries() == []
        drv.post_rx([2048])  # the whole ring: one frame, then it waits for the driver to give it back
        dev.process_rx(0)
        got = drv.received()
        assert [f for _, f in got] == frames[:1]
        assert p.rx_waiting and not p.events & select.EPOLLIN and drv.rxq().avail_event == 8
        assert dev.stats().rx_truncated == 0
        drv.post_rx([2048])  # refilled: the 20000 bytes do not fit the whole ring, the next ones do
        dev.process_rx(0)
        got = drv.received()
        assert [f for _, f in got] == frames[2:3]
        assert [VIRTIO_NET_HDR.unpack(h)[6] for h, _ in got] == [2]
        assert dev.stats().rx_truncated == 1
        drv.post_rx([2048] * 2)
        dev.process_rx(0)
        assert [f for _, f in drv.received()] == frames[3:]
    assert not dev.tap.device_side_pending()
    stats = dev.stats()
    assert (stats.rx_frames, stats.rx_truncated) == (3, 1)


def test_rx_mergeable_gso_burst_with_small_refills(make_dev, mem):
    """The data-loss bug: 64 KiB GSO frames arriving while the driver refills its ring a little at a
    time (8 x 2048 bytes).  The device used to read each frame into whatever it held and drop the
    ones that did not fit; now it waits until it holds room for a largest frame: none is lost."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    frames = [frame_of(65550, seed=i) for i in range(100)]
    host = dev.tap.host()
    host.setblocking(False)
    sent = 0
    outstanding = 0  # chains posted and not yet given back
    got = []
    for _ in range(1000):
        while sent < len(frames):  # the host sends what the tap queue takes
            try:
                host.send(header + frames[sent])
            except BlockingIOError:
                break
            sent += 1
        if outstanding + 8 <= QUEUE_SIZE:
            drv.post_rx([2048] * 8)
            outstanding += 8
        dev.process_rx(0)  # the kick (and the tap readable)
        new = drv.received()
        outstanding -= sum(VIRTIO_NET_HDR.unpack(h)[6] for h, _ in new)
        got += new
        if len(got) == len(frames):
            break
    assert [f for _, f in got] == frames
    assert all(VIRTIO_NET_HDR.unpack(h) == VIRTIO_NET_HDR.unpack(header)[:6] + (LARGEST_2048,) for h, _ in got)
    stats = dev.stats()
    assert (stats.rx_frames, stats.rx_truncated) == (len(frames), 0)
    assert stats.rx_no_buffers >= 1  # it did wait for room (the batch path: while frames it read wait)



def pump_rx(drv, dev, frames, header, buf_size, *, split=None):
    """The host sends `frames` (each after `header`) as fast as the tap queue takes them while the
    driver keeps its whole descriptor table posted with `buf_size` chains; the frames the driver
    receives.  (drv.outstanding: the chains posted and not yet given back, from call to call.)"""
    host = dev.tap.host()
    host.setblocking(False)
    chains = QUEUE_SIZE // (1 + len(split or []))
    outstanding = getattr(drv, "outstanding", 0)
    sent = 0
    got = []
    for _ in range(20 * len(frames) + 100):
        while sent < len(frames):
            try:
                host.send(header + frames[sent])
            except BlockingIOError:
                break
            sent += 1
        if outstanding < chains:
            drv.post_rx([buf_size] * (chains - outstanding), split=split)
            outstanding = chains
        dev.process_rx(0)  # the kick (and the tap readable)
        empty = drv.empty_returned
        new = drv.received()
        outstanding -= sum(VIRTIO_NET_HDR.unpack(h)[6] for h, _ in new) + drv.empty_returned - empty
        got += new
        if len(got) >= len(frames) and sent == len(frames):
            break
    host.settimeout(5)
    drv.outstanding = outstanding
    return got


@pytest.mark.parametrize("split, size", [(None, 2048), ([12, 500], 4096)], ids=["one-buffer", "three-buffers"])
def test_rx_mergeable_stream_of_long_frames(make_dev, mem, split, size):
    """Frames of every size, most longer than a 2048-byte chain, in a stream that keeps the ring
    busy: each arrives whole, in order, in the fewest chains (num_buffers).  The batch path reads
    such a stream a frame at a time across as many chains as a largest frame needs (RxPath.reading_long_frames);
    after RX_SHORT_RUN frames in a row that fit a chain, batches of one read per chain again."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    p = dev.pair_state(0)
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    sizes = [20000, 60, 65550, 1514, 9000, 65550, 100, size - 12, size - 11, 40000]
    frames = [frame_of(n, seed=i) for i in range(3) for n in sizes]
    got = pump_rx(drv, dev, frames, header, size, split=split)
    assert [f for _, f in got] == frames
    assert [VIRTIO_NET_HDR.unpack(h) for h, _ in got] == [
        VIRTIO_NET_HDR.unpack(header)[:6] + (-(-(NET_HDR_SIZE + len(f)) // size),) for f in frames
    ]
    stats = dev.stats()
    assert (stats.rx_frames, stats.rx_truncated, stats.rx_bad_chains) == (len(frames), 0, 0)
    assert stats.rx_bytes == sum(map(len, frames))
    if p.rx_path.batches:
        assert p.rx_path.reading_long_frames
    short = [frame_of(60 + i % 1400, seed=i) for i in range(RX_SHORT_RUN + 40)]
    got = pump_rx(drv, dev, short, hdr(), size, split=split)
    assert [f for _, f in got] == short
    assert all(VIRTIO_NET_HDR.unpack(h)[6] == 1 for h, _ in got)
    assert not p.rx_path.reading_long_frames
    assert not dev.tap.device_side_pending()


@pytest.mark.parametrize("make_dev", [True], ids=["batches"], indirect=True)  # (one chain at a time: PUBLISH_EVERY)
def test_rx_mergeable_long_frames_handed_over_while_more_are_read(make_dev, mem, monkeypatch):
    """Reading a run of long frames, the batch path hands over (used.idx) the chains of the frames
    it has read every RX_PUBLISH_CHAINS chains, not only at the end, with the interrupt a driver
    waiting on its used_event asked for: it refills those while the rest are read, so the next
    batch finds buffers instead of an empty ring to wait on."""
    dev = make_dev(queue_size=256)
    drv = Driver(mem, dev, size=256)
    assert drv.negotiate()
    p = dev.pair_state(0)
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    first = frame_of(65550, seed=0)
    drv.post_rx([2048] * 256)
    dev.tap.send(header + first)
    dev.process_rx(0)
    assert [f for _, f in drv.received()] == [first]  # (and now reading long frames)
    assert p.rx_path.batches and p.rx_path.reading_long_frames
    seen = []  # (used.idx, interrupts so far) as each read starts
    (batch_io,) = dev.tap.batch_ios
    real = batch_io.readv_at

    def readv_at(iov, count):
        seen.append((drv.rxq().used_idx, len(drv.interrupts)))
        return real(iov, count)

    monkeypatch.setattr(batch_io, "readv_at", readv_at)
    frames = [frame_of(20000 + 1000 * i, seed=i) for i in range(6)]  # 10-13 chains each: 69 in all
    dev.tap.host().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for f in frames:
        dev.tap.send(header + f)
    before = drv.rxq().used_idx
    drv.rxq().set_used_event(before)  # (an interrupt for the next used element)
    drv.interrupts.clear()
    dev.process_rx(0)
    got = drv.received()
    assert [f for _, f in got] == frames
    chains = [-(-(NET_HDR_SIZE + len(f)) // 2048) for f in frames]
    # the reads after the frames that filled RX_PUBLISH_CHAINS chains saw those frames' chains used
    handed = next(i for i in range(len(chains)) if sum(chains[: i + 1]) >= RX_PUBLISH_CHAINS) + 1
    assert seen[handed] == ((before + sum(chains[:handed])) & 0xFFFF, 1)
    assert seen[:handed] == [(before, 0)] * handed
    assert drv.rxq().used_idx == (before + sum(chains)) & 0xFFFF
    assert drv.interrupts == [dev.pair_state(0).rx]  # (used_event not moved since: no second one)


def test_rx_mergeable_small_buffers_without_guest_csum(make_dev, mem):
    """Without GUEST_CSUM (so without GUEST_TSO: frames up to 12 + 18 + mtu bytes) in 512-byte
    buffers every full-size frame spans chains; flags are cleared in each header (5.1.6.4.1)."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate(drop=[VIRTIO_NET_F_GUEST_CSUM, *GSO_FEATURES])
    frames = [frame_of(n, seed=i) for i in range(20) for n in (1514, 60, 1000, 511 - 12, 512 - 12)]
    got = pump_rx(drv, dev, frames, hdr(VIRTIO_NET_HDR_F_DATA_VALID), 512)
    assert [f for _, f in got] == frames
    assert [h for h, _ in got] == [hdr(0, 0, 0, 0, 0, 0, -(-(NET_HDR_SIZE + len(f)) // 512)) for f in frames]
    assert dev.stats().rx_truncated == 0


def test_rx_mergeable_frame_longer_than_the_largest_is_dropped(make_dev, mem):
    """A frame longer than the device said it takes (a host MTU above 64 KiB) does not fit the
    chains read for it: dropped and counted, the next frame arrives whole in those chains."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    header = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    first = [frame_of(30000, seed=1), frame_of(30000, seed=2)]  # (the batch path is reading long frames now)
    assert [f for _, f in pump_rx(drv, dev, first, header, 2048)] == first
    frames = [frame_of(MAX_BUFFER - NET_HDR_SIZE + 4100), frame_of(60, seed=3), frame_of(5000, seed=4)]
    got = pump_rx(drv, dev, frames, header, 2048)
    assert [f for _, f in got] == frames[1:]
    stats = dev.stats()
    assert (stats.rx_frames, stats.rx_truncated) == (4, 1)
    assert not dev.tap.device_side_pending()


def test_rx_mergeable_chains_of_tiny_buffers(make_dev, mem):
    """Indirect chains of 18 buffers of 16 bytes: room for a largest frame (12 + 65550 bytes) is
    4104 buffers, more than one readv takes (IOV_MAX): the device reads into the first 1023
    (16368 bytes); frames that fit them arrive whole, a longer one is dropped and counted."""
    dev = make_dev(queue_size=256)
    drv = Driver(mem, dev, size=256)
    assert drv.negotiate()
    p = dev.pair_state(0)
    frames = [frame_of(10000, seed=i) for i in range(6)]
    frames[3] = frame_of(16368 - 12 + 1, seed=3)  # (after the batch path took to long-frame reads)
    got = []
    used = 256
    for f in frames:
        drv.post_rx([288] * used, split=[16] * 17, indirect=True)  # the ring full again
        dev.tap.send(hdr() + f)
        dev.process_rx(0)
        new = drv.received()
        used = sum(VIRTIO_NET_HDR.unpack(h)[6] for h, _ in new)
        got += new
    assert [f for _, f in got] == frames[:3] + frames[4:]
    assert all(VIRTIO_NET_HDR.unpack(h)[6] == -(-10012 // 288) for h, _ in got)
    assert dev.stats().rx_truncated == 1
    assert p.rx_path.reading_long_frames == (p.rx_path.batches)


def test_rx_mergeable_waits_for_room_past_the_chains_it_has_seen(make_dev, mem):
    """After a long frame, the chains left hold less than a largest frame: nothing is read (the
    next frame might not fit), and the kick asked for is the driver's next post (avail_event at
    its avail.idx), whether the device took those chains (one by one) or left them in the ring
    (the batch path, reading long frames)."""
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    p = dev.pair_state(0)
    drv.post_rx([2048] * 40)
    frames = [frame_of(30000), frame_of(100, seed=1)]
    dev.tap.send(hdr() + frames[0])
    dev.process_rx(0)
    assert [f for _, f in drv.received()] == frames[:1]
    assert p.rx_path.reading_long_frames == (p.rx_path.batches)
    dev.tap.send(hdr() + frames[1])  # 25 chains of 2048 left: too few for 12 + 65550 bytes
    dev.process_rx(0)
    assert drv.received() == [] and dev.tap.device_side_pending()
    assert p.rx_waiting and not p.events & select.EPOLLIN
    assert drv.rxq().avail_event == 40
    drv.post_rx([2048] * 8)
    dev.process_rx(0)  # the kick
    assert [f for _, f in drv.received()] == frames[1:]

def test_rx_frame_bigger_than_a_chain_without_mergeable_buffers(make_dev, mem):
    dev = make_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate(drop=[VIRTIO_NET_F_MRG_RXBUF])
    (head,) = drv.post_rx([1526])
    dev.tap.send(hdr() + frame_of(3000))
    dev.tap.send(hdr() + frame_of(1514, seed=1))
    dev.process_rx(0)
    assert drv.rxq().used_entries() == [(head, 1526)]
    assert drv._chain_bytes(0, head, 1526)[12:] == frame_of(1514, seed=1)
    assert dev.stats().rx_truncated == 1


def test_rx_bad_chains_are_returned_empty(drv, dev):
    mq = drv.rxq()
    readable = mq.add_chain([Buf(drv.alloc(100), 100)])  # device-readable in a receiveq
    tiny = mq.add_chain([Buf(drv.alloc(8), 8, write=True)])  # no room for the header
    good, *_ = drv.post_rx([2048] * LARGEST_2048)
    dev.tap.send(hdr() + frame_of(60))
    dev.process_rx(0)
    assert mq.used_entries() == [(readable, 0), (tiny, 0), (good, 72)]
    assert dev.stats().rx_bad_chains == 2



def test_rx_bad_chains_while_reading_long_frames(drv, dev):
    """The same while the batch path reads long frames across chains: a bad chain ends what it
    reads that way, goes the one-chain way (returned empty, counted), and the frames go on."""
    p = dev.pair_state(0)
    mq = drv.rxq()
    drv.post_rx([2048] * LARGEST_2048)
    first = frame_of(30000)
    dev.tap.send(hdr() + first)
    dev.process_rx(0)
    assert [f for _, f in drv.received()] == [first]
    assert p.rx_path.reading_long_frames == (p.rx_path.batches)
    drv.post_rx([2048] * 8)  # with the 18 left: 26 chains, too few for a largest frame, then
    mq.add_chain([Buf(drv.alloc(100), 100)])  # a device-readable chain in a receiveq
    drv.post_rx([2048] * 20)
    frames = [frame_of(20000, seed=1), frame_of(9000, seed=2)]
    for f in frames:
        dev.tap.send(hdr() + f)
    dev.process_rx(0)
    assert [f for _, f in drv.received()] == frames
    assert drv.empty_returned == 1
    assert dev.stats().rx_bad_chains == 1 and dev.stats().rx_truncated == 0

def test_rx_on_a_broken_ring_needs_reset(drv, dev):
    drv.rxq().publish_avail(QUEUE_SIZE + 1)
    dev.tap.send(hdr() + frame_of(60))
    dev.process_rx(0)
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert not dev.pair_state(0).events & select.EPOLLIN  # and the tap is no longer watched


def test_tap_end_of_file_is_link_down(drv, dev):
    drv.post_rx([2048] * LARGEST_2048)
    dev.tap.host().close()
    dev.process_rx(0)
    assert not dev.link_up
    assert struct.unpack_from("<H", dev.config_bytes(), 6)[0] == 0
    assert CONFIG in drv.interrupts
    assert dev.pair_state(0).tap_gone


# -- control queue ---------------------------------------------------------------------------------------------


def test_ctrl_rx_and_mac_commands(drv, dev):
    assert drv.run_ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK
    assert dev.promisc is False
    assert drv.run_ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1") == VIRTIO_NET_OK
    assert dev.allmulti is True
    assert drv.run_ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLUNI, b"\1") == VIRTIO_NET_ERR  # CTRL_RX_EXTRA
    assert drv.run_ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0\0") == VIRTIO_NET_ERR
    uc = [bytes.fromhex("525400aaaaaa")]
    mc = [bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")]
    table = struct.pack("<I", 1) + b"".join(uc) + struct.pack("<I", 2) + b"".join(mc)
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table) == VIRTIO_NET_OK
    assert dev.mac_table == (uc, mc)
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table[:-1]) == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table + b"x") == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 1000)) == VIRTIO_NET_ERR
    assert dev.mac_table == (uc, mc)
    new_mac = bytes.fromhex("525400bbbbbb")
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, new_mac) == VIRTIO_NET_OK
    assert dev.mac == new_mac and dev.config_bytes()[:6] == new_mac
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, new_mac[:5]) == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_VLAN, 0, b"\1\0") == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_ANNOUNCE, 0) == VIRTIO_NET_ERR
    assert drv.run_ctrl(99, 0) == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\1\0") == VIRTIO_NET_ERR  # no MQ
    # the MAC set by the driver is forgotten on reset
    dev.set_status(0)
    assert dev.mac == MAC


def test_ctrl_malformed(drv, dev, mem):
    mq = drv.ctrlq()
    head, _ = drv.ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1", ack=False)  # no ack byte
    gpa = drv.alloc(2)
    short = mq.add_chain([Buf(gpa, 1), Buf(drv.alloc(1), 1, write=True)])  # no command byte
    dev.process_ctrl()
    assert mq.used_entries() == [(head, 0), (short, 1)]
    assert dev.promisc is True
    assert drv.interrupts == [2]


def test_ctrl_mq_pairs(make_dev, mem):
    dev = make_dev(queue_pairs=3)
    drv = Driver(mem, dev)
    assert drv.negotiate()
    assert dev.ctrl_index == 6
    assert dev.tap.enabled == [True, False, False]  # multiqueue starts off
    assert [dev.pair_state(k).enabled for k in range(3)] == [True, False, False]
    for pairs in (0, 4, 0x8000):
        assert drv.run_ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs)) == VIRTIO_NET_ERR
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\3") == VIRTIO_NET_ERR  # 1 byte
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == VIRTIO_NET_OK
    assert dev.active_pairs == 3 and dev.tap.enabled == [True] * 3
    assert all(dev.pair_state(k).events & select.EPOLLIN for k in range(3))
    assert drv.run_ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == VIRTIO_NET_OK
    assert dev.tap.enabled == [True, True, False]
    # a disabled pair reads nothing from its tap queue
    drv.post_rx([2048] * LARGEST_2048, pair=2)  # (enough to read, were it enabled)
    dev.tap.send(hdr() + frame_of(60), index=2)
    dev.process_rx(2)
    assert dev.tap.device_side_pending(2) and drv.rxq(2).used_entries() == []
    # an enabled one does
    drv.post_rx([2048] * LARGEST_2048, pair=1)
    dev.tap.send(hdr() + frame_of(60), index=1)
    dev.process_rx(1)
    assert [f for _, f in drv.received(1)] == [frame_of(60)]


def test_ctrl_queue_without_mq_is_queue_2(make_dev, mem):
    dev = make_dev(queue_pairs=2)
    drv = Driver(mem, dev)
    assert drv.negotiate(drop=[VIRTIO_NET_F_MQ])
    assert dev.ctrl_index == 2
    assert dev.tap.enabled == [True, False]  # the second tap queue gets nothing
    assert drv.run_ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == VIRTIO_NET_OK


# -- I/O threads ------------------------------------------------------------------------------------------------


def net_threads():
    return [t for t in threading.enumerate() if t.name.startswith("virtio-net-pair")]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_threads_end_to_end(make_dev, mem):
    dev = make_dev(io_threads=True)
    drv = Driver(mem, dev)
    assert drv.negotiate()
    assert len(net_threads()) == 1
    got = []

    # TX: the driver kicks, the frame comes out of the tap
    data = hdr() + frame_of(1000)
    drv.send(data)
    drv.kick(1)
    assert dev.tap.recv() == data
    assert wait_for(lambda: drv.txq().used_idx == 1)
    assert wait_for(lambda: 1 in drv.interrupts)

    # RX without buffers: frames wait in the tap, unread
    frames = [frame_of(300 + i, seed=i) for i in range(5)]
    for f in frames:
        dev.tap.send(hdr() + f)
    assert wait_for(lambda: dev.pair_state(0).rx_waiting)
    time.sleep(0.05)
    assert dev.tap.reads == 0 and drv.rxq().used_idx == 0
    # buffers and a kick: they arrive
    drv.post_rx([2048] * (len(frames) + 1 + LARGEST_2048))  # still room for a largest frame after 6
    drv.kick(0)
    assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] == 5)
    assert [f for _, f in got] == frames
    assert 0 in drv.interrupts
    # and later frames come as the tap gets them
    dev.tap.send(hdr() + frame_of(60))
    assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] == 6)

    # the control queue is served too
    head, ack = drv.ctrl(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    drv.kick(dev.ctrl_index)
    assert wait_for(lambda: drv.ctrlq().used_idx == 1)
    assert mem.read(ack, 1)[0] == VIRTIO_NET_OK

    dev.set_status(0)  # reset
    assert net_threads() == []
    assert not dev.active


def test_threads_tx_back_pressure(make_dev, mem):
    dev = make_dev(io_threads=True, tap=FakeTap(sndbuf=8192))
    drv = Driver(mem, dev, size=128)
    assert drv.negotiate()
    frames = [hdr() + frame_of(1000, seed=i) for i in range(100)]
    for f in frames:
        drv.send(f)
    drv.kick(1)
    got = []
    while len(got) < 100:
        got.append(dev.tap.recv())
        if len(got) % 10 == 0:
            time.sleep(0.005)  # a slow reader
    assert got == frames
    assert wait_for(lambda: drv.txq().used_idx == 100)
    assert dev.stats().tx_blocked >= 1


def test_threads_multiqueue(make_dev, mem):
    dev = make_dev(queue_pairs=2, io_threads=True)
    drv = Driver(mem, dev)
    assert drv.negotiate()
    assert len(net_threads()) == 2
    drv.ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2))
    drv.kick(4)
    assert wait_for(lambda: dev.active_pairs == 2 and dev.pair_state(1).enabled)
    for k in range(2):
        drv.post_rx([2048] * LARGEST_2048, pair=k)
        drv.kick(2 * k)
        data = hdr() + frame_of(100, seed=k)
        drv.send(data, pair=k)
        drv.kick(2 * k + 1)
        assert dev.tap.recv(k) == data
        dev.tap.send(hdr() + frame_of(200, seed=k), index=k)
    for k in range(2):
        got = []
        assert wait_for(lambda: (got.extend(drv.received(k)), len(got))[1] == 1)
        assert got[0][1] == frame_of(200, seed=k)
    assert wait_for(lambda: sorted(set(drv.interrupts)) == [0, 1, 2, 3, 4])


def test_reset_stops_the_threads_and_restarts(make_dev, mem):
    dev = make_dev(io_threads=True)
    drv = Driver(mem, dev)
    assert drv.negotiate()
    drv.post_rx([2048] * LARGEST_2048)
    drv.kick(0)
    dev.set_status(0)
    assert net_threads() == []
    dev.tap.send(hdr() + frame_of(60))
    time.sleep(0.05)
    assert dev.tap.device_side_pending()  # nobody reads after the reset
    drv = Driver(mem, dev)
    assert drv.negotiate()
    drv.post_rx([2048] * LARGEST_2048)
    drv.kick(0)
    got = []
    assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] == 1)
    dev.close()
    assert net_threads() == []
    assert dev.tap.closed


# -- the command line ----------------------------------------------------------------------------------------------


def test_parse_net_spec():
    assert parse_net_spec("tap=tap0") == NetSpec("tap0")
    assert parse_net_spec("tap=tap0,mac=52:54:00:12:34:56,queues=4") == NetSpec("tap0", MAC, 4)
    assert parse_net_spec(" TAP = vm1 , MAC=52-54-00-12-34-56") == NetSpec("vm1", MAC)
    assert parse_net_spec("tap=t,mtu=9000") == NetSpec("t", mtu=9000)
    assert parse_net_spec("tap=t,mtu=68").mtu == 68 and parse_net_spec("tap=t,mtu=65535").mtu == 65535


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not KEY=VALUE"),
        ("tap0", "not KEY=VALUE"),
        ("mac=52:54:00:12:34:56", "no tap=NAME"),
        ("tap=", "no tap=NAME"),
        ("tap=a-very-long-tap-name", "too long"),
        ("tap=a/b", "not a valid interface name"),
        ("tap=t,color=red", "unknown option 'color'"),
        ("tap=t,tap=u", "given twice"),
        ("tap=t,mac=52:54:00:12:34", "not six hex bytes"),
        ("tap=t,mac=52:54:00:12:34:zz", "not six hex bytes"),
        ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=t,mac=00:00:00:00:00:00", "all zeroes"),
        ("tap=t,queues=0", "queues='0' is not a number from 1 to 64"),
        ("tap=t,queues=65", "from 1 to 64"),
        ("tap=t,queues=two", "from 1 to 64"),
        ("tap=t,mtu=67", "mtu='67' is not a number from 68 to 65535"),
        ("tap=t,mtu=65536", "from 68 to 65535"),
        ("tap=t,mtu=", "from 68 to 65535"),
        ("tap=t,mtu=jumbo", "from 68 to 65535"),
    ],
)
def test_parse_net_spec_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_net_spec(text)


def test_default_mac():
    a = default_mac("tap0", "vm-a")
    assert a == default_mac("tap0", "vm-a")  # stable
    assert a[:3] == b"\x52\x54\x00"
    assert a[0] & 2 and not a[0] & 1  # locally administered, unicast
    assert parse_mac(format_mac(a)) == a
    assert len({default_mac(t, v) for t in ("tap0", "tap1") for v in ("vm-a", "vm-b", 0)}) == 6


# -- a real tap, in a namespace of the test's own -------------------------------------------------------------------


@pytest.fixture
def real_dev(netns, mem):
    made = []

    def make(*, queue_pairs=1, spec=None):
        spec = spec or NetSpec("pvt0", MAC, queue_pairs)
        with netns.entered():
            dev = build_net(mem, spec, vm_id="test")
        made.append(dev)
        netns.link_up(dev.tap.name)
        return dev

    yield make
    for dev in made:
        dev.close()


def test_from_spec_default_mac_and_close(real_dev, netns):
    dev = real_dev(spec=NetSpec("pvt0"))
    assert isinstance(dev.tap, Tap)
    assert dev.mac == default_mac("pvt0", "test")
    assert dev.tap.get_vnet_hdr_size() == 12
    dev.close()
    assert netns.ip("link", "show", "pvt0", check=False).returncode != 0


def test_mtu_is_offered_to_the_guest_and_set_on_the_tap(real_dev, netns, mem):
    """mtu= reaches both ends: the config space's mtu field and the tap's own MTU; a jumbo frame
    crosses both ways whole.  Without mtu= the tap is left as it was and 1500 is offered."""
    dev = real_dev(spec=NetSpec("pvt0", MAC, mtu=9000))
    assert dev.tap.mtu() == 9000
    assert struct.unpack_from("<H", dev.config_bytes(), 10)[0] == 9000
    drv = Driver(mem, dev)
    assert drv.negotiate()
    netns.link_up("pvt0")
    with netns.packet_socket("pvt0") as host:
        frame = eth_frame(payload(9000), dst=HOST_MAC, src=MAC)
        drv.send(hdr() + frame)
        drv.kick(1)
        assert recv_frames(host, 1) == [frame]  # the tap took a 9014-byte frame
        back = eth_frame(payload(9000, seed=7), dst=MAC, src=HOST_MAC)
        host.send(back)
        drv.post_rx([16384] * 4)
        drv.kick(0)
        got = []
        assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] == 1)
        assert [f for _, f in got] == [back]
    dev.close()
    plain = real_dev(spec=NetSpec("pvt1", MAC))
    assert plain.tap.mtu() == 1500 and struct.unpack_from("<H", plain.config_bytes(), 10)[0] == 1500


def test_mtu_the_tap_cannot_take_is_a_tap_error(netns, mem):
    """An MTU the kernel refuses for the tap (here above a tap's 65521 maximum): TapError, which
    the command line reports in one line, and no tap left open."""
    with netns.entered(), pytest.raises(TapError, match="cannot set its MTU to 65535"):
        build_net(mem, NetSpec("pvt0", MAC, mtu=65535), vm_id="test")
    assert netns.ip("link", "show", "pvt0", check=False).returncode != 0


def test_real_tap_end_to_end(real_dev, netns, mem):
    dev = real_dev()
    drv = Driver(mem, dev)
    assert drv.negotiate()
    with netns.packet_socket("pvt0") as host:
        # guest -> host
        frame = eth_frame(payload(1000), dst=HOST_MAC, src=MAC)
        drv.send(hdr() + frame, split=[12])
        drv.kick(1)
        assert recv_frames(host, 1) == [frame]
        assert wait_for(lambda: drv.txq().used_idx == 1)

        # host -> guest, with back-pressure first: no buffers, nothing read, nothing lost
        frames = [eth_frame(payload(200 + i, seed=i), dst=MAC, src=HOST_MAC) for i in range(5)]
        for f in frames:
            host.send(f)
        assert wait_for(lambda: dev.pair_state(0).rx_waiting)
        time.sleep(0.05)
        assert drv.rxq().used_idx == 0
        drv.post_rx([2048] * (len(frames) + LARGEST_2048))  # room for a largest frame up to the last
        drv.kick(0)
        got = []
        assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] == 5)
        assert [f for _, f in got] == frames

        # a nonsense gso_type: the kernel refuses it, the device counts it and goes on
        drv.send(hdr(0, 0x33) + frame)
        drv.send(hdr() + frame)
        drv.kick(1)
        assert recv_frames(host, 1) == [frame]
        assert wait_for(lambda: drv.txq().used_idx == 3)
        assert dev.stats().tx_errors == 1


@pytest.mark.parametrize("gso", [True, False], ids=["guest-tso", "no-guest-tso"])
def test_real_tap_gso_frames_reach_the_guest(real_dev, netns, mem, gso):
    """A 20000-byte TCP packet from the host side: whole, with its GSO header, across mergeable
    buffers when the driver accepted GUEST_TSO4 (TUNSETOFFLOAD); else segmented by the kernel."""
    dev = real_dev()
    drv = Driver(mem, dev, size=128)
    assert drv.negotiate(drop=() if gso else GSO_FEATURES)
    drv.post_rx([4096] * 100)
    drv.kick(0)
    with netns.packet_socket("pvt0", ETH_P_IP) as sender:
        sender.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        vhdr, frame = tcp_gso_frame(20000, 1400)
        frame = MAC + frame[6:]
        sender.send(vhdr + frame)
    got = []
    want = 1 if gso else 15
    assert wait_for(lambda: (got.extend(drv.received()), len(got))[1] >= want)
    time.sleep(0.05)
    got += drv.received()
    assert len(got) == want
    if gso:
        ((h, f),) = got
        flags, gso_type, _, gso_size, csum_start, csum_offset, num_buffers = VIRTIO_NET_HDR.unpack(h)
        assert (gso_type, gso_size) == (VIRTIO_NET_HDR_GSO_TCPV4, 1400)
        assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and (csum_start, csum_offset) == (34, 16)
        assert num_buffers == -(-(12 + len(frame)) // 4096)
        assert f == frame
    else:
        assert all(VIRTIO_NET_HDR.unpack(h)[1] == 0 and VIRTIO_NET_HDR.unpack(h)[6] == 1 for h, _ in got)
        assert b"".join(f[54:] for _, f in got) == frame[54:]


def test_counters_are_the_ring_paths_figures(drv, dev):
    """The management API's counters (VirtioDevice.counter_totals) of a NIC: frames and payload
    bytes from NetStats, the interrupts sent, NetStats itself as the detail."""
    frames = [hdr() + frame_of(100 + i, seed=i) for i in range(3)]
    for f in frames:
        drv.send(f)
    dev.process_tx(0)
    c = dev.counter_totals()
    assert (c["requests"], c["bytes"], c["errors"]) == (3, 303, 0)
    assert c["interrupts"] == len(drv.interrupts) == 1
    assert c["detail"]["tx_frames"] == 3 and c["detail"]["rx_frames"] == 0
