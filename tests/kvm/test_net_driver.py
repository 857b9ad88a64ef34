"""The driver guest's virtio-net ops (OP_NET_*) through real KVM.

Without a virtio-net device: NET_INIT ends with "no such device", the other net ops say what is
missing, and the blk ops beside them still work. With pyvmm's virtio-net (virtio/net.py), when
it is there: the driver runs against a tap inside a network namespace of the test's own (created
and deleted here; no traffic leaves it), the host side talking through a raw socket on the tap:
frames of every size both ways (60 and 1514 bytes, 64 KiB TSO whole or segmented), a 64 MiB
stream echoed by the guest with its sha256 kept, and a guest that stops taking frames while
the host floods the tap (the disk, the console and signals go on).
"""

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.support import driver as D
from vmm.config import VmConfig
from vmm.machine import Machine

pytestmark = pytest.mark.kvm
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return str(D.build_driver(tmp_path_factory.mktemp("driver")))


def machine(driver, tmp_path, **kw):
    return Machine(VmConfig(program=driver, console=f"file:{tmp_path / 'console.log'}", mem_size=256 * MiB,
                            **kw))


def test_net_init_without_a_device_ends_with_no_such_device(driver, tmp_path):
    m = machine(driver, tmp_path)
    try:
        job = D.run_driver(m, [D.net_init(offloads=True, mrg_rxbuf=True, mq=True)], timeout=30)
    finally:
        m.close()
    assert job.exit_code == 0 and job.message == "guest powered off"
    assert (job.status, job.cmds_done) == (D.R_NO_DEVICE, 1)
    assert job.cmds[0].result == D.R_NO_DEVICE
    assert "cmd 0 net-init dev 0: no such device" in job.console


def test_the_other_net_ops_without_a_device(driver, tmp_path):
    m = machine(driver, tmp_path)
    cmds = [D.net_tx(D.DATA_START, 60, cont=True), D.net_rx(1, cont=True), D.net_stop_rx(cont=True),
            D.net_bench_tx(10, 60, D.DATA_START, cont=True), D.net_ctrl(0, 0, cont=True),
            D.net_config(buffer=D.DATA_START, cont=True), D.net_status(cont=True), D.net_reset(cont=True),
            D.net_init(D.NET_MAX_DEVS, cont=True), D.Cmd(0x2F, aux=D.F_CONTINUE), D.report(1)]
    try:
        job = D.run_driver(m, cmds, timeout=30)
    finally:
        m.close()
    assert job.cmds_done == len(cmds)
    assert [c.result for c in job.cmds] == [D.R_NOT_READY] * 5 + [D.R_NO_DEVICE] * 3 + [
        D.R_BAD_ARG, D.R_BAD_OP, D.R_OK]
    assert "cmd 0 net-tx dev 0: device not ready" in job.console
    assert "net0: not initialised" in job.console


def test_blk_ops_still_work_beside_the_net_ops(driver, tmp_path):
    from vmm.config import DiskSpec

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4 * MiB))
    pattern = os.urandom(MiB)
    m = machine(driver, tmp_path, disks=[DiskSpec(str(disk))])
    try:
        m.mem.write(D.DATA_START, pattern)
        job = D.run_driver(m, [D.net_init(cont=True), D.blk_init(event_idx=True, indirect=True),
                               D.blk_write(8, MiB, D.DATA_START, depth=4, request_size=128 << 10),
                               D.blk_flush(), D.blk_read(8, MiB, D.DATA_START + 2 * MiB, depth=4,
                                                         request_size=64 << 10)], timeout=60)
        back = m.mem.read(D.DATA_START + 2 * MiB, MiB)
    finally:
        m.close()
    assert job.cmds_done == 5 and job.cmds[0].result == D.R_NO_DEVICE
    assert all(c.ok for c in job.cmds[1:]), job.describe()
    assert job.cmds[1].capacity == 4 * MiB // 512
    assert bytes(back) == pattern
    with open(disk, "rb") as f:
        f.seek(8 * 512)
        assert f.read(MiB) == pattern


# ---- against pyvmm's virtio-net, in a network namespace of our own ----------------------------
#
# Each scenario runs in a child process started with `ip netns exec NS`: the tap the device opens,
# the raw socket the host side uses and every frame stay inside NS, which the test deletes.

GUEST_MAC = bytes.fromhex("525400c0ffee")
HOST_MAC = bytes.fromhex("020000000001")
ETHERTYPE = 0x88B5          # IEEE local experimental: nothing in the namespace speaks it
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
RX_AREA = 0x10000000        # net records (256 MiB up; the machine has 512 MiB)
TX_BUF = 0xC000000


def have_net_device() -> bool:
    try:
        from virtio.net import VirtioNet  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def netns():
    if not have_net_device():
        pytest.skip("virtio/net.py (VirtioNet) is not there yet")
    if not shutil.which("ip") or os.geteuid() != 0 or not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        pytest.skip("needs root, iproute2 and /dev/net/tun for a namespace with a tap")
    name = f"pvtnd{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_in_netns(ns, driver, tmp_path, scenario, **args):
    """Run scenario `scenario` (a _sc_* function below) in a child inside the namespace; its
    JSON result. The child asserts; a failure shows its output and the guest's console."""
    params = json.dumps(dict(driver=driver, console=str(tmp_path / "console.log"), scenario=scenario, **args))
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.kvm.test_net_driver", params],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        console = (tmp_path / "console.log").read_text(errors="replace") if (tmp_path / "console.log").exists() else ""
        raise AssertionError(f"scenario {scenario} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                             f"console:\n{console[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the child's side --------------------------------------------------------------------------
class Peer:
    """Inside the namespace: the machine with one virtio-net on tap0, and a raw socket on tap0."""

    def __init__(self, p):

        from virtio.pci import VirtioPciDevice
        from vmm.config import NetSpec
        from vmm.virtio_devices import build_net

        self.p = p
        sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
        sh("ip", "link", "set", "lo", "up")
        for key in ("all", "default"):
            sh("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        from vmm.config import DiskSpec

        disks = [DiskSpec(p["disk"])] if p.get("disk") else []
        self.m = Machine(VmConfig(program=p["driver"], console=f"file:{p['console']}", mem_size=512 * MiB,
                                  cpus=2, disks=disks))
        self.net = build_net(self.m.mem, NetSpec(tap="tap0", mac=GUEST_MAC, queues=p.get("pairs", 1)),
                             queue_size=p.get("queue_size", 256))
        self.net.batches = p.get("batches", True)  # False: the one-chain path only
        self.m.pci.add_device(VirtioPciDevice(self.net, irq=self.m.irq, vm=self.m.vm))
        if p.get("txqueuelen"):
            sh("ip", "link", "set", "tap0", "txqueuelen", str(p["txqueuelen"]))
        sh("ip", "link", "set", "tap0", "up")
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        if p.get("vnet_hdr"):
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        if p.get("ignore_outgoing"):     # our own frames to the guest are not read back
            self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 * MiB)   # the frames wait for us
        self.sock.bind(("tap0", 0))
        self.sock.settimeout(10)
        self.threads = []

    def when_reported(self, value: int, fn) -> None:
        """Run fn in a thread of its own when the guest's OP_REPORT says `value`."""

        peer = self

        class Port:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, v):
                if v == value:
                    peer.threads.append(threading.Thread(target=fn))
                    peer.threads[-1].start()

        self.m.pio.register(D.REPORT_PORT, 4, Port())

    def on_reports(self, handlers: dict) -> None:
        """handlers: OP_REPORT value -> fn, each run on the vCPU thread when the guest reports it
        (the guest waits meanwhile; a handler that must not hold it up starts a thread)."""

        class Port:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, v):
                if v in handlers:
                    handlers[v]()

        self.m.pio.register(D.REPORT_PORT, 4, Port())

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, n: int, timeout: float = 10) -> list[bytes]:
        """The next n frames the guest sent (ours to it left out)."""

        out, end = [], time.monotonic() + timeout
        while len(out) < n:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = self.sock.recvfrom(1 << 17)
            except OSError:
                break
            if addr[2] != PACKET_OUTGOING:
                out.append(data)
        return out

    def run(self, cmds, **kw):
        if self.p.get("seccomp"):  # as pyvmm run does: the filter from the vCPUs' start (tests/kvm/test_seccomp.py)
            from vmm.cli import lock_down

            lock_down(self.p["seccomp"])
        return D.run_driver(self.m, cmds, timeout=kw.pop("timeout", 120), **kw)

    def close(self):
        for t in self.threads:
            t.join(30)
        self.sock.close()
        self.m.close()


def frame(i: int, length: int, dst: bytes = GUEST_MAC, src: bytes = HOST_MAC) -> bytes:
    """A test frame: our EtherType, the index, then a pattern that depends on both."""
    body = i.to_bytes(4, "big") + bytes((i * 7 + k) & 0xFF for k in range(length - 18))
    return dst + src + ETHERTYPE.to_bytes(2, "big") + body


def _sc_init(peer, p):
    job = peer.run([D.net_init(offloads=True, mrg_rxbuf=True, event_idx=True, indirect=True, ctrl_vq=True),
                    D.net_config(buffer=D.DATA_START), D.net_status()]).check()
    init, cfg, st = job.cmds
    assert init.mac == GUEST_MAC and cfg.value & 0xFFFFFFFFFFFF == int.from_bytes(GUEST_MAC, "little")
    assert init.link_status & D.VIRTIO_NET_S_LINK_UP
    assert init.device_status == 0x0F and st.value == 0x0F
    assert (init.pairs, init.max_pairs, init.mtu, init.queue_size, init.rx_buf_size) == (1, 1, 1500, 256, 2048)
    f = init.driver_features
    for bit in (D.VIRTIO_F_VERSION_1, D.VIRTIO_NET_F_MAC, D.VIRTIO_NET_F_STATUS, D.VIRTIO_NET_F_MTU,
                D.VIRTIO_NET_F_CSUM, D.VIRTIO_NET_F_GUEST_CSUM, D.VIRTIO_NET_F_HOST_TSO4, D.VIRTIO_NET_F_GUEST_TSO6,
                D.VIRTIO_NET_F_MRG_RXBUF, D.VIRTIO_NET_F_CTRL_VQ, D.VIRTIO_F_EVENT_IDX, D.VIRTIO_F_INDIRECT_DESC):
        assert f >> bit & 1, bit
    assert not f >> D.VIRTIO_NET_F_MQ & 1
    assert bytes(peer.m.mem.read(D.DATA_START, 12)) == GUEST_MAC + bytes([1, 0, 1, 0, 0xDC, 0x05])
    assert st.length == 256 and st.count == 0          # every RX buffer posted, none held
    return dict(features=f)


def _sc_tx(peer, p):
    length, n = p["length"], p["count"]
    template = frame(0, length, dst=HOST_MAC, src=GUEST_MAC)
    peer.m.mem.write(TX_BUF, template)
    cmds = [D.net_init(**p.get("init", {})),
            D.net_tx(TX_BUF, length, n, depth=p.get("depth", 8), seq_offset=14 + 2, first_seq=1000,
                     seg_size=p.get("seg_size"), split_hdr=p.get("split_hdr", False))]
    job = peer.run(cmds).check()
    got = peer.recv(n)
    assert len(got) == n, f"{len(got)} of {n} frames"
    for i, g in enumerate(got):
        assert g == D.seq_frame(template, i, 16, first_seq=1000), i
    tx = job.cmds[1]
    assert (tx.frames, tx.frame_bytes) == (n, n * length)
    return dict(cycles=tx.cycles)


def _sc_tx_list(peer, p):
    frames = [frame(i, 60 + (i * 97) % 1455, dst=HOST_MAC, src=GUEST_MAC) for i in range(50)]
    peer.m.mem.write(TX_BUF, D.pack_net_records(frames))
    job = peer.run([D.net_init(), D.net_tx_list(TX_BUF, len(frames), depth=4)]).check()
    assert peer.recv(len(frames)) == frames
    return dict(bytes=job.cmds[1].frame_bytes)


def _sc_rx(peer, p):
    sizes = p.get("sizes") or [60 + (i * 211) % (p.get("max_len", 1514) - 59) for i in range(p["count"])]
    frames = [frame(i, s) for i, s in enumerate(sizes)]
    for f in frames:                      # queued in the tap until the device reads them
        peer.send(f)
    job = peer.run([D.net_init(**p.get("init", {})),
                    D.net_rx(len(frames), RX_AREA, area_size=64 * MiB)]).check()
    rx = job.cmds[1]
    recs = D.read_net_records(peer.m.mem, RX_AREA, rx)
    assert [r.data for r in recs] == frames
    assert rx.frames == len(frames) and rx.frame_bytes == sum(sizes)
    for r in recs:
        assert r.hdr.num_buffers == 1 and r.nbufs == 1 and r.used_len == len(r.data) + 12 and r.queue == 0
    return dict(buffers=rx.aux, rx_buf_size=job.cmds[0].rx_buf_size)


def _sc_echo(peer, p):
    """Host -> guest -> host: the guest sends every frame back as it came; at most `window`
    frames in flight so that the tap's queue never overflows."""

    n, window = p["count"], 64
    frames = [frame(i, 60 + (i * 389) % 1455) for i in range(n)]
    got, errors = [], []

    def host():
        try:
            sent = 0
            while sent < min(window, n):
                peer.send(frames[sent])
                sent += 1
            while len(got) < n:
                more = peer.recv(1, timeout=30)
                if not more:
                    raise AssertionError(f"echo stalled after {len(got)} frames")
                got.extend(more)
                if sent < n:
                    peer.send(frames[sent])
                    sent += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=host)
    t.start()
    job = peer.run([D.net_init(**p.get("init", {})), D.net_rx(n, echo=True), D.net_status()])
    t.join(60)
    job.check()
    assert not errors, errors
    assert got == frames
    rx, st = job.cmds[1], job.cmds[2]
    assert rx.frames == n and rx.frame_bytes == sum(map(len, frames)) and rx.length == 0
    assert st.count == 0 and st.length == job.cmds[0].queue_size   # every buffer is back with the device
    return dict(cycles=rx.cycles)


def _sc_backpressure(peer, p):
    frames = [frame(i, 100 + i) for i in range(100)]
    for f in frames:
        peer.send(f)
    job = peer.run([D.net_init(rx_buffers=16), D.net_stop_rx(),
                    D.net_rx(16, RX_AREA), D.net_rx(buffer=RX_AREA + 16 * MiB, timeout_ok=True, timeout_ms=300),
                    D.net_status(), D.net_resume_rx(), D.net_rx(84, RX_AREA + 32 * MiB), D.net_status()]).check()
    init, stop, rx1, rx2, st1, resume, rx3, st2 = job.cmds
    assert stop.aux == 0 and rx1.frames == 16 and rx2.frames == 0 and rx2.length == 0
    assert (st1.count, st1.length) == (16, 0)            # 16 held, none posted
    assert resume.aux == 16 and rx3.frames == 84
    assert (st2.count, st2.length) == (0, 16)
    recs = D.read_net_records(peer.m.mem, RX_AREA, rx1) + D.read_net_records(peer.m.mem, RX_AREA + 32 * MiB, rx3)
    assert [r.data for r in recs] == frames
    return {}


def _tcp4(length: int, *, partial: bool, payload: bytes | None = None, seq: int = 1, dst_mac: bytes = HOST_MAC,
          src_mac: bytes = GUEST_MAC) -> bytes:
    """Ethernet + IPv4 + TCP (20 + 20 bytes), payload to `length` bytes (a pattern, or `payload`,
    which must be that long); the TCP checksum as NEEDS_CSUM wants it (the pseudo header's sum)
    when `partial`."""

    src, dst = bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1])
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, length - 14, 7, 0x4000, 64, 6, 0, src, dst))
    ip[10:12] = (~D.csum16(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    tcp = bytearray(struct.pack(">HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, 0x18, 65535, 0, 0))
    if payload is None:
        payload = bytes((k * 13) & 0xFF for k in range(length - 54))
    assert len(payload) == length - 54
    tlen = 20 + len(payload)
    pseudo = D.csum16(src + dst + struct.pack(">BBH", 0, 6, tlen))
    tcp[16:18] = (pseudo if partial else ~D.csum16(bytes(tcp) + payload, pseudo) & 0xFFFF).to_bytes(2, "big")
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + bytes(tcp) + payload


def _sc_offload_tx(peer, p):
    """What the guest's headers say reaches the kernel: a packet socket with PACKET_VNET_HDR
    shows the tap's skb (gso, partial checksum) as a virtio_net_hdr."""

    big, small = _tcp4(20054, partial=True), _tcp4(1054, partial=True)
    peer.m.mem.write(TX_BUF, big)
    peer.m.mem.write(TX_BUF + MiB, small)
    peer.run([D.net_init(csum=True, host_tso4=True),
                    D.net_tx(TX_BUF, len(big), 1, csum=(34, 16), gso=D.VIRTIO_NET_HDR_GSO_TCPV4, mss=1448, hdr_len=54),
                    D.net_tx(TX_BUF + MiB, len(small), 1, csum=(34, 16))]).check()
    got = peer.recv(2)
    assert len(got) == 2
    out = []
    for g, sent in zip(got, (big, small)):
        flags, gso, hdr_len, gso_size, cstart, coff = struct.unpack_from("<BBHHHH", g)
        assert g[10:] == sent
        out.append((flags, gso, gso_size, cstart, coff))
    assert out[0] == (D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
    assert out[1] == (D.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 16)
    return dict(headers=out)


def _sc_offload_rx(peer, p):
    """The kernel hands a 30000-byte TSO packet (partial checksum) to a guest that took
    GUEST_TSO4: one frame, its header saying so."""

    f = _tcp4(30054, partial=True)
    f = GUEST_MAC + HOST_MAC + f[12:]
    vh = struct.pack("<BBHHHH", D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    peer.when_reported(0x77, lambda: peer.send(vh + f))       # once the tap takes TSO packets
    job = peer.run([D.net_init(guest_csum=True, guest_tso4=True, **p.get("init", {})), D.report(0x77),
                    D.net_rx(1, RX_AREA, timeout_ms=5000)]).check()
    init, _, rx = job.cmds
    (r,) = D.read_net_records(peer.m.mem, RX_AREA, rx)
    assert r.data == f
    assert (r.hdr.flags & D.VIRTIO_NET_HDR_F_NEEDS_CSUM, r.hdr.gso_type, r.hdr.gso_size) == (
        D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, 1448)
    assert (r.hdr.csum_start, r.hdr.csum_offset) == (34, 16)
    assert r.hdr.num_buffers == r.nbufs == -(-(len(f) + 12) // init.rx_buf_size)
    return dict(rx_buf_size=init.rx_buf_size, nbufs=r.nbufs)


def _udp4(sport: int, payload: bytes, dst_mac: bytes, *, partial: bool = False) -> bytes:

    src, dst = bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1])
    ulen = 8 + len(payload)
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0x4000, 64, 17, 0, src, dst))
    ip[10:12] = (~D.csum16(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    udp = bytearray(struct.pack(">HHHH", sport, 5001, ulen, 0) + payload)
    pseudo = D.csum16(src + dst + struct.pack(">BBH", 0, 17, ulen))
    udp[6:8] = (pseudo if partial else (~D.csum16(bytes(udp), pseudo) & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
    return dst_mac + GUEST_MAC + b"\x08\x00" + bytes(ip) + bytes(udp)


def _sc_udp(peer, p):
    """Sequence-numbered UDP datagrams into a socket of the host: the kernel drops a datagram
    whose checksum is wrong, so every one arriving shows the guest kept it right (csum_fix),
    or left it to the device (NEEDS_CSUM). The control: without csum_fix none arrive."""

    subprocess.run(["ip", "addr", "add", "10.9.0.1/24", "dev", "tap0"], check=True)
    tap_mac = bytes.fromhex(open("/sys/class/net/tap0/address").read().strip().replace(":", ""))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * MiB)
    rx.bind(("10.9.0.1", 5001))
    rx.settimeout(5)
    n, plen = 300, 1000
    full = _udp4(7000, bytes(plen), tap_mac)
    part = _udp4(7001, bytes(plen), tap_mac, partial=True)
    peer.m.mem.write(TX_BUF, full)
    peer.m.mem.write(TX_BUF + 16 * MiB, part)
    peer.m.mem.write(TX_BUF + 32 * MiB, full)
    job = peer.run([D.net_init(csum=True),
                    D.net_tx(TX_BUF, len(full), n, depth=16, seq_offset=42, first_seq=1 << 20, csum_fix=40),
                    D.net_tx(TX_BUF + 16 * MiB, len(part), n, depth=16, seq_offset=42, first_seq=2 << 20,
                             csum=(34, 6)),
                    D.net_tx(TX_BUF + 32 * MiB, len(full), 10, seq_offset=42, first_seq=3 << 20)]).check()
    seqs = []
    while True:
        try:
            data = rx.recv(65536)
        except socket.timeout:
            break
        assert len(data) == plen and data[4:] == bytes(plen - 4)
        seqs.append(int.from_bytes(data[:4], "big"))
    rx.close()
    assert sorted(seqs) == [(1 << 20) + i for i in range(n)] + [(2 << 20) + i for i in range(n)], (
        len(seqs), seqs[:5])
    assert [c.frames for c in job.cmds[1:]] == [n, n, 10]
    return {}


def _sc_mq(peer, p):
    """Two queue pairs: VQ_PAIRS_SET on the control queue, TX on both pairs, RX from both,
    the control queue's MSI-X vector (0x40 + 2 * max pairs) and other control commands."""

    sent = [_udp4(1000 + i, i.to_bytes(4, "big") + bytes(60), GUEST_MAC) for i in range(200)]
    peer.when_reported(0x55, lambda: [peer.send(f) for f in sent])
    t0 = frame(0, 200, dst=HOST_MAC, src=GUEST_MAC)
    t1 = frame(1, 300, dst=HOST_MAC, src=GUEST_MAC)
    peer.m.mem.write(TX_BUF, t0)
    peer.m.mem.write(TX_BUF + MiB, t1)
    peer.m.mem.write(D.DATA_START, b"\x02\x00\x00\x00")      # le16 2, le16 0
    got, done = [], threading.Event()
    catcher = threading.Thread(target=lambda: (got.extend(peer.recv(100, timeout=60)), done.set()))
    catcher.start()
    job = peer.run([D.net_init(pairs=2, mq=True, event_idx=True), D.read_irr(),
                    D.net_tx(TX_BUF, len(t0), 50, depth=4, seq_offset=14, queue=0),
                    D.net_tx(TX_BUF + MiB, len(t1), 50, depth=4, seq_offset=14, queue=1), D.read_irr(),
                    D.report(0x55), D.net_rx(len(sent), RX_AREA, any_queue=True),
                    D.net_ctrl(D.VIRTIO_NET_CTRL_MQ, D.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, D.DATA_START, 2),
                    D.net_ctrl(D.VIRTIO_NET_CTRL_MQ, D.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, D.DATA_START + 2, 2),
                    D.net_ctrl(99, 0), D.net_init(pairs=2, cont=True)])
    catcher.join(60)
    assert job.cmds_done == len(job.cmds) and all(c.ok for c in job.cmds[:-1]), job.describe()
    init, irr0, _, _, irr1, _, rx, two, zero, bogus, no_mq = job.cmds
    assert (init.pairs, init.max_pairs) == (2, 2)
    assert irr0.value & 1 << 4                  # the control queue (4 = 2 * max pairs) answered
    assert irr1.value & (1 << 1 | 1 << 3) == 1 << 1 | 1 << 3   # both transmit queues
    assert no_mq.result == D.R_BAD_ARG          # two pairs without MQ
    assert (two.aux, zero.aux, bogus.aux) == (D.VIRTIO_NET_OK, D.VIRTIO_NET_ERR, D.VIRTIO_NET_ERR)
    assert two.value == 1                       # the used length: the ack byte
    assert sorted(got) == sorted([D.seq_frame(t0, i, 14) for i in range(50)] + [D.seq_frame(t1, i, 14)
                                                                                  for i in range(50)])
    recs = D.read_net_records(peer.m.mem, RX_AREA, rx)
    assert sorted(r.data for r in recs) == sorted(sent)
    queues = [r.queue for r in recs]
    for q in (0, 1):     # each queue in the order sent
        mine = [struct.unpack_from(">I", r.data, 42)[0] for r in recs if r.queue == q]
        assert mine == sorted(mine)
    return dict(per_queue=[queues.count(0), queues.count(1)])


def _sc_reinit(peer, p):
    """Reset and initialise again with other features: the queues and the control queue are
    set up anew; RX and TX work after."""
    frames = [frame(i, 64 + i) for i in range(20)]
    peer.when_reported(0x66, lambda: [peer.send(f) for f in frames])
    t = frame(9, 500, dst=HOST_MAC, src=GUEST_MAC)
    peer.m.mem.write(TX_BUF, t)
    job = peer.run([D.net_init(offloads=True, ctrl_vq=True), D.net_tx(TX_BUF, len(t), 5), D.net_reset(),
                    D.net_init(mrg_rxbuf=True, event_idx=True, indirect=True, queue_size=64, rx_buffers=8),
                    D.report(0x66), D.net_rx(len(frames), RX_AREA), D.net_tx(TX_BUF, len(t), 5)]).check()
    assert job.cmds[2].aux == 0 and job.cmds[3].queue_size == 64
    assert [r.data for r in D.read_net_records(peer.m.mem, RX_AREA, job.cmds[5])] == frames
    assert peer.recv(10) == [t] * 10
    return {}


def _sc_bench(peer, p):

    subprocess.run(["ip", "link", "set", "tap0", "txqueuelen", "20000"], check=True)
    n = p["count"]
    rxf = frame(1, 1514)
    for _ in range(n):
        peer.send(rxf)
    t = frame(2, 1514, dst=HOST_MAC, src=GUEST_MAC)
    peer.m.mem.write(TX_BUF, t)
    start = time.monotonic()
    job = peer.run([D.net_init(mrg_rxbuf=True, event_idx=True), D.net_bench_rx(n),
                    D.net_bench_tx(n, len(t), TX_BUF, depth=128)]).check()
    wall = time.monotonic() - start
    khz = D.guest_tsc_khz(peer.m) or 2_000_000
    rx, tx = job.cmds[1], job.cmds[2]
    assert rx.frames == tx.frames == n and rx.frame_bytes == tx.frame_bytes == n * 1514
    assert len(peer.recv(n, timeout=30)) == n
    return dict(rx_fps=rx.frames * khz * 1000 // max(rx.cycles, 1), tx_fps=tx.frames * khz * 1000 // max(tx.cycles, 1),
                wall=wall)


def _sc_irq(peer, p):
    """Used-buffer interrupts: suppressed while asked (EVENT_IDX or the flag), then one comes;
    queue i -> vector 0x40 + i; without MSI-X nothing is pending."""
    t = frame(3, 100, dst=HOST_MAC, src=GUEST_MAC)
    peer.m.mem.write(TX_BUF, t)
    msix = p["msix"]
    job = peer.run([D.net_init(event_idx=p["event_idx"], ctrl_vq=True, msix=msix), D.read_irr(),
                    D.net_tx(TX_BUF, len(t), 20, depth=4, no_interrupt=True), D.read_irr(),
                    D.net_tx(TX_BUF, len(t), 20, depth=4), D.read_irr()]).check()
    irr = [c.value for c in job.cmds[1::2]]
    assert irr[0] == irr[1] == 0, irr                  # no ctrl command, TX interrupts off
    assert irr[2] == (1 << 1 if msix else 0), irr      # transmitq 0 is queue 1
    assert peer.recv(40) == [t] * 40
    return {}


# ---- frame sizes, 64 KiB TSO both ways, a 64 MiB stream, a guest that stops taking frames ----

# Guest -> host: the largest TCP/IPv4 packet (IP total length 65535) with its Ethernet header, 65549
# bytes. Host -> guest: 65535 bytes; the kernel segments in software a GSO packet whose skb (the
# Ethernet header included) is not shorter than the tap's gso_max_size (65536), whatever the
# offloads the tap reader took.
TSO_FRAME = 14 + 65535
TSO_PAYLOAD = TSO_FRAME - 54    # 65495 bytes of TCP payload
TSO_RX_FRAME = 65535
TSO_RX_PAYLOAD = TSO_RX_FRAME - 54   # 65481
TSO_MSS = 1448
TSO_SEGMENTS = -(-TSO_PAYLOAD // TSO_MSS)   # 46 (45 of 1448 bytes and one of 335)
TSO_RX_SEGMENTS = -(-TSO_RX_PAYLOAD // TSO_MSS)   # 46 (the last one 321)
IFF_TAP, IFF_NO_PI, TUNSETIFF = 0x0002, 0x1000, 0x400454CA


def _sysfs_stat(dev: str, name: str) -> int:
    with open(f"/sys/class/net/{dev}/statistics/{name}") as f:
        return int(f.read())


def _plain_tap(name: str) -> int:
    """A tap of our own without IFF_VNET_HDR (and no TUNSETOFFLOAD): the kernel checksums and
    segments every frame before a read hands it to us. Its fd (non-blocking)."""
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def _check_tcp_segment(f: bytes, partial: bool) -> tuple[int, bytes]:
    """One TCP/IPv4 frame: the IP header's checksum right, its length the frame's, the TCP
    checksum right - or, when `partial` (NEEDS_CSUM), the pseudo header's sum, so that summing
    from csum_start makes it right. (sequence number, payload)."""
    assert f[12:14] == b"\x08\x00", f[:14].hex()
    ip = f[14:34]
    assert ip[0] == 0x45 and ip[9] == 6 and D.csum16(ip) == 0xFFFF, ip.hex()
    total = int.from_bytes(ip[2:4], "big")
    assert 14 + total == len(f), (total, len(f))
    tcp = bytearray(f[34:])
    pseudo = D.csum16(ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp)))
    if partial:        # what the device (or the stack) does for NEEDS_CSUM: fold from csum_start
        tcp[16:18] = (~D.csum16(bytes(tcp)) & 0xFFFF).to_bytes(2, "big")
    assert D.csum16(bytes(tcp), pseudo) == 0xFFFF, "TCP checksum"
    return int.from_bytes(tcp[4:8], "big"), bytes(tcp[20:])


def _reassemble(segments, mss: int, first_seq: int = 1) -> bytes:
    """The payload of TCP segments (seq, payload) in order, each at most mss bytes, no gap or overlap."""
    out = bytearray()
    for seq, data in segments:
        assert seq == first_seq + len(out), (seq, first_seq + len(out))
        assert 0 < len(data) <= mss, len(data)
        out += data
    return bytes(out)


def _sc_tso_tx(peer, p):
    """Guest -> host, a 64 KiB TSO frame (gso TCPV4, gso_size 1448, partial checksum): on tap0 (a
    PACKET_VNET_HDR socket) it is the guest's frame and header byte for byte; leaving through a
    tap without offloads (tap0 and tap1 in a bridge, tap1 read without a vnet header) the kernel
    cut it into 46 segments with right checksums whose payloads put together are the original."""

    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    tap1 = _plain_tap("tap1")
    try:
        sh("ip", "link", "add", "br0", "type", "bridge")
        for dev in ("tap0", "tap1"):
            sh("ip", "link", "set", dev, "master", "br0")
        for dev in ("tap1", "br0"):
            sh("ip", "link", "set", dev, "up")
        payload = os.urandom(TSO_PAYLOAD)
        f = _tcp4(TSO_FRAME, partial=True, payload=payload)
        peer.m.mem.write(TX_BUF, f)
        job = peer.run([D.net_init(csum=True, host_tso4=True, **p.get("init", {})),
                        D.net_tx(TX_BUF, len(f), 1, csum=(34, 16), gso=D.VIRTIO_NET_HDR_GSO_TCPV4, mss=TSO_MSS,
                                 hdr_len=54, seg_size=p.get("seg_size"))]).check()
        assert job.cmds[1].frame_bytes == TSO_FRAME
        (g,) = peer.recv(1)
        flags, gso, _hdr_len, gso_size, cstart, coff = struct.unpack_from("<BBHHHH", g)
        assert (flags, gso, gso_size, cstart, coff) == (D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4,
                                                         TSO_MSS, 34, 16)
        assert g[10:] == f
        segs, end = [], time.monotonic() + 10
        while sum(len(d) for _, d in segs) < TSO_PAYLOAD and time.monotonic() < end:
            select.select([tap1], [], [], 0.2)
            try:
                s = os.read(tap1, 1 << 17)
            except BlockingIOError:
                continue
            if s[12:14] == b"\x08\x00" and s[23] == 6:     # IPv4/TCP: ours (nothing else speaks TCP here)
                assert s[:12] == f[:12]
                assert len(s) <= 14 + 20 + 20 + TSO_MSS
                segs.append(_check_tcp_segment(s, partial=False))
        assert len(segs) == TSO_SEGMENTS, len(segs)
        assert _reassemble(segs, TSO_MSS) == payload
        return dict(segments=len(segs))
    finally:
        os.close(tap1)


def _sc_tso_rx(peer, p):
    """Host -> guest, 64 KiB GSO packets (65535 bytes; `count` of them back to back) written into
    the tap with their vnet header (partial checksum, gso TCPV4, gso_size 1448). With GUEST_TSO4:
    each one frame in the guest, the header saying so. Without it (5.1.6.4: the device must not
    hand a GSO packet to a driver that did not take the feature): 46 plain segments, right
    checksums, partial ones (NEEDS_CSUM) only if GUEST_CSUM was taken; their payloads put
    together are the original."""

    tso, csum, count = p["tso"], p["guest_csum"], p.get("count", 1)
    assert tso or count == 1
    payloads = [os.urandom(TSO_RX_PAYLOAD) for _ in range(count)]
    sent = [_tcp4(TSO_RX_FRAME, partial=True, payload=x, dst_mac=GUEST_MAC, src_mac=HOST_MAC) for x in payloads]
    vh = struct.pack("<BBHHHH", D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, 54, TSO_MSS, 34, 16)
    peer.on_reports({0x77: lambda: [peer.send(vh + f) for f in sent]})   # once the tap has the guest's offloads
    n = count if tso else TSO_RX_SEGMENTS
    job = peer.run([D.net_init(guest_csum=csum, guest_tso4=tso, mrg_rxbuf=p["mrg"]), D.report(0x77),
                    D.net_rx(n, RX_AREA, area_size=64 * MiB, timeout_ms=2000, cont=True),
                    D.net_rx(buffer=RX_AREA + 64 * MiB, timeout_ok=True, timeout_ms=300)])
    init, _, rx, more = job.cmds
    stats = peer.net.stats()
    assert stats.rx_truncated == 0, (f"the device read {stats.rx_truncated} of {count} packet(s) into too few "
                                     f"receive buffers and dropped them (rx_truncated); {rx.frames} arrived")
    job.check()
    f_bit = init.driver_features >> D.VIRTIO_NET_F_GUEST_TSO4 & 1
    assert f_bit == tso and (init.driver_features >> D.VIRTIO_NET_F_GUEST_CSUM & 1) == csum
    assert more.frames == 0, "more frames than sent"
    recs = D.read_net_records(peer.m.mem, RX_AREA, rx)
    assert len(recs) == n
    for r in recs:
        assert r.hdr.num_buffers == r.nbufs          # 1 without MRG_RXBUF (5.1.6.4)
        assert r.used_len == len(r.data) + D.NET_HDR_SIZE
    if tso:
        for r, f in zip(recs, sent):
            assert r.data == f
            assert (r.hdr.flags & D.VIRTIO_NET_HDR_F_NEEDS_CSUM, r.hdr.gso_type, r.hdr.gso_size) == (
                D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, TSO_MSS)
            assert (r.hdr.csum_start, r.hdr.csum_offset) == (34, 16)
            assert r.nbufs == (-(-(len(f) + 12) // init.rx_buf_size) if p["mrg"] else 1)
        return dict(nbufs=recs[0].nbufs, rx_buf_size=init.rx_buf_size)
    (f,) = sent
    segs = []
    for r in recs:
        assert r.hdr.gso_type == D.VIRTIO_NET_HDR_GSO_NONE and r.nbufs == 1
        assert r.data[:12] == f[:12] and len(r.data) <= 14 + 40 + TSO_MSS
        partial = bool(r.hdr.flags & D.VIRTIO_NET_HDR_F_NEEDS_CSUM)
        assert not partial or csum, "NEEDS_CSUM to a driver without GUEST_CSUM"
        if partial:
            assert (r.hdr.csum_start, r.hdr.csum_offset) == (34, 16)
        segs.append(_check_tcp_segment(r.data, partial))
    assert _reassemble(segs, TSO_MSS) == payloads[0]
    return dict(flags=sorted({r.hdr.flags for r in recs}))


def _sc_stream(peer, p):
    """64 MiB host -> guest -> host: the host writes it into tap0 as numbered frames (1514-byte
    ones, or 64 KiB TSO packets with their vnet header), the guest echoes every frame (net_rx
    with F_NET_ECHO), the host reads what comes back: the same frames, in order, none missing,
    and the payload stream's sha256 is the one sent.

    Losses: the host keeps at most `window` frames unanswered, fewer than the tap's queue holds
    (txqueuelen) and than the kernel's backlog (netdev_max_backlog, 1000) on the way back, so
    nothing may be dropped on the host side; the tap's own drop counters (tx_dropped: full
    queue towards the device; rx_dropped: frames written by the device and refused) are checked
    to be 0 all the same, apart from the frame comparison, which fails on any loss."""

    total, kind = p.get("total", 64 * MiB), p["kind"]
    window, tso = p.get("window", 512), kind == "tso"
    data = os.urandom(total)
    chunk = TSO_RX_PAYLOAD if tso else 1514 - 18
    n = -(-total // chunk)
    dv = memoryview(data)
    vh = struct.pack("<BBHHHHH", D.VIRTIO_NET_HDR_F_NEEDS_CSUM, D.VIRTIO_NET_HDR_GSO_TCPV4, 54, TSO_MSS, 34, 16, 0)
    prefix = GUEST_MAC + HOST_MAC + ETHERTYPE.to_bytes(2, "big")

    def make(i: int) -> bytes:
        piece = bytes(dv[i * chunk:(i + 1) * chunk])
        if tso:
            return _tcp4(54 + len(piece), partial=True, payload=piece, seq=1 + i * chunk, dst_mac=GUEST_MAC,
                         src_mac=HOST_MAC)
        return prefix + i.to_bytes(4, "big") + piece

    if tso:
        tx = peer.sock          # the vnet-header socket (PACKET_IGNORE_OUTGOING): it reads the echoes too
        hlen = 10
    else:
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only
        tx.bind(("tap0", 0))
        hlen = 0
    rx = peer.sock
    credit = threading.Semaphore(window)
    errors, state = [], dict(got=0, sent=0)
    digest = hashlib.sha256()
    stop = threading.Event()

    def sender():
        try:
            for i in range(n):
                while not credit.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                tx.send(vh[:10] + make(i) if tso else make(i))
                state["sent"] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            stop.set()

    def receiver():
        buf = bytearray(1 << 17)
        rx.settimeout(0.2)
        try:
            for i in range(n):
                quiet_since = time.monotonic()
                while True:
                    try:
                        size = rx.recv_into(buf)
                        break
                    except socket.timeout:      # the job ended (its own no-progress limit), or 10 s
                        if stop.is_set() or time.monotonic() - quiet_since > 10:
                            raise AssertionError(f"frame {i} did not come back") from None
                want = make(i)
                got = bytes(buf[hlen:size])
                if got != want:
                    seq = int.from_bytes(got[14:18], "big") if not tso else int.from_bytes(got[38:42], "big")
                    raise AssertionError(f"frame {i}: {len(got)} bytes (seq field {seq}), {len(want)} expected: "
                                         "lost, reordered or changed")
                if tso:
                    flags, gso, _, gso_size, cstart, coff = struct.unpack_from("<BBHHHH", buf)
                    assert (flags, gso, gso_size, cstart, coff) == (1, 1, TSO_MSS, 34, 16), (flags, gso, gso_size)
                    digest.update(got[54:])
                else:
                    digest.update(got[18:])
                state["got"] = i + 1
                credit.release()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    drops0 = {k: _sysfs_stat("tap0", k) for k in ("tx_dropped", "rx_dropped")}
    init = dict(mrg_rxbuf=p.get("mrg", False), event_idx=True)
    if tso:
        init.update(csum=True, host_tso4=True, guest_csum=True, guest_tso4=True)
    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    peer.on_reports({0x5E: lambda: [t.start() for t in threads]})
    start = time.monotonic()
    job = peer.run([D.net_init(**init), D.report(0x5E), D.net_rx(n, echo=True), D.net_status()], timeout=120,
                   timeout_ms=2000)
    stop.set()          # the guest is gone: the host threads give up on what did not come
    for t in threads:
        t.join(30)
    wall = time.monotonic() - start
    if tx is not peer.sock:
        tx.close()
    stats = peer.net.stats()
    drops = {k: _sysfs_stat("tap0", k) - v for k, v in drops0.items()}
    assert stats.rx_truncated == 0, (f"the device read {stats.rx_truncated} frame(s) into too few receive buffers "
                                     f"and dropped them (rx_truncated; {state['got']} of {n} frames came back)")
    assert drops == dict(tx_dropped=0, rx_dropped=0), f"the host side dropped frames: {drops}"
    job.check()
    assert not errors, f"after {state['got']} of {n} frames ({state['sent']} sent): {errors[0]!r}"
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    rx_cmd, st = job.cmds[2], job.cmds[3]
    assert rx_cmd.frames == n and rx_cmd.frame_bytes == total + n * (54 if tso else 18)
    assert st.count == 0 and st.length == job.cmds[0].queue_size
    assert (stats.rx_frames, stats.tx_frames) == (n, n), stats
    assert stats.rx_truncated == stats.tx_dropped == stats.tx_errors == stats.rx_bad_chains == 0, stats
    return dict(frames=n, seconds=round(wall, 2), mbit=round(total * 8 / wall / 1e6),
                tx_blocked=stats.tx_blocked, rx_no_buffers=stats.rx_no_buffers)


def _runs(seqs) -> str:
    """[0, 1, 2, 5, 6] -> '0-2 5-6': what arrived, for a failure's message."""
    out, start = [], None
    for k, v in enumerate(seqs):
        if start is None:
            start = v
        if k + 1 == len(seqs) or seqs[k + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return " ".join(out)


def _sc_stall(peer, p):
    """A guest that stops posting RX buffers while the host floods the tap: the device fills
    the buffers it has and then waits (reads nothing more), the tap's queue fills and the kernel
    drops the rest; meanwhile virtio-blk writes and reads complete byte for byte, the console
    goes on, and SIGTERM still stops the VMM. After the guest resumes, the frames the tap kept
    arrive: exactly the first ones sent (the kernel drops at the tail), in order."""

    ring = p["txqueuelen"]
    length, size = 128, 4 * MiB
    pattern = os.urandom(size)
    peer.m.mem.write(D.DATA_START, pattern)
    flood = dict(sent=0)
    seen = {}
    stop = threading.Event()
    drops0 = _sysfs_stat("tap0", "tx_dropped")
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind(("tap0", 0))

    def send_more(k: int) -> None:
        for _ in range(k):
            tx.send(frame(flood["sent"], length))
            flood["sent"] += 1

    def keep_flooding():
        while not stop.is_set():
            send_more(100)

    flooder = threading.Thread(target=keep_flooding)

    def start_flood():
        # On the vCPU thread: the guest goes on once the device has filled every buffer and the
        # tap's queue is full. The device reads nothing while the rest is sent, so the tap keeps
        # exactly the next `ring` frames (its queue drops at the tail; with a reader taking
        # frames at the same time it frees room in batches, and a later frame could get in).
        send_more(p["buffers"])
        end = time.monotonic() + 5
        while peer.net.stats().rx_frames < p["buffers"] and time.monotonic() < end:
            time.sleep(0.001)
        send_more(ring + 1000)
        flooder.start()

    def end_flood():
        stop.set()
        flooder.join(30)
        seen.update(stats=peer.net.stats(), drops=_sysfs_stat("tap0", "tx_dropped") - drops0,
                    console=open(p["console"], errors="replace").read(), state=peer.net.pair_state(0).rx_waiting)

    def sigterm_soon():
        seen["term"] = time.monotonic()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()

    peer.on_reports({0x88: start_flood, 0x89: end_flood, 0x8A: sigterm_soon})
    cmds = [D.net_init(queue_size=p["buffers"]), D.blk_init(), D.net_stop_rx(), D.report(0x88),
            D.blk_write(0, size, D.DATA_START, depth=8, request_size=128 << 10), D.blk_flush(),
            D.blk_read(0, size, D.DATA_START + 8 * MiB, depth=8, request_size=64 << 10), D.net_status(),
            D.report(0x89), D.net_resume_rx(), D.net_rx(buffer=RX_AREA, area_size=64 * MiB, timeout_ok=True,
                                                          timeout_ms=500),
            D.net_status(), D.report(0x8A), D.delay(60_000_000)]
    job = peer.run(cmds, timeout=120)
    back = time.monotonic()
    tx.close()
    assert job.message == "stopped by SIGTERM" and job.cmds_done == len(cmds) - 1, job.describe()
    assert all(c.ok for c in job.cmds[:-1]), job.describe()
    assert back - seen["term"] < 5, back - seen["term"]
    assert bytes(peer.m.mem.read(D.DATA_START + 8 * MiB, size)) == pattern
    with open(p["disk"], "rb") as f:
        assert f.read(size) == pattern
    blk_read_index = 6
    assert f"cmd {blk_read_index} blk-read: ok" in seen["console"]   # written while the net was stalled
    stats = seen["stats"]
    assert stats.rx_frames == p["buffers"] and stats.rx_no_buffers >= 1 and seen["state"], stats
    assert stats.rx_truncated == 0
    sent, dropped = flood["sent"], seen["drops"]
    kept = sent - dropped
    rx = job.cmds[10]
    recs = D.read_net_records(peer.m.mem, RX_AREA, rx)
    assert rx.frames == len(recs) == kept, (rx.frames, sent, dropped)
    seqs = [int.from_bytes(r.data[14:18], "big") for r in recs]
    assert seqs == sorted(set(seqs)), f"out of order or twice: {_runs(seqs)}"
    assert [r.data for r in recs] == [frame(i, length) for i in seqs]
    assert seqs == list(range(kept)), _runs(seqs)      # every one the tap kept, and those were the first
    assert kept == p["buffers"] + ring, (kept, p["buffers"], ring)
    st_stop, st_end = job.cmds[7], job.cmds[11]
    assert st_end.count == 0 and st_end.length == p["buffers"]
    return dict(sent=sent, dropped=dropped, kept=kept, status_during=(st_stop.count, st_stop.length))


SCENARIOS = {k[4:]: v for k, v in dict(globals()).items() if k.startswith("_sc_")}


def _child(params: str) -> None:
    p = json.loads(params)
    peer = Peer(p)
    try:
        result = SCENARIOS[p["scenario"]](peer, p)
    finally:
        peer.close()
    print(json.dumps(result or {}))


if __name__ == "__main__":
    _child(sys.argv[1])


# -- the tests -----------------------------------------------------------------------------------
def test_init_reads_mac_status_mtu_and_negotiates_what_it_is_told(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "init")


@pytest.mark.parametrize("opts", [dict(), dict(init=dict(indirect=True), seg_size=256, split_hdr=True),
                                  dict(init=dict(event_idx=True), depth=64)], ids=["plain", "sg", "event-idx"])
def test_tx_frames_reach_the_tap_byte_for_byte(netns, driver, tmp_path, opts):
    run_in_netns(netns, driver, tmp_path, "tx", length=1000, count=200, **opts)


def test_tx_list_sends_each_record(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "tx_list")


@pytest.mark.parametrize("init", [dict(), dict(mrg_rxbuf=True), dict(event_idx=True, indirect=True, rx_seg_size=256)],
                         ids=["plain", "mrg", "chained"])
def test_rx_frames_arrive_byte_for_byte_in_order(netns, driver, tmp_path, init):
    run_in_netns(netns, driver, tmp_path, "rx", count=300, init=init)


def test_echo_sends_every_frame_back_unchanged(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "echo", count=3000)


@pytest.mark.debian12
def test_echo_with_mergeable_buffers_and_event_idx(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "echo", count=3000, init=dict(mrg_rxbuf=True, event_idx=True))


def test_stopped_rx_holds_buffers_and_the_device_waits(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "backpressure")


@pytest.mark.debian12
def test_tx_offload_headers_reach_the_kernel(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "offload_tx", vnet_hdr=True)


@pytest.mark.parametrize("init", [dict(), dict(mrg_rxbuf=True)], ids=["big-buffers", "mrg"])
def test_rx_tso_packet_arrives_whole_with_its_header(netns, driver, tmp_path, init):
    got = run_in_netns(netns, driver, tmp_path, "offload_rx", vnet_hdr=True, init=init)
    assert got["rx_buf_size"] == (2048 if init else 65562)


def test_udp_checksums_kept_right_by_the_guest_or_left_to_the_device(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "udp")


@pytest.mark.debian12
def test_two_queue_pairs_with_the_control_queue(netns, driver, tmp_path):
    got = run_in_netns(netns, driver, tmp_path, "mq", pairs=2)
    assert sum(got["per_queue"]) == 200
    assert min(got["per_queue"]) > 0          # 200 flows: the tap spreads them over both
    print(f"frames per receive queue: {got['per_queue']}")


def test_reset_and_initialise_again(netns, driver, tmp_path):
    run_in_netns(netns, driver, tmp_path, "reinit")


def test_bench_rx_and_tx(netns, driver, tmp_path):
    got = run_in_netns(netns, driver, tmp_path, "bench", count=5000)
    print(f"virtio-net through the driver guest: rx {got['rx_fps']} frames/s, tx {got['tx_fps']} frames/s "
          f"(1514 bytes)")


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "no-msix"])
def test_tx_interrupts_follow_the_suppression(netns, driver, tmp_path, event_idx, msix):
    run_in_netns(netns, driver, tmp_path, "irq", event_idx=event_idx, msix=msix)


# -- frame sizes, 64 KiB TSO, a 64 MiB stream, a stalled receiver -------------------------------


@pytest.mark.parametrize("length", [60, 1514], ids=["min-60", "mtu-1514"])
def test_tx_minimum_and_mtu_frames_reach_the_tap_byte_for_byte(netns, driver, tmp_path, length):
    run_in_netns(netns, driver, tmp_path, "tx", length=length, count=200, depth=32)


@pytest.mark.parametrize("mrg", [False, True], ids=["big-buffers", "mrg"])
@pytest.mark.parametrize("length", [60, 1514], ids=["min-60", "mtu-1514"])
def test_rx_minimum_and_mtu_frames_arrive_byte_for_byte(netns, driver, tmp_path, length, mrg):
    got = run_in_netns(netns, driver, tmp_path, "rx", sizes=[length] * 200, init=dict(mrg_rxbuf=mrg))
    assert got["rx_buf_size"] == (2048 if mrg else 1526)


@pytest.mark.parametrize("opts", [dict(), dict(init=dict(indirect=True), seg_size=4096)], ids=["one-buffer", "sg"])
def test_tx_64k_tso_frame_reaches_the_tap_whole_and_segments_right(netns, driver, tmp_path, opts):
    got = run_in_netns(netns, driver, tmp_path, "tso_tx", vnet_hdr=True, **opts)
    assert got["segments"] == TSO_SEGMENTS


@pytest.mark.parametrize("mrg", [False, True], ids=["big-buffers", "mrg"])
def test_rx_64k_gso_packet_arrives_whole_with_guest_tso4(netns, driver, tmp_path, mrg):
    got = run_in_netns(netns, driver, tmp_path, "tso_rx", vnet_hdr=True, tso=True, guest_csum=True, mrg=mrg)
    assert got["nbufs"] == (33 if mrg else 1)


@pytest.mark.parametrize("mrg", [False, True], ids=["big-buffers", "mrg"])
def test_rx_burst_of_64k_gso_packets_all_arrive_whole(netns, driver, tmp_path, mrg):
    """100 back to back: with MRG_RXBUF each takes 33 of the 256 buffers, so the ring runs short
    of 64 KiB between the guest's refills."""
    run_in_netns(netns, driver, tmp_path, "tso_rx", vnet_hdr=True, tso=True, guest_csum=True, mrg=mrg, count=100)


@pytest.mark.parametrize("guest_csum", [False, True], ids=["no-guest-csum", "guest-csum"])
def test_rx_64k_gso_packet_arrives_segmented_without_guest_tso4(netns, driver, tmp_path, guest_csum):
    got = run_in_netns(netns, driver, tmp_path, "tso_rx", vnet_hdr=True, tso=False, guest_csum=guest_csum, mrg=True)
    # the kernel checksums what a reader without TUN_F_CSUM gets; with it, it may leave them partial
    assert guest_csum or got["flags"] == [0]
    print(f"46 segments, virtio_net_hdr flags {got['flags']}")


@pytest.mark.parametrize("kind,mrg,batches", [("mtu", False, True), ("tso", False, True),
                                              ("tso", True, True), ("mtu", False, False)],
                         ids=["1514-byte-frames", "tso-frames", "tso-frames-mrg", "1514-byte-frames-one-chain-path"])
def test_64mib_stream_echoed_by_the_guest_keeps_its_sha256(netns, driver, tmp_path, kind, mrg, batches):
    """Both ways through the batch path (virtio/batch.py + io_uring), and once through the
    one-chain path alone (as on a host without io_uring)."""
    got = run_in_netns(netns, driver, tmp_path, "stream", kind=kind, mrg=mrg, txqueuelen=1000,
                       ignore_outgoing=True, vnet_hdr=kind == "tso", batches=batches)
    print(f"64 MiB echoed as {got['frames']} {kind} frames in {got['seconds']} s ({got['mbit']} Mbit/s each way), "
          f"tx blocked {got['tx_blocked']}x, rx out of buffers {got['rx_no_buffers']}x")


def test_a_guest_that_stops_taking_frames_stalls_neither_the_vmm_nor_the_disk(netns, driver, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    got = run_in_netns(netns, driver, tmp_path, "stall", disk=str(disk), txqueuelen=1000, buffers=256)
    print(f"flood: {got['sent']} frames sent, {got['dropped']} dropped by the tap, {got['kept']} delivered after "
          f"the resume")
