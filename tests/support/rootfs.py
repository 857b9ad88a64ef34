"""A root filesystem image for boot-from-disk tests: the guest kit's initramfs contents in an ext4
image (mkfs.ext4 -d, no mounting, no root needed), so its /init runs from /dev/vda."""

from __future__ import annotations

import gzip
import importlib.util
import os
import stat
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def guestkit():
    spec = importlib.util.spec_from_file_location("guestkit", ROOT / "scripts" / "guestkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_rootfs_image(initrd: Path, image: Path, size: int = 256 << 20) -> Path:
    """Unpack the newc initramfs into a directory and make an ext4 image of it."""
    kit = guestkit()
    entries = kit.read_newc(gzip.decompress(initrd.read_bytes()))
    with tempfile.TemporaryDirectory(prefix="pyvmm-rootfs-") as d:
        top = Path(d)
        for e in entries:
            path = top / e.path
            kind = stat.S_IFMT(e.mode)
            if kind == stat.S_IFDIR:
                path.mkdir(parents=True, exist_ok=True)
            elif kind == stat.S_IFLNK:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(e.data.decode(), path)
            elif kind == stat.S_IFREG:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(e.data)
            else:
                continue  # device nodes: the guest mounts devtmpfs
            if kind != stat.S_IFLNK:
                os.chmod(path, stat.S_IMODE(e.mode))
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pyvmm-root", "-d", str(top), str(image)], check=True)
    return image
