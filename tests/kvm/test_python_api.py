"""The Python API for tests: `with Machine(cfg) as vm:` runs the VM beside the caller; the
console is read, waited on and typed into; pause, resume, counters, stop; errors carry the
console's tail."""

import time

import pytest

from vmm.config import VmConfig
from vmm.guest_console import VmStopped, VmTimeout
from vmm.machine import Machine

pytestmark = pytest.mark.kvm


def test_with_machine_runs_beside_the_caller_and_the_console_answers(tiny):
    with Machine(VmConfig(program=tiny("echo"), console="none")) as vm:
        assert vm.state == "running"
        vm.wait_for("echo> ", timeout=10)
        vm.console.read()  # (what came so far)
        vm.console.write("hello, console; " * 20)  # more than the UART's FIFO holds at once
        vm.wait_for("HELLO, CONSOLE; " * 20, timeout=10)
        assert vm.console.read() == "HELLO, CONSOLE; " * 20
        vm.pause()
        vm.console.write("x")  # taken into the FIFO; the paused guest does not read it
        time.sleep(0.2)
        assert vm.console.read() == ""
        vm.resume()
        vm.wait_for("X", timeout=10, start=vm.console.offset - 1)
        counters = vm.counters()
        assert counters["vcpus"]["0"]["by_kind"]["io-in"] > 0
        assert vm.stop(timeout=5) == 0
        assert vm.state == "stopping"


def test_errors_carry_the_console_tail(tiny):
    with Machine(VmConfig(program=tiny("echo"), console="none")) as vm:
        with pytest.raises(VmTimeout) as e:
            vm.wait_for("never printed", timeout=0.5)
        assert "echo> " in e.value.tail and "never printed" in str(e.value)


def test_a_guest_that_powers_off_ends_the_wait(tiny):
    with Machine(VmConfig(program=tiny("hello"), console="none")) as vm:
        assert vm.wait(timeout=10) == 0
        assert "hello from a guest in user mode" in vm.console.text()
        with pytest.raises(VmStopped) as e:
            vm.wait_for("more", timeout=10)
        assert e.value.exit_code == 0 and "hello from a guest" in e.value.tail
