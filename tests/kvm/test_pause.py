"""Machine.pause() / resume() through real KVM: the vCPUs really stop, and the guest's clock too.

The tiny guest clock.S counts in guest memory and writes kvm-clock's time (pvclock + RDTSC, as
Linux reads it) beside the count, forever; the test points its kvm-clock MSR at a page of its
memory, so both are read straight from guest RAM."""

import time

import pytest

from vmm.config import VmConfig
from vmm.machine import Machine, VmStateError

pytestmark = pytest.mark.kvm

MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK, COUNTER, CLOCK_NS = 0x310000, 0x320000, 0x320008


def guest_values(machine):
    """(count, kvm-clock ns) as the guest last wrote them."""
    raw = machine.mem.read(COUNTER, 16)
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


@pytest.fixture
def clock_vm(tiny):
    m = Machine(VmConfig(program=tiny("clock"), console="none", cpus=2))
    m.vcpus[0].set_msrs({MSR_KVM_SYSTEM_TIME_NEW: PVCLOCK | 1})
    m.start()  # the vCPU threads alone: the test's thread is the API's caller
    deadline = time.monotonic() + 10
    while guest_values(m)[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest_values(m)[1] > 0, "the guest never read its clock"
    yield m
    m.lifecycle.stop(0)
    for t in m.threads:
        t.join(timeout=5)
    m.close()


def test_pause_stops_the_vcpus_and_the_guest_clock(clock_vm):
    m = clock_vm
    assert m.state == "running"
    m.pause()
    assert m.state == "paused"
    assert m.gate.parked == 2
    count, clock = guest_values(m)
    exits = [t.exits for t in m.threads]
    time.sleep(0.5)
    assert guest_values(m) == (count, clock)  # not one more iteration of the guest's loop
    assert [t.exits for t in m.threads] == exits  # no KVM_RUN while paused
    kvm_clock_at_pause = m._paused_clock
    m.resume()
    assert m.state == "running"
    time.sleep(0.3)
    count2, clock2 = guest_values(m)
    assert count2 > count
    # the guest's clock went on from where it stopped: it advanced by about the 0.3 s run since
    # the resume, not by the 0.5 s pause as well
    assert clock < clock2 < clock + 450_000_000, (clock, clock2)
    assert clock2 >= kvm_clock_at_pause
    assert m.paused_seconds >= 0.5


def test_pause_and_resume_again_and_again(clock_vm):
    m = clock_vm
    last = guest_values(m)[0]
    for _ in range(20):
        m.pause()
        frozen = guest_values(m)
        assert guest_values(m) == frozen
        m.resume()
        time.sleep(0.01)
        assert guest_values(m)[0] > last
        last = guest_values(m)[0]


def test_pause_and_resume_refuse_the_wrong_state(clock_vm):
    m = clock_vm
    with pytest.raises(VmStateError, match="running"):
        m.resume()
    m.pause()
    with pytest.raises(VmStateError, match="paused"):
        m.pause()
    m.resume()


def test_a_stop_while_paused_ends_the_vm(clock_vm):
    m = clock_vm
    m.pause()
    m.lifecycle.stop(0, "stop while paused")
    for t in m.threads:
        t.join(timeout=5)
        assert not t.is_alive()
    assert m.state == "stopping"
    with pytest.raises(VmStateError):
        m.resume()
