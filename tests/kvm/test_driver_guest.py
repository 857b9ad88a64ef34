"""The driver guest through real KVM, without virtio devices: start-up in user mode, the console,
port I/O, the job protocol. (Its virtio paths are exercised by the device tests.)"""

import threading

import pytest

from tests.support import driver as D
from vmm.config import VmConfig
from vmm.machine import Machine

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return str(D.build_driver(tmp_path_factory.mktemp("driver")))


class Port:
    def __init__(self):
        self.writes, self.threads = [], set()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        self.threads.add(threading.current_thread().name)


def machine(driver, tmp_path, **kw):
    return Machine(VmConfig(program=driver, console=f"file:{tmp_path / 'console.log'}", **kw))


def test_blk_init_without_devices_ends_with_no_such_device(driver, tmp_path):
    m = machine(driver, tmp_path)
    try:
        job = D.run_driver(m, [D.blk_init()], timeout=30)
    finally:
        m.close()
    assert job.exit_code == 0 and job.message == "guest powered off"
    assert (job.status, job.cmds_done) == (D.R_NO_DEVICE, 1)
    assert job.cmds[0].result == D.R_NO_DEVICE
    assert "cmd 0 blk-init dev 0: no such device" in job.console


def test_report_reaches_port_0x500_on_the_vcpu_thread(driver, tmp_path):
    m = machine(driver, tmp_path)
    port = Port()
    m.pio.register(D.REPORT_PORT, 4, port)
    try:
        job = D.run_driver(m, [D.report(0x1234), D.nop(), D.report(0xDEADBEEF)], timeout=30)
    finally:
        m.close()
    job.check()
    assert port.writes == [(0, 4, 0x1234), (0, 4, 0xDEADBEEF)]
    assert port.threads == {"vcpu0"}


def test_a_failure_stops_the_job_unless_told_to_continue(driver, tmp_path):
    m = machine(driver, tmp_path, cpus=2)  # the second vCPU just waits
    port = Port()
    m.pio.register(D.REPORT_PORT, 4, port)
    try:
        job = D.run_driver(m, [D.blk_init(cont=True), D.report(1), D.blk_read(0, 512, D.DATA_START),
                               D.report(2)], timeout=30)
    finally:
        m.close()
    assert [v for _, _, v in port.writes] == [1]
    assert job.status == D.R_NO_DEVICE and job.cmds_done == 3
    assert [c.result for c in job.cmds] == [D.R_NO_DEVICE, D.R_OK, D.R_NOT_READY, D.R_NOT_RUN]
    with pytest.raises(AssertionError, match="no such device"):
        job.check()


def test_the_guest_sees_pending_msis_in_the_lapic_irr(driver, tmp_path):
    # what the interrupt tests rely on: an MSI to vector 0x40 + queue stays pending (IF=0) and the
    # guest can read it from the LAPIC page at 0xFEE00000 in user mode
    m = machine(driver, tmp_path)
    m.vm.signal_msi(D.MSI_ADDRESS, D.MSI_VECTOR_QUEUE0 + 1)
    m.vm.signal_msi(D.MSI_ADDRESS, D.MSI_VECTOR_CONFIG)
    try:
        job = D.run_driver(m, [D.read_irr()], timeout=30).check()
    finally:
        m.close()
    assert job.cmds[0].value == 1 << 1
    assert job.cmds[0].aux == 1 << 31


def test_a_bad_job_block_is_refused(driver, tmp_path):
    m = machine(driver, tmp_path)
    D.write_job(m.mem, [D.nop()])
    m.mem.write_int(D.JOB_ADDR + 4, 4, 99)  # version
    try:
        assert m.run() == 0
        status = m.mem.read_int(D.JOB_ADDR + 12, 4)
        cmd = D.Cmd.unpack(m.mem.read(D.JOB_ADDR + 64, 64))
    finally:
        m.close()
    assert status == D.R_BAD_JOB and cmd.result == D.R_NOT_RUN
    assert "bad job block" in (tmp_path / "console.log").read_text()


def test_poweroff_op_and_the_watchdog(driver, tmp_path):
    m = machine(driver, tmp_path)
    try:
        job = D.run_driver(m, [D.nop(), D.poweroff(), D.report(1)], timeout=30)
    finally:
        m.close()
    assert job.status == D.R_OK and job.cmds_done == 2 and job.cmds[2].result == D.R_NOT_RUN
    m = machine(driver, tmp_path)
    try:
        job = D.run_driver(m, [D.delay(60_000_000)], timeout=1)
    finally:
        m.close()
    assert job.exit_code == 99 and job.status == D.R_NOT_RUN and not job.ok
