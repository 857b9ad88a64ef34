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

Batches (the fast path, virtio/net_batch.py): with a real tap each pair reads
and writes many frames per system call (io_uring), the chains walked together
in numpy; what is not of the usual shape goes the one-chain way below.

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

The command line describes a NIC as `tap=NAME[,mac=MAC][,queues=N][,rom=PATH|off]`
(rom: the PCI expansion ROM the machine puts behind the function's ROM BAR):
`parse_net_spec()` reads that, `VirtioNet.from_spec()` opens the tap and builds
the device.  Without mac=, `default_mac(tap, vm_id)` derives a stable, locally
administered 52:54:00:xx:xx:xx address from the tap name and an identifier of
the VM chosen by the caller (its name, say): the same VM on the same tap gets
the same address on every start, two VMs (or two taps) almost surely differ.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from vmm.memory import GuestMemory
from .backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    NetBackend,
    NetBatchIO,
    Tap,
    TapError,
    check_tap_name,
)
from .batch import IOV_MAX, BatchReader
from .device import VIRTIO_ID_NET, VirtioDevice
from .ratelimit import RateLimitedLog
from .net_batch import MORE, NO_BUFFERS, TAP_EMPTY, TX_BATCH_BUFFERS, NetBatches
from .net_hdr import NET_HDR_SIZE, NUM_BUFFERS_OFFSET
from .queue import ChainError, DescriptorChain, Queue, QueueError
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
ETH_ALEN = 6
MIN_MTU = 68  # what IPv4 needs; the spec's lower bound for the mtu field
MAX_MTU = 65535
# The largest frame: a 64 KiB GSO packet with its link headers.  A driver
# without MRG_RXBUF that accepts GUEST_TSO*/UFO posts NET_HDR_SIZE + MAX_FRAME
# = 65562-byte buffers (5.1.6.3.1).
MAX_FRAME = 65550
MAX_BUFFER = NET_HDR_SIZE + MAX_FRAME
MAX_QUEUE_PAIRS = 64
MAX_CTRL_BYTES = 1 << 20  # a control command bigger than this (a huge MAC table) is refused
# Frames per wake-up before going back to epoll (the other queue of the pair gets its turn).
RX_BATCH = 256
TX_BATCH = 256
# used.idx is written every this many chains within a batch, not only at its end: the driver can
# refill the ring while the device works through it, so a busy queue does not run dry and sleep.
PUBLISH_EVERY = 32

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

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


# -- the command line ------------------------------------------------------------------------

NET_SPEC_SYNTAX = "tap=NAME[,mac=MAC][,queues=N][,rom=PATH|off]"


@dataclass(frozen=True)
class NetSpec:
    """One NIC as the command line describes it."""

    tap: str
    mac: bytes | None = None  # None: default_mac(tap, vm_id)
    queues: int | None = None  # queue pairs; None: the machine's choice (1)
    rom: str | None = None  # expansion ROM image; None: the machine's default, "off": none


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` (or with '-') as 6 bytes; ValueError unless a unicast, non-zero address."""
    parts = text.strip().replace("-", ":").split(":")
    try:
        if len(parts) != ETH_ALEN or not all(1 <= len(p) <= 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address (the first byte is odd)")
    if mac == bytes(ETH_ALEN):
        raise ValueError(f"MAC address {text!r} is all zeroes")
    return mac


def default_mac(tap: str, vm_id: str | int = "") -> bytes:
    """A stable MAC for a NIC: 52:54:00 (locally administered, unicast) and 3 bytes of
    SHA-256 over the VM's identifier and the tap name.  The caller picks `vm_id` (the VM's
    name, or its index among the VMs it starts); equal inputs give equal addresses."""
    digest = hashlib.sha256(f"pyvmm-net\0{vm_id}\0{tap}".encode()).digest()
    return b"\x52\x54\x00" + digest[:3]


def parse_net_spec(text: str) -> NetSpec:
    """Parse `tap=NAME[,mac=MAC][,queues=N][,rom=PATH|off]`; ValueError says what is wrong."""
    values: dict[str, str] = {}
    for option in text.split(","):
        key, eq, value = option.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise ValueError(f"net {text!r}: {option!r} is not KEY=VALUE (expected {NET_SPEC_SYNTAX})")
        if key not in ("tap", "mac", "queues", "rom"):
            raise ValueError(f"net {text!r}: unknown option {key!r} (known: tap, mac, queues, rom)")
        if key in values:
            raise ValueError(f"net {text!r}: option {key!r} given twice")
        values[key] = value.strip()
    if not values.get("tap"):
        raise ValueError(f"net {text!r}: no tap=NAME (expected {NET_SPEC_SYNTAX})")
    try:
        check_tap_name(values["tap"])
    except TapError as err:
        raise ValueError(f"net {text!r}: {err}") from None
    mac = None
    if "mac" in values:
        try:
            mac = parse_mac(values["mac"])
        except ValueError as err:
            raise ValueError(f"net {text!r}: {err}") from None
    queues = None
    if "queues" in values:
        try:
            queues = int(values["queues"], 10)
        except ValueError:
            queues = 0
        if not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"net {text!r}: queues={values['queues']!r} is not a number from 1 to {MAX_QUEUE_PAIRS}")
    if "rom" in values and not values["rom"]:
        raise ValueError(f"net {text!r}: rom= needs a PATH (or off)")
    return NetSpec(tap=values["tap"], mac=mac, queues=queues, rom=values.get("rom"))


# -- the device ------------------------------------------------------------------------------


@dataclass
class NetStats:
    """Counters of one queue pair (or, from VirtioNet.stats(), of the device)."""

    rx_frames: int = 0
    rx_bytes: int = 0  # frame bytes, headers excluded
    rx_truncated: int = 0  # frames bigger than the buffers in hand: dropped
    rx_no_buffers: int = 0  # times RX stopped for want of buffers (back-pressure)
    rx_bad_chains: int = 0  # unusable RX chains, returned empty
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # malformed chains, not sent
    tx_errors: int = 0  # frames the tap refused (a bad header: EINVAL; link down: EIO)
    tx_blocked: int = 0  # times the tap was full (back-pressure)

    def add(self, other: "NetStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(eq=False)
class _Pair:
    """The state of queue pair `index`: receiveq 2*index, transmitq 2*index+1, tap queue `index`."""

    index: int
    fd: int  # the tap queue's fd
    send: Callable[[list[memoryview]], int]  # writev of one frame on it (NetBackend.writer)
    recv: Callable[[list[memoryview]], int]  # readv of one frame from it (NetBackend.reader)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ep: select.epoll = field(default_factory=select.epoll)  # watches fd alone; nested in the IoThread's
    events: int | None = None  # the interest registered in ep (None: not registered)
    enabled: bool = False  # within the driver's VQ_PAIRS_SET (the tap queue is attached)
    rx_waiting: bool = False  # no RX buffers: not reading the tap until the driver kicks the receiveq
    rx_kicks_on: bool = True  # whether the driver is asked to notify the receiveq
    tx_blocked: bool = False  # the tap was full: waiting for EPOLLOUT
    tap_gone: bool = False
    # RX chains held for frames to come, in ring order: (head, views, capacity, ring_descriptors);
    # without MRG_RXBUF each chain's views end with `scratch`, the byte readv reaches only when the
    # frame is longer than the chain.
    rx_buffers: deque = field(default_factory=deque)
    rx_capacity: int = 0  # their total bytes
    rx_descriptors: int = 0  # the descriptor-table entries they occupy
    # With MRG_RXBUF: the views of every held chain in order, then `scratch` (one readv's iovec).
    rx_iov: list = field(default_factory=list)
    scratch: memoryview = field(default_factory=lambda: memoryview(bytearray(1)))
    stats: NetStats = field(default_factory=NetStats)
    # The batch path (see "Batches" in the module's text): a BatchReader and an io_uring per queue,
    # or None where the pair goes one chain at a time.
    batch_io: NetBatchIO | None = None  # the backend's, for this queue
    tx_reader: BatchReader | None = None
    rx_reader: BatchReader | None = None
    rx_hint: int = 8  # how many reads the next RX batch submits (grows while the tap keeps up)
    # With MRG_RXBUF: a row of rx_need bytes per read of an RX batch, where the part of a frame
    # past its chain lands (at the chain's capacity into the row, so the row can hold the frame
    # whole), and the frames read but not yet handed over, in order, whole (header first).
    rx_spill: mmap.mmap | None = None
    rx_spill_addresses: np.ndarray | None = None
    rx_pending: deque = field(default_factory=deque)
    # With MRG_RXBUF, once frames longer than a chain come: each read spans the chains a largest
    # frame needs (_rx_merge_batch), until rx_short_run frames in a row have fitted one chain.
    rx_long: bool = False
    rx_short_run: int = 0
    rx_flat: np.ndarray | None = None  # its iovec array (struct iovec rows), as 64-bit words, its address
    rx_flat_words: memoryview | None = None
    rx_flat_address: int = 0
    # TX chains taken in a batch whose write found the tap full: (head, views), sent first next time
    tx_retry: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.rx_iov.append(self.scratch)
        self.scratch_array = np.frombuffer(self.scratch, dtype=np.uint8)
        self.scratch_iov = np.array([self.scratch_array.ctypes.data, 1], dtype=np.uint64)  # (struct iovec)

    def forget_rx_buffers(self) -> None:
        self.rx_buffers.clear()
        self.rx_pending.clear()
        self.rx_long = False
        del self.rx_iov[:-1]
        self.rx_capacity = self.rx_descriptors = 0
        self.tx_retry.clear()

    def close_batches(self) -> None:
        for name in ("tx_reader", "rx_reader", "batch_io"):
            thing = getattr(self, name)
            if thing is not None:
                thing.close()
                setattr(self, name, None)
        if self.rx_spill is not None:
            self.rx_pending.clear()  # (their views of the spill go first)
            self.rx_flat_words = self.rx_flat = None
            self.rx_spill_addresses = None
            self.rx_spill.close()
            self.rx_spill = None

    @property
    def rx(self) -> int:
        return 2 * self.index

    @property
    def tx(self) -> int:
        return 2 * self.index + 1


class VirtioNet(NetBatches, VirtioDevice):
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
        mtu: int = 1500,
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

        features = 0
        for bit in (
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
        ):
            features |= 1 << bit
        if queue_pairs > 1:
            features |= 1 << VIRTIO_NET_F_MQ
        super().__init__(mem, num_queues=2 * queue_pairs + 1, queue_size=queue_size, features=features)

        self._pairs: list[_Pair] = []
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

    @classmethod
    def from_spec(
        cls, mem: GuestMemory, spec: NetSpec, *, vm_id: str | int = "", queue_size: int = 256, mtu: int = 1500
    ) -> "VirtioNet":
        """Open the tap a NetSpec names and build its device (raises TapError, ValueError)."""
        queues = spec.queues or 1
        tap = Tap.open(spec.tap, queues=queues, vnet_hdr_size=NET_HDR_SIZE)
        try:
            return cls(
                mem, tap, mac=spec.mac or default_mac(tap.name, vm_id), queue_pairs=queues, queue_size=queue_size, mtu=mtu
            )
        except BaseException:
            tap.close()
            raise

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
        tap = self.tap
        self._pairs = [
            _Pair(k, tap.fileno(k), tap.writer(k), tap.reader(k)) for k in range(self.queue_pairs if mq else 1)
        ]
        if self.batches:
            for p in self._pairs:
                p.batch_io = tap.open_batch_io(p.index)
                if p.batch_io is not None:
                    self._open_batches(p)
        self.active_pairs = 1  # multiqueue starts disabled (5.1.6.5.5)
        for k in range(self.queue_pairs):
            self._enable_pair(k, k < self.active_pairs)
        if not self.io_threads:
            return
        for p in self._pairs:
            thread = IoThread(f"{self.name}-pair{p.index}")
            thread.add_eventfd(self.queue_events[p.rx], partial(self.process_rx, p.index))
            thread.add_eventfd(self.queue_events[p.tx], partial(self.process_tx, p.index))
            thread.add_fd(p.ep.fileno(), partial(self._tap_event, p.index))
            if p.index == 0 and self.ctrl_index is not None:
                thread.add_eventfd(self.queue_events[self.ctrl_index], self.process_ctrl)
            self._threads.append(thread)
            thread.start()

    def deactivate(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.stop()  # joins: nothing of this device runs after this
        pairs, self._pairs = self._pairs, []
        for p in pairs:
            self._past_stats.add(p.stats)
            p.ep.close()
            p.close_batches()
            p.forget_rx_buffers()  # the driver gets its buffers back by resetting the queues
        self.mac = self.default_mac
        self._reset_rx_mode()

    def close(self) -> None:
        super().close()
        self.tap.close()

    def stats(self) -> NetStats:
        total = NetStats()
        total.add(self._past_stats)
        for p in self._pairs:
            total.add(p.stats)
        return total

    def pair_state(self, index: int) -> _Pair:
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

    def _update_interest(self, p: _Pair) -> None:
        """Watch the tap fd for what the pair waits for now (call with p.lock held)."""
        want = 0
        if p.enabled and not p.rx_waiting and not self._queue_failed[p.rx]:
            want |= select.EPOLLIN
        if p.tx_blocked and not self._queue_failed[p.tx]:
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
                p.tx_blocked = False
                self._update_interest(p)
            self.process_tx(index)
        if events & select.EPOLLIN:
            self.process_rx(index)

    def _tap_lost(self, p: _Pair) -> None:
        """The tap went away under us (deleted by someone): link down for the driver."""
        with p.lock:
            self._mark_tap_gone(p)
        self._link_down()

    def _mark_tap_gone(self, p: _Pair) -> None:
        """Stop watching a queue of the tap that cannot be used any more (call with p.lock held)."""
        if not p.tap_gone:
            log.warning("%s: tap %s queue %d is gone: link down", self.name, self.tap.name, p.index)
            p.tap_gone = True
            self._update_interest(p)

    def _link_down(self) -> None:
        if self.link_up:
            self.link_up = False
            self.config_changed()  # VIRTIO_NET_S_LINK_UP is off: tell the driver

    # -- transmit -------------------------------------------------------------------------
    def process_tx(self, index: int) -> None:
        """Send every frame of transmitq `index` to the tap (on the pair's I/O thread).

        The hot loop of the device.  On the batch path: the available chains of the
        usual shape walked together (BatchReader), one writev each submitted to the
        kernel together (io_uring), their used elements written together.  A chain
        of another shape, or without the batch path: one pop_buffers() (the chain's
        memoryviews), one writev, one used element.  used.idx, the driver's
        notification flag and the interrupt once per batch.
        """
        if index >= len(self._pairs):
            return  # not active (a stale kick)
        p = self._pairs[index]
        qi = p.tx
        queue = self.queues[qi]
        pop, add_used, send = queue.pop_buffers, queue.add_used, p.send
        frames = nbytes = done = 0
        with p.lock:
            if p.tx_blocked or self._queue_failed[qi]:
                return
            first_used = queue.next_used
            try:
                queue.set_notification(False)
                if p.tx_retry:
                    frames, nbytes = self._tx_retry(p, queue)
                while done < TX_BATCH and not p.tx_blocked:
                    if p.tx_reader is not None:
                        batch = p.tx_reader.peek(
                            TX_BATCH - done,
                            writable=False,
                            min_length=NET_HDR_SIZE,
                            max_length=MAX_BUFFER,
                            max_buffers=TX_BATCH_BUFFERS,
                        )
                        if batch is None:
                            if queue.enable_notification():
                                queue.set_notification(False)
                                continue
                            break
                        if len(batch):
                            sent, sent_bytes = self._tx_batch(p, batch)
                            frames += sent
                            nbytes += sent_bytes
                            done += len(batch)
                            queue.publish_used()  # the driver may reuse these while we go on
                            continue
                        # the next chain is not of the usual shape: it goes alone, below
                    try:
                        chain = pop()
                    except ChainError as err:  # malformed, or with device-writable buffers
                        p.stats.tx_dropped += 1
                        self._on_chain_error(queue, err)
                        done += 1
                        continue
                    if chain is None:
                        if queue.enable_notification():
                            queue.set_notification(False)
                            continue
                        break
                    head, views, length, writable, _ = chain
                    if writable or not NET_HDR_SIZE <= length <= MAX_BUFFER or len(views) > IOV_MAX:
                        self._tx_drop(p, head, length, writable)
                    else:
                        try:
                            send(views)
                        except BlockingIOError:
                            queue.undo_pop()  # the tap is full: this chain goes first when it has room
                            self._tx_block(p)
                            break
                        except OSError as err:
                            self._tx_error(p, length, err)
                        else:
                            frames += 1
                            nbytes += length
                    add_used(head, 0)
                    done += 1
                    if not done % PUBLISH_EVERY:
                        queue.publish_used()  # the driver may reuse these while we go on
                else:
                    if done >= TX_BATCH:  # let the receiveq have the thread, and come back at once
                        os.eventfd_write(self.queue_events[qi], 1)
                if queue.next_used != first_used:
                    queue.publish_used()
            except QueueError as err:
                self.fail_queue(qi, err)
                self._update_interest(p)
                return
            finally:
                p.stats.tx_frames += frames
                p.stats.tx_bytes += nbytes - NET_HDR_SIZE * frames
        self.notify(qi)

    def _tx_block(self, p: _Pair) -> None:
        """The tap is full: wait for EPOLLOUT before sending more (call with p.lock held)."""
        if not p.tx_blocked:
            p.tx_blocked = True
            p.stats.tx_blocked += 1
            self._update_interest(p)

    def _tx_drop(self, p: _Pair, head: int, length: int, writable: bool) -> None:
        """A TX chain that is no frame: completed unsent."""
        p.stats.tx_dropped += 1
        if writable:
            self._guest_error("%s: TX chain %d has device-writable buffers: dropped", self.name, head)
        elif not NET_HDR_SIZE <= length <= MAX_BUFFER:
            self._guest_error(
                "%s: TX chain %d is %d bytes, not %d to %d: dropped", self.name, head, length, NET_HDR_SIZE, MAX_BUFFER
            )
        else:
            self._guest_error("%s: TX chain %d has more than %d buffers: dropped", self.name, head, IOV_MAX)

    def _tx_error(self, p: _Pair, length: int, err: OSError) -> None:
        """The tap refused a frame: EINVAL, the kernel did not like its header (a bad gso_type...);
        EIO, the host side is down.  Counted; the chain is completed all the same."""
        p.stats.tx_errors += 1
        self._tap_error("%s: tap %s refused a frame of %d bytes: %s", self.name, self.tap.name, length, err)

    # -- receive --------------------------------------------------------------------------
    def process_rx(self, index: int) -> None:
        """Move frames from the tap to receiveq `index` while there are buffers for them.

        Called when the tap is readable and when the driver kicks the receiveq
        (it posted buffers): on the pair's I/O thread, or by a test.
        """
        if index >= len(self._pairs):
            return
        p = self._pairs[index]
        qi = p.rx
        queue = self.queues[qi]
        with p.lock:
            if self._queue_failed[qi] or not p.enabled or p.tap_gone:
                return
            first_used = queue.next_used
            need = self._rx_need if self._mrg else 1
            try:
                frames = 0
                while frames < RX_BATCH:
                    if p.rx_pending:  # frames a batch read first (MRG_RXBUF), waiting for buffers
                        delivered, done = self._rx_deliver_pending(p, queue)
                        frames += delivered
                        if not done:
                            self._rx_wait_for_buffers(p)
                            break
                        continue
                    if p.rx_reader is not None and not p.rx_buffers:
                        take = self._rx_merge_batch if p.rx_long else self._rx_batch
                        got, state = take(p, queue, RX_BATCH - frames)  # (dropped frames count too)
                        if state == NO_BUFFERS:
                            self._rx_wait_for_buffers(p)
                            break
                        if p.rx_waiting:
                            p.rx_waiting = False
                            self._update_interest(p)
                        if got:
                            frames += got
                            queue.publish_used()
                        if state == TAP_EMPTY:
                            break
                        if state == MORE:
                            continue
                        # the next chain is not of the usual shape: one frame the one-chain way
                    if p.rx_capacity < need and not self._take_rx_buffers(p, queue):
                        self._rx_wait_for_buffers(p)
                        break
                    if p.rx_waiting:
                        p.rx_waiting = False
                        self._update_interest(p)
                    if not self._receive(p, queue):
                        break  # the tap is empty
                    frames += 1
                    if not frames % PUBLISH_EVERY:
                        queue.publish_used()
                if queue.next_used != first_used:
                    queue.publish_used()
            except QueueError as err:
                self.fail_queue(qi, err)
                self._update_interest(p)
                return
        if p.tap_gone:
            self._link_down()
        self.notify(qi)

    def _rx_wait_for_buffers(self, p: _Pair) -> None:
        """Back-pressure: no buffers, so leave the frames in the tap until the driver kicks."""
        if not p.rx_waiting:
            p.rx_waiting = True
            p.stats.rx_no_buffers += 1
            self._update_interest(p)

    def _pop_rx_chain(self, p: _Pair, queue: Queue, min_capacity: int = 1) -> tuple[int, list[memoryview], int, int] | None:
        """The next available RX chain of min_capacity+ device-writable bytes in under IOV_MAX
        buffers, as (head, views, capacity, ring descriptors); None when there is none (the
        driver is then asked for a kick, and the ring looked at once more: no lost kick).
        A malformed chain is counted and handled by _on_chain_error; one of the wrong shape is
        returned empty."""
        while True:
            try:
                chain = queue.pop_buffers()
            except ChainError as err:
                p.stats.rx_bad_chains += 1
                self._on_chain_error(queue, err)
                continue
            if chain is None:
                p.rx_kicks_on = True
                if queue.enable_notification():
                    continue
                return None
            head, views, capacity, writable, descriptors = chain
            if writable and capacity >= min_capacity and len(views) < IOV_MAX:
                return head, views, capacity, descriptors
            p.stats.rx_bad_chains += 1
            self._guest_error(
                "%s: RX chain %d is not %d+ device-writable bytes in under %d buffers: returned empty",
                self.name, head, min_capacity, IOV_MAX,
            )
            queue.add_used(head, 0)

    def _take_rx_buffers(self, p: _Pair, queue: Queue, need: int | None = None) -> bool:
        """Pop chains until a frame surely fits, or one of `need` bytes (or the ring is empty);
        False if there are none (with MRG_RXBUF: too few, and the driver can add more)."""
        mrg = self._mrg
        if need is None:
            need = self._rx_need if mrg else 1  # without MRG_RXBUF one chain takes any frame it can
        buffers = p.rx_buffers
        while p.rx_capacity < need:
            chain = self._pop_rx_chain(p, queue, NET_HDR_SIZE)
            if chain is None:
                break
            self._hold_rx_chain(p, *chain)
        else:
            if p.rx_kicks_on:  # enough in hand: the driver need not tell us about more
                queue.set_notification(False)
                p.rx_kicks_on = False
            return True
        # The ring ran dry first.  Reading now could take a frame too big for what we hold and
        # drop it: wait for the driver's kick instead (armed above) - unless we hold the whole
        # descriptor table, so the driver cannot give more (its choice: then the biggest frames
        # cannot fit, and are counted in rx_truncated).
        if mrg and p.rx_descriptors < queue.size:
            return False
        return bool(buffers)

    def _hold_rx_chain(self, p: _Pair, head: int, views: list[memoryview], capacity: int, descriptors: int) -> None:
        """Keep an RX chain for the frames to come (after those held already)."""
        if self._mrg:
            p.rx_iov[-1:-1] = views
        else:
            views.append(p.scratch)
        p.rx_buffers.append((head, views, capacity, descriptors))
        p.rx_capacity += capacity
        p.rx_descriptors += descriptors

    def _receive(self, p: _Pair, queue: Queue) -> bool:
        """Read one frame from the tap into the buffers in hand; False if the tap had none."""
        buffers = p.rx_buffers
        if not self._mrg:
            iov = buffers[0][1]
            capacity = buffers[0][2]
        elif len(p.rx_iov) <= IOV_MAX:
            iov = p.rx_iov
            capacity = p.rx_capacity
        else:  # more views held than one readv takes: the first chains, up to what a frame needs
            iov = []
            capacity = 0
            for _, views, cap, _ in buffers:
                if capacity and (capacity >= self._rx_need or len(iov) + len(views) >= IOV_MAX):
                    break
                iov += views
                capacity += cap
            iov.append(p.scratch)
        try:
            n = p.recv(iov)
        except BlockingIOError:
            return False
        except OSError as err:
            self._tap_error("%s: reading tap %s: %s", self.name, self.tap.name, err)
            return False
        if n == 0:  # end of file: not from a tap (a frame has its header), but a socket backend closed
            self._mark_tap_gone(p)
            return False
        if n > capacity or n < NET_HDR_SIZE:
            p.stats.rx_truncated += 1
            self._tap_error(
                "%s: a frame from tap %s did not fit the %d bytes of receive buffers in hand: dropped",
                self.name, self.tap.name, capacity,
            )
            return True
        self._rx_hand_over(p, queue, n)
        return True

    def _rx_hand_over(self, p: _Pair, queue: Queue, n: int) -> None:
        """The first `n` bytes of the chains held are a frame: the chains it filled are the
        driver's, each with the bytes it got, num_buffers in the header says how many."""
        buffers = p.rx_buffers
        head, views, cap, descriptors = buffers.popleft()
        first_views = views  # the header is in the first chain (it has NET_HDR_SIZE bytes or more)
        first = views[0]
        if n <= cap:  # one chain (always, without MRG_RXBUF)
            queue.add_used(head, n)
            count = 1
            p.rx_capacity -= cap
            p.rx_descriptors -= descriptors
            used_views = len(views)
        else:
            buffers.appendleft((head, views, cap, descriptors))
            count = used_views = 0
            remaining = n
            while remaining > 0:
                head, views, cap, descriptors = buffers.popleft()
                got = cap if cap < remaining else remaining
                queue.add_used(head, got)
                p.rx_capacity -= cap
                p.rx_descriptors -= descriptors
                used_views += len(views)
                remaining -= got
                count += 1
        if self._mrg:
            del p.rx_iov[:used_views]
        if len(first) >= NET_HDR_SIZE:  # the usual case: the whole header in the first buffer
            _U16.pack_into(first, NUM_BUFFERS_OFFSET, count)
            if not self._guest_csum:
                first[0] = 0
        else:
            _patch_header(first_views, count, None if self._guest_csum else 0)
        stats = p.stats
        stats.rx_frames += 1
        stats.rx_bytes += n - NET_HDR_SIZE

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
        if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and self.has_feature(VIRTIO_NET_F_MQ):
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
        if cls == VIRTIO_NET_CTRL_RX and self.has_feature(VIRTIO_NET_F_CTRL_RX):
            if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) or len(data) != 1:
                return VIRTIO_NET_ERR
            if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(data[0])
            else:
                self.allmulti = bool(data[0])
            return VIRTIO_NET_OK
        if cls == VIRTIO_NET_CTRL_MAC:
            if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and self.has_feature(VIRTIO_NET_F_CTRL_RX):
                tables = []
                pos = 0
                for _ in range(2):  # unicast, then multicast: le32 entries; u8 macs[entries][6]
                    if pos + 4 > len(data):
                        return VIRTIO_NET_ERR
                    (entries,) = _U32.unpack_from(data, pos)
                    end = pos + 4 + ETH_ALEN * entries
                    if end > len(data):
                        return VIRTIO_NET_ERR
                    tables.append([data[i : i + ETH_ALEN] for i in range(pos + 4, end, ETH_ALEN)])
                    pos = end
                if pos != len(data):
                    return VIRTIO_NET_ERR
                self.mac_table = (tables[0], tables[1])
                return VIRTIO_NET_OK
            if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR):
                if len(data) != ETH_ALEN:
                    return VIRTIO_NET_ERR
                self.mac = bytes(data)
                return VIRTIO_NET_OK
        self._guest_error("%s: control command class %d command %d is not supported", self.name, cls, cmd)
        return VIRTIO_NET_ERR


def _patch_header(views: list[memoryview], num_buffers: int, flags: int | None) -> None:
    """Write num_buffers (and, unless None, flags) into the header at the start of `views`."""
    first = views[0]
    if len(first) >= NET_HDR_SIZE:  # the usual case: the header is in one buffer
        _U16.pack_into(first, NUM_BUFFERS_OFFSET, num_buffers)
        if flags is not None:
            first[0] = flags
        return
    patches = [(NUM_BUFFERS_OFFSET, _U16.pack(num_buffers))]
    if flags is not None:
        patches.append((0, bytes([flags])))
    for offset, data in patches:
        pos = 0
        for view in views:
            for i, byte in enumerate(data):
                j = offset + i - pos
                if 0 <= j < len(view):
                    view[j] = byte
            pos += len(view)
            if pos >= offset + len(data):
                break
