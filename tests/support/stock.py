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

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT_TIMEOUT = 180  # a boot to poweroff: ~10 s on hardware, ~40-60 s in the nested KVM


@dataclass
class GuestRun:
    rc: int  # pyvmm's exit status
    status: int  # the guest command's
    out: str  # what the command printed
    console: str  # the whole console
    stderr: str


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
    r = subprocess.run(pyvmm_argv(command, **kw), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    console = r.stdout.replace("\r", "")
    assert "PYVMM-READY" in console, console[-3000:] + r.stderr
    m = re.search(r"PYVMM-EXIT=(\d+)", console)
    assert m, console[-3000:] + r.stderr
    between = console.split("PYVMM-READY", 1)[1].split("PYVMM-EXIT=", 1)[0]
    return GuestRun(r.returncode, int(m.group(1)), between, console, r.stderr)


# In the nested KVM (QEMU's TCG emulating SVM) a 4-vCPU stock boot now and then ends in a triple fault
# about 37 s in, as the kernel write-protects its read-only data (cross-CPU TLB flushes): seen in 2 of
# 7 boots there, never with 1 or 2 vCPUs.  Not yet known whether pyvmm or the emulated SVM is at fault:
# there such a test is an expected failure that is reported (XFAIL / XPASS), not hidden; on hardware
# virtualization it is a plain test.
FLAKY_IN_NESTED_4_VCPUS = pytest.mark.xfail(
    os.environ.get("PYVMM_IN_NESTED") == "1", strict=False,
    reason="intermittent triple fault of 4-vCPU stock boots in the nested KVM (open: pyvmm or TCG's SVM)")
