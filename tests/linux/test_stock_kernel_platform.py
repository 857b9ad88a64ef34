"""The platform as the stock kit kernel sees it: SIGTERM to pyvmm (KVM's paravirtual hooks are
checked in test_stock_kernel_native.py's boots).  Guest
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
