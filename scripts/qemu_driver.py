#!/usr/bin/env python3
"""Run the driver guest (tests/guest/driver) under QEMU, against QEMU's own virtio devices.

pyvmm starts the driver ELF directly in 64-bit user mode. QEMU cannot: its `-kernel` takes an
ELF only through the Xen PVH boot ABI. tests/guest/driver/pvh.S adds the PVH ELF note and a small
32-bit entry stub that builds page tables and a GDT and `iretq`s to user mode, which then reaches
`_start` in the state pyvmm gives it (pyvmm ignores the note and still starts the same ELF at
e_entry, `_start`; driver_sources() picks pvh.S up, so pyvmm's driver.elf has it too).

How a job runs here:

* the job block (tests.support.driver.encode_job) and any input buffers are files placed in guest
  RAM by QEMU's generic loader (`-device loader,file=...,addr=...,force-raw=on`) at reset;
* QEMU starts paused (-S) with a QMP socket and the serial port on a socket this module reads
  (every byte time-stamped); after `cont`, the firmware runs (SeaBIOS by default: ~3 s here, in
  emulated real mode on this host's software KVM; firmware="qboot": ~0.05 s, and pvh.S assigns
  the BARs qboot leaves alone), then pvh.bin enters pvh.S, which prints "pvh" and starts the driver;
* the guest's power-off (port 0x600) means nothing on q35, so this module polls the job block's
  status with QMP `human-monitor-command` `xp` until it leaves R_NOT_RUN (or QEMU exits, or the
  time is up), then `pmemsave`s the job block and the buffers asked for, and quits QEMU.

    from scripts.qemu_driver import QemuDisk, run_qemu_job
    from tests.support import driver as D
    res = run_qemu_job([D.blk_init(), D.blk_get_id(D.DATA_START)], workdir=tmp,
                       disks=[QemuDisk("/dev/shm/x.img", serial="abc")], save=[(D.DATA_START, 20)])
    res.check(); res.buffers[D.DATA_START]; res.timings

virtio-net-pci the same way: nets=[QemuNet("tap", "tap0")] (vhost=off) or QemuNet("user").

By hand (commands are Python expressions over tests.support.driver's helpers):

    python3 scripts/qemu_driver.py --disk /dev/shm/x.img,serial=abc,queues=2 \\
        'blk_init()' 'blk_bench(20000, 4096, DATA_START, random=True, depth=32)'
"""

import argparse
import fcntl
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import driver as D  # noqa: E402
from tests.support.guests import LINK_FLAGS  # noqa: E402

QEMU = "qemu-system-x86_64"
PVH_SOURCE = D.DRIVER_DIR / "pvh.S"
PVH_ELF_NAME = "driver-pvh.elf"
XEN_ELFNOTE_PHYS32_ENTRY = 18
# -cpu host aborts on this host's software KVM unless IA32_ARCH_CAPABILITIES is left out
# (shared/README.md); leaving it out costs nothing elsewhere.
DEFAULT_CPU = "host,-arch-capabilities"
PVH_MARK = "pvh\n"          # pvh.S prints it on entry
DRIVER_MARK = "driver:"     # main() prints "driver: N commands ..." first (unless the job is quiet)


class QemuError(RuntimeError):
    """QEMU did not start, or the harness could not talk to it."""


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None


def have_kvm() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


# ---- building ------------------------------------------------------------------------------
def pvh_sources() -> list[Path]:
    """The driver's sources with pvh.S (driver_sources() already has it when it lies in the
    driver directory: then pyvmm's own driver.elf is PVH-capable too)."""
    srcs = list(D.driver_sources())
    if PVH_SOURCE not in srcs:
        srcs.append(PVH_SOURCE)
    return srcs


def build_pvh_driver(out_dir: Path | str, *, extra_cflags: list[str] = ()) -> Path:
    """Compile the driver guest with its PVH entry into out_dir/driver-pvh.elf (rebuilt when a
    source is newer). The same ELF runs under pyvmm (entry _start) and QEMU (entry pvh_start)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / PVH_ELF_NAME
    srcs = pvh_sources()
    inputs = [*srcs, *D.DRIVER_DIR.glob("*.h"), Path(D.__file__), Path(__file__)]
    if out.exists() and not extra_cflags and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return out
    tmp = out_dir / (PVH_ELF_NAME + ".tmp")
    r = subprocess.run(["gcc", *D.CFLAGS, *extra_cflags, *LINK_FLAGS, "-I", str(D.DRIVER_DIR), "-o", str(tmp),
                        *map(str, srcs)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"building the PVH driver guest failed:\n{r.stderr}")
    if pvh_entry(tmp) is None:
        raise RuntimeError(f"{tmp} has no XEN_ELFNOTE_PHYS32_ENTRY note")
    tmp.replace(out)
    return out


def pvh_entry(path: Path | str) -> int | None:
    """The PVH entry point an ELF declares (XEN_ELFNOTE_PHYS32_ENTRY), as QEMU reads it."""
    from kernel.elf import parse_elf

    return parse_elf(Path(path).read_bytes()).pvh_entry


# ---- the TSC -------------------------------------------------------------------------------
_tsc_khz: int | None = None


def host_tsc_khz() -> int:
    """The TSC frequency a KVM vCPU gets by default, in kHz (0 if it cannot be told).

    Asked of KVM itself (KVM_GET_TSC_KHZ on a scratch VM's vCPU): that is the rate QEMU's guests
    run at with -accel kvm unless `tsc-frequency` is set, and what pyvmm's guest_tsc_khz() reads
    on its own vCPUs, so both VMMs' driver jobs convert cycles alike. Cached."""
    global _tsc_khz
    if _tsc_khz is None:
        _tsc_khz = _kvm_tsc_khz()
    return _tsc_khz


def _kvm_tsc_khz() -> int:
    from vmm.kvm import constants as c

    fds = []
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        vm = fcntl.ioctl(kvm, c.KVM_CREATE_VM, 0)
        fds.append(vm)
        vcpu = fcntl.ioctl(vm, c.KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        return max(0, fcntl.ioctl(vcpu, c.KVM_GET_TSC_KHZ, 0))
    except OSError:
        return 0
    finally:
        for fd in reversed(fds):
            os.close(fd)


# ---- QMP -----------------------------------------------------------------------------------
class Qmp:
    """A minimal QMP client on a unix socket (asynchronous events are read and dropped)."""

    def __init__(self, sock: socket.socket, timeout: float = 30):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError(f"no QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name: str, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QemuError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def read_u32s(self, addr: int, count: int) -> list[int]:
        """`count` 32-bit words of guest physical memory (HMP xp)."""
        out = self.hmp(f"xp /{count}wx {addr:#x}")
        words = []
        for line in out.splitlines():
            _, _, rest = line.partition(":")
            words += [int(w, 16) for w in rest.split()]
        if len(words) != count:
            raise QemuError(f"xp {addr:#x}: unexpected reply {out!r}")
        return words

    def close(self) -> None:
        for f in (self.file, self.sock):
            try:
                f.close()
            except OSError:
                pass


class SerialReader(threading.Thread):
    """Reads the guest's COM1 from QEMU's socket chardev, appends it to a log file and notes
    when each marker first appeared (time.monotonic())."""

    def __init__(self, sock: socket.socket, log: Path, marks: tuple[str, ...]):
        super().__init__(name="qemu-serial", daemon=True)
        self.sock, self.log, self.pending_marks = sock, log, list(marks)
        self.marks: dict[str, float] = {}
        self.chunks: list[bytes] = []
        self._tail = ""

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.sock.close()

    def _run(self) -> None:
        with open(self.log, "wb") as f:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                now = time.monotonic()
                f.write(data)
                f.flush()
                self.chunks.append(data)
                if self.pending_marks:
                    self._tail = (self._tail + data.decode("latin-1"))[-4096:]
                    for m in list(self.pending_marks):
                        if m in self._tail:
                            self.marks[m] = now
                            self.pending_marks.remove(m)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


# ---- running a job ---------------------------------------------------------------------------
@dataclass
class QemuDisk:
    """A virtio-blk-pci disk (modern only: disable-legacy=on, as the driver guest expects)."""

    path: str
    serial: str = ""
    queues: int = 1
    queue_size: int = 0             # 0: QEMU's default (256)
    cache: str = "writeback"        # writeback (page cache, as pyvmm's default) | none | unsafe | ...
    aio: str = "threads"
    read_only: bool = False
    device_opts: str = ""           # more ",key=value" for -device virtio-blk-pci

    def args(self, index: int) -> list[str]:
        drive = f"file={self.path},if=none,id=d{index},format=raw,cache={self.cache},aio={self.aio}"
        if self.read_only:
            drive += ",readonly=on"
        dev = f"virtio-blk-pci,drive=d{index},disable-legacy=on,num-queues={self.queues}"
        if self.serial:
            dev += f",serial={self.serial}"
        if self.queue_size:
            dev += f",queue-size={self.queue_size}"
        if self.device_opts:
            dev += "," + self.device_opts.lstrip(",")
        return ["-drive", drive, "-device", dev]


@dataclass
class QemuNet:
    """A virtio-net-pci device (modern only, vhost off: QEMU's own device model, as pyvmm's) on a
    netdev: "tap" (ifname: an existing tap, or one QEMU creates, in the namespace QEMU runs in),
    "user" (QEMU's slirp), or any -netdev type with netdev_opts."""

    netdev: str = "tap"
    ifname: str = ""
    mac: str = ""
    queues: int = 1                 # queue pairs: mq=on when > 1 (needs a multiqueue tap)
    netdev_opts: str = ""           # more ",key=value" for -netdev
    device_opts: str = ""           # more ",key=value" for -device virtio-net-pci

    def args(self, index: int) -> list[str]:
        nd = f"{self.netdev},id=n{index}"
        if self.netdev == "tap":
            nd += ",script=no,downscript=no,vhost=off" + (f",ifname={self.ifname}" if self.ifname else "")
            if self.queues > 1:
                nd += f",queues={self.queues}"
        if self.netdev_opts:
            nd += "," + self.netdev_opts.lstrip(",")
        dev = f"virtio-net-pci,netdev=n{index},disable-legacy=on"
        if self.queues > 1:
            dev += f",mq=on,vectors={2 * self.queues + 2}"
        if self.mac:
            dev += f",mac={self.mac}"
        if self.device_opts:
            dev += "," + self.device_opts.lstrip(",")
        return ["-netdev", nd, "-device", dev]


@dataclass
class QemuJobResult(D.JobResult):
    """JobResult (status, cmds_done, progress, cmds, console, exit_code = QEMU's exit status,
    message) plus what the QEMU run adds."""

    buffers: dict[int, bytes] = field(default_factory=dict)   # address -> bytes, as `save` asked
    timings: dict[str, float] = field(default_factory=dict)   # seconds, see run_qemu_job
    cpu: dict[str, float] = field(default_factory=dict)       # QEMU's CPU seconds (user + system)
    tsc_khz: int = 0                # what the job block told the guest
    qemu_tsc_khz: int = 0           # the vCPU's tsc-frequency as QEMU reports it (QOM), 0 unknown
    pci: list = field(default_factory=list)     # query-pci: the devices with their BARs
    argv: list = field(default_factory=list)
    stderr: str = ""

    def describe(self) -> str:
        text = super().describe()
        err = [x for x in self.stderr.splitlines() if x.strip() and "QEMU waiting for connection" not in x]
        if err:
            text += "\nqemu stderr:\n" + "\n".join("  | " + x for x in err[-20:])
        if self.timings:
            text += "\ntimings: " + timings_text(self.timings)
        return text


def timings_text(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f} s" for k, v in t.items())


def _proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connect_unix(path: Path, proc: subprocess.Popen, deadline: float) -> socket.socket:
    while True:
        if proc.poll() is not None:
            raise QemuError(f"QEMU exited with status {proc.returncode} before its socket {path} was ready")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU's socket {path} did not come up")
        time.sleep(0.01)


def qboot_rom() -> Path | None:
    """QEMU's qboot firmware, if installed (Debian: qemu-system-data)."""
    for d in ("/usr/share/qemu", "/usr/local/share/qemu", "/usr/share/qemu-kvm"):
        p = Path(d) / "qboot.rom"
        if p.exists():
            return p
    return None


def firmware_args(firmware: str) -> list[str]:
    """"seabios": QEMU's default BIOS (assigns PCI BARs, ~3 s here in emulated real mode); "qboot":
    the minimal firmware QEMU ships (~0.05 s here; assigns no BARs: pvh.S does, in user mode);
    anything else: a firmware image's path for -bios."""
    if firmware == "seabios":
        return []
    if firmware == "qboot":
        rom = qboot_rom()
        if rom is None:
            raise QemuError("qboot.rom is not installed")
        return ["-bios", str(rom)]
    return ["-bios", firmware]


def qemu_argv(program: Path | str, *, job_file: Path, serial_sock: Path, qmp_sock: Path, disks=(), nets=(),
              loads: list[tuple[int, Path]] = (), mem_mib: int = 1024, cpus: int = 1, cpu: str = DEFAULT_CPU,
              accel: str = "kvm", firmware: str = "seabios", qemu: str = QEMU, extra_args=()) -> list[str]:
    argv = [qemu, "-accel", accel, "-M", "q35", "-cpu", cpu, "-m", str(mem_mib), "-smp", str(cpus),
            "-nographic", "-nodefaults", "-no-reboot", "-S",
            *firmware_args(firmware),
            "-chardev", f"socket,id=ser0,path={serial_sock},server=on,wait=on", "-serial", "chardev:ser0",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off",
            "-kernel", str(program),
            "-device", f"loader,file={job_file},addr={D.JOB_ADDR:#x},force-raw=on"]
    for addr, path in loads:
        argv += ["-device", f"loader,file={path},addr={addr:#x},force-raw=on"]
    for i, d in enumerate(disks):
        argv += d.args(i)
    for i, n in enumerate(nets):
        argv += n.args(i)
    return argv + list(extra_args)


def run_qemu_job(cmds: list[D.Cmd], *, workdir: Path | str, disks: list[QemuDisk] = (), nets: list[QemuNet] = (),
                 load: dict[int, bytes | Path] | None = None, save: list[tuple[int, int]] = (),
                 mem_mib: int = 1024, cpus: int = 1, timeout: float = 60, timeout_ms: int = 0,
                 quiet: bool = False, tsc_khz: int | None = None, program: Path | str | None = None,
                 cpu: str | None = None, accel: str = "kvm", firmware: str = "seabios",
                 poll_interval: float = 0.02, qemu: str = QEMU, extra_args=()) -> QemuJobResult:
    """Run a driver job under QEMU and return its results.

    cmds: the commands (tests.support.driver helpers). disks: virtio-blk-pci devices, in PCI order
    (dev 0, 1, ...); nets: virtio-net-pci devices, after the disks. load: guest physical address ->
    bytes (or a file) put in RAM before the start.
    save: (address, length) ranges read back at the end into result.buffers. timeout: seconds
    for the whole run, QEMU's start included; timeout_ms: the guest's own no-progress limit per
    command (0: 10 s). tsc_khz: for the job block (None: host_tsc_khz()). program: a PVH driver
    ELF (None: build_pvh_driver(workdir)). accel: "kvm", or "tcg" (QEMU's own emulator: checks the
    PVH stub on another CPU model); cpu: the -cpu model (None: DEFAULT_CPU with kvm, "max" with tcg).
    firmware: "seabios" (QEMU's default), "qboot" (much quicker to start here), or a -bios path.

    result.timings (seconds): `qemu_start` (process start to ready, paused at -S), `firmware`
    (`cont` to pvh.S's "pvh" on COM1: SeaBIOS or qboot, and pvh.bin), `pvh_stub` ("pvh" to the
    driver's first line, i.e. the stub and the driver's start; needs quiet=False), `job` (the
    driver's first line, or "pvh" when quiet, to the job status seen written), `first_cmd_seen`
    (`cont` to cmds_done >= 1 seen), `total` (process start to the status seen), `quit`. Marks
    on the console are timed as the bytes arrive; the rest to poll_interval.
    result.cpu: QEMU's CPU seconds (all threads) `at_cont`, `at_first_cmd`, `at_done`.
    A QEMU that cannot start raises QemuError; a job that does not finish (timeout, QEMU gone,
    e.g. after a triple fault: -no-reboot) comes back with status R_NOT_RUN and a message.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    program = Path(program) if program else build_pvh_driver(workdir)
    khz = host_tsc_khz() if tsc_khz is None else tsc_khz
    job_file = workdir / "job.bin"
    job_file.write_bytes(D.encode_job(cmds, tsc_khz=khz, timeout_ms=timeout_ms, quiet=quiet))
    loads = []
    for addr, data in (load or {}).items():
        if isinstance(data, (bytes, bytearray, memoryview)):
            path = workdir / f"load-{addr:x}.bin"
            path.write_bytes(data)
        else:
            path = Path(data)
        loads.append((addr, path))
    # unix socket paths are limited to 107 bytes: keep them in a short private directory
    sockdir = Path(tempfile.mkdtemp(prefix="qd-"))
    serial_sock, qmp_sock = sockdir / "serial", sockdir / "qmp"
    argv = qemu_argv(program, job_file=job_file, serial_sock=serial_sock, qmp_sock=qmp_sock, disks=disks,
                     nets=nets, loads=loads, mem_mib=mem_mib, cpus=cpus,
                     cpu=cpu or (DEFAULT_CPU if accel == "kvm" else "max"), accel=accel, firmware=firmware,
                     qemu=qemu, extra_args=extra_args)
    stderr_path = workdir / "qemu.stderr"
    console_path = workdir / "console.log"
    res = QemuJobResult(status=D.R_NOT_RUN, cmds_done=0, progress=0, cmds=list(cmds), message="", tsc_khz=khz,
                        argv=argv)
    t = res.timings
    t_launch = time.monotonic()
    deadline = t_launch + timeout
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
    qmp = reader = None
    try:
        try:
            ser = _connect_unix(serial_sock, proc, t_launch + 30)
            reader = SerialReader(ser, console_path, (PVH_MARK, DRIVER_MARK))
            reader.start()
            qmp = Qmp(_connect_unix(qmp_sock, proc, t_launch + 30))
        except (QemuError, OSError, EOFError) as e:
            proc.kill()
            proc.wait()
            raise QemuError(f"{e}\n{' '.join(map(shlex.quote, argv))}\n{_read(stderr_path)}") from None
        res.qemu_tsc_khz = _qemu_tsc_khz(qmp)
        t_cont = time.monotonic()
        t["qemu_start"] = t_cont - t_launch
        res.cpu["at_cont"] = _proc_cpu(proc.pid)
        qmp.cmd("cont")
        t_done = None
        while True:
            if proc.poll() is not None:
                break
            try:
                status, done, progress = qmp.read_u32s(D.JOB_ADDR + 12, 3)
            except (EOFError, OSError, QemuError) as e:
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    res.message = f"lost QMP ({e})"
                break
            now = time.monotonic()
            if done >= 1 and res.cmds_done == 0:
                res.cpu["at_first_cmd"] = _proc_cpu(proc.pid)
                t["first_cmd_seen"] = now - t_cont
            res.cmds_done, res.progress = done, progress  # as last seen, should the end be lost
            if status != D.R_NOT_RUN:
                res.cpu["at_done"] = _proc_cpu(proc.pid)
                res.message = "job finished"
                t_done = now
                break
            if now > deadline:
                res.message = f"timeout: the job did not finish within {timeout} s"
                break
            time.sleep(poll_interval)
        if proc.poll() is not None:
            res.message = (f"QEMU exited (status {proc.returncode}) before the job finished (with -no-reboot: "
                           "a triple fault, which is what any exception in the driver guest becomes)")
        elif res.message.startswith("lost QMP"):
            pass
        else:
            try:
                _collect(qmp, res, len(cmds), save, workdir)
                res.pci = _pci_devices(qmp)
            except (EOFError, OSError, QemuError, ValueError) as e:
                res.message += f"; the results could not be read: {e}"
            t_quit = time.monotonic()
            try:
                qmp.cmd("quit")
            except (EOFError, OSError, QemuError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            t["quit"] = time.monotonic() - t_quit
        res.exit_code = proc.returncode
        if reader is not None:
            reader.join(5)
            marks = dict(reader.marks)
            if PVH_MARK in marks:
                t["firmware"] = marks[PVH_MARK] - t_cont
                if DRIVER_MARK in marks:
                    t["pvh_stub"] = marks[DRIVER_MARK] - marks[PVH_MARK]
            start = marks.get(DRIVER_MARK, marks.get(PVH_MARK))
            if t_done is not None:
                if start is not None:
                    t["job"] = t_done - start
                t["total"] = t_done - t_launch
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    res.console = reader.text if reader is not None else ""
    res.stderr = _read(stderr_path)
    return res


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _collect(qmp: Qmp, res: QemuJobResult, ncmds: int, save, workdir: Path) -> None:
    """pmemsave the job block and the buffers asked for; fill res."""
    size = D.JOB_HEADER_SIZE + ncmds * D.CMD_SIZE
    path = workdir / "job.out"
    qmp.cmd("pmemsave", val=D.JOB_ADDR, size=size, filename=str(path))
    job = D.decode_job(path.read_bytes(), ncmds)
    res.status, res.cmds_done, res.progress, res.cmds = job.status, job.cmds_done, job.progress, job.cmds
    for addr, length in save:
        path = workdir / f"save-{addr:x}.bin"
        qmp.cmd("pmemsave", val=addr, size=length, filename=str(path))
        res.buffers[addr] = path.read_bytes()


def _pci_devices(qmp: Qmp) -> list[dict]:
    """Every PCI function with its BARs as the firmware assigned them."""
    out = []
    try:
        buses = qmp.cmd("query-pci")
    except QemuError:
        return out
    for bus in buses:
        for dev in bus.get("devices", []):
            out.append({"slot": dev.get("slot"), "function": dev.get("function"),
                        "id": f"{dev['id']['vendor']:04x}:{dev['id']['device']:04x}",
                        "qdev_id": dev.get("qdev_id", ""),
                        "bars": [{"bar": r["bar"], "type": r["type"], "address": r["address"], "size": r["size"],
                                  "mem_type_64": r.get("mem_type_64", False)} for r in dev.get("regions", [])]})
    return out


def _qemu_tsc_khz(qmp: Qmp) -> int:
    try:
        path = qmp.cmd("query-cpus-fast")[0]["qom-path"]
        return int(qmp.cmd("qom-get", path=path, property="tsc-frequency")) // 1000
    except (QemuError, LookupError, ValueError, TypeError):
        return 0


# ---- for scripts/bench_disk.py ----------------------------------------------------------------
def bench_result(image: Path, w, work: Path, result_cls):
    """One bench_disk.py workload (w: its Workload) on QEMU's virtio-blk-pci (1 queue,
    cache=writeback, aio=threads: the page cache, as pyvmm's default), driven by the same job
    bench_disk.py gives pyvmm. Returns a result_cls (bench_disk.Result). CPU per GB: QEMU's
    process CPU from the end of blk_init (as first seen by the poller) to the end of the bench.
    Firmware: qboot where installed (starts in ~0.05 s here instead of SeaBIOS's ~3 s; the
    device and its BARs work the same)."""
    job = run_qemu_job([
        D.blk_init(event_idx=True, indirect=True, queues=1),
        D.blk_bench(w.requests, w.request, D.DATA_START, write=w.write, random=w.random, depth=w.depth),
    ], workdir=Path(work) / "qemu", disks=[QemuDisk(str(image))], mem_mib=256, timeout=600,
        timeout_ms=120_000, quiet=True, firmware="qboot" if qboot_rom() else "seabios")
    job.check()
    khz = job.qemu_tsc_khz or job.tsc_khz
    if not khz:
        raise RuntimeError("the guest's TSC frequency is unknown")
    seconds = job.cmds[1].value / (khz * 1000)
    total = w.requests * w.request
    cpu = None
    if "at_first_cmd" in job.cpu and "at_done" in job.cpu:
        cpu = (job.cpu["at_done"] - job.cpu["at_first_cmd"]) / (total / 1e9)
    return result_cls(Path(image).parent.as_posix(), w.name, "qemu", seconds, total / seconds / 1e6,
                      w.requests / seconds, cpu, "virtio-blk-pci, cache=writeback, aio=threads, 1 queue, "
                      "CPU from the end of blk_init")


# ---- command line ------------------------------------------------------------------------------
def _parse_disk(text: str) -> QemuDisk:
    path, *opts = text.split(",")
    d = QemuDisk(path)
    for o in opts:
        k, _, v = o.partition("=")
        if k == "serial":
            d.serial = v
        elif k == "queues":
            d.queues = int(v)
        elif k == "queue_size":
            d.queue_size = int(v)
        elif k in ("cache", "aio"):
            setattr(d, k, v)
        elif k == "readonly":
            d.read_only = v in ("on", "1", "yes", "true")
        else:
            d.device_opts += f",{o}"
    return d


def _parse_net(text: str) -> QemuNet:
    kind, *opts = text.split(",")
    kind, _, ifname = kind.partition(":")
    n = QemuNet(kind, ifname)
    for o in opts:
        k, _, v = o.partition("=")
        if k == "queues":
            n.queues = int(v)
        elif k == "mac":
            n.mac = v
        else:
            n.device_opts += f",{o}"
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commands", nargs="+", help="driver commands as Python expressions, e.g. 'blk_init()'")
    ap.add_argument("--disk", action="append", default=[],
                    help="PATH[,serial=ID][,queues=N][,queue_size=N][,cache=MODE][,aio=MODE][,readonly=on]"
                         "[,other virtio-blk-pci property=value]")
    ap.add_argument("--net", action="append", default=[],
                    help="user | tap[:IFNAME][,queues=N][,mac=M][,other virtio-net-pci property=value]")
    ap.add_argument("--mem", type=int, default=1024, help="guest RAM in MiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--timeout-ms", type=int, default=0, help="the guest's no-progress limit per command")
    ap.add_argument("--quiet", action="store_true", help="the guest prints only errors")
    ap.add_argument("--cpu", help=f"-cpu model (default: {DEFAULT_CPU} with kvm, max with tcg)")
    ap.add_argument("--accel", default="kvm", choices=["kvm", "tcg"])
    ap.add_argument("--firmware", default="seabios", help="seabios (default), qboot, or a -bios image")
    ap.add_argument("--save", action="append", default=[], metavar="ADDR:LEN",
                    help="dump guest memory at the end (first 256 bytes shown)")
    ap.add_argument("--workdir", help="where the ELF, job and logs go (default: a temporary directory, kept)")
    ap.add_argument("--extra", default="", help="more QEMU arguments (one string, split like a shell)")
    args = ap.parse_args(argv)
    if not have_qemu():
        print(f"{QEMU} not found", file=sys.stderr)
        return 2
    namespace = {k: v for k, v in vars(D).items() if not k.startswith("_")}
    cmds = [eval(c, namespace) for c in args.commands]  # noqa: S307 - a developer's own command line
    save = []
    for s in args.save:
        a, _, n = s.partition(":")
        save.append((int(a, 0), int(n, 0)))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qemu-driver-"))
    res = run_qemu_job(cmds, workdir=workdir, disks=[_parse_disk(d) for d in args.disk],
                       nets=[_parse_net(n) for n in args.net], save=save,
                       mem_mib=args.mem, cpus=args.cpus, timeout=args.timeout, timeout_ms=args.timeout_ms,
                       quiet=args.quiet, cpu=args.cpu, accel=args.accel, firmware=args.firmware,
                       extra_args=shlex.split(args.extra))
    print(res.describe())
    print(f"TSC: job {res.tsc_khz} kHz, QEMU's vCPU {res.qemu_tsc_khz} kHz")
    for dev in res.pci:
        bars = ", ".join(f"BAR{b['bar']} {b['type']} {b['address']:#x}+{b['size']:#x}" for b in dev["bars"])
        print(f"pci {dev['slot']:02x}.{dev['function']} {dev['id']} {bars}")
    for c in res.cmds:
        if c.op == D.OP_BLK_BENCH and c.ok and (res.qemu_tsc_khz or res.tsc_khz):
            secs = c.value / ((res.qemu_tsc_khz or res.tsc_khz) * 1000)
            print(f"bench: {c.count} x {c.length} B in {secs:.3f} s: {c.count / secs:.0f} IOPS, "
                  f"{c.count * c.length / secs / 1e6:.1f} MB/s")
    for addr, data in res.buffers.items():
        print(f"memory at {addr:#x} ({len(data)} bytes): {data[:256].hex(' ', 4)}")
    print(f"work directory: {workdir}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
