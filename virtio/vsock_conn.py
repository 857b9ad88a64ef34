"""One virtio-vsock stream connection between the guest and a host Unix stream: its state and
its credit (OASIS virtio 1.2, 5.10.6.3, "Buffer Space Management").

Each side tells the other, in every packet header, how much it can buffer for the connection
(buf_alloc) and how many bytes it has consumed so far (fwd_cnt, free-running, 32 bits); a sender
may have at most buf_alloc - (bytes sent - peer's fwd_cnt) bytes in flight.

    guest -> host:  `rx_cnt` bytes came from the guest, `fwd_cnt` of them went on to the host
                    stream, the rest wait in `pending` (at most BUF_ALLOC: a guest that sends
                    more than its credit is reset).  The guest last heard of `last_fwd_cnt`.
    host -> guest:  `tx_cnt` bytes went to the guest, whose own counters are `peer_buf_alloc`
                    and `peer_fwd_cnt`; `peer_credit()` is what may still go.

The device (virtio/vsock.py) moves the bytes; this class only counts and decides.
"""

from __future__ import annotations

from .vsock_packet import VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE, VIRTIO_VSOCK_SHUTDOWN_F_SEND, Header

U32 = 0xFFFFFFFF
# What the device buffers per connection for the guest's bytes the host has not taken yet.
BUF_ALLOC = 256 << 10
# The guest hears of freed space once its idea of our free space falls below this.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 2

# states
CONNECTING = "connecting"  # host-initiated: REQUEST sent, the guest's RESPONSE awaited
ESTABLISHED = "established"
CLOSED = "closed"


class CreditError(Exception):
    """The guest sent more than the credit it was given."""


class Connection:
    def __init__(self, stream, local_port: int, peer_port: int, state: str):
        self.stream = stream  # the host side (virtio/backends/vsock_unix.HostStream)
        self.local_port = local_port  # the host's port number on the guest's side of the wire
        self.peer_port = peer_port  # the guest's
        self.state = state
        # guest -> host
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_cnt = 0
        self.pending = bytearray()
        # host -> guest
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        # shutdowns: what the guest said (VIRTIO_VSOCK_SHUTDOWN_F_*), what the host stream did
        self.peer_shutdown = 0
        self.host_eof = False  # the host will send no more (SHUTDOWN F_SEND told the guest)
        self.host_gone = False  # the host stream hung up: reset the guest once its data went
        self.host_write_shut = False  # shutdown(SHUT_WR) done on the host stream
        # device bookkeeping
        self.events = 0  # what the I/O thread watches the host stream for
        self.reading = False  # in the device's queue of connections with host data to move
        self.credit_update_queued = False

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # -- the guest's credit to us -------------------------------------------------------
    def update_peer(self, hdr: Header) -> None:
        """Every packet from the guest carries its buf_alloc and fwd_cnt."""
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt

    def peer_credit(self) -> int:
        """Bytes that may go to the guest now (0 when its counters claim nonsense)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def sent_to_guest(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32

    # -- our credit to the guest ----------------------------------------------------------
    def free_space(self) -> int:
        return BUF_ALLOC - ((self.rx_cnt - self.fwd_cnt) & U32)

    def received(self, n: int) -> None:
        """n payload bytes came from the guest; CreditError if that is more than it may send."""
        if n > self.free_space():
            raise CreditError(f"{n} bytes with {self.free_space()} bytes of credit")
        self.rx_cnt = (self.rx_cnt + n) & U32

    def forwarded(self, n: int) -> None:
        """n of the guest's bytes went to the host stream."""
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def credit_update_due(self) -> bool:
        """Has space been freed that the guest, running short by what it last heard, should hear of?"""
        guest_view = BUF_ALLOC - ((self.rx_cnt - self.last_fwd_cnt) & U32)
        return self.fwd_cnt != self.last_fwd_cnt and guest_view < CREDIT_UPDATE_THRESHOLD

    def credit_fields(self) -> tuple[int, int]:
        """(buf_alloc, fwd_cnt) for a header going to the guest, which then knows them."""
        self.last_fwd_cnt = self.fwd_cnt
        return BUF_ALLOC, self.fwd_cnt

    # -- shutdown -------------------------------------------------------------------------
    def guest_stops_sending(self) -> bool:
        return bool(self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND)

    def guest_stops_receiving(self) -> bool:
        return bool(self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)

    def wants_host_data(self) -> bool:
        """Should the host stream be read (for the guest) now?"""
        return (self.state == ESTABLISHED and not self.host_eof and not self.guest_stops_receiving()
                and self.peer_credit() > 0)

    def done(self) -> bool:
        """The guest shut both ways and every byte of its went to the host: time to reset."""
        return self.guest_stops_sending() and self.guest_stops_receiving() and not self.pending
