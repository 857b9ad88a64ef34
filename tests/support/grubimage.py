"""A bootable BIOS disk image with GRUB, the guest kit's kernel and initramfs, built with
Debian's own tools: `grub-mkrescue` (grub-pc-bin, xorriso, mtools).

grub-mkrescue writes a hybrid ISO 9660 image: El Torito for CD boot plus an MBR (GRUB's
boot_hybrid.img) so that a PC BIOS also boots it as a hard disk, which is how SeaBIOS boots it
from pyvmm's virtio-blk disk.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

TOOLS = ("grub-mkrescue", "xorriso", "mformat")
GRUB_PC_DIR = "/usr/lib/grub/i386-pc"  # grub-pc-bin: the BIOS platform's modules and boot images

GRUB_MARKER = "PYVMM-GRUB"  # echoed by grub.cfg before it loads the kernel


def missing_tools() -> list[str]:
    """What grub-mkrescue needs for a BIOS image and this host lacks (empty when all is there)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.path.isfile(os.path.join(GRUB_PC_DIR, "boot_hybrid.img")):
        missing.append(f"{GRUB_PC_DIR} (package grub-pc-bin)")
    return missing


def grub_cfg(cmdline: str, *, timeout: int = 0) -> str:
    """A grub.cfg that talks on COM1 only and boots /boot/vmlinuz with /boot/initramfs.cpio.gz."""
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial\n"
        "terminal_output serial\n"
        f"set timeout={timeout}\n"
        "set default=0\n"
        "menuentry 'pyvmm kit' {\n"
        f"    echo '{GRUB_MARKER} loading linux'\n"
        f"    linux /boot/vmlinuz {cmdline}\n"
        f"    echo '{GRUB_MARKER} loading initrd'\n"
        "    initrd /boot/initramfs.cpio.gz\n"
        f"    echo '{GRUB_MARKER} booting'\n"
        "}\n"
    )


def kit_cmdline(command: str, extra: str = "") -> str:
    """console=ttyS0 and the kit's `pyvmm.cmd=<base64 of command>`, plus `extra`."""
    b64 = base64.b64encode(command.encode()).decode()
    return " ".join(w for w in ("console=ttyS0", extra, f"pyvmm.cmd={b64}") if w)


def build_grub_image(out: str | os.PathLike, kernel: str | os.PathLike, initrd: str | os.PathLike,
                     cmdline: str, workdir: str | os.PathLike) -> Path:
    """Write a hybrid GRUB image to `out` holding `kernel`, `initrd` and a grub.cfg booting them
    with `cmdline`; return its path."""
    root = Path(workdir) / "grub-root"
    (root / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel, root / "boot" / "vmlinuz")
    shutil.copyfile(initrd, root / "boot" / "initramfs.cpio.gz")
    (root / "boot" / "grub" / "grub.cfg").write_text(grub_cfg(cmdline))
    out = Path(out)
    # Only the BIOS platform: no EFI image (it would need grub-efi and is of no use to SeaBIOS).
    r = subprocess.run(["grub-mkrescue", "-d", GRUB_PC_DIR, "-o", str(out), str(root)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"grub-mkrescue failed ({r.returncode}):\n{r.stdout}")
    with open(out, "rb") as f:
        mbr = f.read(512)
    if mbr[510:] != b"\x55\xaa":
        raise RuntimeError("grub-mkrescue's image has no MBR boot signature")
    return out
