"""Where the default guest kit lives (built by scripts/guestkit.py)."""

from __future__ import annotations

import os
from pathlib import Path


def kit_dir() -> Path:
    if os.environ.get("PYVMM_KIT_DIR"):
        return Path(os.environ["PYVMM_KIT_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "pyvmm" / "kit"


def kit_kernel() -> Path:
    return kit_dir() / "vmlinuz"


def kit_initrd() -> Path:
    return kit_dir() / "initramfs.cpio.gz"
