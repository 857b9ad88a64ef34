"""`pyvmm run --config` and SIGTERM's graceful stop through real KVM: a tiny guest in guest user
mode, and the kit kernel with `sleep` for its init (no button driver, no acpid: the press goes
unheard and the timeout runs out, on any host; tests/linux/test_stock_kernel_platform.py sees the
kit's own init power the guest off)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmm import kit
from vmm.config import VmConfig
from vmm.machine import Machine

pytestmark = pytest.mark.kvm
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_kit = pytest.mark.skipif(not kit.kit_kernel().exists(), reason="no guest kit (scripts/guestkit.py build)")
DEAF_GUEST = ["--console", "none", "--append", "quiet rdinit=/bin/sleep -- 100000"]  # init: busybox sleep


def popen(*args):
    return subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_with_a_config_file_and_flags_over_it(tiny, tmp_path):
    """The program runs on every vCPU: one line on the console means the flag's --cpus 1 won."""
    file_log, flag_log = tmp_path / "file.log", tmp_path / "flag.log"
    config = tmp_path / "vm.toml"
    config.write_text(f'program = "{tiny("hello")}"\ncpus = 2\nconsole = "file:{file_log}"\nseccomp = "kill"\n')
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--config", str(config), "--console", f"file:{flag_log}",
                        "--cpus", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert flag_log.read_text() == "hello from a guest in user mode\n" and not file_log.exists()


def wait_for_vcpus(p, timeout: float = 60) -> None:
    """Until pyvmm runs its vCPUs (a thread named vcpu0): its signal handlers are in place by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        names = set()
        for task in Path(f"/proc/{p.pid}/task").glob("*/comm"):
            try:
                names.add(task.read_text().strip())
            except OSError:  # the thread ended meanwhile
                continue
        if "vcpu0" in names:
            return
        time.sleep(0.05)
    raise AssertionError(f"pyvmm started no vCPU in {timeout} s")


def stop_with_sigterm(p, after: float = 1.0) -> tuple[str, float]:
    wait_for_vcpus(p)
    time.sleep(after)
    assert p.poll() is None, p.communicate()
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    return err, time.monotonic() - sent


def test_a_guest_without_acpi_is_stopped_at_once_whatever_the_timeout(tiny):
    p = popen("--program", tiny("spin"), "--console", "none", "--shutdown-timeout", "60")
    err, took = stop_with_sigterm(p)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert took < 10


@needs_kit
def test_sigterm_presses_the_button_and_stops_hard_when_the_timeout_runs_out():
    """SIGTERM's press goes unheard and pyvmm stops the VM 2 s later, saying so; exit status 0 as
    for any SIGTERM."""
    p = popen(*DEAF_GUEST, "--shutdown-timeout", "2")
    err, took = stop_with_sigterm(p)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "pyvmm: the guest did not power off within 2 s of SIGTERM: stopped" in err
    assert 2 <= took < 15


@needs_kit
def test_a_second_sigterm_stops_at_once():
    p = popen(*DEAF_GUEST, "--shutdown-timeout", "60")
    wait_for_vcpus(p)
    p.send_signal(signal.SIGTERM)
    err, took = stop_with_sigterm(p, after=0.5)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert took < 10 and "did not power off" not in err


@needs_kit
def test_request_shutdown_raises_the_power_button_event():
    m = Machine(VmConfig(kernel=str(kit.kit_kernel()), initrd=str(kit.kit_initrd()), console="none"))
    try:
        assert m.request_shutdown() is True
        assert m.ged.presses == 1 and m.ged.read(0, 1) == 1  # what the guest's _EVT would read
        m.lifecycle.stop(0, "done")
        assert m.request_shutdown() is False  # a stopping VM is not asked
    finally:
        m.close()


def test_request_shutdown_of_a_program_guest_says_no(tiny):
    m = Machine(VmConfig(program=tiny("spin"), console="none"))
    try:
        assert m.request_shutdown() is False and m.ged.presses == 0
    finally:
        m.close()
