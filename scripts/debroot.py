#!/usr/bin/env python3
"""Build and cache a Debian 12 root file system on a bootable disk image, for pyvmm's boot tests.

debootstrap (minbase, no recommends) makes a bookworm root from deb.debian.org with systemd as init,
udev and Debian's cloud kernel (linux-image-cloud-amd64, its initramfs-tools initrd holding
virtio_pci, virtio_blk and ext4); hostname pyvmm-debian, root's password locked (the tests only
need the `login:` prompt of the serial getty that console=ttyS0 starts), timers and units that only
slow a boot masked.  The cache then holds:

    disk.img      raw, sparse: an MBR, partition 1 (from 1 MiB) ext4 labelled pyvmm-root holding the
                  root, GRUB for BIOS embedded before it (scripts/mbrdisk.py); its grub.cfg talks on
                  COM1 and boots the kernel with root=/dev/vda1 console=ttyS0
    vmlinuz       the root's kernel and its initrd, beside the image for direct kernel boot
    initrd.img
    debroot.json  what went in, the recipe's digest, the files' sha256 and the image's data extents

Usage:
    python3 scripts/debroot.py build [--force]   build it unless up to date (as root; minutes)
    python3 scripts/debroot.py path              print its directory

It lives in ${PYVMM_DEBROOT_DIR:-${XDG_CACHE_HOME:-~/.cache}/pyvmm/debroot}.  A changed recipe
rebuilds it; builds take a lock, happen in a staging directory renamed into place, and clear what
killed builds left.  `copy_disk(dest)` makes a throw-away copy of the image (its data only, by the
manifest's extents: quick where the cache is read over 9p, as in the nested KVM).
Only the standard library is used (with guestkit.py and mbrdisk.py beside this file).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guestkit as gk  # noqa: E402  (beside this file; stdlib only)
import mbrdisk  # noqa: E402

FORMAT_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd-sysv", "udev", "linux-image-cloud-amd64", "initramfs-tools", "zstd")
HOSTNAME = "pyvmm-debian"
LABEL = "pyvmm-root"
DISK_SIZE = 2 << 30  # sparse; the root takes ~250 MB of it
ROOT_DEVICE = "/dev/vda1"
# quiet: in the nested KVM every byte on the serial console costs an exit to pyvmm (~150 bytes/s
# there), so the kernel's log would take minutes; systemd's status lines stay on.
CMDLINE = f"root={ROOT_DEVICE} rw console=ttyS0 quiet systemd.show_status=1"
GRUB_MARKER = "PYVMM-GRUB"  # grub.cfg echoes it before loading the kernel
# Units that only slow a boot in a VM that has no network and lives minutes.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
                "e2scrub_reap.service", "fstrim.timer", "getty@tty1.service", "getty-static.service",
                "systemd-pstore.service")
# Dropped from the root: documentation, translations, apt's package lists and downloads.
PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/lib/apt/lists",
          "var/cache/apt", "var/cache/debconf/templates.dat-old", "vmlinuz.old", "initrd.img.old")

DISK, VMLINUZ, INITRD, MANIFEST = "disk.img", "vmlinuz", "initrd.img", "debroot.json"
FILES = (DISK, VMLINUZ, INITRD)


def grub_cfg(kernel: str, initrd: str) -> str:
    """grub.cfg: COM1 only, one entry booting `kernel` and `initrd` (paths in the root)."""
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial\n"
        "terminal_output serial\n"
        "set timeout=0\n"
        "menuentry 'Debian 12 (pyvmm)' {\n"
        f"    echo '{GRUB_MARKER} loading {kernel}'\n"
        f"    linux {kernel} {CMDLINE}\n"
        f"    initrd {initrd}\n"
        f"    echo '{GRUB_MARKER} booting'\n"
        "}\n"
    )


FSTAB = f"{ROOT_DEVICE} / ext4 defaults 0 0\n"
# The serial getty waits for udev to announce ttyS0; in a busy nested KVM that took past systemd's
# 90 s device timeout, so the prompt never came: the wait is left to the caller's own bound.
DROP_INS = {"dev-ttyS0.device.d/pyvmm-timeout.conf": "[Unit]\nJobTimeoutSec=infinity\nJobRunningTimeoutSec=infinity\n"}


def debroot_dir() -> Path:
    if os.environ.get("PYVMM_DEBROOT_DIR"):
        return Path(os.environ["PYVMM_DEBROOT_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pyvmm" / "debroot"


def recipe_digest() -> str:
    recipe = {"format": FORMAT_VERSION, "suite": SUITE, "packages": PACKAGES, "hostname": HOSTNAME,
              "size": DISK_SIZE, "cmdline": CMDLINE, "grub": grub_cfg("K", "I"), "fstab": FSTAB,
              "masked": MASKED_UNITS, "drop_ins": DROP_INS, "pruned": PRUNED, "grub_modules": mbrdisk.GRUB_MODULES}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def log(message: str) -> None:
    print(f"debroot: {message}", file=sys.stderr, flush=True)


def read_manifest(directory: Path | None = None) -> dict | None:
    """debroot.json's contents, or None if it is missing or unreadable."""
    return gk.read_manifest(directory or debroot_dir(), MANIFEST)


def is_current(directory: Path | None = None) -> bool:
    """Whether the cache holds a finished build of this recipe (no hashing: cheap anywhere)."""
    directory = directory or debroot_dir()
    data = read_manifest(directory)
    return bool(data) and data.get("recipe") == recipe_digest() and all((directory / f).is_file() for f in FILES)


def is_up_to_date(directory: Path) -> bool:
    """is_current, and every file matches its sha256."""
    if not is_current(directory):
        return False
    hashes = read_manifest(directory).get("sha256", {})
    return set(hashes) == set(FILES) and all(gk.file_sha256(directory / f) == h for f, h in hashes.items())


def copy_disk(dest: Path, directory: Path | None = None) -> Path:
    """A sparse throw-away copy of the cached disk image at `dest`."""
    directory = directory or debroot_dir()
    data = read_manifest(directory) or {}
    extents = [tuple(e) for e in data.get("extents", [])]
    if not extents:
        extents = mbrdisk.data_extents(directory / DISK)
    mbrdisk.copy_extents(directory / DISK, dest, extents, (directory / DISK).stat().st_size)
    return dest


def _unmount_under(path: Path) -> None:
    """Lazily unmount what a killed debootstrap left mounted inside `path` (its proc, sys...)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        gk.run(["umount", "-l", point])


def build(force: bool = False) -> Path:
    """Build the image unless it is up to date (or `force`); returns the cache directory."""
    cache = debroot_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with gk._build_lock(cache):
        gk._remove_leftovers(cache, before_removal=_unmount_under)
        if not force and is_up_to_date(cache):
            log(f"debian root up to date: {cache}")
            return cache
        if os.geteuid() != 0:
            raise gk.KitError("need root to debootstrap the Debian root; run this as root or via scripts/setup.sh")
        gk.build_in_place(cache, _build_into, before_removal=_unmount_under)
    log(f"debian root built: {cache}")
    return cache


def _debootstrap(root: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise gk.KitError("debootstrap not found (apt-get install debootstrap, or run scripts/setup.sh)")
    log(f"debootstrap {SUITE} with {' '.join(PACKAGES)} (minutes)")
    gk.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR])


def _configure(root: Path) -> tuple[str, str]:
    """Hostname, fstab, masked units, grub.cfg; returns the kernel's and initrd's paths in the root."""
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (root / "etc/fstab").write_text(FSTAB)
    for unit in MASKED_UNITS:
        for wants in (root / "etc/systemd/system").glob(f"*.wants/{unit}"):
            wants.unlink()
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for name, text in DROP_INS.items():
        path = root / "etc/systemd/system" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pruned in PRUNED:
        path = root / pruned
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    (root / "var/cache/apt").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise gk.KitError(f"the root holds {len(kernels)} kernels in /boot, expected one")
    release = kernels[0].name.removeprefix("vmlinuz-")
    if not (root / f"boot/initrd.img-{release}").is_file():
        raise gk.KitError(f"the root has no /boot/initrd.img-{release}")
    kernel, initrd = f"/boot/vmlinuz-{release}", f"/boot/initrd.img-{release}"
    (root / "boot/grub").mkdir(parents=True, exist_ok=True)
    (root / "boot/grub/grub.cfg").write_text(grub_cfg(kernel, initrd))
    return kernel, initrd


def _package_versions(root: Path) -> dict[str, str]:
    out = gk.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Package} ${Version}\\n"])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _build_into(out: Path, work: Path) -> None:
    root = work / "root"
    _debootstrap(root)
    kernel, initrd = _configure(root)
    shutil.copyfile(root / kernel.lstrip("/"), out / VMLINUZ)
    shutil.copyfile(root / initrd.lstrip("/"), out / INITRD)
    versions = _package_versions(root)
    log(f"making {DISK} ({DISK_SIZE >> 20} MiB, sparse) and embedding GRUB")
    mbrdisk.make_disk(out / DISK, root, size=DISK_SIZE, label=LABEL)
    core_sectors = mbrdisk.install_grub(out / DISK, work)
    data = {
        "format": FORMAT_VERSION,
        "recipe": recipe_digest(),
        "suite": SUITE,
        "kernel": {"path": kernel, "initrd": initrd, "package_version": versions.get("linux-image-cloud-amd64")},
        "cmdline": CMDLINE,
        "grub": {"core_sectors": core_sectors, "prefix": mbrdisk.GRUB_PREFIX, "marker": GRUB_MARKER},
        "packages": versions,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extents": mbrdisk.data_extents(out / DISK),
        "sha256": {name: gk.file_sha256(out / name) for name in FILES},
    }
    (out / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="debroot.py", description="Build and cache the Debian 12 root disk image.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build it unless it is up to date")
    build_parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    commands.add_parser("path", help="print its directory")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(debroot_dir())
        return 0
    return gk.print_built("debroot", lambda: build(force=args.force), (mbrdisk.DiskError,))


if __name__ == "__main__":
    sys.exit(main())
