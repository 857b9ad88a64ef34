"""Where the default guest kit lives (built by scripts/guestkit.py), and pyvmm's other caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user's cache directory for pyvmm: $XDG_CACHE_HOME/pyvmm, else ~/.cache/pyvmm."""
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "pyvmm"


def kit_dir() -> Path:
    if os.environ.get("PYVMM_KIT_DIR"):
        return Path(os.environ["PYVMM_KIT_DIR"]).expanduser()
    return cache_dir() / "kit"


def kernel_cache_dir() -> Path:
    """Decompressed kernels (kernel/cache.py)."""
    return cache_dir() / "vmlinux"


def kit_kernel() -> Path:
    return kit_dir() / "vmlinuz"


def kit_initrd() -> Path:
    return kit_dir() / "initramfs.cpio.gz"
