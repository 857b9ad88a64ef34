"""virtio-vsock packets (OASIS virtio 1.2, section 5.10.6): the header, its checks, and buffers.

Every packet, on the rx queue (device to driver) or the tx queue (driver to device), is

    struct virtio_vsock_hdr {          le64 src_cid;  le64 dst_cid;  le32 src_port;  le32 dst_port;
                                        le32 len;      le16 type;     le16 op;        le32 flags;
                                        le32 buf_alloc;               le32 fwd_cnt; }     (44 bytes, packed)
    u8 payload[len];                   (VIRTIO_VSOCK_OP_RW only)

in any split across descriptors: Linux before 6.1.63 / 6.3 puts header and payload in one buffer,
later ones in two, and a driver may cut anywhere.  `split_views` cuts a list of memoryviews at a
byte offset, so the header is read from (or written to) wherever it lies and the payload is
moved straight between guest RAM and a host socket, never copied in Python.

`parse_tx` checks what the driver wrote and says what is wrong with it (a PacketError); whether
the packet then makes sense for a connection is the device's business (virtio/vsock.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# struct virtio_vsock_hdr (5.10.6)
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = VSOCK_HDR.size
assert HDR_SIZE == 44

# Well-known CIDs (5.10.4): the host is 2; a guest's is at least 3.
VMADDR_CID_HOST = 2
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE  # 32 bits of the 64 are used; -1 is VMADDR_CID_ANY

# type (5.10.6): a feature bit (VIRTIO_VSOCK_F_SEQPACKET) adds SEQPACKET, which this device does not offer.
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

# op (5.10.6)
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset(range(VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_CREDIT_REQUEST + 1))

# flags of VIRTIO_VSOCK_OP_SHUTDOWN (5.10.6.5)
VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE = 1
VIRTIO_VSOCK_SHUTDOWN_F_SEND = 2
VIRTIO_VSOCK_SHUTDOWN_MASK = VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND

# struct virtio_vsock_event (5.10.6.7)
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
VSOCK_EVENT = struct.Struct("<I")

# The largest payload this device takes in one tx packet: Linux sends at most 64 KiB
# (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a longer one is refused, which bounds a packet's work.
MAX_PKT_PAYLOAD = 64 << 10


class PacketError(Exception):
    """A tx packet the device cannot take.  `hdr` is its header when one could be read (the
    device may answer it with RST), None when the chain is too short to hold one."""

    def __init__(self, reason: str, hdr: "Header | None" = None):
        super().__init__(reason)
        self.hdr = hdr


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return VSOCK_HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                              self.op, self.flags, self.buf_alloc, self.fwd_cnt)


def split_views(views: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the views of bytes [0, at), those of bytes [at, end)) of the views' concatenation."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for v in views:
        n = len(v)
        if at >= n:
            head.append(v)
            at -= n
        elif at > 0:
            head.append(v[:at])
            tail.append(v[at:])
            at = 0
        else:
            tail.append(v)
    return head, tail


def limit_views(views: list[memoryview], length: int) -> list[memoryview]:
    """The views of the first `length` bytes of `views`."""
    return split_views(views, length)[0]


def scatter(views: list[memoryview], data: bytes) -> None:
    """Write `data` over the start of the views (they must hold at least len(data) bytes)."""
    pos = 0
    for v in views:
        if pos >= len(data):
            return
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n


def parse_tx(readable: list[memoryview], readable_len: int, writable_len: int) -> tuple[Header, list[memoryview]]:
    """A tx chain's header and its payload's views, or PacketError.

    The chain must be device-readable only (the tx queue carries nothing back), hold the
    header, and hold exactly `len` bytes after it for an RW packet (other ops carry none),
    `len` at most MAX_PKT_PAYLOAD.  Bytes past the packet are ignored only for ops without
    payload (a driver may reuse a larger buffer for a control packet)."""
    if writable_len:
        raise PacketError(f"a tx chain with {writable_len} device-writable bytes")
    if readable_len < HDR_SIZE:
        raise PacketError(f"a tx chain of {readable_len} bytes is shorter than the {HDR_SIZE}-byte header")
    raw, rest = split_views(readable, HDR_SIZE)
    hdr = Header(*VSOCK_HDR.unpack(b"".join(raw)))
    if hdr.op == VIRTIO_VSOCK_OP_RW:
        if hdr.len > MAX_PKT_PAYLOAD:
            raise PacketError(f"RW payload of {hdr.len} bytes, more than {MAX_PKT_PAYLOAD}", hdr)
        if hdr.len > readable_len - HDR_SIZE:
            raise PacketError(f"RW len {hdr.len} but the chain holds {readable_len - HDR_SIZE} after the header", hdr)
        return hdr, limit_views(rest, hdr.len)
    if hdr.len:
        raise PacketError(f"op {hdr.op} with len {hdr.len} (only RW carries a payload)", hdr)
    return hdr, []
