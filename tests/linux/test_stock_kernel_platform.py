"""The platform as the stock kit kernel sees it: SIGTERM to pyvmm (at once, and with --shutdown-timeout
through the ACPI power button), the guest's `reboot -f` with each --on-reboot (KVM's paravirtual hooks
are checked in test_stock_kernel_native.py's boots).  Guest
kernel mode must run natively (the `native` marker): directly on VT-x / AMD-V, inside the nested KVM
elsewhere."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

from tests.support import stock

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.native]


def test_reboot_ends_pyvmm_by_default():
    """The kernel's default way to reset, where the FADT is hardware-reduced and there is no EFI, is
    the BIOS's reset vector: it must reach pyvmm (it hung there before)."""
    r = subprocess.run(stock.pyvmm_argv("echo REBOOTING; reboot -f"), cwd=stock.ROOT, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=stock.BOOT_TIMEOUT)
    assert "REBOOTING" in r.stdout, r.stdout[-2000:] + r.stderr
    assert r.returncode == 0 and "guest reset" in r.stderr, r.stdout[-2000:] + r.stderr
    assert "PYVMM-EXIT" not in r.stdout  # the guest never came back to its /init


def test_reboot_with_on_reboot_restart_boots_the_guest_again(tmp_path):
    """A marker on a disk tells the second boot from the first: the first reboots, the second powers off."""
    disk = tmp_path / "marker.img"
    disk.write_bytes(bytes(4096))
    command = ("if [ \"$(head -c 6 /dev/vda)\" = SECOND ]; then echo SECOND-BOOT; "
               "else printf SECOND | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; echo FIRST-BOOT; reboot -f; fi")
    r = subprocess.run(stock.pyvmm_argv(command, args=["--disk", str(disk), "--on-reboot", "restart"]),
                       cwd=stock.ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=2 * stock.BOOT_TIMEOUT)
    out = r.stdout.replace("\r", "")
    assert out.count("PYVMM-READY") == 2, out[-3000:] + r.stderr
    assert out.index("FIRST-BOOT") < out.index("SECOND-BOOT"), out[-3000:]
    assert "PYVMM-EXIT=0" in out and r.returncode == 0, out[-3000:] + r.stderr
    assert r.stderr.count("guest reset; booting it again") == 1
    assert disk.read_bytes()[:6] == b"SECOND"  # what the first boot wrote before its reboot


def _until_ready(proc) -> bytes:
    """The console up to the kit's ready line (its interactive shell follows)."""
    out = b""
    deadline = time.monotonic() + stock.BOOT_TIMEOUT
    while b"PYVMM-READY" not in out and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    assert b"PYVMM-READY" in out, out[-2000:]
    return out


def test_sigterm_stops_a_running_guest_cleanly():
    proc = subprocess.Popen(stock.pyvmm_argv(None), cwd=stock.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _until_ready(proc)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"Traceback" not in err


SHUTDOWN_TIMEOUT = 90  # far more than the guest needs (~1-3 s in the nested KVM): a hard stop is a failure


def test_sigterm_with_a_shutdown_timeout_lets_the_guest_power_itself_off():
    """SIGTERM presses the ACPI power button (a Generic Event Device notifying PNP0C0C): the stock
    kernel's button driver reports KEY_POWER, the kit's busybox acpid runs its handler, which says so
    on the console and powers off; pyvmm ends with the guest's power-off, well before the timeout."""
    argv = stock.pyvmm_argv(None, cpus=2, args=["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)])
    proc = subprocess.Popen(argv, cwd=stock.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = _until_ready(proc)
        time.sleep(1)
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 30)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console = (out + rest).decode(errors="replace").replace("\r", "")
    after = console.split("PYVMM-READY", 1)[1]
    errors = err.decode(errors="replace")
    assert proc.returncode == 0, errors + console[-3000:]
    assert "did not power off" not in errors and "Traceback" not in errors, errors
    assert "pyvmm: power button pressed: powering off" in after, console[-3000:]  # the kit's acpid handler
    assert "reboot: Power down" in after.split("power button pressed", 1)[1], console[-3000:]  # the kernel's
    assert took < SHUTDOWN_TIMEOUT, f"pyvmm ended {took:.0f} s after SIGTERM"
    print(f"\npyvmm ended {took:.1f} s after SIGTERM, with the guest's power-off")
