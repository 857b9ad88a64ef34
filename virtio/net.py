"""virtio-net: an Ethernet card on a tap device (OASIS virtio 1.2, section 5.1).

Queues (5.1.2): receiveq0, transmitq0, receiveq1, transmitq1, ..., and the
control queue last: index 2 * max_virtqueue_pairs when VIRTIO_NET_F_MQ is
negotiated, else index 2 (a driver without MQ uses one pair and the controlq).

Every frame, both ways, is preceded by the 12-byte `struct virtio_net_hdr`
(virtio/net_hdr.py: flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset, num_buffers).  The tap (virtio/backends/tap.py) is opened with IFF_VNET_HDR and a 12-byte vnet
header, so that header *is* the kernel's: TX chains go to the tap as they are
(os.writev of the chain's readable memoryviews), RX frames come from the tap
straight into the guest's buffers (os.readv into their writable memoryviews);
the device writes only num_buffers (and clears flags if the driver did not
accept VIRTIO_NET_F_GUEST_CSUM).  No frame is copied in Python.

Offloads: the host-side features the driver accepts (CSUM, HOST_TSO4/6/ECN)
need nothing of us - the kernel checks every header a write brings and rejects
a bad one (EINVAL: counted, the chain completed, the VM goes on).  The guest
side ones (GUEST_CSUM, GUEST_TSO4/6/ECN, GUEST_UFO) become TUNSETOFFLOAD flags at
DRIVER_OK: only then may the kernel hand us partially checksummed or 64 KiB
frames (`tun_offload_flags`).

TX (transmitq): each chain is one frame; `writev` to the tap; used length 0.
A chain with device-writable buffers, without a full header, or longer than
12 + 65550 bytes is completed unsent (a rate-limited log line).  When the tap
is full (EAGAIN) the chain is put back (`Queue.undo_pop`) and the pair waits
for EPOLLOUT on the tap fd before it looks at the queue again (no spinning; the
driver's notifications stay off meanwhile).  That is Cloud Hypervisor's
approach; Firecracker drops instead.

RX (receiveq): popped chains are *held* by the device until a frame fills them
(like Firecracker's pre-parsed RX buffers): nothing is read from the tap unless
the buffers for it are already in hand, so a frame is never read and then
dropped for want of guest buffers.
  * With VIRTIO_NET_F_MRG_RXBUF a frame may span several chains: chains are
    taken until they hold the largest frame the tap may deliver (12 + 65550
    bytes with GUEST_TSO*/UFO, else 12 + 18 + mtu) or the ring has no more,
    one readv fills them in order, the chains used are completed with the
    bytes each got, num_buffers in the first one's header says how many; the
    rest stay held for the next frame.
  * Without it each chain takes one frame whole (the driver posts 65562-byte
    buffers with GUEST_TSO*, else 1526-byte ones).
  * A frame longer than the buffers in hand (the driver posted fewer or smaller
    than it should, or the tap's MTU is above ours) is truncated by the kernel:
    readv has one scratch byte after the guest's buffers to tell, and such a
    frame is dropped and counted (`rx_truncated`); its buffers stay held.
  * Back-pressure: when the driver has posted no buffers, the pair stops
    polling the tap (no EPOLLIN interest) after re-enabling the RX queue's
    notifications; frames wait in the tap's queue (the kernel drops beyond its
    txqueuelen, as with any NIC), and the driver's next kick resumes reading.
    Cloud Hypervisor does the same.
  * Per wake-up: up to RX_BATCH frames, one used.idx update, one interrupt.

The shape (virtio/README.md): this module is the device - features, config
space, the control queue, the queue pairs with their threads, epoll interest and
interrupts.  Each pair has a TX path (virtio/net_tx.py: `TxPath.drain`) and an
RX path (virtio/net_rx.py: `RxPath.fill`) that own their state (held chains,
frames set aside, unsent chains, batch readers) and say how they stopped
(`TxOutcome`, `RxOutcome`).  The backend (virtio/backends/tap.py) owns the I/O:
one frame per readv / writev, and where it has them batches (io_uring on a tap)
over rows of struct iovec the paths build; what is not of the usual shape goes
one chain at a time.  The device never reads or writes a file descriptor.

Control queue (5.1.6.5): MQ VQ_PAIRS_SET (1..max pairs: the others are
detached from the tap with TUNSETQUEUE, so the kernel steers nothing to them),
RX PROMISC / ALLMULTI, MAC TABLE_SET, MAC ADDR_SET (acknowledged and
remembered: the tap hands us every frame and the guest's stack filters, so
they need not filter anything), anything else VIRTIO_NET_ERR.

Threads: `activate()` (DRIVER_OK) starts one IoThread per queue pair in use
(every pair with MQ, else pair 0), woken by the RX queue's eventfd, the TX
queue's eventfd, and the tap fd of that pair.  The tap fd is watched through a
small epoll of the pair's own (nested in the IoThread's), whose interest
changes with the state: EPOLLIN unless out of RX buffers, EPOLLOUT only while
TX is blocked.  The control queue is served on pair 0's thread.  A pair's work
runs under its lock (the control queue changes other pairs' state).
`deactivate()` (reset) stops and joins them; held RX chains are forgotten with
the queues.  `io_threads=False` leaves the threads out, for tests that call
process_rx / process_tx / process_ctrl themselves.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from dataclasses import asdict, dataclass, field
from functools import partial

from vmm.memory import GuestMemory
from .backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    NetBackend,
)
from .backends.tap_batch import NetBatchIO
from .device import VIRTIO_ID_NET, VirtioDevice
from .net_common import (DEFAULT_MTU, ETH_ALEN, MAX_BUFFER, MAX_FRAME, MAX_MTU, MAX_QUEUE_PAIRS, MIN_MTU, NetStats,
                         PathContext)
from .net_hdr import NET_HDR_SIZE
from .net_rx import RxOutcome, RxPath
from .net_tx import TxOutcome, TxPath
from .queue import DescriptorChain, QueueError
from .ratelimit import RateLimitedLog
from .worker import IoThread

log = logging.getLogger(__name__)

# Feature bits (5.1.3)
VIRTIO_NET_F_CSUM = 0  # the device handles packets with partial checksum (host side)
VIRTIO_NET_F_GUEST_CSUM = 1  # the driver handles packets with partial checksum
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

# struct virtio_net_config status (5.1.4)
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# Control queue (5.1.6.5): struct virtio_net_ctrl { u8 class; u8 command; u8 data[]; u8 ack; }
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1
VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5

# struct virtio_net_config, the fields of the features we offer:
#   0 mac[6]   6 status le16   8 max_virtqueue_pairs le16   10 mtu le16
VIRTIO_NET_CONFIG = struct.Struct("<6sHHH")
assert VIRTIO_NET_CONFIG.size == 12

ETH_HLEN = 14
VLAN_HLEN = 4
# (MAX_FRAME, the largest frame, and MAX_BUFFER, with its header: virtio/net_common.py)
MAX_CTRL_BYTES = 1 << 20  # a control command bigger than this (a huge MAC table) is refused
# Frames per wake-up before going back to epoll (the other queue of the pair gets its turn).
RX_BATCH = 256
TX_BATCH = 256

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

# What the device offers (VIRTIO_NET_F_MQ too, with more than one queue pair).
OFFERED_FEATURES = (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
)

# VIRTIO_NET_F_GUEST_* -> TUN_F_*; TUNSETOFFLOAD wants TSO/UFO only with CSUM and ECN only with TSO.
GUEST_GSO_FEATURES = (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6) | (1 << VIRTIO_NET_F_GUEST_UFO)

# 5.1.3.1: a feature the driver may accept only with another.  (feature, needs any of)
FEATURE_REQUIREMENTS = (
    (VIRTIO_NET_F_GUEST_TSO4, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_TSO6, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_ECN, (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)),
    (VIRTIO_NET_F_GUEST_UFO, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_HOST_TSO4, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_TSO6, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_ECN, (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6)),
    (VIRTIO_NET_F_HOST_UFO, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_CTRL_RX, (VIRTIO_NET_F_CTRL_VQ,)),
    (VIRTIO_NET_F_CTRL_VLAN, (VIRTIO_NET_F_CTRL_VQ,)),
    (VIRTIO_NET_F_GUEST_ANNOUNCE, (VIRTIO_NET_F_CTRL_VQ,)),
    (VIRTIO_NET_F_MQ, (VIRTIO_NET_F_CTRL_VQ,)),
    (VIRTIO_NET_F_CTRL_MAC_ADDR, (VIRTIO_NET_F_CTRL_VQ,)),
)


def tun_offload_flags(features: int) -> int:
    """The TUN_F_* offloads a driver that accepted `features` can take (TUNSETOFFLOAD's argument)."""

    def has(bit: int) -> bool:
        return bool(features >> bit & 1)

    if not has(VIRTIO_NET_F_GUEST_CSUM):
        return 0  # the kernel checksums and segments everything for us
    flags = TUN_F_CSUM
    if has(VIRTIO_NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if has(VIRTIO_NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if has(VIRTIO_NET_F_GUEST_ECN) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    if has(VIRTIO_NET_F_GUEST_UFO):
        flags |= TUN_F_UFO
    return flags


# -- the device ------------------------------------------------------------------------------


@dataclass(eq=False)
class QueuePair:
    """Queue pair `index`: receiveq 2*index and transmitq 2*index+1, their ring paths, and tap
    queue `index`, whose fd the pair watches (never reads or writes: the backend does)."""

    index: int
    fd: int  # the tap queue's fd, for epoll
    stats: NetStats = field(default_factory=NetStats)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ep: select.epoll = field(default_factory=select.epoll)  # watches fd alone; nested in the IoThread's
    events: int | None = None  # the interest registered in ep (None: not registered)
    enabled: bool = False  # within the driver's VQ_PAIRS_SET (the tap queue is attached)
    rx_waiting: bool = False  # no RX buffers: not reading the tap until the driver kicks the receiveq
    tap_gone: bool = False
    batch_io: NetBatchIO | None = None  # the backend's, for this queue (None: one frame per call)
    rx_path: RxPath | None = None
    tx_path: TxPath | None = None

    @property
    def rx(self) -> int:
        return 2 * self.index

    @property
    def tx(self) -> int:
        return 2 * self.index + 1

    def close(self) -> None:
        """Forget the paths' state (held RX chains, unsent TX chains: the driver gets its buffers
        back by resetting the queues) and the batch I/O."""
        self.ep.close()
        for thing in (self.rx_path, self.tx_path, self.batch_io):
            if thing is not None:
                thing.close()
        self.rx_path = self.tx_path = self.batch_io = None


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(
        self,
        mem: GuestMemory,
        tap: NetBackend,
        *,
        mac: bytes,
        queue_pairs: int = 1,
        queue_size: int = 256,
        mtu: int = DEFAULT_MTU,
        io_threads: bool = True,
        batches: bool = True,
    ):
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"virtio-net: {queue_pairs} queue pairs is not from 1 to {MAX_QUEUE_PAIRS}")
        if tap.queues != queue_pairs:
            raise ValueError(f"virtio-net: the tap has {tap.queues} queues for {queue_pairs} queue pairs")
        mac = bytes(mac)
        if len(mac) != ETH_ALEN or mac[0] & 1:
            raise ValueError(f"virtio-net: MAC {mac.hex(':')} is not a 6-byte unicast address")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"virtio-net: MTU {mtu} is not from {MIN_MTU} to {MAX_MTU}")
        self.tap = tap
        self.default_mac = mac
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.io_threads = io_threads
        self.batches = batches  # the batch path where the backend and the kernel allow it
        self.link_up = True

        features = sum(1 << bit for bit in OFFERED_FEATURES)
        if queue_pairs > 1:
            features |= 1 << VIRTIO_NET_F_MQ
        super().__init__(mem, num_queues=2 * queue_pairs + 1, queue_size=queue_size, features=features)

        self._pairs: list[QueuePair] = []
        self._threads: list[IoThread] = []
        self.ctrl_index: int | None = None
        self.active_pairs = 1
        self._mrg = False
        self._guest_csum = False
        self._rx_need = MAX_BUFFER
        self._ctrl_lock = threading.Lock()
        self._reset_rx_mode()
        self._past_stats = NetStats()
        self._guest_error = RateLimitedLog(log)
        self._tap_error = RateLimitedLog(log)

    def _reset_rx_mode(self) -> None:
        self.promisc = True  # what a device without VIRTIO_NET_F_CTRL_RX does
        self.allmulti = True
        self.mac_table: tuple[list[bytes], list[bytes]] = ([], [])

    # -- features and configuration space ---------------------------------------------
    def _features_acceptable(self) -> bool:
        if not super()._features_acceptable():
            return False
        for bit, needs in FEATURE_REQUIREMENTS:
            if self.has_feature(bit) and not any(self.has_feature(n) for n in needs):
                log.warning("%s: driver accepted feature %d without %s", self.name, bit, " or ".join(map(str, needs)))
                return False
        return True

    def config_bytes(self) -> bytes:
        return VIRTIO_NET_CONFIG.pack(
            self.mac, VIRTIO_NET_S_LINK_UP if self.link_up else 0, self.queue_pairs, self.mtu
        )

    # -- activation and threads -----------------------------------------------------------
    def activate(self) -> None:
        self._mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self._guest_csum = self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
        if self.driver_features & GUEST_GSO_FEATURES:
            self._rx_need = MAX_BUFFER
        else:
            self._rx_need = min(MAX_BUFFER, NET_HDR_SIZE + ETH_HLEN + VLAN_HLEN + self.mtu)
        mq = self.has_feature(VIRTIO_NET_F_MQ)
        if self.has_feature(VIRTIO_NET_F_CTRL_VQ):
            self.ctrl_index = 2 * self.queue_pairs if mq else 2
        else:
            self.ctrl_index = None
        offload = tun_offload_flags(self.driver_features)
        try:
            self.tap.set_offload(offload)
        except OSError as err:  # the kernel then checksums and segments for us: slower, not wrong
            log.warning("%s: tap %s: cannot set offloads %#x: %s", self.name, self.tap.name, offload, err)
        self._pairs = [self._open_pair(k) for k in range(self.queue_pairs if mq else 1)]
        self.active_pairs = 1  # multiqueue starts disabled (5.1.6.5.5)
        for k in range(self.queue_pairs):
            self._enable_pair(k, k < self.active_pairs)
        if not self.io_threads:
            return
        for p in self._pairs:
            thread = IoThread(f"{self.name}-pair{p.index}")
            self.watch_queue(thread, p.rx, partial(self.process_rx, p.index))
            self.watch_queue(thread, p.tx, partial(self.process_tx, p.index))
            thread.add_fd(p.ep.fileno(), partial(self._tap_event, p.index))
            if p.index == 0 and self.ctrl_index is not None:
                self.watch_queue(thread, self.ctrl_index, self.process_ctrl)
            self._threads.append(thread)
            thread.start()

    def _open_pair(self, index: int) -> QueuePair:
        """Queue pair `index` with its ring paths over tap queue `index` (and its batch I/O, where
        the tap has it and `batches` is on)."""
        tap = self.tap
        p = QueuePair(index, tap.fileno(index))
        if self.batches:
            p.batch_io = tap.open_batch_io(index)
        ctx = PathContext(self.name, tap.name, self._guest_error, self._tap_error, self._on_chain_error)
        p.tx_path = TxPath(self.queues[p.tx], tap.writer(index), p.batch_io, p.stats, ctx)
        p.rx_path = RxPath(self.queues[p.rx], tap.reader(index), p.batch_io, p.stats, ctx, mem=self.mem, mrg=self._mrg,
                           guest_csum=self._guest_csum, need=self._rx_need, notify=partial(self.publish_and_notify, p.rx))
        return p

    def deactivate(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.stop()  # joins: nothing of this device runs after this
        pairs, self._pairs = self._pairs, []
        for p in pairs:
            self._past_stats.add(p.stats)
            p.close()  # the driver gets its buffers back by resetting the queues
        self.mac = self.default_mac
        self._reset_rx_mode()

    def close(self) -> None:
        super().close()
        self.tap.close()

    def counter_totals(self) -> dict:
        """The common counters, requests, bytes and errors from the ring paths' NetStats (frames,
        payload bytes, frames dropped or refused), which `detail` gives in full."""
        out = super().counter_totals()
        s = self.stats()
        out["requests"] += s.rx_frames + s.tx_frames
        out["bytes"] += s.rx_bytes + s.tx_bytes
        out["errors"] += s.rx_truncated + s.rx_bad_chains + s.tx_dropped + s.tx_errors
        return out

    def counter_detail(self) -> dict:
        return asdict(self.stats())

    def stats(self) -> NetStats:
        total = NetStats()
        total.add(self._past_stats)
        for p in self._pairs:
            total.add(p.stats)
        return total

    def pair_state(self, index: int) -> QueuePair:
        """A pair's state (for tests and debugging)."""
        return self._pairs[index]

    def _enable_pair(self, index: int, enabled: bool) -> None:
        """Attach / detach tap queue `index` and (un)watch it; called with no pair lock held."""
        try:
            self.tap.set_queue_enabled(index, enabled)
        except OSError as err:
            log.warning("%s: %s", self.name, err)
        if index < len(self._pairs):
            p = self._pairs[index]
            with p.lock:
                p.enabled = enabled
                # a disabled pair ignores receiveq kicks: look for buffers again on the next frame
                p.rx_waiting = False
                self._update_interest(p)

    def _update_interest(self, p: QueuePair) -> None:
        """Watch the tap fd for what the pair waits for now (call with p.lock held)."""
        want = 0
        if p.enabled and not p.rx_waiting and not self._queue_failed[p.rx]:
            want |= select.EPOLLIN
        if p.tx_path.blocked and not self._queue_failed[p.tx]:
            want |= select.EPOLLOUT
        if p.tap_gone:
            if p.events is not None:
                p.ep.unregister(p.fd)  # EPOLLERR would be reported whatever the interest
                p.events = None
            return
        if p.events is None:
            p.ep.register(p.fd, want)
        elif want != p.events:
            p.ep.modify(p.fd, want)
        p.events = want

    def _tap_event(self, index: int) -> None:
        """The pair's tap fd is ready (on its I/O thread)."""
        p = self._pairs[index]
        events = 0
        for _, ev in p.ep.poll(0):
            events |= ev
        if events & (select.EPOLLERR | select.EPOLLHUP):
            self._tap_lost(p)
            return
        if events & select.EPOLLOUT:
            with p.lock:
                p.tx_path.unblock()
                self._update_interest(p)
            self.process_tx(index)
        if events & select.EPOLLIN:
            self.process_rx(index)

    def _tap_lost(self, p: QueuePair) -> None:
        """The tap went away under us (deleted by someone): link down for the driver."""
        with p.lock:
            self._mark_tap_gone(p)
        self._link_down()

    def _mark_tap_gone(self, p: QueuePair) -> None:
        """Stop watching a queue of the tap that cannot be used any more (call with p.lock held)."""
        if not p.tap_gone:
            log.warning("%s: tap %s queue %d is gone: link down", self.name, self.tap.name, p.index)
            p.tap_gone = True
            self._update_interest(p)

    def _link_down(self) -> None:
        if self.link_up:
            self.link_up = False
            self.config_changed()  # VIRTIO_NET_S_LINK_UP is off: tell the driver

    # -- transmit and receive --------------------------------------------------------------
    def process_tx(self, index: int) -> None:
        """Send the frames of transmitq `index` to the tap (on the pair's I/O thread, or a test's):
        up to TX_BATCH chains, then the receiveq gets the thread and this comes back at once.
        used.idx, the driver's notification flag and the interrupt once per batch (TxPath)."""
        if index >= len(self._pairs):
            return  # not active (a stale kick)
        p = self._pairs[index]
        qi = p.tx
        with p.lock:
            if p.tx_path.blocked or self._queue_failed[qi]:
                return
            try:
                outcome = p.tx_path.drain(TX_BATCH)
            except QueueError as err:
                self.fail_queue(qi, err)
                self._update_interest(p)
                return
            if outcome is TxOutcome.BLOCKED:  # the tap is full: wait for EPOLLOUT
                self._update_interest(p)
            elif outcome is TxOutcome.BUDGET_SPENT:  # let the receiveq have the thread, and come back
                os.eventfd_write(self.queue_events[qi], 1)
        self.notify(qi)

    def process_rx(self, index: int) -> None:
        """Move frames from the tap to receiveq `index` while there are buffers for them (RxPath):
        up to RX_BATCH per call, one used.idx update and one interrupt.

        Called when the tap is readable and when the driver kicks the receiveq
        (it posted buffers): on the pair's I/O thread, or by a test.
        """
        if index >= len(self._pairs):
            return
        p = self._pairs[index]
        qi = p.rx
        with p.lock:
            if self._queue_failed[qi] or not p.enabled or p.tap_gone:
                return
            try:
                outcome = p.rx_path.fill(RX_BATCH)
            except QueueError as err:
                self.fail_queue(qi, err)
                self._update_interest(p)
                return
            if p.rx_path.buffers_found and p.rx_waiting:
                p.rx_waiting = False
                self._update_interest(p)
            if outcome is RxOutcome.NO_BUFFERS:
                self._rx_wait_for_buffers(p)
            if p.rx_path.eof:
                self._mark_tap_gone(p)
        if p.tap_gone:
            self._link_down()
        self.notify(qi)

    def _rx_wait_for_buffers(self, p: QueuePair) -> None:
        """Back-pressure: no buffers, so leave the frames in the tap until the driver kicks."""
        if not p.rx_waiting:
            p.rx_waiting = True
            p.stats.rx_no_buffers += 1
            self._update_interest(p)

    # -- control queue ----------------------------------------------------------------------
    def process_ctrl(self) -> None:
        """Execute every command of the control queue (on pair 0's I/O thread)."""
        qi = self.ctrl_index
        if qi is None or self._queue_failed[qi]:
            return
        queue = self.queues[qi]
        with self._ctrl_lock:
            try:
                for chain in queue.drain(partial(self._on_chain_error, queue)):
                    queue.add_used(chain.head, self._ctrl_command(chain))
                queue.publish_used()
            except QueueError as err:
                self.fail_queue(qi, err)
                return
        self.notify(qi)

    def _ctrl_command(self, chain: DescriptorChain) -> int:
        """Run one command, write its ack byte; the used length."""
        if not chain.writable:
            self._guest_error("%s: control command %d has no ack byte", self.name, chain.head)
            return 0
        if not 2 <= chain.readable_len <= MAX_CTRL_BYTES:
            self._guest_error("%s: control command %d is %d bytes", self.name, chain.head, chain.readable_len)
            ack = VIRTIO_NET_ERR
        else:
            data = b"".join(chain.readable_views())
            ack = self._ctrl_execute(data[0], data[1], data[2:])
        gpa, _ = chain.writable[0]
        self.mem.write(gpa, bytes([ack]))
        return 1

    def _ctrl_execute(self, cls: int, cmd: int, data: bytes) -> int:
        """The ack of one command; one of a class or feature not negotiated is not supported."""
        handler = {
            VIRTIO_NET_CTRL_MQ: self._ctrl_mq,
            VIRTIO_NET_CTRL_RX: self._ctrl_rx,
            VIRTIO_NET_CTRL_MAC: self._ctrl_mac,
        }.get(cls)
        ack = handler(cmd, data) if handler is not None else None
        if ack is None:
            self._guest_error("%s: control command class %d command %d is not supported", self.name, cls, cmd)
            return VIRTIO_NET_ERR
        return ack

    def _ctrl_mq(self, cmd: int, data: bytes) -> int | None:
        if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET or not self.has_feature(VIRTIO_NET_F_MQ):
            return None
        if len(data) != 2:
            return VIRTIO_NET_ERR
        (pairs,) = _U16.unpack(data)
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.queue_pairs:
            self._guest_error("%s: VQ_PAIRS_SET %d is not from 1 to %d", self.name, pairs, self.queue_pairs)
            return VIRTIO_NET_ERR
        self.active_pairs = pairs
        for k in range(self.queue_pairs):
            self._enable_pair(k, k < pairs)
        return VIRTIO_NET_OK

    def _ctrl_rx(self, cmd: int, data: bytes) -> int | None:
        if not self.has_feature(VIRTIO_NET_F_CTRL_RX):
            return None
        if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) or len(data) != 1:
            return VIRTIO_NET_ERR
        if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
            self.promisc = bool(data[0])
        else:
            self.allmulti = bool(data[0])
        return VIRTIO_NET_OK

    def _ctrl_mac(self, cmd: int, data: bytes) -> int | None:
        if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and self.has_feature(VIRTIO_NET_F_CTRL_RX):
            tables = _parse_mac_tables(data)
            if tables is None:
                return VIRTIO_NET_ERR
            self.mac_table = tables
            return VIRTIO_NET_OK
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != ETH_ALEN:
                return VIRTIO_NET_ERR
            self.mac = bytes(data)
            return VIRTIO_NET_OK
        return None


def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """MAC TABLE_SET's data: unicast, then multicast, each le32 entries; u8 macs[entries][6].
    None unless exactly that."""
    tables = []
    pos = 0
    for _ in range(2):
        if pos + 4 > len(data):
            return None
        (entries,) = _U32.unpack_from(data, pos)
        end = pos + 4 + ETH_ALEN * entries
        if end > len(data):
            return None
        tables.append([data[i : i + ETH_ALEN] for i in range(pos + 4, end, ETH_ALEN)])
        pos = end
    if pos != len(data):
        return None
    return tables[0], tables[1]
