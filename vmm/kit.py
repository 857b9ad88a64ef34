"""Where the default guest kit lives (built by scripts/guestkit.py)."""

from __future__ import annotations

import os
from pathlib import Path


def kit_dir() -> Path:
    if os.environ.get("PYVMM_KIT_DIR"):
        return Path(os.environ["PYVMM_KIT_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyvmm" / "kit"


def kit_kernel() -> Path:
    return kit_dir() / "vmlinuz"


def kit_initrd() -> Path:
    return kit_dir() / "initramfs.cpio.gz"
