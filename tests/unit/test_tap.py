"""The tap backend (virtio/backends/tap.py) against real tap devices, each in a network namespace
of its own.

Every tap, every socket and every frame of these tests lives in a namespace the test creates
(`ip netns add pvt-XXXX`) and deletes at the end, failed or not.  The code that must run in the
namespace - opening /dev/net/tun, creating AF_PACKET sockets - runs on the test's thread after
setns(CLONE_NEWNET) into it (`NetNs.entered()`), which moves only that thread, and moves it back
at once: a tap and a socket belong for good to the namespace they were created in.  No address is
configured and no frame leaves the namespace.

Needs root, /dev/net/tun and `ip`; skipped plainly otherwise.  `netns` and `NetNs` are also used
by tests/unit/test_net.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from virtio.backends import tap as tapmod
from virtio.backends.tap_batch import IovecLoop
from virtio.backends.tap import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    Tap,
    TapError,
    check_tap_name,
)

REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental ethertype: nothing in the kernel answers it
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_VNET_HDR = 15

_libc = ctypes.CDLL(None, use_errno=True)

# What the host kernel offers here is what these check: they also run on Debian 12's 6.1 in the nested KVM.
pytestmark = pytest.mark.debian12


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_unavailable() -> str | None:
    """Why namespace tap tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and taps)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


class NetNs:
    """A network namespace of the test's own."""

    def __init__(self, name: str):
        self.name = name

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.name, *args], check=check, capture_output=True, text=True)

    def run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        """A command inside the namespace."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], **kwargs)

    @contextlib.contextmanager
    def entered(self):
        """Run the body with this thread in the namespace (and back out, whatever happens)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    yield self
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)

    def open_tap(self, name: str, **kwargs) -> Tap:
        with self.entered():
            return Tap.open(name, **kwargs)

    def packet_socket(self, ifname: str, protocol: int = ETH_P_ALL, *, timeout: float = 2.0) -> socket.socket:
        """An AF_PACKET raw socket bound to `ifname` (the host side of a tap) in the namespace."""
        with self.entered():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
        sock.bind((ifname, protocol))
        sock.settimeout(timeout)
        return sock

    def link_up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")


@pytest.fixture
def netns():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"pvt-{uuid.uuid4().hex[:10]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        ns = NetNs(name)
        ns.ip("link", "set", "lo", "up")
        # No IPv6 autoconfiguration noise (router solicitations, MLD) on the taps.
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", check=True)
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# -- frames ---------------------------------------------------------------------------------

GUEST_MAC = bytes.fromhex("525400000001")
HOST_MAC = bytes.fromhex("525400000002")
VNET_HDR = struct.Struct("<BBHHHHH")  # virtio 1.x: 12 bytes with num_buffers


def eth_frame(payload: bytes, dst: bytes = HOST_MAC, src: bytes = GUEST_MAC, ethertype: int = ETH_P_EXPERIMENTAL) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def recv_frames(sock: socket.socket, count: int, *, ethertype: int = ETH_P_EXPERIMENTAL, incoming_only: bool = True):
    """The next `count` frames of `ethertype` a packet socket sees (others are skipped)."""
    frames = []
    deadline = time.monotonic() + 5
    while len(frames) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data, addr = sock.recvfrom(1 << 17)
        if incoming_only and addr[2] == PACKET_OUTGOING:
            continue
        if len(data) >= 14 and struct.unpack_from("!H", data, 12)[0] == ethertype:
            frames.append(data)
    return frames


def wait_readable(fd: int, timeout: float = 5.0) -> bool:
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        return bool(ep.poll(timeout))
    finally:
        ep.close()


def read_tap_frames(tap: Tap, index: int = 0, *, size: int = 70000, ethertype: int | None = ETH_P_EXPERIMENTAL, timeout: float = 2.0):
    """Every frame (header, frame) tap queue `index` delivers within `timeout` after the first."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not wait_readable(tap.fileno(index), max(0.0, min(0.2, deadline - time.monotonic()))):
            if out:
                break
            continue
        while True:
            hdr, body = bytearray(12), bytearray(size)
            try:
                n = tap.readv(index, [hdr, body])
            except BlockingIOError:
                break
            frame = bytes(body[: n - 12])
            if ethertype is None or struct.unpack_from("!H", frame, 12)[0] == ethertype:
                out.append((bytes(hdr), frame))
    return out


def test_ioctl_numbers():
    """The numbers written out in tap.py are linux/if_tun.h's _IOW('T', nr, int) / _IOR(...)."""
    from vmm.kvm.ioctl import _IOR, _IOW

    T = ord("T")
    assert tapmod.TUNSETIFF == _IOW(T, 202, ctypes.c_int)
    assert tapmod.TUNSETPERSIST == _IOW(T, 203, ctypes.c_int)
    assert tapmod.TUNGETFEATURES == _IOR(T, 207, ctypes.c_uint)
    assert tapmod.TUNSETOFFLOAD == _IOW(T, 208, ctypes.c_uint)
    assert tapmod.TUNGETIFF == _IOR(T, 210, ctypes.c_uint)
    assert tapmod.TUNSETSNDBUF == _IOW(T, 212, ctypes.c_int)
    assert tapmod.TUNGETVNETHDRSZ == _IOR(T, 215, ctypes.c_int)
    assert tapmod.TUNSETVNETHDRSZ == _IOW(T, 216, ctypes.c_int)
    assert tapmod.TUNSETQUEUE == _IOW(T, 217, ctypes.c_int)
    assert tapmod.TUNSETVNETLE == _IOW(T, 220, ctypes.c_int)


# -- opening -----------------------------------------------------------------------------------


def test_create_by_name(netns):
    tap = netns.open_tap("pvt0")
    try:
        assert tap.name == "pvt0" and tap.queues == 1 and len(tap.fds) == 1
        flags = tap.flags()
        assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        assert not flags & IFF_MULTI_QUEUE
        assert tap.get_vnet_hdr_size() == 12
        assert os.get_blocking(tap.fileno()) is False
        link = netns.ip("-d", "link", "show", "pvt0").stdout
        assert "tun type tap" in link and "vnet_hdr" in link
        # it is in the test's namespace, not in the one the tests run in
        assert subprocess.run(["ip", "link", "show", "pvt0"], capture_output=True).returncode != 0
    finally:
        tap.close()
    assert netns.ip("link", "show", "pvt0", check=False).returncode != 0  # not persistent: gone with its fd


def test_name_pattern_gets_the_real_name(netns):
    with netns.open_tap("pvt%d") as tap:
        assert tap.name.startswith("pvt") and tap.name != "pvt%d"
        assert netns.ip("link", "show", tap.name).returncode == 0


def test_vnet_header_size_is_set(netns):
    with netns.open_tap("pvt0", vnet_hdr_size=16) as tap:
        assert tap.get_vnet_hdr_size() == 16
    with pytest.raises(TapError, match="below 10"):
        netns.open_tap("pvt0", vnet_hdr_size=8)


@pytest.mark.parametrize(
    "flags",
    [0, TUN_F_CSUM, TUN_F_CSUM | TUN_F_TSO4, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, TUN_F_CSUM | TUN_F_UFO],
)
def test_set_offload_accepted(netns, flags):
    with netns.open_tap("pvt0") as tap:
        tap.set_offload(flags)
        assert tap.offload == flags


def test_set_offload_rejects_what_the_kernel_rejects(netns):
    with netns.open_tap("pvt0") as tap:
        with pytest.raises(OSError) as info:
            tap.set_offload(TUN_F_TSO4)  # TSO without checksum offload
        assert info.value.errno == errno.EINVAL
        assert "TUNSETOFFLOAD" in str(info.value)


def test_second_open_is_held_by_another_process(netns):
    with netns.open_tap("pvt0"):
        with pytest.raises(TapError, match="pvt0 is held by another process"):
            netns.open_tap("pvt0")
    netns.open_tap("pvt0").close()  # free again once closed


@pytest.mark.parametrize(
    "name, message",
    [
        ("a" * 16, "too long"),
        ("", "empty"),
        ("a/b", "not a valid interface name"),
        ("a b", "not a valid interface name"),
        ("a:b", "not a valid interface name"),
        ("..", "not a valid interface name"),
    ],
)
def test_bad_name(name, message):
    with pytest.raises(TapError, match=message):
        check_tap_name(name)
    with pytest.raises(TapError, match=message):
        Tap.open(name)  # refused before /dev/net/tun is even opened


def test_an_interface_that_is_not_a_tap(netns):
    with pytest.raises(TapError, match="not a tap"):
        netns.open_tap("lo")


def test_bad_queue_count():
    with pytest.raises(TapError, match="queues"):
        Tap.open("pvt0", queues=0)
    with pytest.raises(TapError, match="queues"):
        Tap.open("pvt0", queues=257)


def test_missing_tun_device(monkeypatch):
    monkeypatch.setattr(tapmod, "TUN_DEVICE", "/nonexistent/net/tun")
    with pytest.raises(TapError, match="does not exist"):
        Tap.open("pvt0")


def test_no_permission_without_cap_net_admin(netns):
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    code = (
        "from virtio.backends.tap import Tap, TapError\n"
        "try:\n    Tap.open('pvt0')\nexcept TapError as e:\n    print(e)\n"
    )
    result = netns.run(
        "setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", sys.executable, "-c", code,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "no permission to create tap pvt0: need CAP_NET_ADMIN" in result.stdout


# -- frames through the tap ------------------------------------------------------------------


def test_writev_appears_on_the_host_side(netns):
    with netns.open_tap("pvt0") as tap:
        netns.link_up("pvt0")
        host = netns.packet_socket("pvt0")
        with host:
            payload = bytes(range(256)) * 4
            frame = eth_frame(payload)
            hdr = VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
            # header, Ethernet header and payload in separate buffers, as a driver's chain may be
            n = tap.writev(0, [memoryview(hdr), memoryview(frame[:14]), memoryview(frame[14:])])
            assert n == 12 + len(frame)
            assert recv_frames(host, 1) == [frame]


def test_host_frame_is_read_with_its_vnet_header(netns):
    with netns.open_tap("pvt0") as tap:
        netns.link_up("pvt0")
        host = netns.packet_socket("pvt0")
        with host:
            frame = eth_frame(b"hello from the host side".ljust(46, b"."), dst=GUEST_MAC, src=HOST_MAC)
            assert len(frame) == 60
            host.send(frame)
            assert wait_readable(tap.fileno())
            hdr = bytearray(b"\xaa" * 12)
            body = bytearray(2000)
            n = tap.readv(0, [hdr, body])
            assert n == 12 + len(frame)
            assert bytes(body[: len(frame)]) == frame
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", hdr)
            assert gso_type == 0 and gso_size == 0
            assert flags & ~2 == 0  # at most VIRTIO_NET_HDR_F_DATA_VALID
            # num_buffers is the reader's to write: older kernels skip it, newer ones zero it
            assert hdr[10:12] in (b"\xaa\xaa", b"\0\0")
            with pytest.raises(BlockingIOError):
                tap.readv(0, [hdr, body])


def test_a_frame_longer_than_the_buffers_is_cut(netns):
    """readv returns what fit, no more: a reader tells truncation by a byte after its buffers."""
    with netns.open_tap("pvt0") as tap:
        netns.link_up("pvt0")
        with netns.packet_socket("pvt0") as host:
            frame = eth_frame(bytes(200), dst=GUEST_MAC, src=HOST_MAC)
            host.send(frame)
            assert wait_readable(tap.fileno())
            hdr, body, scratch = bytearray(12), bytearray(100), bytearray(1)
            assert tap.readv(0, [hdr, body, scratch]) == 12 + 100 + 1
            assert bytes(body) == frame[:100]


def test_write_to_a_down_tap_is_eio(netns):
    with netns.open_tap("pvt0") as tap:
        frame = eth_frame(bytes(50))
        with pytest.raises(OSError) as info:
            tap.writev(0, [memoryview(bytes(12) + frame)])
        assert info.value.errno == errno.EIO


def test_kernel_rejects_a_bad_gso_type(netns):
    with netns.open_tap("pvt0") as tap:
        netns.link_up("pvt0")
        frame = eth_frame(bytes(100))
        with pytest.raises(OSError) as info:
            tap.writev(0, [memoryview(VNET_HDR.pack(0, 0x33, 0, 0, 0, 0, 0) + frame)])
        assert info.value.errno == errno.EINVAL
        tap.writev(0, [memoryview(bytes(12) + frame)])  # and the tap goes on


# -- offloads, seen on frames --------------------------------------------------------------------


def ipv4_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_gso_frame(payload_len: int, mss: int) -> tuple[bytes, bytes]:
    """A TCP/IPv4 frame of `payload_len` bytes as a GSO packet: (10-byte virtio_net_hdr, frame)."""
    src, dst = bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2])
    tcp_len = 20 + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - ipv4_checksum(ip)) + ip[12:]
    pseudo = ipv4_checksum(src + dst + struct.pack("!BBH", 0, 6, tcp_len))  # not complemented: partial
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    payload = bytes(i % 251 for i in range(payload_len))
    frame = eth_frame(ip + tcp + payload, dst=GUEST_MAC, src=HOST_MAC, ethertype=ETH_P_IP)
    # flags NEEDS_CSUM, gso_type TCPV4, hdr_len, gso_size, csum_start, csum_offset
    hdr = struct.pack("<BBHHHH", 1, 1, 14 + 20 + 20, mss, 14 + 20, 16)
    return hdr, frame


@pytest.mark.parametrize("offload", [True, False], ids=["tso-on", "tso-off"])
def test_offload_decides_whether_gso_frames_reach_the_reader_whole(netns, offload):
    """With TUN_F_CSUM|TUN_F_TSO4 the kernel hands a 20000-byte TCP packet over whole, with its GSO
    header; without, it segments it into MSS-sized frames first."""
    with netns.open_tap("pvt0") as tap:
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 if offload else 0)
        netns.link_up("pvt0")
        sender = netns.packet_socket("pvt0", ETH_P_IP)
        with sender:
            sender.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            hdr, frame = tcp_gso_frame(20000, 1400)
            sender.send(hdr + frame)
            frames = read_tap_frames(tap, ethertype=ETH_P_IP)
    if offload:
        assert len(frames) == 1
        vhdr, got = frames[0]
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = VNET_HDR.unpack(vhdr)
        assert gso_type == 1 and gso_size == 1400  # VIRTIO_NET_HDR_GSO_TCPV4
        assert flags & 1 and (csum_start, csum_offset) == (34, 16)  # NEEDS_CSUM
        assert got == frame
    else:
        assert len(frames) == 15  # ceil(20000 / 1400)
        assert all(VNET_HDR.unpack(h)[1] == 0 for h, _ in frames)
        assert sum(len(f) - 54 for _, f in frames) == 20000
        assert b"".join(f[54:] for _, f in frames) == frame[54:]


# -- multiqueue ------------------------------------------------------------------------------------


def test_multiqueue(netns):
    with netns.open_tap("pvt0", queues=2) as tap:
        assert tap.queues == 2 and len(set(tap.fds)) == 2
        assert tap.flags() & IFF_MULTI_QUEUE
        assert "multi_queue" in netns.ip("-d", "link", "show", "pvt0").stdout
        with pytest.raises(TapError, match="multi_queue"):
            netns.open_tap("pvt0")  # a single-queue open of a multiqueue tap
        netns.link_up("pvt0")
        with netns.packet_socket("pvt0") as host:
            # queue 1 detached: every frame goes to queue 0
            tap.set_queue_enabled(1, False)
            assert not tap.queue_enabled(1)
            frames = [eth_frame(bytes([i]) * 60, dst=GUEST_MAC, src=bytes([2, 0, 0, 0, i, 1])) for i in range(8)]
            for f in frames:
                host.send(f)
            got = read_tap_frames(tap, 0)
            assert [f for _, f in got] == frames
            with pytest.raises(BlockingIOError):
                tap.readv(1, [bytearray(100)])
            # attached again: the kernel spreads flows over both; none is lost
            tap.set_queue_enabled(1, True)
            for f in frames:
                host.send(f)
            time.sleep(0.2)
            got = read_tap_frames(tap, 0, timeout=0.5) + read_tap_frames(tap, 1, timeout=0.5)
            assert sorted(f for _, f in got) == sorted(frames)


def test_set_queue_enabled_is_a_no_op_on_a_single_queue_tap(netns):
    with netns.open_tap("pvt0") as tap:
        tap.set_queue_enabled(0, True)
        assert tap.queue_enabled(0)


# -- io_uring on a tap: what the running kernel accepts -----------------------------------------


def test_io_uring_probe_tells_whether_nowait_tap_io_works_and_moves_no_frame(netns):
    """IoUring.probe() (virtio-net's choice between io_uring batches and one frame per system call)
    agrees with what a real RWF_NOWAIT readv of the tap does on this kernel, and consumes nothing."""
    import numpy as np

    from vmm.io_uring import IORING_OP_READV, IORING_OP_WRITEV, IoUring

    with netns.open_tap("pvt0") as tap:
        netns.link_up("pvt0")
        host = netns.packet_socket("pvt0")
        reader, writer = IoUring(4), IoUring(4)
        with host:
            try:
                reader.prefill(IORING_OP_READV, tap.fileno())
                writer.prefill(IORING_OP_WRITEV, tap.fileno())
                frame = eth_frame(b"probe".ljust(46, b"."), dst=GUEST_MAC, src=HOST_MAC)
                host.send(frame)
                assert wait_readable(tap.fileno())
                read_probe, write_probe = reader.probe(), writer.probe()
                buf = bytearray(2048)
                iov = np.array([ctypes.addressof(ctypes.c_char.from_buffer(buf)), len(buf)], dtype=np.uint64)
                real = int(reader.submit_rw(np.array([iov.ctypes.data], dtype=np.uint64), np.ones(1, np.uint64))[0])
                if read_probe == -errno.EOPNOTSUPP:  # Debian 12's 6.1: no RWF_NOWAIT on a tap
                    assert real == -errno.EOPNOTSUPP and write_probe == -errno.EOPNOTSUPP
                    assert tap.readv(0, [bytearray(12), buf]) == 12 + len(frame)  # the frame was left there
                else:
                    assert read_probe in (0, -errno.EAGAIN) and write_probe == -errno.EINVAL
                    assert real == 12 + len(frame)  # the probe took nothing
                assert bytes(buf[12:12 + len(frame)] if real > 0 else buf[:len(frame)]) == frame
            finally:
                reader.close()
                writer.close()


# -- batch I/O (NetBatchIO): what virtio-net's ring paths call -----------------------------------


def _iov_rows(*rows):
    """Each row a list of buffers: (the iovec arrays, their addresses, their counts), kept alive together."""
    import numpy as np

    arrays = [np.array([[ctypes.addressof(ctypes.c_char.from_buffer(b)), len(b)] for b in bufs], dtype=np.uint64)
              for bufs in rows]
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.uint64)
    counts = np.array([len(a) for a in arrays], dtype=np.uint64)
    return arrays, addresses, counts


def test_iovec_loop_moves_a_frame_per_row_and_reports_errors_per_row():
    """IovecLoop (a backend without io_uring, a test's fake): one readv / writev per row, in
    order; -EAGAIN for an empty / full queue, -errno for a refusal, as io_uring reports them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.setblocking(False)
        refuse = []

        def writev(views):
            if refuse:
                raise OSError(refuse[0], os.strerror(refuse[0]))
            return os.writev(a.fileno(), views)

        loop = IovecLoop(lambda views: os.readv(a.fileno(), views), writev)
        frames = [bytearray(b"first frame"), bytearray(b"second"), bytearray(b"3")]
        pieces = [frames[0][:5], frames[0][5:]]  # (a frame in two buffers)
        keep, addresses, counts = _iov_rows(pieces, [frames[1]], [frames[2]])
        assert list(loop.write_batch(addresses, counts)) == [11, 6, 1]
        assert [b.recv(100) for _ in frames] == [bytes(f) for f in frames]
        refuse.append(errno.EINVAL)
        assert list(loop.write_batch(addresses[:1], counts[:1])) == [-errno.EINVAL]
        b.send(b"to the device")
        bufs = [bytearray(4), bytearray(20), bytearray(8)]
        keep, addresses, counts = _iov_rows(bufs[:2], bufs[2:])
        assert list(loop.read_batch(addresses, counts)) == [13, -errno.EAGAIN]
        assert bytes(bufs[0] + bufs[1][:9]) == b"to the device"
        b.send(b"again")
        assert loop.readv_at(int(addresses[1]), 1) == 5 and bytes(bufs[2][:5]) == b"again"
        assert loop.readv_at(int(addresses[1]), 1) == -errno.EAGAIN
        del keep


def test_tap_batch_io_moves_frames_or_says_once_why_not(netns, monkeypatch, caplog):
    """Tap.open_batch_io: io_uring batches where the kernel takes RWF_NOWAIT on a tap, else None
    (Linux 6.1); either way the path is said once per process."""
    import logging

    monkeypatch.setattr(tapmod, "_said_path", False)
    with netns.open_tap("pvt0") as tap, caplog.at_level(logging.INFO, logger=tapmod.__name__):
        netns.link_up("pvt0")
        host = netns.packet_socket("pvt0")
        with host:
            batch_io, again = tap.open_batch_io(0), tap.open_batch_io(0)
            said = [r.getMessage() for r in caplog.records if "I/O path" in r.getMessage()]
            assert len(said) == 1
            if batch_io is None:
                assert again is None and "io_uring batches unavailable" in said[0]
                return
            try:
                assert "io_uring batches" in said[0]
                frame = bytearray(eth_frame(b"batch".ljust(46, b".")))
                hdr = bytearray(VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0))
                keep, addresses, counts = _iov_rows([hdr, frame], [hdr, frame])
                assert list(batch_io.write_batch(addresses, counts)) == [12 + len(frame)] * 2
                assert recv_frames(host, 2) == [bytes(frame)] * 2
                incoming = eth_frame(b"to the guest".ljust(46, b"."), dst=GUEST_MAC, src=HOST_MAC)
                host.send(incoming)
                assert wait_readable(tap.fileno())
                bufs = [bytearray(12), bytearray(2000), bytearray(12), bytearray(2000)]
                keep, addresses, counts = _iov_rows(bufs[:2], bufs[2:])
                assert list(batch_io.read_batch(addresses, counts)) == [12 + len(incoming), -errno.EAGAIN]
                assert bytes(bufs[1][: len(incoming)]) == incoming
                assert batch_io.readv_at(int(addresses[0]), 2) == -errno.EAGAIN
                del keep
            finally:
                batch_io.close()
                again.close()
