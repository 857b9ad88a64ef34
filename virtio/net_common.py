"""What virtio-net's device (virtio/net.py) and its ring paths (virtio/net_rx.py,
virtio/net_tx.py) share: frame sizes, the per-pair counters, and the context a path
reports through.  The configuration (vmm/config/net.py) takes its limits from here, so
checking a --net option loads no ring code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from .net_hdr import NET_HDR_SIZE
from .queue import ChainError, Queue

# The largest frame: a 64 KiB GSO packet with its link headers.  A driver without MRG_RXBUF that
# accepts GUEST_TSO*/UFO posts NET_HDR_SIZE + MAX_FRAME = 65562-byte buffers (5.1.6.3.1).
MAX_FRAME = 65550
ETH_ALEN = 6  # bytes in a MAC address
MAX_QUEUE_PAIRS = 64  # what a virtio-net device of ours offers at most
MIN_MTU = 68  # what IPv4 needs; the lowest mtu (5.1.4.1) a device of ours offers
MAX_MTU = 65535  # the config field is a le16
DEFAULT_MTU = 1500  # Ethernet's, and a new tap's
MAX_BUFFER = NET_HDR_SIZE + MAX_FRAME
# used.idx is written every this many chains within a batch, not only at its end: the driver can
# refill the ring while the device works through it, so a busy queue does not run dry and sleep.
PUBLISH_EVERY = 32


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


class PathContext(NamedTuple):
    """What a ring path reports through: the device's name and rate-limited log lines (what the
    guest did wrong; what the backend refused), its backend's name, and the device's handling of
    a chain the queue could not walk (VirtioDevice._on_chain_error)."""

    name: str
    backend: str
    guest_error: Callable[..., None]
    backend_error: Callable[..., None]
    chain_error: Callable[[Queue, ChainError], None]
