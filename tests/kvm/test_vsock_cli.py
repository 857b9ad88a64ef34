"""--vsock through `pyvmm run` on real KVM (a user-mode guest, so no driver starts the device): the
device is on the PCI bus, its Unix socket is made before the filter goes in and removed at the end,
host programs may connect meanwhile, and a socket already in use is bad input (exit 2)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.kvm]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tiny, path, *extra):
    return subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--program", tiny("spin"), "--console", "none",
                             "--vsock", f"cid=3,socket={path}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_vsock_socket_lives_with_the_vm(tiny, tmp_path):
    path = str(tmp_path / "v.sock")
    p = _run(tiny, path)
    try:
        deadline = time.monotonic() + 120  # (in the nested KVM Python starts slowly)
        while not os.path.exists(path):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)  # queued until the guest's driver starts the device
            s.sendall(b"CONNECT 5\n")
        second = _run(tiny, path)  # the same socket, in use: one line, exit 2
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "--vsock socket" in err and "listens" in err, err
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err == "", err  # the way out, under the filter, removes the socket
    assert not os.path.exists(path)
