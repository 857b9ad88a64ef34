"""Building the test guests from their sources under tests/guest/ with the host's gcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
# Guests are linked with their ELF headers at 4 MiB: pyvmm's user-mode program layout
# keeps page tables and stacks below that.
LINK_FLAGS = ["-nostdlib", "-static", "-Wl,-Ttext-segment=0x400000", "-Wl,--build-id=none", "-Wl,-z,noexecstack"]


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


def build_tiny(name: str, out_dir: Path) -> Path:
    """Assemble tests/guest/tiny/<name>.S into an ELF in out_dir."""
    src = GUEST_DIR / "tiny" / f"{name}.S"
    out = out_dir / f"{name}.elf"
    if not out.exists() or out.stat().st_mtime < max(src.stat().st_mtime, (src.parent / "common.inc").stat().st_mtime):
        subprocess.run(["gcc", *LINK_FLAGS, "-I", str(src.parent), "-o", str(out), str(src)], check=True)
    return out
