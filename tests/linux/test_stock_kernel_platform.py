"""The platform as the stock kit kernel sees it: SIGTERM to pyvmm, the guest's `reboot -f` with each
--on-reboot (KVM's paravirtual hooks are checked in test_stock_kernel_native.py's boots).  Guest
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


def test_sigterm_stops_a_running_guest_cleanly():
    proc = subprocess.Popen(stock.pyvmm_argv(None), cwd=stock.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    try:
        deadline = time.monotonic() + stock.BOOT_TIMEOUT
        while b"PYVMM-READY" not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        assert b"PYVMM-READY" in out, out[-2000:]
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"Traceback" not in err
