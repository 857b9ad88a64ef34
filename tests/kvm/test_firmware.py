"""Firmware boot (`pyvmm run --firmware`): SeaBIOS from the reset vector, a boot sector read
through int 13h from virtio-blk, SeaBIOS's view of memory and CPUs, the ACPI tables it
installs from fw_cfg, iPXE from virtio-net's expansion ROM.

Timings (printed; run with -s to see them) are wall-clock seconds from the start of the
pyvmm process.  On a host whose KVM emulates guest kernel mode all of the firmware runs
emulated, instruction by instruction.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from kernel import acpi
from tests.support.consolerun import report, run_pyvmm
from vmm import firmware as fw
from vmm.config import DEFAULT_BOOT_ORDER, BootItem, boot_slots, parse_boot_order
from vmm.memory import GiB, MiB, layout as ram_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_SECTOR_SRC = os.path.join(ROOT, "tests", "guest", "bootsector", "boot.S")
SECTORS = 256  # what the boot sector reads (its default SECTORS)

needs_seabios = pytest.mark.skipif(not os.path.exists(fw.DEFAULT_FIRMWARE),
                                   reason=f"no SeaBIOS image at {fw.DEFAULT_FIRMWARE} (package seabios)")


# -- building the guest ------------------------------------------------------------------------


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in ("gcc", "ld", "objcopy"))


def build_boot_sector(out_dir, disk_id: str) -> bytes:
    """tests/guest/bootsector/boot.S with DISK_ID, as a flat 512-byte sector."""
    obj, elf, binary = (os.path.join(out_dir, f"boot-{disk_id}.{ext}") for ext in ("o", "elf", "bin"))
    subprocess.run(["gcc", "-m32", "-c", f"-DDISK_ID='{disk_id}'", "-o", obj, BOOT_SECTOR_SRC], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x7c00", "-o", elf, obj], check=True)
    subprocess.run(["objcopy", "-O", "binary", elf, binary], check=True)
    data = open(binary, "rb").read()
    assert len(data) == 512 and data[510:] == b"\x55\xaa", "the boot sector must be 512 bytes ending in 55 AA"
    return data


@pytest.fixture(scope="module")
def boot_sector(tmp_path_factory):
    if not have_toolchain():
        pytest.skip("gcc, ld and objcopy are needed to build the boot sector")
    out = str(tmp_path_factory.mktemp("bootsector"))
    built = {}

    def get(disk_id: str) -> bytes:
        if disk_id not in built:
            built[disk_id] = build_boot_sector(out, disk_id)
        return built[disk_id]

    return get


def fnv_words(data: bytes) -> int:
    """The boot sector's hash: FNV-1a over little-endian 32-bit words."""
    h = 0x811C9DC5
    for (w,) in struct.iter_unpack("<I", data):
        h = ((h ^ w) * 0x01000193) & 0xFFFFFFFF
    return h


def make_disk(path, sector0: bytes, seed: int) -> int:
    """A disk image: the boot sector, SECTORS random sectors, 1 MiB of zeros; the expected hash."""
    payload = random.Random(seed).randbytes(SECTORS * 512)
    with open(path, "wb") as f:
        f.write(sector0 + payload + bytes(MiB))
    return fnv_words(payload)


# -- running pyvmm -----------------------------------------------------------------------------


# -- pure pieces of vmm/firmware and vmm/config ------------------------------------------------


def test_parse_boot_order():
    B = BootItem
    assert parse_boot_order("disk") == (B("disk"),)
    assert parse_boot_order("net, disk1,disk0") == (B("net"), B("disk", 1), B("disk", 0))
    for bad in ("", "cdrom", "disk-1", "disk,", "usb0"):
        with pytest.raises(ValueError):
            parse_boot_order(bad)


def test_boot_slots_and_bootorder_paths():
    order = parse_boot_order("disk1,net,disk")
    entries = boot_slots(order, [1, 2], [3])
    assert entries == [("disk", 2), ("net", 3), ("disk", 1)]
    assert fw.bootorder_paths(entries) == ["/pci@i0cf8/scsi@2/disk@0,0", "/pci@i0cf8/ethernet@3/ethernet-phy@0",
                                           "/pci@i0cf8/scsi@1/disk@0,0"]
    assert boot_slots(DEFAULT_BOOT_ORDER, [], []) == []
    with pytest.raises(ValueError, match="disk2"):
        boot_slots(parse_boot_order("disk2"), [1, 2], [])


def test_load_firmware_errors(tmp_path):
    with pytest.raises(fw.FirmwareError, match="does not exist"):
        fw.load_firmware(str(tmp_path / "nope.bin"))
    with pytest.raises(fw.FirmwareError, match="not a file"):
        fw.load_firmware(str(tmp_path))
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(4096))
    with pytest.raises(fw.FirmwareError, match="multiple of 4 KiB"):
        fw.load_firmware(str(small))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(128 * 1024 + 1))
    with pytest.raises(fw.FirmwareError):
        fw.load_firmware(str(odd))
    ok = tmp_path / "ok.bin"
    ok.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    image = fw.load_firmware(str(ok))
    assert image.base == 0xFFFC_0000 and image.shadow_base == 0xC0000 and len(image.shadow) == 256 * 1024
    assert image.tss_addr == 0xFFFB_D000 and image.identity_map_addr == 0xFFFB_C000
    assert image.e820_reserved() == [(0xFFFB_C000, 0x44000)]


def test_debug_console_lines():
    got = []
    con = fw.DebugConsole(got.append)
    assert con.read(0, 1) == 0xE9
    for ch in b"ab\ncd":
        con.write(0, 1, ch)
    assert got == [b"ab\n"]
    con.flush()
    assert got == [b"ab\n", b"cd"]


class _FakeVcpu:
    def __init__(self, regs, sregs):
        self.id, self.regs, self.sregs = 0, regs, sregs

    def get_regs(self):
        return self.regs

    def set_regs(self, r):
        self.regs = r

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, s):
        self.sregs = s


def _pm_state(mem, *, ss_base: int, esp: int):
    """32-bit protected mode at CPL 0: a GDT at 0x1000 with code 0x08 and data 0x10, both with base
    `ss_base`; CS:EIP = 0x08:0x3000, where an IRET is; SS:ESP = 0x10:`esp`."""
    from vmm.kvm import structs as s

    def descriptor(base, access):
        return struct.pack("<HHBBBB", 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access, 0xCF, base >> 24)

    mem.write(0x1000, bytes(8) + descriptor(ss_base, 0x9B) + descriptor(ss_base, 0x93))
    sregs = s.kvm_sregs()
    sregs.cr0 = 0x11
    sregs.gdt.base, sregs.gdt.limit = 0x1000, 23
    for name, sel, typ in (("cs", 8, 0xB), ("ss", 0x10, 3), ("ds", 0x10, 3)):
        seg = getattr(sregs, name)
        seg.selector, seg.base, seg.limit, seg.type, seg.present, seg.s, seg.db, seg.g = \
            sel, ss_base, 0xFFFFFFFF, typ, 1, 1, 1, 1
    mem.write(ss_base + 0x3000, b"\xcf")  # IRET
    regs = s.kvm_regs(rip=0x3000, rsp=esp, rflags=0x2)
    return regs, sregs


def test_protected_mode_iret_completion():
    from vmm.kvm import exits
    from vmm.memory import GuestMemory

    with GuestMemory(16 * MiB) as mem:
        fix = fw.ProtectedModeIret(mem)
        regs, sregs = _pm_state(mem, ss_base=0x100000, esp=0x8000)
        mem.write(0x100000 + 0x8000, struct.pack("<III", 0x4321, 0x08, 0x246))  # EIP, CS, EFLAGS
        thread = type("T", (), {})()
        thread.vcpu = _FakeVcpu(regs, sregs)
        assert not fix(thread, exits.Hlt())
        assert fix(thread, exits.InternalError(1, ()))
        r, sr = thread.vcpu.regs, thread.vcpu.sregs
        assert (r.rip, r.rsp, r.rflags, sr.cs.selector, sr.cs.base) == (0x4321, 0x800C, 0x246, 8, 0x100000)

        # A frame the emulating KVM wrote at the flat address (SS's base ignored) is found there.
        regs, sregs = _pm_state(mem, ss_base=0x200000, esp=0x9000)
        mem.write(0x200000 + 0x9000, struct.pack("<III", 0x1111, 0x800, 0x1396E))  # no frame here
        mem.write(0x9000, struct.pack("<III", 0x5555, 0x08, 0x202))
        thread.vcpu = _FakeVcpu(regs, sregs)
        assert fix(thread, exits.InternalError(1, ()))
        assert (thread.vcpu.regs.rip, thread.vcpu.regs.rsp, thread.vcpu.regs.rflags) == (0x5555, 0x900C, 0x202)

        # No valid frame anywhere, an outer privilege level, or not an IRET: left alone.
        for frame in (struct.pack("<III", 0x10, 0x99, 0x2), struct.pack("<III", 0x10, 0x0B, 0x2)):
            regs, sregs = _pm_state(mem, ss_base=0, esp=0x9000)
            mem.write(0x9000, frame)
            thread.vcpu = _FakeVcpu(regs, sregs)
            assert not fix(thread, exits.InternalError(1, ()))
        regs, sregs = _pm_state(mem, ss_base=0, esp=0x9000)
        mem.write(0x9000, struct.pack("<III", 0x10, 0x08, 0x2))
        mem.write(0x3000, b"\x90")
        thread.vcpu = _FakeVcpu(regs, sregs)
        assert not fix(thread, exits.InternalError(1, ()))
        assert fix.count == 2


# -- SeaBIOS boots a disk -----------------------------------------------------------------------


@needs_seabios
def test_seabios_boots_the_disk_and_reads_it_through_int13(boot_sector, tmp_path):
    disk = tmp_path / "a.img"
    want = make_disk(disk, boot_sector("A"), seed=1)
    run = run_pyvmm(["run", "--firmware", "--disk", str(disk), "--console", "stdio"], timeout=90)
    out = run.text()
    assert run.first(r"PYVMM-BOOT A DL=80"), out
    assert run.first(rf"PYVMM-SUM {want:08X}"), out
    assert run.rc == 0, out  # the boot sector powered the machine off
    report("SeaBIOS disk boot (1 vCPU, 512 MiB; seconds from pyvmm start):", [
        ("SeaBIOS banner on the console", run.time_of(r"SeaBIOS \(version")),
        ("Booting from Hard Disk", run.time_of(r"Booting from Hard Disk")),
        ("boot sector marker", run.time_of(r"PYVMM-BOOT")),
        (f"checksum of {SECTORS} sectors read with int 13h AH=42h", run.time_of(r"PYVMM-SUM")),
        ("pyvmm exited (ACPI power-off)", run.wall),
    ])


@needs_seabios
def test_boot_order_picks_the_disk(boot_sector, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    sum_a = make_disk(a, boot_sector("A"), seed=1)
    sum_b = make_disk(b, boot_sector("B"), seed=2)
    disks = ["--disk", str(a), "--disk", str(b)]
    second = run_pyvmm(["run", "--firmware", *disks, "--boot", "disk1,disk0", "--console", "stdio"], timeout=90)
    assert second.first(r"PYVMM-BOOT B DL=80"), second.text()  # the boot disk is drive 0x80
    assert second.first(rf"PYVMM-SUM {sum_b:08X}"), second.text()
    assert second.rc == 0
    first = run_pyvmm(["run", "--firmware", *disks, "--console", "stdio"], timeout=90)  # default: disk order
    assert first.first(r"PYVMM-BOOT A DL=80"), first.text()
    assert first.first(rf"PYVMM-SUM {sum_a:08X}"), first.text()
    assert first.rc == 0


# -- what SeaBIOS saw ---------------------------------------------------------------------------

E820_LINE = re.compile(r"^\s*\d+: ([0-9a-f]{16}) - ([0-9a-f]{16}) = (\d+) ")
RAM, RESERVED = 1, 2


def seabios_e820(log: str) -> list[tuple[int, int, int]]:
    """The last "e820 map has N items:" SeaBIOS printed: (start, end, type) each."""
    lines = log.splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith("e820 map has ")]
    assert starts, "SeaBIOS printed no e820 map"
    i = starts[-1]
    count = int(lines[i].split()[3])
    entries = []
    for line in lines[i + 1 : i + 1 + count]:
        m = E820_LINE.match(line)
        assert m, line
        entries.append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))))
    assert len(entries) == count
    return entries


def covered(entries, start, end, kind) -> bool:
    """[start, end) lies wholly inside entries of `kind`."""
    pos = start
    for s, e, t in sorted(entries):
        if t == kind and s <= pos < e:
            pos = e
            if pos >= end:
                return True
    return pos >= end


@needs_seabios
def test_seabios_sees_our_memory_map_and_cpus(boot_sector, tmp_path):
    disk = tmp_path / "a.img"
    make_disk(disk, boot_sector("A"), seed=1)
    log = tmp_path / "seabios.log"
    mem_size, cpus = 5 * GiB, 2
    run = run_pyvmm(["run", "--firmware", "--firmware-log", str(log), "--disk", str(disk), "--mem", "5G",
                     "--cpus", str(cpus), "--console", "stdio"], timeout=90)
    assert run.rc == 0, run.text()
    text = log.read_text(errors="replace")
    assert f"Found {cpus} cpu(s) max supported {cpus} cpu(s)" in text, text
    assert "Found QEMU fw_cfg" in text and "QEMU fw_cfg DMA interface supported" in text, text
    entries = seabios_e820(text)
    print("\nSeaBIOS's e820 map:\n" + "\n".join(f"  {s:#014x}-{e:#014x} {t}" for s, e, t in entries))

    low, high = ram_layout(mem_size)
    assert (high.gpa, high.end, RAM) in entries  # RAM above 4 GiB, exactly as configured
    # Below 4 GiB: conventional RAM, then the legacy area is not RAM: EBDA and BIOS reserved
    assert (0, 0x9FC00, RAM) in entries
    assert covered(entries, 0x9FC00, 0xA0000, RESERVED) and covered(entries, 0xF0000, 0x100000, RESERVED)
    assert not any(t == RAM and s < 0x100000 and e > 0x9FC00 for s, e, t in entries)
    # ... then RAM from 1 MiB up to the end of low RAM, less what SeaBIOS keeps for itself at its top
    ram_1m = next(e for s, e, t in entries if s == 0x100000 and t == RAM)
    assert low.end - 64 * MiB < ram_1m <= low.end and covered(entries, ram_1m, low.end, RESERVED)
    # The reservations pyvmm made: ECAM, the firmware image with the VT-x pages below it
    image = fw.load_firmware()
    for start, size in fw.FIRMWARE_PCI_LAYOUT.e820_reserved() + image.e820_reserved():
        assert covered(entries, start, start + size, RESERVED), (hex(start), hex(size))
    # and nothing else is RAM
    ram = sum(e - s for s, e, t in entries if t == RAM)
    assert mem_size - 64 * MiB - 0x60400 < ram <= mem_size


@needs_seabios
def test_acpi_tables_through_the_table_loader_are_pyvmms(boot_sector, tmp_path):
    """After SeaBIOS has run etc/table-loader, guest memory holds exactly the tables pyvmm builds
    for a firmware boot (the PC form: a full FADT with PM1 blocks and a FACS), linked at the
    addresses SeaBIOS chose."""
    from vmm.boot import acpi_config
    from vmm.config import VmConfig, parse_disk_spec
    from vmm.machine import Machine

    disk = tmp_path / "a.img"
    make_disk(disk, boot_sector("A"), seed=1)
    cpus = 2
    cfg = VmConfig(mem_size=512 * MiB, cpus=cpus, firmware=fw.DEFAULT_FIRMWARE,
                   disks=[parse_disk_spec(str(disk))], console=f"file:{tmp_path / 'console.txt'}",
                        kernel_mode_native=False)
    m = Machine(cfg)
    try:
        assert m.run() == 0
        console = (tmp_path / "console.txt").read_text(errors="replace")
        assert "PYVMM-SUM" in console, console
        rsdp = next((a for a in range(0xE0000, 0x100000, 16) if m.mem.read(a, 8) == acpi.RSDP_SIGNATURE
                     and sum(m.mem.read(a, 20)) % 256 == 0), None)
        assert rsdp is not None, "no RSDP in 0xE0000-0xFFFFF"
        addresses = {"RSDP": rsdp, "XSDT": m.mem.read_int(rsdp + 24, 8)}
        xsdt_len = m.mem.read_int(addresses["XSDT"] + 4, 4)
        for i in range((xsdt_len - acpi.HEADER_LENGTH) // 8):
            addr = m.mem.read_int(addresses["XSDT"] + acpi.HEADER_LENGTH + 8 * i, 8)
            addresses[m.mem.read(addr, 4).decode()] = addr
        addresses["DSDT"] = m.mem.read_int(addresses["FACP"] + 140, 8)  # X_DSDT
        addresses["FACS"] = m.mem.read_int(addresses["FACP"] + 36, 4)  # FIRMWARE_CTRL
        assert addresses["FACS"] % 64 == 0
        tables = acpi.build_tables(acpi_config(cpus, m.pci.layout.acpi_config(), pc_platform=True))
        assert sorted(addresses) == sorted(t.name for t in tables)
        for name, data in acpi.link(tables, addresses).items():
            assert m.mem.read(addresses[name], len(data)) == data, name
    finally:
        m.close()


# -- iPXE on virtio-net ---------------------------------------------------------------------------

IPXE_STEPS = [
    ("SeaBIOS runs the NIC's option ROM", r"Running option rom at"),
    ("iPXE ROM banner (PCI 00:0N.0, PnP, PMM)", r"iPXE \(http://ipxe\.org\) 00:"),
    ("SeaBIOS boots the ROM's BEV", r"Booting from ROM"),
    ("iPXE starting execution (decompressed, relocated)", r"starting execution\.\.\.ok"),
    ("iPXE initialising devices", r"initialising devices\.\.\.ok"),
    ("iPXE banner", r"iPXE 1\.|Open Source Network Boot Firmware"),
    ("virtio-net driver opened our device", r"net0: [0-9a-f:]{17} using virtio-net"),
    ("link up", r"Link:up"),
    ("DHCP started", r"Configuring \(net0"),
    ("DHCP and IPv6 router discovery done", r"Configuring \(net0[^\n]*ok"),
    ("DHCP address", r"net0: \d+\.\d+\.\d+\.\d+/"),
    ("TFTP download done", r"tftp://[^ ]*/boot\.bin\.\.\. ok"),
    ("PXE NBP started (our boot sector)", r"PYVMM-BOOT N"),
]

HOST_IP, NET = "10.9.0.1", "10.9.0"


# Answers IPv6 router solicitations on tap0 with a router advertisement (no prefix, no flags):
# iPXE configures IPv4 (DHCP) and IPv6 (router discovery) side by side and says "ok" only when
# both are done; unanswered, its solicitations take about 30 s to give up.
RA_RESPONDER = r"""
import socket, struct, sys, time
dev = sys.argv[1]
for _ in range(300):
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD)); s.bind((dev, 0)); break
    except OSError:
        time.sleep(0.1)
mac = bytes.fromhex(open(f"/sys/class/net/{dev}/address").read().strip().replace(":", ""))
src = bytes.fromhex("fe80000000000000") + bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
def csum(data):
    data += b"\0" * (len(data) & 1)
    t = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
while True:
    f, addr = s.recvfrom(2048)
    if addr[2] == socket.PACKET_OUTGOING or len(f) < 58 or f[20] != 58 or f[54] != 133:
        continue
    dst = f[22:38] if any(f[22:38]) else bytes.fromhex("ff020000000000000000000000000001")
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0) + bytes([1, 1]) + mac
    ra = ra[:2] + struct.pack("!H", csum(src + dst + struct.pack("!I3xB", len(ra), 58) + ra)) + ra[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(ra), 58, 255) + src + dst
    s.send(f[6:12] + mac + b"\x86\xdd" + ip6 + ra)
"""


class PxeServers:
    """dnsmasq (DHCP + TFTP, DNS off) and the router-advertisement responder in the namespace, on
    tap0 once pyvmm has created it.  Started from a thread (tap0 appears only after pyvmm starts);
    `close()` stops whatever was started, also when the test fails half way."""

    def __init__(self, ns: str, workdir, nbp: bytes, t0: float):
        self.ns, self.workdir, self.t0 = ns, workdir, t0
        self.tftp = workdir / "tftp"
        self.tftp.mkdir()
        (self.tftp / "boot.bin").write_bytes(nbp)
        self.log: list[tuple[float, str]] = []  # (seconds since t0, dnsmasq's line)
        self.error: str | None = None
        self._procs: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._start, daemon=True)

    def dnsmasq_cmd(self) -> list[str]:
        w = self.workdir
        return ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--user=root", "--port=0",
                "--interface=tap0", "--bind-interfaces", f"--listen-address={HOST_IP}",
                f"--dhcp-range={NET}.10,{NET}.20,255.255.255.0,1h", "--dhcp-authoritative",
                f"--dhcp-leasefile={w}/dnsmasq.leases", f"--pid-file={w}/dnsmasq.pid",
                "--enable-tftp", f"--tftp-root={self.tftp}", "--dhcp-boot=boot.bin", "--log-facility=-"]

    def start(self):
        self._thread.start()

    def _start(self):
        deadline = time.monotonic() + 30
        while subprocess.run(["ip", "-n", self.ns, "link", "show", "tap0"], capture_output=True).returncode:
            if self._stop.is_set() or time.monotonic() > deadline:
                self.error = "tap0 never appeared in the namespace"
                return
            time.sleep(0.05)
        for cmd in (["ip", "-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
                    ["ip", "-n", self.ns, "link", "set", "tap0", "up"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                self.error = f"{' '.join(cmd)}: {r.stderr.strip()}"
                return
        for cmd, logged in ((self.dnsmasq_cmd(), True), ([sys.executable, "-c", RA_RESPONDER, "tap0"], False)):
            with self._lock:
                if self._stop.is_set():
                    return
                p = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if logged else subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if logged else subprocess.DEVNULL,
                                     start_new_session=True)
                self._procs.append(p)
            if logged:
                reader = threading.Thread(target=self._read, args=(p,), daemon=True)
                reader.start()
                self._readers.append(reader)

    def _read(self, p: subprocess.Popen):
        for raw in p.stdout:
            self.log.append((time.monotonic() - self.t0, raw.decode(errors="replace").rstrip()))

    def first(self, pattern: str) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        return next(((t, line) for t, line in list(self.log) if rx.search(line)), None)

    def text(self) -> str:
        return "\n".join(f"{t:7.2f} {line}" for t, line in self.log) or "(dnsmasq logged nothing)"

    def close(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=35)
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for p in procs:
            if p.stdout:
                p.stdout.close()


@needs_seabios
@pytest.mark.skipif(not os.path.exists(fw.DEFAULT_NET_ROM), reason=f"no {fw.DEFAULT_NET_ROM} (package ipxe-qemu)")
def test_ipxe_from_the_virtio_net_rom(boot_sector, tmp_path):
    """SeaBIOS finds iPXE behind virtio-net's ROM BAR and runs it; iPXE's virtio-net driver
    opens our device; dnsmasq in the namespace gives it an address over DHCP and our boot sector
    over TFTP, which iPXE runs as a PXE NBP: it prints its marker and powers off.  Without dnsmasq
    (package dnsmasq-base) the test checks only up to iPXE starting DHCP."""
    from tests.support.netns import namespace

    serve = shutil.which("dnsmasq") is not None
    nbp = boot_sector("N")
    with namespace() as ns:
        servers = PxeServers(ns, tmp_path, nbp, time.monotonic())  # dnsmasq's times: from about pyvmm's start
        if serve:
            servers.start()
        else:
            def link_up():
                deadline = time.monotonic() + 30
                while subprocess.run(["ip", "-n", ns, "link", "set", "tap0", "up"],
                                     capture_output=True).returncode != 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
            threading.Thread(target=link_up, daemon=True).start()
        try:
            run = run_pyvmm(["-v", "run", "--firmware", "--net", "tap=tap0", "--boot", "net", "--console", "stdio"],
                            netns=ns, timeout=100, stop_at=None if serve else r"Configuring \(net0")
        finally:
            servers.close()
    lease, sent = servers.first(r"DHCPACK\(tap0\)"), servers.first(r"sent \S*boot\.bin to ")
    steps = [(name, run.time_of(rx)) for name, rx in IPXE_STEPS]
    extra = [("dnsmasq: DHCPACK (lease handed out)", lease and lease[0]),
             ("dnsmasq: TFTP sent boot.bin", sent and sent[0])] if serve else []
    report(f"iPXE on virtio-net ({'DHCP + TFTP from dnsmasq' if serve else 'no dnsmasq, so no DHCP server'}; "
           f"seconds from pyvmm start):", sorted(steps + extra, key=lambda s: (s[1] is None, s[1] or 0))
           + [("pyvmm exited", run.wall)])
    if serve:
        print(f"dnsmasq's log (seconds from pyvmm start):\n{servers.text()}")
    out = run.text()
    reached = dict(steps)
    for name in ("SeaBIOS runs the NIC's option ROM", "iPXE ROM banner (PCI 00:0N.0, PnP, PMM)",
                 "SeaBIOS boots the ROM's BEV", "iPXE starting execution (decompressed, relocated)",
                 "virtio-net driver opened our device", "link up", "DHCP started"):
        assert reached[name] is not None, f"iPXE did not get to: {name}\n{out}"
    if serve:
        where = f"\n--- pyvmm ---\n{out}\n--- dnsmasq ---\n{servers.text()}"
        assert servers.error is None, servers.error + where
        assert lease is not None, f"dnsmasq handed out no lease{where}"
        got = re.search(rf"DHCPACK\(tap0\) ({NET}\.\d+) ([0-9a-f:]{{17}})", lease[1])
        assert got, lease[1] + where
        assert run.first(rf"net0: {re.escape(got.group(1))}/255\.255\.255\.0"), where  # the address iPXE took
        assert run.first(rf"net0: {got.group(2)} using virtio-net"), where  # ... for our NIC's MAC
        assert sent is not None and sent[1].rstrip().endswith(f"to {got.group(1)}"), \
            f"dnsmasq sent no boot.bin over TFTP to {got.group(1)}{where}"
        assert reached["TFTP download done"] is not None, where
        assert reached["PXE NBP started (our boot sector)"] is not None, where
        assert run.rc == 0, where  # the NBP powered off


# -- the command line -------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["--firmware", "/nonexistent/bios.bin"], ["--firmware", "does not exist"]),
    (["--firmware", "--kernel", "/bin/true"], ["--firmware", "--kernel"]),
    (["--boot", "disk"], ["--boot needs --firmware"]),
    (["--firmware-log", "/tmp/x.log"], ["--firmware-log needs --firmware"]),
    (["--firmware", "--boot", "floppy"], ["--boot", "floppy"]),
    (["--firmware", "--boot", "disk1"], ["disk1", "not given"]),
    (["--firmware", "--net", "tap=t0,rom=/nonexistent.rom"], ["rom", "/nonexistent.rom"]),
    (["--firmware", "--net", "tap=t0,rom="], ["rom="]),
    (["--firmware", "--firmware-log", "/nonexistent/dir/x.log"], ["--firmware-log", "does not exist"]),
])
def test_cli_errors(args, words):
    _one_line_error(_cli("run", *args), *words)


def test_cli_firmware_image_checked(tmp_path):
    bad = tmp_path / "bios.bin"
    bad.write_bytes(b"\0" * 1000)
    _one_line_error(_cli("run", "--firmware", str(bad)), "multiple of 4 KiB")
