"""The Python API on the stock kit kernel: `with Machine(cfg) as vm:`, commands in its shell
through vm.run, and a pause that the guest's own clock (kvm-clock) does not see."""

import time

import pytest

from vmm.config import VmConfig, check_host
from vmm.machine import Machine

pytestmark = [pytest.mark.linux, pytest.mark.native]
PAUSE = 5.0


def uptime(vm) -> float:
    status, out = vm.run("cat /proc/uptime", timeout=120)
    assert status == 0, out
    return float(out.split()[0])


def test_run_commands_and_pause_under_the_stock_kernel():
    cfg = check_host(VmConfig.from_dict({"cpus": 2, "mem": "512M", "console": "none", "append": "quiet"}))
    with Machine(cfg) as vm:
        vm.wait_for("PYVMM-READY", timeout=300)
        vm.wait_for("interactive shell", timeout=60)
        assert vm.run("echo hello; uname -s") == (0, "hello\nLinux")
        assert vm.run("false")[0] == 1
        status, out = vm.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
        assert (status, out) == (0, "kvm-clock")
        host0, guest0 = time.monotonic(), uptime(vm)
        vm.pause()
        time.sleep(PAUSE)
        vm.resume()
        host1, guest1 = time.monotonic(), uptime(vm)
        # the guest's clock ran while its commands did, not during the pause
        assert guest1 - guest0 < host1 - host0 - PAUSE + 1.0, (guest0, guest1, host0, host1)
        assert guest1 > guest0
        print(f"a {PAUSE:g} s pause: the host's clock moved {host1 - host0:.2f} s, the guest's {guest1 - guest0:.2f} s")
        assert vm.run("echo after the pause") == (0, "after the pause")
        assert vm.stop(timeout=10) == 0
