#!/usr/bin/env python3
"""A nested KVM test host: run one command inside a Linux guest (L1) of QEMU's software CPU, whose
own /dev/kvm runs guest kernel mode natively.

Why: on hosts without VT-x/AMD-V exposed (cloud VMs), /dev/kvm emulates guest kernel mode and a
stock kernel cannot boot to userspace under any VMM.  QEMU's TCG emulates AMD SVM with nested
paging (`-cpu max`) whatever the host CPU is, so a Linux L1 loads kvm_amd and gets a /dev/kvm that
runs L2 kernels the way hardware would.  Everything in L1 runs at TCG speed: figures measured there
compare VMMs side by side in the same L1, never against native numbers.

L1 is Debian 12's generic 6.1 kernel (the host kernel pyvmm promises) with a busybox initramfs,
built from Debian's packages and cached.  Its /init mounts the host's / read-only over 9p at the same
paths (so a checkout and its .venv work unchanged), a fresh ext4 scratch disk on /tmp (O_DIRECT, hole
punching and fsync as on a host's disk; sparse, deleted afterwards), a tmpfs on /run, proc, sys, devtmpfs,
devpts and /dev/shm, a writable share for results, loads tun and kvm_amd, and runs the command in a
chroot with a normal PATH; then it powers off.  No /dev/kvm is needed on the host, only
qemu-system-x86.

Usage:
    scripts/nested.py build [--force]                 build the L1 kit unless up to date
    scripts/nested.py [options] -- COMMAND [ARG...]   run COMMAND in L1; its exit status is ours
    scripts/nested.py path                            print the L1 kit's directory

    e.g. scripts/nested.py -- .venv/bin/pyvmm run --cpus 2 --append quiet

Options: --cpus N (L1's vCPUs, default: the host's, at most 4), --mem SIZE (default 8G),
--timeout SECONDS (default 3600; L1 is stopped then and the exit status is 124), --idle-timeout
SECONDS (likewise when L1's console says nothing that long; default never), --stall-timeout SECONDS
(likewise when L1's heartbeat, written to the share every 5 s, is that old: L1 froze; default 120),
--share DIR (the
writable folder, mounted in L1 at the same path; default a fresh temporary one), --env NAME=VALUE
(repeatable), --scratch SIZE (L1's sparse ext4 /tmp, default 32G), --log FILE (L1's whole console).  The working directory in L1 is the current one.

Exit status: the command's; 124 when L1 ran past --timeout; 125 when L1 stopped without reporting
one (a panic, an init failure: its console says why); 2 for bad input or a missing tool, one line.
The kit lives in ${PYVMM_NESTED_DIR:-${XDG_CACHE_HOME:-~/.cache}/pyvmm/nested}.  Only the standard
library is used (with scripts/guestkit.py beside this file), so the file can be imported by path.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guestkit as gk  # noqa: E402  (beside this file; stdlib only)

FORMAT_VERSION = 1
KERNEL_PACKAGE_PREFIX = "linux-image-6.1.0-"
KERNEL_PACKAGE_SUFFIX = "-amd64-unsigned"  # generic: 9p and kvm_amd are modules (the cloud kernel lacks 9p)
QEMU = "qemu-system-x86_64"

# What L1 loads, dependencies first whatever the order here (guestkit.collect_modules sorts them).
L1_MODULES = (
    "virtio_pci", "9pnet_virtio", "9p",  # the host's filesystem and the results share
    "kvm_amd",  # L1's /dev/kvm
    "tun", "virtio_net", "bridge", "veth",  # tap tests (failover, net_failover, stp, llc with them)
    "virtio_blk", "ext4", "crc32c_generic",  # the scratch disk on /tmp (ext4 asks for crc32c by name)
)

READY_LINE = "NESTED-READY"
EXIT_PREFIX = "NESTED-EXIT="
STATUS_FILE = ".nested-status"
HEARTBEAT_FILE = ".nested-heartbeat"  # L1 rewrites it every 5 s while it runs
SCRIPT_FILE = ".nested-run.sh"
TIMEOUT_STATUS = 124
NO_STATUS = 125

# L1's /init.  nested.share=PATH names the share's path on the host, which is also its path in L1.
L1_INIT = r"""#!/bin/sh
export PATH=/bin
say() { echo "nested: $*"; }
die() { say "$*"; echo "NESTED-EXIT=125"; poweroff -f; }
param() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#"$1"=}";; esac; done; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
    insmod "/lib/modules/$m.ko" || say "module $m not loaded"
done < /lib/modules/modules.load

share=$(param nested.share)
[ -n "$share" ] || die "no nested.share= on the kernel command line"
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro,cache=loose" host /mnt || die "cannot mount the host's / over 9p"
# /tmp is an ext4 scratch disk, not a tmpfs: O_DIRECT, hole punching and sync behave as on a host disk
# The working directory stays visible at its path even where it lies under the host's /tmp.
keep=$(param nested.keep)
case "$keep" in
    /tmp/*) mkdir -p /keep && mount -o bind "/mnt$keep" /keep || die "cannot keep $keep" ;;
    *) keep= ;;
esac
mount -t ext4 /dev/vda /mnt/tmp || die "cannot mount the scratch disk on /tmp"
chmod 1777 /mnt/tmp
if [ -n "$keep" ]; then
    mkdir -p "/mnt$keep" && mount -o bind /keep "/mnt$keep" || die "cannot show $keep under the scratch /tmp"
fi
mount -t tmpfs -o mode=755 tmpfs /mnt/run || die "no tmpfs on /run"
mkdir -p "/mnt$share" 2>/dev/null
mount -t 9p -o "$opts" share "/mnt$share" || die "cannot mount the share at $share"
mount -t proc proc /mnt/proc
mount -t sysfs sysfs /mnt/sys
mount -t devtmpfs devtmpfs /mnt/dev
mkdir -p /mnt/dev/pts /mnt/dev/shm
mount -t devpts -o ptmxmode=0666 devpts /mnt/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /mnt/dev/shm
ip link set lo up
# A heartbeat in the share: the host tells a frozen L1 from a long, quiet command by it.
(while :; do date +%s > "/mnt$share/.nested-heartbeat"; sleep 5; done) &
echo NESTED-READY
chroot /mnt /bin/sh "$share/.nested-run.sh"
status=$?
echo "NESTED-EXIT=$status"
sync
poweroff -f
"""


class NestedError(Exception):
    """A failure to build or start L1, explained in one line for the user."""


# --------------------------------------------------------------------------
# The L1 kit: kernel + initramfs, cached
# --------------------------------------------------------------------------

def kit_dir() -> Path:
    if os.environ.get("PYVMM_NESTED_DIR"):
        return Path(os.environ["PYVMM_NESTED_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pyvmm" / "nested"


def recipe_digest() -> str:
    recipe = {"format": FORMAT_VERSION, "init": L1_INIT, "modules": L1_MODULES}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def newest_kernel(names: Sequence[str]) -> str | None:
    """The linux-image-6.1.0-N-amd64-unsigned name with the highest N."""
    found = []
    for name in names:
        middle = name.removeprefix(KERNEL_PACKAGE_PREFIX).removesuffix(KERNEL_PACKAGE_SUFFIX)
        if name.startswith(KERNEL_PACKAGE_PREFIX) and name.endswith(KERNEL_PACKAGE_SUFFIX) and middle.isdigit():
            found.append((int(middle), name))
    return max(found)[1] if found else None


def is_up_to_date(kit: Path) -> bool:
    manifest = gk.read_manifest(kit)
    if not manifest or manifest.get("recipe") != recipe_digest():
        return False
    hashes = manifest.get("sha256", {})
    return all((kit / name).is_file() and gk.file_sha256(kit / name) == digest for name, digest in hashes.items()) \
        and {gk.VMLINUZ, gk.INITRAMFS} <= set(hashes)


def build_initramfs(busybox: Path, modules: Sequence[tuple[str, bytes]]) -> bytes:
    tree = gk.ArchiveTree()
    for path in ("dev", "proc", "sys", "mnt", "tmp", "lib/modules"):
        tree.add(gk.directory(path))
    tree.add(gk.char_device("dev/console", 5, 1))
    tree.add(gk.regular_file("init", L1_INIT.encode(), 0o755))
    tree.add(gk.regular_file("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in gk.busybox_applets(busybox):
        if applet != "busybox":
            tree.add(gk.symlink(f"bin/{applet}", "busybox"))
    for name, elf in modules:
        tree.add(gk.regular_file(f"lib/modules/{name}.ko", elf))
    tree.add(gk.regular_file("lib/modules/modules.load", "".join(f"{n}\n" for n, _ in modules).encode()))
    archive, _ = gk.newc_gz(tree.entries())
    return archive


def build(force: bool = False) -> Path:
    """Build the L1 kit unless it is up to date; returns its directory."""
    kit = kit_dir()
    kit.parent.mkdir(parents=True, exist_ok=True)
    with gk._build_lock(kit):
        if not force and is_up_to_date(kit):
            return kit
        gk.build_in_place(kit, _build_into)
    gk.log(f"nested L1 kit built: {kit}")
    return kit


def _build_into(out: Path, work: Path) -> None:
    apt = gk.Apt()
    pattern = f"^{KERNEL_PACKAGE_PREFIX}[0-9]+{KERNEL_PACKAGE_SUFFIX}$"
    package = newest_kernel(apt._search(pattern))
    if package is None:
        apt.update()
        package = newest_kernel(apt._search(pattern))
    if package is None:
        raise gk.KitError("apt knows no linux-image-6.1.0-N-amd64-unsigned package (Debian 12's generic kernel)")
    debs = apt.download([package, gk.BUSYBOX_PACKAGE], work / "debs")
    kernel = gk.unpack_kernel(debs[package], work / "kernel")
    gk.log(f"L1 kernel {kernel.release} ({gk.deb_field(debs[package], 'Version')})")
    busybox = gk.deb_extract(debs[gk.BUSYBOX_PACKAGE], work / "busybox") / "bin" / "busybox"
    modules = gk.collect_modules(kernel, L1_MODULES)
    gk.log(f"L1 modules: {' '.join(name for name, _ in modules)}")
    (out / gk.INITRAMFS).write_bytes(build_initramfs(busybox, modules))
    shutil.copyfile(kernel.vmlinuz, out / gk.VMLINUZ)
    manifest = {
        "format": FORMAT_VERSION,
        "recipe": recipe_digest(),
        "kernel": {"package": package, "version": gk.deb_field(debs[package], "Version"), "release": kernel.release},
        "modules": [name for name, _ in modules],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": {name: gk.file_sha256(out / name) for name in (gk.VMLINUZ, gk.INITRAMFS)},
    }
    (out / gk.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------
# Running a command in L1
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
    cpus: int = dataclasses.field(default_factory=lambda: min(os.cpu_count() or 1, 4))
    mem: str = "8G"
    scratch: str = "32G"  # the sparse ext4 disk on L1's /tmp
    timeout: float = 3600.0
    idle_timeout: float = 0.0  # stop L1 when its console is silent this long (0: never)
    stall_timeout: float = 0.0  # stop L1 when its heartbeat is older than this (0: never)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cwd: str = dataclasses.field(default_factory=os.getcwd)
    log: Path | None = None


def make_scratch(path: Path, size: str) -> None:
    """A sparse raw image with a fresh ext4 file system, for L1's /tmp."""
    with open(path, "wb") as f:
        f.truncate(_bytes(size))
    gk.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-L", "l1tmp", str(path)])


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = size.strip().upper()
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise NestedError(f"not a size: {size!r} (e.g. 512M, 8G)") from None


def qemu_command(kit: Path, share: Path, scratch: Path, opts: Options) -> list[str]:
    virtfs = "local,security_model=none,multidevs=remap"
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35", "-smp", str(opts.cpus), "-m", opts.mem,
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", "stdio",
        "-kernel", str(kit / gk.VMLINUZ), "-initrd", str(kit / gk.INITRAMFS),
        "-append", f"console=ttyS0 quiet loglevel=4 panic=-1 nested.share={share} nested.keep={opts.cwd}",
        "-virtfs", f"{virtfs},path=/,mount_tag=host,readonly=on",
        "-virtfs", f"{virtfs},path={share},mount_tag=share",
        "-drive", f"file={scratch},format=raw,if=none,id=scratch,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=scratch",
    ]


def run_script(command: Sequence[str], opts: Options, share: Path) -> str:
    """The shell script L1 runs in its chroot: environment, working directory, the command, its status."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "TERM": "dumb", "LANG": "C.UTF-8", "PYVMM_IN_NESTED": "1", **opts.env}
    lines = ["#!/bin/sh"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines += [f"cd {shlex.quote(opts.cwd)} || exit 125",
              " ".join(shlex.quote(word) for word in command) + " </dev/null",
              "status=$?", f"echo $status > {shlex.quote(str(share / STATUS_FILE))}", "exit $status"]
    return "\n".join(lines) + "\n"


def check_tools() -> None:
    if shutil.which(QEMU) is None:
        raise NestedError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if shutil.which("mkfs.ext4") is None:
        raise NestedError("mkfs.ext4 is not installed (apt-get install e2fsprogs)")


def run(command: Sequence[str], opts: Options | None = None, *, share: Path | None = None,
        on_line: Callable[[str], None] | None = None) -> int:
    """Run `command` in a fresh L1; its exit status (or TIMEOUT_STATUS / NO_STATUS).  Every line of
    L1's console goes to `on_line` (default: our stdout).  L1 is always stopped before returning."""
    opts = opts or Options()
    check_tools()
    _bytes(opts.mem)
    kit = build()
    own_share = share is None
    share = Path(tempfile.mkdtemp(prefix="pyvmm-nested-")) if own_share else share.resolve()
    share.mkdir(parents=True, exist_ok=True)
    if any(c.isspace() for c in str(share) + opts.cwd):
        raise NestedError(f"the share's and the working directory's paths must have no spaces: {share}, {opts.cwd}")
    status_file, heartbeat = share / STATUS_FILE, share / HEARTBEAT_FILE
    status_file.unlink(missing_ok=True)
    heartbeat.unlink(missing_ok=True)
    (share / SCRIPT_FILE).write_text(run_script(command, opts, share))
    emit = on_line or (lambda line: print(line, flush=True))
    scratch_dir = tempfile.TemporaryDirectory(prefix="pyvmm-nested-scratch-")
    scratch = Path(scratch_dir.name) / "tmp.img"
    make_scratch(scratch, opts.scratch)
    log = open(opts.log, "w") if opts.log else None
    proc = subprocess.Popen(qemu_command(kit, share, scratch, opts), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    timed_out, why = threading.Event(), []
    last_line = [time.monotonic()]

    def watchdog() -> None:
        """Stop L1 past the timeout, when its console has been silent for idle_timeout, or when its
        heartbeat is older than stall_timeout (L1 froze: a long, quiet command still beats)."""
        deadline = time.monotonic() + opts.timeout
        while not _wait(proc, 5):
            now = time.monotonic()
            silent = now - last_line[0]
            beat = _heartbeat_age(heartbeat)
            if now >= deadline:
                why.append(f"ran past {opts.timeout:.0f} s")
            elif opts.idle_timeout and silent >= opts.idle_timeout:
                why.append(f"was silent for {silent:.0f} s")
            elif opts.stall_timeout and beat is not None and beat >= opts.stall_timeout:
                why.append(f"stopped responding (no heartbeat for {beat:.0f} s)")
            if why:
                timed_out.set()
                _stop(proc)
                return

    threading.Thread(target=watchdog, daemon=True, name="nested-watchdog").start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if log:
                log.write(line + "\n")
                log.flush()
            last_line[0] = time.monotonic()
            emit(line)
        proc.wait()
    finally:
        _stop(proc)
        scratch_dir.cleanup()
        if log:
            log.close()
    try:
        if timed_out.is_set():
            emit(f"nested: L1 {why[0]} and was stopped")
            return TIMEOUT_STATUS
        try:
            return int(status_file.read_text().strip())
        except (OSError, ValueError):
            emit(f"nested: L1 stopped (QEMU exit status {proc.returncode}) without the command's exit status")
            return NO_STATUS
    finally:
        if own_share:
            shutil.rmtree(share, ignore_errors=True)


def _heartbeat_age(path: Path) -> float | None:
    """Seconds since L1 last wrote its heartbeat (host clock), or None before the first."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL when we end, even killed (no `finally` runs then)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """True when `proc` ended within `timeout` seconds."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop QEMU (its whole process group): TERM, then KILL after 5 s."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if _wait(proc, grace):
            return


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="nested.py", description="Run a command in a nested-KVM L1 guest.")
    parser.add_argument("action", nargs="?", choices=("build", "path", "run"), default="run")
    parser.add_argument("--force", action="store_true", help="with build: rebuild even if up to date")
    parser.add_argument("--cpus", type=int, default=Options().cpus)
    parser.add_argument("--mem", default="8G")
    parser.add_argument("--scratch", default="32G", help="size of L1's sparse ext4 /tmp (default 32G)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--idle-timeout", type=float, default=0.0,
                        help="stop L1 when its console is silent this many seconds (default: never)")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="stop L1 when its 5-second heartbeat is this many seconds old (default 120; 0: never)")
    parser.add_argument("--share", type=Path)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--log", type=Path)
    args = parser.parse_args(argv)
    args.command = command
    if args.action == "run" and not command:
        parser.error("give the command to run in L1 after --")
    if args.cpus < 1 or args.timeout <= 0:
        parser.error("--cpus and --timeout must be positive")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes NAME=VALUE, not {item!r}")
    return args


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run(), which stops L1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.action == "path":
            print(kit_dir())
            return 0
        if args.action == "build":
            check_tools()
            print(build(force=args.force))
            return 0
        opts = Options(cpus=args.cpus, mem=args.mem, scratch=args.scratch, timeout=args.timeout,
                       idle_timeout=args.idle_timeout, stall_timeout=args.stall_timeout, log=args.log,
                       env=dict(item.split("=", 1) for item in args.env))
        started = time.monotonic()
        status = run(args.command, opts, share=args.share)
        print(f"nested: exit status {status} after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return status
    except (NestedError, gk.KitError, OSError) as error:
        print(f"nested: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nested: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
