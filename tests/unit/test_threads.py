"""Our threads carry their names to the host (/proc/PID/task/TID/comm), where top -H and taskset see them."""

import os
import threading
from pathlib import Path

from virtio.worker import IoThread
from vmm.kvm import exits
from vmm.kvm.structs import KVM_SYSTEM_EVENT_SHUTDOWN
from vmm.lifecycle import Lifecycle
from vmm.threadname import set_os_thread_name
from vmm.vcpu import VcpuThread


def comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def test_set_os_thread_name_cuts_to_the_kernels_15_bytes():
    seen = []

    def body():
        set_os_thread_name("a-name-longer-than-fifteen")
        seen.append(comm(threading.get_native_id()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == ["a-name-longer-t"]


def test_io_thread_runs_its_handlers_on_a_thread_the_host_sees_by_its_name():
    worker = IoThread("net0-pair1")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = []
    done = threading.Event()

    def handler():
        seen.append(comm(threading.get_native_id()))
        done.set()

    worker.add_eventfd(fd, handler)
    worker.start()
    try:
        os.eventfd_write(fd, 1)
        assert done.wait(5)
    finally:
        worker.stop()
        os.close(fd)
    assert seen == ["net0-pair1"]
    assert comm(threading.get_native_id()) != "net0-pair1"  # (the caller's own name is its own)


class _PowerOffVcpu:
    """A vCPU whose KVM_RUN comes back with the guest's power-off (a shutdown system event)."""

    id = 3

    def __init__(self):
        self.names = []

    def run(self):
        self.names.append(comm(threading.get_native_id()))
        return exits.SystemEvent(type=KVM_SYSTEM_EVENT_SHUTDOWN, data=())


def test_vcpu_threads_are_named_vcpuN_for_the_host():
    vcpu, lifecycle = _PowerOffVcpu(), Lifecycle()
    t = VcpuThread(vcpu, pio=None, mmio=None, mem=None, lifecycle=lifecycle)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert vcpu.names == ["vcpu3"]
    assert (lifecycle.exit_code, lifecycle.message) == (0, "guest powered off")
