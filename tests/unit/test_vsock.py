"""virtio-vsock (virtio/vsock*.py, virtio/backends/vsock_unix.py): packets, credit, the device on mock
queues with its real I/O thread and real Unix sockets, hostile chains, and --vsock's syntax."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from tests.support.mockqueue import Buf
from tests.support.vsockdriver import LAYOUTS, GuestVsock
from virtio.backends.vsock_unix import ConnectLineError, UnixVsockBackend, parse_connect_line
from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_ID_VSOCK
from virtio.vsock import TX, VirtioVsock
from virtio.vsock_conn import BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, ESTABLISHED, Connection, CreditError
from virtio.vsock_packet import (MAX_PKT_PAYLOAD, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
                                 VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
                                 VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
                                 VIRTIO_VSOCK_SHUTDOWN_F_SEND, VIRTIO_VSOCK_SHUTDOWN_MASK,
                                 VIRTIO_VSOCK_TYPE_SEQPACKET, Header, PacketError, parse_tx, scatter, split_views)
from vmm.config import ConfigError, VmConfig, parse_vsock_spec
from vmm.memory import MiB, GuestMemory

CID = 3
RW, RST, SHUTDOWN = VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_SHUTDOWN


# -- packets ------------------------------------------------------------------------------------
def _views(data: bytes, lengths: list[int]) -> list[memoryview]:
    out, pos = [], 0
    for n in lengths:
        out.append(memoryview(bytearray(data[pos : pos + n])))
        pos += n
    return out


def _hdr(**kw) -> Header:
    values = dict(src_cid=CID, dst_cid=2, src_port=1, dst_port=2, len=0, type=1, op=RW, flags=0, buf_alloc=0,
                  fwd_cnt=0)
    values.update(kw)
    return Header(**values)


@pytest.mark.parametrize("lengths", [[44 + 100], [44, 100], [7, 30, 9, 1, 97], [1] * 144, [44 + 60, 40]])
def test_parse_tx_any_layout(lengths):
    payload = random.Random(1).randbytes(100)
    data = _hdr(len=100).pack() + payload
    hdr, views = parse_tx(_views(data, lengths), len(data), 0)
    assert hdr == _hdr(len=100)
    assert b"".join(bytes(v) for v in views) == payload


@pytest.mark.parametrize("make, error", [
    (lambda: (_views(_hdr().pack(), [44]), 44, 8), "device-writable"),
    (lambda: (_views(b"x" * 43, [43]), 43, 0), "shorter than"),
    (lambda: (_views(_hdr(len=10).pack() + b"x" * 9, [53]), 53, 0), "holds 9"),
    (lambda: (_views(_hdr(len=MAX_PKT_PAYLOAD + 1).pack(), [44]), 44, 0), "more than"),
    (lambda: (_views(_hdr(op=SHUTDOWN, len=4).pack() + b"abcd", [48]), 48, 0), "only RW"),
])
def test_parse_tx_refuses(make, error):
    with pytest.raises(PacketError, match=error):
        parse_tx(*make())


def test_parse_tx_ignores_bytes_past_a_control_packet():
    data = _hdr(op=SHUTDOWN, flags=3).pack() + b"junk"
    hdr, payload = parse_tx(_views(data, [48]), 48, 0)
    assert hdr.flags == 3 and payload == []


def test_split_and_scatter():
    views = _views(bytes(10), [3, 4, 3])
    head, tail = split_views(views, 5)
    assert [len(v) for v in head] == [3, 2] and [len(v) for v in tail] == [2, 3]
    scatter(views, b"abcdefg")
    assert b"".join(bytes(v) for v in views) == b"abcdefg\0\0\0"


def test_connect_line():
    assert parse_connect_line(b"CONNECT 52\n") == 52
    for bad in (b"CONNECT\n", b"connect 5\n", b"CONNECT -1\n", b"CONNECT 4294967296\n", b"CONNECT 1 2\n"):
        with pytest.raises(ConnectLineError):
            parse_connect_line(bad)


# -- credit -------------------------------------------------------------------------------------
def test_credit_accounting():
    conn = Connection(None, 5000, 1234, ESTABLISHED)
    conn.update_peer(_hdr(buf_alloc=1000, fwd_cnt=0))
    assert conn.peer_credit() == 1000
    conn.sent_to_guest(600)
    assert conn.peer_credit() == 400
    conn.update_peer(_hdr(buf_alloc=1000, fwd_cnt=600))
    assert conn.peer_credit() == 1000
    conn.update_peer(_hdr(buf_alloc=100, fwd_cnt=0))  # shrinks below what is in flight: nothing, not negative
    assert conn.peer_credit() == 0
    # our side: the guest may send BUF_ALLOC unforwarded bytes, no more
    conn.received(BUF_ALLOC)
    with pytest.raises(CreditError):
        conn.received(1)
    assert conn.credit_fields() == (BUF_ALLOC, 0)
    conn.forwarded(CREDIT_UPDATE_THRESHOLD // 2)
    assert conn.credit_update_due()  # the guest thinks it has no room; some was freed
    conn.credit_fields()
    assert not conn.credit_update_due()
    conn.received(CREDIT_UPDATE_THRESHOLD // 2)


def test_credit_counters_wrap():
    conn = Connection(None, 1, 2, ESTABLISHED)
    conn.tx_cnt = 0xFFFFFF00
    conn.update_peer(_hdr(buf_alloc=0x1000, fwd_cnt=0xFFFFFF00))
    conn.sent_to_guest(0x200)
    assert conn.tx_cnt == 0x100 and conn.peer_credit() == 0xE00
    conn.rx_cnt = conn.fwd_cnt = conn.last_fwd_cnt = 0xFFFFFFF0
    conn.received(0x100)
    assert conn.free_space() == BUF_ALLOC - 0x100


# -- the device ----------------------------------------------------------------------------------
@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


@pytest.fixture
def sockpath(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def dev(mem, sockpath):
    d = VirtioVsock(mem, UnixVsockBackend(sockpath), guest_cid=CID)
    yield d
    d.close()


def guest(mem, dev, layout="split", **kw) -> GuestVsock:
    return GuestVsock(mem, dev, cid=CID, layout=layout, **kw)


def host_listener(path: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{path}_{port}")
    s.listen(64)
    s.settimeout(5)
    return s


def host_connect(path: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def closed(s: socket.socket) -> bool:
    """The other end closed the stream (EOF, or a reset where it left bytes unread)."""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def guest_connects(g: GuestVsock, port: int, peer: int) -> None:
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=peer, dst_port=port)
    g.expect(lambda p: p.hdr.op == VIRTIO_VSOCK_OP_RESPONSE and p.hdr.dst_port == peer)


def host_connects(g: GuestVsock, path: str, port: int) -> tuple[socket.socket, int]:
    """A host program's CONNECT, accepted by the guest: (its stream, the host port)."""
    s = host_connect(path, port)
    req = g.expect(lambda p: p.hdr.op == VIRTIO_VSOCK_OP_REQUEST and p.hdr.dst_port == port)
    assert req.hdr.src_cid == 2 and req.hdr.dst_cid == CID and req.hdr.type == 1
    g.send(op=VIRTIO_VSOCK_OP_RESPONSE, src_port=port, dst_port=req.hdr.src_port)
    line = b""
    while not line.endswith(b"\n"):
        line += s.recv(1)
    assert line == f"OK {req.hdr.src_port}\n".encode()
    return s, req.hdr.src_port


def test_device_identity(dev):
    assert dev.device_id == VIRTIO_ID_VSOCK == 19
    assert dev.read_config(0, 8) == CID and len(dev.queues) == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_guest_to_host_stream(mem, dev, sockpath, layout):
    listener = host_listener(sockpath, 5000)
    g = guest(mem, dev, layout)
    guest_connects(g, 5000, 1234)
    conn, _ = listener.accept()
    data = random.Random(2).randbytes(300_000)  # more than BUF_ALLOC: needs the credit updates
    sent, credit_updates, fwd = 0, 0, 0
    got = bytearray()
    conn.settimeout(0.05)  # a round may have nothing in flight: the credit update waits in rx (poll below)
    deadline = time.monotonic() + 60
    while len(got) < len(data):
        assert time.monotonic() < deadline, f"stalled: {len(got)} of {len(data)} bytes at the host"
        # the device's fwd_cnt as last heard (kept: a round in which no packet came must not forget it,
        # or the guest thinks it has no credit, sends nothing, and recv below waits forever)
        fwd = max([fwd] + [p.hdr.fwd_cnt for p in g.received if p.hdr.dst_port == 1234])
        g.received.clear()
        while sent - fwd < BUF_ALLOC and sent < len(data):  # within the credit the device gave
            n = min(MAX_PKT_PAYLOAD, len(data) - sent, BUF_ALLOC - (sent - fwd))
            g.send(data[sent : sent + n], op=RW, src_port=1234, dst_port=5000)
            sent += n
        try:
            got += conn.recv(1 << 20)
        except TimeoutError:
            pass
        new = g.poll()
        credit_updates += sum(p.hdr.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE for p in new)
        g.received += new
    assert bytes(got) == data
    assert credit_updates >= 1
    # the guest shuts down both ways: the host reads EOF, the guest gets its RST
    g.send(op=SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_MASK, src_port=1234, dst_port=5000)
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 1234)
    conn.settimeout(5)
    assert conn.recv(10) == b""


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_to_guest_stream_within_credit(mem, dev, sockpath, layout):
    g = guest(mem, dev, layout, buf_alloc=8192)
    s, port = host_connects(g, sockpath, 6000)
    peer = 6000
    data = random.Random(3).randbytes(100_000)
    s.sendall(data[:20000])
    # without a credit update the device sends no more than the guest's 8192 bytes
    got = b""
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        for p in g.poll():
            assert p.hdr.op == RW and p.hdr.len == len(p.payload) and p.hdr.src_port == port
            got += p.payload
        g.received.clear()
    assert got == data[:8192]
    g.consume(peer, port, len(got))
    s.sendall(data[20000:])
    s.shutdown(socket.SHUT_WR)
    got += g.read_stream(peer, port, len(data) - len(got))
    assert got == data
    shut = g.expect(lambda p: p.hdr.dst_port == peer)
    assert shut.hdr.op == SHUTDOWN and shut.hdr.flags == VIRTIO_VSOCK_SHUTDOWN_F_SEND
    # the host can still read what the guest sends, then closes: the guest is reset
    g.send(b"bye", op=RW, src_port=peer, dst_port=port)
    assert s.recv(3) == b"bye"
    s.close()
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == peer)


def test_refused_connections(mem, dev, sockpath):
    g = guest(mem, dev)
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=1, dst_port=7777)  # nobody listens at PATH_7777
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 1 and p.hdr.src_port == 7777)
    s = host_connect(sockpath, 8000)  # the guest refuses: the host stream is closed, no OK
    req = g.expect(lambda p: p.hdr.op == VIRTIO_VSOCK_OP_REQUEST)
    g.send(op=RST, src_port=8000, dst_port=req.hdr.src_port)
    assert s.recv(10) == b""


def test_bad_connect_line_closes_the_stream(mem, dev, sockpath):
    guest(mem, dev)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sockpath)
    s.sendall(b"HELLO 5\n")
    assert s.recv(10) == b""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sockpath)
    s.sendall(b"CONNECT " + b"1" * 40)  # no end of line in sight
    assert closed(s)


def test_a_guest_that_never_reads_stalls_no_other(mem, dev, sockpath):
    g = guest(mem, dev, buf_alloc=4096)
    stuck, stuck_port = host_connects(g, sockpath, 100)
    stuck.setblocking(False)
    pushed = 0
    try:
        while True:
            pushed += stuck.send(bytes(65536))
    except BlockingIOError:
        pass
    live, live_port = host_connects(g, sockpath, 101)
    data = random.Random(4).randbytes(200_000)
    live.sendall(data)
    assert g.read_stream(101, live_port, len(data)) == data
    stuck_bytes = sum(len(p.payload) for p in g.received if p.hdr.dst_port == 100)
    assert stuck_bytes <= 4096 < pushed  # the stuck connection got its credit's worth, no more


def test_host_hang_up_resets_the_guest(mem, dev, sockpath):
    listener = host_listener(sockpath, 5001)
    g = guest(mem, dev)
    guest_connects(g, 5001, 42)
    conn, _ = listener.accept()
    conn.sendall(b"last words")
    conn.close()
    assert g.read_stream(42, 5001, 10) == b"last words"
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 42)
    g.send(b"too late", op=RW, src_port=42, dst_port=5001)  # the connection is gone: RST again
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 42)


def test_credit_request_and_many_connections(mem, dev, sockpath):
    listener = host_listener(sockpath, 5002)
    g = guest(mem, dev, rx_buffers=60)
    conns = []
    for peer in range(2000, 2040):
        guest_connects(g, 5002, peer)
        conns.append(listener.accept()[0])
    for i, peer in enumerate(range(2000, 2040)):
        g.send(f"conn {i}".encode(), op=RW, src_port=peer, dst_port=5002)
    for i, c in enumerate(conns):
        assert c.recv(100) == f"conn {i}".encode()
    g.send(op=VIRTIO_VSOCK_OP_CREDIT_REQUEST, src_port=2005, dst_port=5002)
    upd = g.expect(lambda p: p.hdr.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and p.hdr.dst_port == 2005)
    assert upd.hdr.buf_alloc == BUF_ALLOC and upd.hdr.fwd_cnt == len("conn 5")


# -- hostile guests -----------------------------------------------------------------------------
def test_hostile_packets_are_refused(mem, dev, sockpath):
    listener = host_listener(sockpath, 5003)
    g = guest(mem, dev)
    guest_connects(g, 5003, 9)
    conn, _ = listener.accept()
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=10, dst_port=5003, dst_cid=4)  # another VM: RST
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 10 and p.hdr.src_cid == 4)
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=11, dst_port=5003, type=VIRTIO_VSOCK_TYPE_SEQPACKET)
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 11 and p.hdr.type == VIRTIO_VSOCK_TYPE_SEQPACKET)
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=12, dst_port=5003, src_cid=77)  # spoofed: dropped
    g.send(op=99, src_port=13, dst_port=5003)  # unknown op, no connection: RST
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 13)
    g.send(b"x" * 100, op=RW, src_port=9, dst_port=5003, len=200)  # len beyond the chain: reset
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 9)
    assert conn.recv(10) == b""
    assert not any(p.hdr.dst_port == 12 for p in g.poll() + g.received)
    assert all(length == 0 for _, length in g.tx_used())
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_more_than_the_credit_resets(mem, dev, sockpath):
    listener = host_listener(sockpath, 5004)
    g = guest(mem, dev)
    guest_connects(g, 5004, 9)
    conn, _ = listener.accept()
    # The host reads nothing: once its socket is full the device holds up to BUF_ALLOC more, and the
    # guest, which ignores the credit it was given, sends more than that (the socket takes < 1 MiB).
    for _ in range((1 << 20) // MAX_PKT_PAYLOAD + BUF_ALLOC // MAX_PKT_PAYLOAD):
        g.send(bytes(MAX_PKT_PAYLOAD), op=RW, src_port=9, dst_port=5004)
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 9)
    assert sum(len(conn.recv(1 << 20)) for _ in range(8)) < (1 << 20) + BUF_ALLOC


def test_bad_chains(mem, dev):
    g = guest(mem, dev)
    mq = g.mqs[TX]
    w = Buf(mq.alloc(64), 64, write=True)
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=1, dst_port=2, extra=[w])  # a writable tx descriptor
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=1, dst_port=2, layout="joined", kick=False)
    mq.write_desc(mq.read_desc(0)[3], 1 << 40, 44)  # a buffer outside guest RAM (the last chain's head)
    g.kick(TX)
    used = g.tx_used()
    assert len(used) == 2 and all(n == 0 for _, n in used)
    g.post_rx([100], write=False)  # a device-readable rx buffer, then one too short for a header
    g.post_rx([20])
    g.send(op=VIRTIO_VSOCK_OP_REQUEST, src_port=3, dst_port=9)
    g.expect(lambda p: p.hdr.op == RST and p.hdr.dst_port == 3)
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    mq.publish_avail(mq.avail_idx + 1000)  # avail.idx far ahead: the ring is broken
    g.kick(TX)
    deadline = time.monotonic() + 5
    while not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.001)
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_transport_reset_event_after_a_restart(mem, dev, sockpath):
    listener = host_listener(sockpath, 5005)
    g = guest(mem, dev)
    time.sleep(0.05)
    assert g.poll_events() == []  # not on the first activation
    guest_connects(g, 5005, 9)
    conn, _ = listener.accept()
    g.restart()
    assert conn.recv(10) == b""  # the reset ended the connection
    deadline = time.monotonic() + 5
    while not (events := g.poll_events()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(events) == 1 and events[0][1] == 4
    head = events[0][0]
    assert mem.read(g.event_chains[head][0].addr, 4) == bytes(4)  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    guest_connects(g, 5005, 10)  # and it works again


# -- configuration --------------------------------------------------------------------------------
def test_vsock_spec():
    spec = parse_vsock_spec("cid=3,socket=/tmp/v.sock")
    assert (spec.cid, spec.socket) == (3, "/tmp/v.sock")
    assert VmConfig.from_dict({"vsock": "cid=42,socket=/x"}).vsock.cid == 42
    assert VmConfig.from_dict({"vsock": {"cid": 5, "socket": "/y"}}).vsock.socket == "/y"
    assert VmConfig.from_dict({}).vsock is None
    for bad in ("cid=2,socket=/x", "cid=4294967295,socket=/x", "socket=/x", "cid=3", "cid=x,socket=/x",
                "cid=3,socket=/x,port=1", "cid=3,socket=/" + "a" * 100):
        with pytest.raises(ConfigError, match="vsock"):
            VmConfig.from_dict({"vsock": bad})


def test_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    backend = UnixVsockBackend(path)
    with pytest.raises(OSError, match="listens"):
        UnixVsockBackend(path)
    backend.close()
    assert not os.path.exists(path)
