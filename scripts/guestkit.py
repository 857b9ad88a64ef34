#!/usr/bin/env python3
"""Build and cache pyvmm's default guest kit from Debian's packages.

The kit is a stock Debian 6.1 cloud kernel plus a small initramfs (`--kernel 6.12`: a second kit,
beside the first, with Debian 12's 6.12 generic kernel and its own modules):

    vmlinuz             the kernel (a bzImage), unmodified
    initramfs.cpio.gz   busybox, the kernel's virtio and vsock modules, fio, iperf3, mkfs.ext4, socat, /init
    config              the kernel's build configuration
    System.map          the kernel's symbol table (when the package has one)
    kit.json            what went in, and the sha256 of every file above

The guest's /init loads the virtio drivers, starts busybox acpid (the ACPI power button powers
the guest off), prints PYVMM-READY, then runs the shell command given base64-encoded as
`pyvmm.cmd=` on the kernel command line (printing PYVMM-EXIT=<status> and powering off), or else
an interactive shell.

Usage:
    python3 scripts/guestkit.py build [--kernel 6.1|6.12] [--force]   build a kit unless it is up to date
    python3 scripts/guestkit.py path [--kernel 6.1|6.12]              print its directory

The default kit lives in ${PYVMM_KIT_DIR:-${XDG_CACHE_HOME:-~/.cache}/pyvmm/kit}, the 6.12 one
in the same place with "-6.12" after its name.
Only the standard library is used, so the file can also be imported by path.
Importing it has no side effects.
"""

import argparse
import base64
import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

# Bump when the kit's layout or contents change, so old kits get rebuilt.
FORMAT_VERSION = 1

VMLINUZ = "vmlinuz"
INITRAMFS = "initramfs.cpio.gz"
CONFIG = "config"
SYSTEM_MAP = "System.map"
MANIFEST = "kit.json"
REQUIRED_FILES = (VMLINUZ, INITRAMFS, CONFIG)



@dataclasses.dataclass(frozen=True)
class KitKernel:
    """A kernel a kit can be built around: the Debian 12 package (the one whose number the
    pattern's group makes highest) and what the kit's directory name gets after it."""

    name: str
    package_re: re.Pattern
    describe: str
    dir_suffix: str


KIT_KERNELS = {
    "6.1": KitKernel("6.1", re.compile(r"^linux-image-6\.1\.0-([0-9]+)-cloud-amd64-unsigned$"),
                     "linux-image-6.1.0-N-cloud-amd64-unsigned (Debian 12's cloud kernel)", ""),
    "6.12": KitKernel("6.12", re.compile(r"^linux-image-6\.12\.([0-9]+)\+deb12-amd64-unsigned$"),
                      "linux-image-6.12.N+deb12-amd64-unsigned (Debian 12's 6.12 generic kernel)", "-6.12"),
}
DEFAULT_KERNEL = KIT_KERNELS["6.1"]
KERNEL_PACKAGE_RE = DEFAULT_KERNEL.package_re
BUSYBOX_PACKAGE = "busybox-static"

# Guest programs taken from the host, with the Debian package providing each.
GUEST_TOOLS = {"fio": "fio", "iperf3": "iperf3", "mkfs.ext4": "e2fsprogs", "socat": "socat"}

# The drivers the guest needs, as module names; their dependencies come first
# in the load order whatever their place here.  Besides virtio: the ACPI power button
# (`button`) and the input event devices busybox acpid reads it from (`evdev`).
VIRTIO_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
)

REQUIRED_APPLETS = (
    "sh", "mount", "insmod", "ip", "dd", "sha256sum", "cat", "echo", "poweroff", "switch_root", "env", "umount",
    "reboot", "sleep", "setsid", "cttyhack", "ls", "mkdir", "ln", "grep",
    "ifconfig", "ping", "nproc", "free", "uname", "dmesg", "base64", "acpid", "sync",
)

# Where the modules go inside the initramfs, and the file giving their order.
GUEST_MODULE_DIR = "lib/modules/pyvmm"
GUEST_MODULE_LIST = f"{GUEST_MODULE_DIR}/modules.load"
# The archive's last member: when the kernel runs out of memory unpacking the
# initramfs it carries on without the rest, and /init warns if this is missing.
COMPLETE_MARKER = "pyvmm-complete"

READY_LINE = "PYVMM-READY"
EXIT_PREFIX = "PYVMM-EXIT="
CMD_PARAM = "pyvmm.cmd"


def cmdline_arg(command: str) -> str:
    """The kernel command-line word that makes the guest run `command` with sh."""
    return f"{CMD_PARAM}={base64.b64encode(command.encode()).decode('ascii')}"


# --------------------------------------------------------------------------
# The guest's /init
# --------------------------------------------------------------------------

# Shell functions of /init, kept apart so the unit tests can run them on the host.
INIT_FUNCTIONS = r"""
# Print the value of the last pyvmm.cmd= word in the kernel command line file $1.
pyvmm_cmd_b64() {
    set -f
    value=
    for word in $(cat "$1"); do
        case "$word" in
            pyvmm.cmd=*) value=${word#pyvmm.cmd=} ;;
        esac
    done
    set +f
    printf '%s' "$value"
}

# Print the value of the last NAME=value word ($1 = NAME) in the kernel command line file $2.
pyvmm_param() {
    set -f
    value=
    for word in $(cat "$2"); do
        case "$word" in
            "$1"=*) value=${word#"$1"=} ;;
        esac
    done
    set +f
    printf '%s' "$value"
}

# With pyvmm.root=DEV on the kernel command line (file $1), mount DEV and make it the root
# filesystem (its /init runs next, with PYVMM_SWITCHED=1); returns if there is nothing to do.
pyvmm_switch_root() {
    root=$(pyvmm_param pyvmm.root "$1")
    [ -n "$root" ] && [ -z "$PYVMM_SWITCHED" ] || return 0
    mkdir -p /newroot
    if ! mount "$root" /newroot; then
        echo "pyvmm: cannot mount root $root; staying in the initramfs"
        return 0
    fi
    echo "pyvmm: switching root to $root"
    umount /dev/pts /dev /sys /proc
    exec env PYVMM_SWITCHED=1 switch_root /newroot /init
}

# Print the base64 text $1 decoded; fails if it is not base64.
pyvmm_decode_cmd() {
    printf '%s\n' "$1" | base64 -d
}

# Run the command given as pyvmm.cmd=<base64> in the kernel command line file $1,
# then print PYVMM-EXIT=<its status>. Returns 1 at once if there is no command.
pyvmm_run_cmd() {
    cmd_b64=$(pyvmm_cmd_b64 "$1")
    [ -n "$cmd_b64" ] || return 1
    if cmd=$(pyvmm_decode_cmd "$cmd_b64") && [ -n "$cmd" ]; then
        sh -c "$cmd"
        status=$?
    else
        echo "pyvmm: pyvmm.cmd is not valid base64"
        status=126
    fi
    echo "PYVMM-EXIT=$status"
}

# insmod each module named in the file $1 (dependencies first), one line each.
pyvmm_load_modules() {
    while read -r name; do
        [ -n "$name" ] || continue
        if error=$(insmod "/lib/modules/pyvmm/$name.ko" 2>&1); then
            echo "pyvmm: module $name loaded"
        else
            echo "pyvmm: module $name not loaded: $error"
        fi
    done < "$1"
}

# Link /dev/virtio-ports/NAME to each named virtio-console port, as udev does elsewhere.  The
# device names its ports (and makes hvc0 the console) over its control queue after the driver
# has loaded: wait for that, at most 5 s.
pyvmm_virtio_ports() {
    [ -d /sys/bus/virtio/drivers/virtio_console ] || return 0
    mkdir -p /dev/virtio-ports
    tries=50
    while :; do
        waiting=
        for dev in /sys/bus/virtio/drivers/virtio_console/virtio*; do
            [ -e "$dev" ] || continue
            set -- "$dev"/virtio-ports/vport*
            [ -e "$1" ] || waiting=1
        done
        for port in /sys/class/virtio-ports/vport*; do
            [ -e "$port" ] || continue
            if [ -r "$port/name" ]; then
                ln -sfn "../${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
            else
                case ${port##*/} in *p0) ;; *) waiting=1 ;; esac
            fi
        done
        if grep -q 'console=hvc0' /proc/cmdline && ! grep -q hvc0 /sys/class/tty/console/active; then
            waiting=1
        fi
        [ -n "$waiting" ] && [ "$tries" -gt 0 ] || return 0
        tries=$((tries - 1))
        sleep 0.1
    done
}

# Start busybox acpid on the input event devices: on the ACPI power button (KEY_POWER from the
# button driver) it runs /etc/acpi/PWRF/00000080, which powers the guest off.
pyvmm_acpid() {
    if [ ! -e /dev/input/event0 ]; then
        echo "pyvmm: no input event device: the power button will not be heard"
        return 0
    fi
    acpid -c /etc/acpi -l /dev/null
}

# Power off once the console has sent everything: closing the last descriptor
# of the console tty waits for its output to drain.
pyvmm_power_off() {
    sync
    exec </dev/null >/dev/null 2>&1
    poweroff -f
}
"""

INIT_MAIN = r"""
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=vt100

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
ip link set lo up

if [ ! -e /pyvmm-complete ]; then
    echo "pyvmm: the initramfs did not unpack completely; give the guest more memory"
fi
pyvmm_load_modules /lib/modules/pyvmm/modules.load
pyvmm_switch_root /proc/cmdline
pyvmm_virtio_ports
pyvmm_acpid
echo PYVMM-READY

if ! pyvmm_run_cmd /proc/cmdline; then
    echo "pyvmm: interactive shell; leave it to power off"
    setsid cttyhack sh
fi
pyvmm_power_off
"""

INIT_SCRIPT = (
    "#!/bin/sh\n"
    "# pyvmm guest init: mount the basics, load the virtio drivers, then run the\n"
    "# command from the kernel command line (pyvmm.cmd=<base64>) or a shell.\n"
    + INIT_FUNCTIONS
    + INIT_MAIN
)

# What busybox acpid runs when the power button is pressed (its event PWRF/00000080): say so on
# the console, write everything out, remount the disks read-only and power off.
POWER_BUTTON_SCRIPT = r"""#!/bin/sh
echo "pyvmm: power button pressed: powering off" > /dev/console
sync
while read -r dev mnt _; do
    case "$dev" in /dev/*) mount -o remount,ro "$mnt" 2>/dev/null ;; esac
done < /proc/mounts
poweroff -f
"""
POWER_BUTTON_HANDLER = "etc/acpi/PWRF/00000080"

GUEST_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GUEST_GROUP = "root:x:0:\n"


# --------------------------------------------------------------------------
# Errors, progress and commands
# --------------------------------------------------------------------------

class KitError(Exception):
    """A build failure, explained in one line for the user."""


def log(message: str) -> None:
    print(f"guestkit: {message}", file=sys.stderr, flush=True)


def run(args: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run a command and return its stdout; a failure becomes a KitError."""
    try:
        result = subprocess.run(
            list(args), cwd=cwd, env=None if env is None else {**os.environ, **env},
            capture_output=True, text=True,
        )
    except FileNotFoundError:
        raise KitError(f"{args[0]} not found (this needs a Debian system)") from None
    if result.returncode != 0:
        command = " ".join(args[:2])
        raise KitError(f"{command} failed: {_error_summary(result.stderr, result.returncode)}")
    return result.stdout


def _error_summary(stderr: str, returncode: int) -> str:
    """The most telling line of a failed command's stderr (apt's last `E:` line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit status {returncode}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# apt
# --------------------------------------------------------------------------

def newest_kernel(package_names: Iterable[str], choice: KitKernel = DEFAULT_KERNEL) -> str | None:
    """The package name of `choice` with the highest N (linux-image-6.1.0-N-cloud-amd64-unsigned)."""
    matches = [(int(m.group(1)), m.group(0))
               for m in map(choice.package_re.match, package_names) if m]
    return max(matches)[1] if matches else None


class Apt:
    """The apt operations of a build; `apt-get update` runs at most once."""

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        if self.updated:
            return
        self._need_root("refresh apt's package lists")
        log("running apt-get update")
        run(["apt-get", "update", "-q", *self._lock_wait()])
        self.updated = True

    def install(self, packages: Sequence[str]) -> None:
        self._need_root(f"install {' '.join(packages)}")
        log(f"installing {' '.join(packages)} on the host")
        args = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *self._lock_wait(), *packages]
        try:
            run(args, env={"DEBIAN_FRONTEND": "noninteractive"})
        except KitError:
            self.update()
            run(args, env={"DEBIAN_FRONTEND": "noninteractive"})

    def newest_kernel_package(self, choice: KitKernel = DEFAULT_KERNEL) -> str:
        name = newest_kernel(self._search(choice.package_re.pattern), choice)
        if name is None and not self.updated:
            log(f"apt-cache knows no {choice.describe} yet")
            self.update()
            name = newest_kernel(self._search(choice.package_re.pattern), choice)
        if name is None:
            raise KitError(f"apt knows no {choice.describe}")
        return name

    def download(self, packages: Sequence[str], dest: Path) -> dict[str, Path]:
        """apt-get download `packages` into `dest`; returns each package's .deb."""
        dest.mkdir(parents=True, exist_ok=True)
        # As root, apt hands downloads to its `_apt` user, who cannot write into
        # a private temporary directory; download as root instead.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        log(f"downloading {' '.join(packages)}")
        run(["apt-get", "download", "-q", *sandbox, *packages], cwd=dest)
        debs = {}
        for package in packages:
            found = sorted(dest.glob(f"{package}_*.deb"))
            if len(found) != 1:
                raise KitError(f"apt-get download gave no single .deb for {package}")
            debs[package] = found[0]
        return debs

    @staticmethod
    def _search(pattern: str) -> list[str]:
        out = run(["apt-cache", "search", "--names-only", pattern])
        return [line.split(" - ", 1)[0].strip() for line in out.splitlines()]

    @staticmethod
    def _lock_wait() -> list[str]:
        return ["-o", "DPkg::Lock::Timeout=300"]

    @staticmethod
    def _need_root(action: str) -> None:
        if os.geteuid() != 0:
            raise KitError(f"need root to {action}; run this as root or via scripts/setup.sh")


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).strip()


def deb_extract(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def installed_version(package: str) -> str:
    try:
        return run(["dpkg-query", "-W", "-f=${Version}", package]).strip()
    except KitError:
        return "unknown"


# --------------------------------------------------------------------------
# The kernel package
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    """An extracted linux-image package."""

    root: Path
    release: str  # e.g. "6.1.0-50-cloud-amd64"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"

    @property
    def system_map(self) -> Path:
        return self.root / "boot" / f"System.map-{self.release}"

    @property
    def modules_root(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def unpack_kernel(deb: Path, dest: Path) -> Kernel:
    deb_extract(deb, dest)
    images = sorted((dest / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise KitError(f"{deb.name} holds {len(images)} boot/vmlinuz-* files, expected one")
    kernel = Kernel(dest, images[0].name.removeprefix("vmlinuz-"))
    with open(kernel.vmlinuz, "rb") as f:
        header = f.read(0x206)
    if header[0x202:0x206] != b"HdrS":
        raise KitError(f"{kernel.vmlinuz.name} is not a bzImage")
    if not kernel.config.is_file():
        raise KitError(f"{deb.name} has no boot/config-{kernel.release}")
    return kernel


# --------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: Path | str) -> str:
    """The module name of a module file: virtio-rng.ko.xz -> virtio_rng."""
    name = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix).replace("-", "_")
    raise ValueError(f"not a kernel module file: {name}")


def index_modules(modules_root: Path) -> dict[str, Path]:
    """Module name -> module file, for every module under `modules_root`/kernel."""
    index = {}
    for path in sorted((modules_root / "kernel").rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES):
            index[module_name(path)] = path
    return index


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if the file is compressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise KitError(f"{path.name} is zstd-compressed and the zstd tool is missing")
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        if result.returncode != 0:
            raise KitError(f"zstd could not decompress {path.name}")
        return result.stdout
    return data


def elf_section(elf: bytes, wanted: str) -> bytes:
    """The contents of the section called `wanted` in a little-endian ELF64 file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise KitError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        start = names_offset + name
        if elf[start:elf.index(b"\0", start)].decode() == wanted:
            return elf[offset:offset + size]
    raise KitError(f"ELF file has no {wanted} section")


def module_depends(elf: bytes) -> list[str]:
    """The `depends=` field of a module's .modinfo section, as module names."""
    for field in elf_section(elf, ".modinfo").split(b"\0"):
        if field.startswith(b"depends="):
            value = field.removeprefix(b"depends=").decode()
            return [name.replace("-", "_") for name in value.split(",") if name]
    return []


def load_order(wanted: Iterable[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """`wanted` and all their dependencies, each after everything it depends on.

    `depends` maps a module to the modules it needs; a module missing from it
    needs none. Modules keep their order in `wanted` where dependencies allow.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise KitError(f"module dependency cycle: {' -> '.join(chain + [name])}")
        state[name] = "visiting"
        for dependency in depends.get(name, ()):
            visit(dependency, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, [])
    return order


def builtin_modules(modules_root: Path) -> set[str]:
    """The modules built into the kernel (modules.builtin), which no kit loads."""
    try:
        lines = (modules_root / "modules.builtin").read_text().split()
    except FileNotFoundError:
        return set()
    return {module_name(line) for line in lines}


def collect_modules(kernel: Kernel, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, ELF bytes) of `wanted` and their dependencies, in load order; those the
    kernel has built in are left out."""
    index = index_modules(kernel.modules_root)
    builtin = builtin_modules(kernel.modules_root)
    elves: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    pending = [name for name in wanted if name not in builtin]
    while pending:
        name = pending.pop()
        if name in elves or name in builtin:
            continue
        if name not in index:
            raise KitError(f"kernel {kernel.release} has no module {name}")
        elves[name] = read_module(index[name])
        depends[name] = module_depends(elves[name])
        pending.extend(depends[name])
    return [(name, elves[name]) for name in load_order([n for n in wanted if n in elves], depends)]


# --------------------------------------------------------------------------
# Host programs for the guest
# --------------------------------------------------------------------------

def parse_ldd(output: str) -> list[Path]:
    """The files named by ldd's output: shared libraries and the dynamic loader."""
    paths = []
    for line in output.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise KitError(f"ldd: library not found: {line.split()[0]}")
        if "=>" in line:
            target = line.split("=>", 1)[1].strip()
        else:
            target = line  # the loader, or the vDSO which has no file
        path = target.split(" (", 1)[0].strip()
        if path.startswith("/"):
            paths.append(Path(path))
    return paths


def host_tools(apt: Apt, tools: Mapping[str, str]) -> dict[str, Path]:
    """Each tool's path on the host, installing the packages of missing ones."""
    missing = [package for tool, package in tools.items() if shutil.which(tool) is None]
    if missing:
        apt.install(missing)
    found = {}
    for tool in tools:
        where = shutil.which(tool)
        if where is None:
            raise KitError(f"{tool} is still missing after installing it")
        found[tool] = Path(where).resolve()
    return found


# --------------------------------------------------------------------------
# newc cpio archives
# --------------------------------------------------------------------------

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
NEWC_TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One archive member. Owners are root and mtimes 0, for reproducible archives."""

    path: str          # relative, without a leading "/"
    mode: int          # st_mode: file type and permission bits
    data: bytes = b""  # a file's contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def directory(path: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | perm)


def regular_file(path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> CpioEntry:
    return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _write_member(out: BinaryIO, ino: int, entry: CpioEntry) -> None:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
              0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header + name + _pad4(NEWC_HEADER_SIZE + len(name)))
    out.write(entry.data + _pad4(len(entry.data)))


def write_newc(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write `entries` as a newc ("070701") cpio archive, trailer included."""
    for ino, entry in enumerate(entries, start=1):
        if not entry.path or entry.path.startswith("/"):
            raise ValueError(f"archive paths must be relative: {entry.path!r}")
        _write_member(out, ino, entry)
    _write_member(out, 0, CpioEntry(NEWC_TRAILER, 0))


def read_newc(archive: bytes) -> list[CpioEntry]:
    """The members of a newc cpio archive, up to its trailer."""
    entries = []
    offset = 0
    while True:
        if archive[offset:offset + 6] != NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {offset}")
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        offset += NEWC_HEADER_SIZE
        name = archive[offset:offset + namesize - 1].decode()
        offset += namesize + len(_pad4(NEWC_HEADER_SIZE + namesize))
        data = archive[offset:offset + size]
        offset += size + len(_pad4(size))
        if name == NEWC_TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data, rdev))


class ArchiveTree:
    """Initramfs members by path; parent directories are added automatically."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def add(self, entry: CpioEntry) -> None:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            self._entries.setdefault(parent, directory(parent))
        old = self._entries.get(entry.path)
        if old is not None and old != entry and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode)):
            raise KitError(f"two different files for /{entry.path} in the initramfs")
        self._entries[entry.path] = entry  # a directory's later mode wins

    def add_host_file(self, path: Path, perm: int = 0o755) -> None:
        """Copy the host file `path` (following symlinks) to the same path in the archive."""
        self.add(regular_file(str(path).lstrip("/"), path.read_bytes(), perm))

    def entries(self) -> list[CpioEntry]:
        """Members sorted by path, which puts every directory before its contents."""
        return [self._entries[path] for path in sorted(self._entries)]


def newc_gz(entries: Iterable[CpioEntry]) -> tuple[bytes, int]:
    """`entries` as a gzip-compressed newc archive, the same bytes every time,
    and the archive's uncompressed size."""
    raw = io.BytesIO()
    write_newc(entries, raw)
    archive = raw.getvalue()
    return gzip.compress(archive, compresslevel=6, mtime=0), len(archive)


# --------------------------------------------------------------------------
# The initramfs
# --------------------------------------------------------------------------

def busybox_applets(busybox: Path) -> list[str]:
    """The applets of a busybox binary (run on the host to ask it)."""
    applets = run([str(busybox), "--list"]).split()
    missing = sorted(set(REQUIRED_APPLETS) - set(applets))
    if missing:
        raise KitError(f"busybox lacks applets: {' '.join(missing)}")
    return applets


def build_initramfs(busybox: Path, modules: Sequence[tuple[str, bytes]],
                    tools: Mapping[str, Path]) -> tuple[bytes, int]:
    """The gzip-compressed initramfs and its uncompressed size."""
    tree = ArchiveTree()
    for path in ("dev", "proc", "sys", "root", "run", "mnt", "sbin", "usr/bin", "usr/sbin", "etc"):
        tree.add(directory(path))
    tree.add(directory("tmp", 0o1777))
    tree.add(char_device("dev/console", 5, 1))  # the kernel opens it before /init runs
    tree.add(regular_file("init", INIT_SCRIPT.encode(), 0o755))
    tree.add(regular_file("etc/passwd", GUEST_PASSWD.encode()))
    tree.add(regular_file("etc/group", GUEST_GROUP.encode()))
    tree.add(regular_file(POWER_BUTTON_HANDLER, POWER_BUTTON_SCRIPT.encode(), 0o755))

    tree.add(regular_file("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in busybox_applets(busybox):
        if applet != "busybox":
            tree.add(symlink(f"bin/{applet}", "busybox"))

    for name, elf in modules:
        tree.add(regular_file(f"{GUEST_MODULE_DIR}/{name}.ko", elf))
    tree.add(regular_file(GUEST_MODULE_LIST, "".join(f"{name}\n" for name, _ in modules).encode()))

    for tool, path in tools.items():
        tree.add(regular_file(f"usr/bin/{tool}", path.read_bytes(), 0o755))
        for library in parse_ldd(run(["ldd", str(path)])):
            tree.add_host_file(library)
    return newc_gz([*tree.entries(), regular_file(COMPLETE_MARKER, b"")])


# --------------------------------------------------------------------------
# The kit directory
# --------------------------------------------------------------------------

def kit_dir(choice: KitKernel = DEFAULT_KERNEL) -> Path:
    """${PYVMM_KIT_DIR:-${XDG_CACHE_HOME:-~/.cache}/pyvmm/kit}: where pyvmm looks (vmm/kit.py);
    another kernel's kit beside it, its name with the kernel's suffix."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vmm.kit import kit_dir as pyvmm_kit_dir

    kit = pyvmm_kit_dir()
    return kit.with_name(kit.name + choice.dir_suffix)


def read_manifest(kit: Path, name: str = MANIFEST) -> dict | None:
    """kit.json's contents (or another manifest's), or None if it is missing or unreadable."""
    try:
        manifest = json.loads((kit / name).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def recipe_digest(choice: KitKernel = DEFAULT_KERNEL) -> str:
    """A digest of what this script puts in a kit: a changed /init rebuilds the kit."""
    recipe = {
        **({} if choice is DEFAULT_KERNEL else {"kernel": choice.package_re.pattern}),
        "format": FORMAT_VERSION,
        "init": INIT_SCRIPT,
        "power_button": POWER_BUTTON_SCRIPT,
        "modules": VIRTIO_MODULES,
        "tools": GUEST_TOOLS,
        "applets": REQUIRED_APPLETS,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def is_up_to_date(kit: Path, choice: KitKernel = DEFAULT_KERNEL) -> bool:
    """Whether `kit` is a complete kit of this format and recipe, matching its hashes."""
    manifest = read_manifest(kit)
    if manifest is None or manifest.get("format") != FORMAT_VERSION:
        return False
    if manifest.get("recipe") != recipe_digest(choice):
        return False
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or not set(REQUIRED_FILES) <= set(hashes):
        return False
    for name, digest in hashes.items():
        path = kit / name
        if not path.is_file() or file_sha256(path) != digest:
            return False
    return True


def write_manifest(kit: Path, details: Mapping[str, object], choice: KitKernel = DEFAULT_KERNEL) -> None:
    """Write kit.json: `details`, the format and recipe, and the hashes of the kit's files."""
    files = [name for name in (*REQUIRED_FILES, SYSTEM_MAP) if (kit / name).is_file()]
    manifest = {
        "format": FORMAT_VERSION,
        "recipe": recipe_digest(choice),
        **details,
        "sha256": {name: file_sha256(kit / name) for name in files},
    }
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextlib.contextmanager
def _build_lock(kit: Path) -> Iterator[None]:
    """Serialise builds of the same kit (a second build then finds it up to date)."""
    with open(kit.parent / f".{kit.name}.lock", "a") as lock:
        os.lockf(lock.fileno(), os.F_LOCK, 0)
        try:
            yield
        finally:
            os.lockf(lock.fileno(), os.F_ULOCK, 0)


def _remove_leftovers(kit: Path, before_removal: Callable[[Path], None] | None = None) -> None:
    """Delete what killed builds left behind (only called under the build lock); `before_removal`
    sees each leftover first."""
    for pattern in (f".{kit.name}.building-*", f".{kit.name}.work-*", f".{kit.name}.old-*"):
        for leftover in kit.parent.glob(pattern):
            if before_removal is not None:
                before_removal(leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _put_in_place(staging: Path, kit: Path) -> None:
    """Replace `kit` by the finished `staging` directory, never leaving half a kit."""
    staging.chmod(0o755)
    if kit.exists() or kit.is_symlink():
        old = kit.with_name(f".{kit.name}.old-{os.getpid()}")
        os.rename(kit, old)
        os.rename(staging, kit)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, kit)


def build(force: bool = False, choice: KitKernel = DEFAULT_KERNEL) -> Path:
    """Build the kit unless it is up to date (or `force`); returns its directory."""
    kit = kit_dir(choice)
    kit.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(kit):
        _remove_leftovers(kit)
        if not force and is_up_to_date(kit, choice):
            print(f"guest kit up to date: {kit}", file=sys.stderr, flush=True)
            return kit
        build_in_place(kit, lambda staging, work: _build_into(staging, work, choice))
    log(f"guest kit built: {kit}")
    return kit


def build_in_place(target: Path, build_into: Callable[[Path, Path], None],
                   before_removal: Callable[[Path], None] | None = None) -> None:
    """Run build_into(staging, work) in two fresh directories beside `target` (so the next build
    clears them if this one is killed), then put staging in target's place; called under the build
    lock.  `before_removal` sees the work directory before it is deleted."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.work-", dir=target.parent))
    try:
        build_into(staging, work)
        _put_in_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if before_removal is not None:
            before_removal(work)
        shutil.rmtree(work, ignore_errors=True)


def _download_packages(apt: Apt, work: Path, choice: KitKernel) -> tuple[str, dict[str, Path]]:
    """Download the newest kernel of `choice` and busybox-static, refreshing apt's lists once if needed."""
    kernel_package = apt.newest_kernel_package(choice)
    try:
        return kernel_package, apt.download([kernel_package, BUSYBOX_PACKAGE], work)
    except KitError as error:
        if apt.updated or os.geteuid() != 0:
            raise
        log(f"{error}; retrying after apt-get update")
        apt.update()
        kernel_package = apt.newest_kernel_package(choice)
        return kernel_package, apt.download([kernel_package, BUSYBOX_PACKAGE], work)


def _is_real_system_map(path: Path) -> bool:
    """Debian ships a one-line stub System.map pointing at the -dbg package."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return len(f.read(4096).splitlines()) > 1


def _build_into(out: Path, work: Path, choice: KitKernel = DEFAULT_KERNEL) -> None:
    apt = Apt()
    kernel_package, debs = _download_packages(apt, work / "debs", choice)

    kernel = unpack_kernel(debs[kernel_package], work / "kernel")
    log(f"kernel {kernel.release} ({deb_field(debs[kernel_package], 'Version')})")
    busybox = deb_extract(debs[BUSYBOX_PACKAGE], work / "busybox") / "bin" / "busybox"
    if not busybox.is_file():
        raise KitError(f"{BUSYBOX_PACKAGE} has no bin/busybox")

    modules = collect_modules(kernel, VIRTIO_MODULES)
    log(f"modules in load order: {' '.join(name for name, _ in modules)}")
    tools = host_tools(apt, GUEST_TOOLS)

    log("writing the initramfs")
    initramfs, unpacked_size = build_initramfs(busybox, modules, tools)
    (out / INITRAMFS).write_bytes(initramfs)
    shutil.copyfile(kernel.vmlinuz, out / VMLINUZ)
    shutil.copyfile(kernel.config, out / CONFIG)
    if _is_real_system_map(kernel.system_map):
        shutil.copyfile(kernel.system_map, out / SYSTEM_MAP)

    write_manifest(out, {
        "kernel": {
            "package": kernel_package,
            "version": deb_field(debs[kernel_package], "Version"),
            "release": kernel.release,
        },
        "busybox": {
            "package": BUSYBOX_PACKAGE,
            "version": deb_field(debs[BUSYBOX_PACKAGE], "Version"),
        },
        "modules": [name for name, _ in modules],
        "initramfs_unpacked_bytes": unpacked_size,
        "tools": {tool: {"package": package, "version": installed_version(package)}
                  for tool, package in GUEST_TOOLS.items()},
        "init": {"ready_line": READY_LINE, "exit_prefix": EXIT_PREFIX, "cmd_param": CMD_PARAM},
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, choice)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="guestkit.py", description="Build and cache pyvmm's default guest kit.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build the kit unless it is up to date")
    build_parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    path_parser = commands.add_parser("path", help="print the kit directory")
    for sub in (build_parser, path_parser):
        sub.add_argument("--kernel", choices=sorted(KIT_KERNELS), default=DEFAULT_KERNEL.name,
                         help="the kit's kernel: Debian 12's 6.1 cloud kernel (the default kit) or its 6.12 generic one")
    args = parser.parse_args(argv)
    choice = KIT_KERNELS[args.kernel]

    if args.command == "path":
        print(kit_dir(choice))
        return 0
    return print_built("guestkit", lambda: build(force=args.force, choice=choice))


def print_built(prog: str, build_it: Callable[[], Path], errors: tuple[type[BaseException], ...] = ()) -> int:
    """A build command's end: print what build_it() built and return 0; a KitError, an OSError or
    one of `errors` in one line and 2; 130 when interrupted."""
    try:
        print(build_it())
    except (KitError, OSError, *errors) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
