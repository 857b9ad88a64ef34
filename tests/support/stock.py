"""Booting the stock kit kernel under pyvmm for a test: one command in the guest, its output back.

The kit's /init runs the command given base64-encoded as pyvmm.cmd=, prints PYVMM-EXIT=<status> and
powers off; what the command printed lies between PYVMM-READY and that line."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from dataclasses import dataclass


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = 180  # a boot to poweroff: ~10 s on hardware, ~40-60 s in the nested KVM


@dataclass
class GuestRun:
    rc: int  # pyvmm's exit status
    status: int  # the guest command's
    out: str  # what the command printed
    console: str  # the whole console
    stderr: str


def _text(data: bytes | str | None) -> str:
    """What a TimeoutExpired kept of a stream (bytes even with text=True)."""
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def pyvmm_argv(command: str | None, *, cpus: int = 1, mem: str = "512M", args=(), append: str = "",
               quiet: bool = True) -> list[str]:
    words = ["quiet"] if quiet else []
    if append:
        words.append(append)
    if command is not None:
        words.append("pyvmm.cmd=" + base64.b64encode(command.encode()).decode())
    return [sys.executable, "-m", "vmm.cli", "run", "--cpus", str(cpus), "--mem", mem, *args,
            *(["--append", " ".join(words)] if words else [])]


def run_in_guest(command: str, *, timeout: int = BOOT_TIMEOUT, **kw) -> GuestRun:
    """Boot the kit with `command`; asserts that it ran to PYVMM-EXIT."""
    try:
        r = subprocess.run(pyvmm_argv(command, **kw), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # say where the guest stopped: the console's last lines
        raise AssertionError(f"the guest did not finish within {timeout} s; its console ended:\n"
                             f"{_text(e.output)[-3000:]}\nand pyvmm's stderr:\n{_text(e.stderr)[-2000:]}") from None
    console = r.stdout.replace("\r", "")
    assert "PYVMM-READY" in console, console[-3000:] + r.stderr
    m = re.search(r"PYVMM-EXIT=(\d+)", console)
    assert m, console[-3000:] + r.stderr
    between = console.split("PYVMM-READY", 1)[1].split("PYVMM-EXIT=", 1)[0]
    return GuestRun(r.returncode, int(m.group(1)), between, console, r.stderr)
