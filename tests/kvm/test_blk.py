"""virtio-blk end to end through real KVM: the driver guest (tests/guest/driver) runs in guest user
mode and drives pyvmm's virtio-pci virtio-blk devices as a driver would, through ioeventfd kicks,
the I/O threads, and MSI-X interrupts delivered by irqfd."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support import driver as D
from vmm.config import DiskSpec
from vmm.config import VmConfig
from vmm.machine import Machine

pytestmark = pytest.mark.kvm
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_BLK_F_RO = 1 << 5
STATUS_DRIVER_READY = 0x0F  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
VIRTIO_BLK_S_IOERR = 1


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return str(D.build_driver(tmp_path_factory.mktemp("driver")))


def image(path, size, fill=None):
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
            f.truncate(size)
    return str(path)


def new_machine(driver, tmp_path, disks, mem=256 * MiB, cpus=1):
    return Machine(VmConfig(program=driver, console=f"file:{tmp_path / 'console.log'}", mem_size=mem,
                            cpus=cpus, disks=disks))


def run(machine, cmds, **kw):
    try:
        return D.run_driver(machine, cmds, **kw).check()
    except BaseException:
        machine.close()
        raise


def test_feature_negotiation_and_status(driver, tmp_path):
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", 8 * MiB))])
    job = run(m, [D.blk_init(event_idx=True, indirect=True)])
    m.close()
    init = job.cmds[0]
    assert init.device_features & VIRTIO_F_VERSION_1
    assert init.device_status == STATUS_DRIVER_READY
    assert init.capacity == 8 * MiB // 512


def test_features_ok_is_refused_for_features_not_offered(driver, tmp_path):
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", MiB))])
    bogus = VIRTIO_F_VERSION_1 | (1 << 40)
    job = D.run_driver(m, [D.blk_init(features=bogus)])
    m.close()
    assert job.cmds[0].result == D.R_FEATURES


@pytest.mark.debian12
def test_64_mib_pattern_round_trip_and_image_hash(driver, tmp_path):
    size = 64 * MiB
    pattern = os.urandom(size)
    path = image(tmp_path / "d.img", size)
    m = new_machine(driver, tmp_path, [DiskSpec(path)], mem=256 * MiB)
    m.mem.write(D.DATA_START, pattern)
    back = D.DATA_START + size
    run(m, [D.blk_init(event_idx=True, indirect=True), D.blk_write(0, size, D.DATA_START, depth=16),
            D.blk_flush(), D.blk_read(0, size, back, depth=16)])
    read_back = m.mem.read(back, size)
    m.close()
    assert hashlib.sha256(read_back).hexdigest() == hashlib.sha256(pattern).hexdigest()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(pattern).hexdigest()


@pytest.mark.parametrize("event_idx,indirect", [(False, False), (True, False), (False, True), (True, True)])
def test_small_segmented_requests_in_every_ring_mode(driver, tmp_path, event_idx, indirect):
    size = 4 * MiB
    pattern = os.urandom(size)
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", size))])
    m.mem.write(D.DATA_START, pattern)
    back = D.DATA_START + size
    run(m, [D.blk_init(event_idx=event_idx, indirect=indirect),
            D.blk_write(0, size, D.DATA_START, depth=8, request_size=64 << 10, seg_size=4096),
            D.blk_read(0, size, back, depth=32, request_size=4096)])
    assert m.mem.read(back, size) == pattern
    m.close()


def test_read_only_disk_refuses_writes(driver, tmp_path):
    original = os.urandom(MiB)
    path = image(tmp_path / "ro.img", MiB, original)
    m = new_machine(driver, tmp_path, [DiskSpec(path, read_only=True)])
    m.mem.write(D.DATA_START, bytes(MiB))
    job = D.run_driver(m, [D.blk_init(), D.blk_write(0, MiB, D.DATA_START, cont=True),
                           D.blk_read(0, MiB, D.DATA_START + MiB)])
    data = m.mem.read(D.DATA_START + MiB, MiB)
    m.close()
    assert job.cmds[0].device_features & VIRTIO_BLK_F_RO
    assert job.cmds[1].result == D.R_VIRTIO_STATUS + VIRTIO_BLK_S_IOERR
    assert job.cmds[2].ok and data == original
    assert open(path, "rb").read() == original


def test_get_id_returns_the_serial(driver, tmp_path):
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", MiB), serial="pyvmm-disk-0042")])
    run(m, [D.blk_init(), D.blk_get_id(D.DATA_START)])
    ident = m.mem.read(D.DATA_START, 20)
    m.close()
    assert ident == b"pyvmm-disk-0042".ljust(20, b"\0")


@pytest.mark.debian12
def test_discard_frees_blocks_and_write_zeroes_zeroes(driver, tmp_path):
    size = 16 * MiB
    path = image(tmp_path / "d.img", size, os.urandom(size))
    os.fsync(os.open(path, os.O_RDONLY))
    blocks_before = os.stat(path).st_blocks
    m = new_machine(driver, tmp_path, [DiskSpec(path)])
    run(m, [D.blk_init(), D.blk_discard(0, 8 * MiB), D.blk_write_zeroes(8 * MiB // 512, MiB), D.blk_flush()])
    m.close()
    st = os.stat(path)
    if st.st_blocks >= blocks_before:
        pytest.skip(f"the filesystem of {tmp_path} does not punch holes")
    assert st.st_blocks * 512 <= blocks_before * 512 - 7 * MiB
    with open(path, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_two_disks_at_once(driver, tmp_path):
    a, b = image(tmp_path / "a.img", 2 * MiB), image(tmp_path / "b.img", 2 * MiB)
    pa, pb = os.urandom(2 * MiB), os.urandom(2 * MiB)
    m = new_machine(driver, tmp_path, [DiskSpec(a, serial="A"), DiskSpec(b, serial="B")])
    m.mem.write(D.DATA_START, pa)
    m.mem.write(D.DATA_START + 2 * MiB, pb)
    run(m, [D.blk_init(dev=0), D.blk_init(dev=1), D.blk_write(0, 2 * MiB, D.DATA_START, dev=0, depth=4),
            D.blk_write(0, 2 * MiB, D.DATA_START + 2 * MiB, dev=1, depth=4), D.blk_flush(dev=0),
            D.blk_flush(dev=1), D.blk_get_id(D.DATA_START + 4 * MiB, dev=0),
            D.blk_get_id(D.DATA_START + 4 * MiB + 64, dev=1)])
    ids = m.mem.read(D.DATA_START + 4 * MiB, 1), m.mem.read(D.DATA_START + 4 * MiB + 64, 1)
    m.close()
    assert ids == (b"A", b"B")  # PCI order is --disk order
    assert open(a, "rb").read() == pa and open(b, "rb").read() == pb


def test_multiqueue_one_queue_per_vcpu(driver, tmp_path):
    size = 2 * MiB
    pattern = os.urandom(size)
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", size))], cpus=2)
    m.mem.write(D.DATA_START, pattern)
    job = run(m, [D.blk_init(event_idx=True), D.blk_write(0, MiB, D.DATA_START, queue=0, depth=4),
                  D.blk_write(MiB // 512, MiB, D.DATA_START + MiB, queue=1, depth=4), D.blk_flush(queue=1),
                  D.blk_read(0, size, D.DATA_START + size, queue=1, depth=8)])
    assert job.cmds[0].queue == 2  # the default: one queue per vCPU
    assert m.mem.read(D.DATA_START + size, size) == pattern
    m.close()


IRR = 0x200  # local APIC Interrupt Request Register, 8 x 32 bits at 16-byte strides


def irr_bit(lapic: bytes, vector: int) -> bool:
    word = int.from_bytes(lapic[IRR + 16 * (vector // 32): IRR + 16 * (vector // 32) + 4], "little")
    return bool(word >> (vector % 32) & 1)


@pytest.mark.parametrize("event_idx", [False, True])
def test_msix_vector_pending_only_when_the_driver_asked(driver, tmp_path, event_idx):
    """The guest runs with interrupts off, so an MSI stays pending in the LAPIC's IRR where the
    host can see it: not after a request with interrupts suppressed, yes after one without."""
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", MiB))])
    seen = {}

    class Probe:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):  # on the vCPU thread, between two guest instructions
            seen[value] = irr_bit(m.vcpus[0].get_lapic(), 0x40)

    m.pio.register(D.REPORT_PORT, 4, Probe())
    run(m, [D.blk_init(event_idx=event_idx), D.blk_read(0, 64 << 10, D.DATA_START, no_interrupt=True),
            D.delay(20000), D.report(1), D.blk_read(0, 64 << 10, D.DATA_START), D.delay(20000), D.report(2)])
    m.close()
    assert seen == {1: False, 2: True}


@pytest.mark.parametrize("kind", [D.GARBAGE_ADDR_BEYOND_RAM, D.GARBAGE_LOOP, D.GARBAGE_ADDR_WRAP, D.GARBAGE_HUGE_LEN,
                                  D.GARBAGE_HEAD_RANGE, D.GARBAGE_NEXT_RANGE, D.GARBAGE_AVAIL_IDX,
                                  D.GARBAGE_SHORT_HDR, D.GARBAGE_NO_STATUS, D.GARBAGE_NESTED_INDIRECT,
                                  D.GARBAGE_INDIRECT_NEXT, D.GARBAGE_INDIRECT_LEN, D.GARBAGE_READ_AFTER_WRITE])
def test_garbage_descriptors_fail_the_request_or_reset_the_device_and_the_vmm_goes_on(driver, tmp_path, kind):
    pattern = os.urandom(MiB)
    path = image(tmp_path / "d.img", MiB, pattern)
    m = new_machine(driver, tmp_path, [DiskSpec(path)])
    job = D.run_driver(m, [D.blk_init(event_idx=True, indirect=True), D.blk_garbage(kind, cont=True),
                           D.blk_reset(), D.blk_init(event_idx=True, indirect=True),
                           D.blk_read(0, MiB, D.DATA_START)])
    data = m.mem.read(D.DATA_START, MiB)
    m.close()
    g = job.cmds[1]
    # the bad request came back with an error (or no status), or the device asked for a reset
    assert g.garbage_needs_reset or (g.garbage_used and g.garbage_status_byte != 0), str(g)
    if kind in (D.GARBAGE_HEAD_RANGE, D.GARBAGE_AVAIL_IDX):
        assert g.garbage_needs_reset
    # the VMM is alive, and after a reset the same device works again
    assert all(c.ok for c in job.cmds[2:]), job.describe()
    assert data == pattern


def test_a_second_vm_on_a_locked_image_exits_2(driver, tmp_path):
    path = image(tmp_path / "d.img", MiB)
    m = new_machine(driver, tmp_path, [DiskSpec(path)])
    try:
        r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--program", driver, "--disk", path],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        m.close()
    assert r.returncode == 2
    assert "in use by another VM" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.debian12
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_flushed_data_survives_sigkill(driver, tmp_path, cache):
    """A child VMM writes and flushes, says so, and is killed with SIGKILL: the data is in the image."""
    path = image(tmp_path / "d.img", 4 * MiB)
    pattern = os.urandom(4 * MiB)
    (tmp_path / "pattern").write_bytes(pattern)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from tests.support import driver as D
        from vmm.config import DiskSpec, VmConfig
        from vmm.machine import Machine
        m = Machine(VmConfig(program={driver!r}, console="none", mem_size=128 << 20,
                             disks=[DiskSpec({path!r}, cache={cache!r})]))
        m.mem.write(D.DATA_START, open({str(tmp_path / 'pattern')!r}, "rb").read())
        class Say:
            def read(self, o, s): return 0
            def write(self, o, s, v): print("FLUSHED", flush=True)
        m.pio.register(D.REPORT_PORT, 4, Say())
        D.run_driver(m, [D.blk_init(), D.blk_write(0, {4 * MiB}, D.DATA_START, depth=4), D.blk_flush(),
                         D.report(1), D.delay(60_000_000)], timeout=120, timeout_ms=120_000)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "FLUSHED", p.stderr.read() if p.poll() is not None else line
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    assert open(path, "rb").read() == pattern


@pytest.mark.parametrize("event_idx", [False, True])
def test_requests_never_exit_to_the_vcpu_thread(driver, tmp_path, event_idx):
    """Kicks are ioeventfds and completions irqfds: 20000 requests must not cost 20000 vCPU exits
    (only the set-up - PCI config space, the console - goes through Python on the vCPU thread)."""
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", 16 * MiB))])
    run(m, [D.blk_init(event_idx=event_idx, queues=1), D.report(0)], quiet=True)  # counts the set-up exits
    setup_exits = m.threads[0].exits
    m.close()
    m = new_machine(driver, tmp_path, [DiskSpec(image(tmp_path / "d.img", 16 * MiB))])
    job = run(m, [D.blk_init(event_idx=event_idx, queues=1),
                  D.blk_bench(20000, 4096, D.DATA_START, random=True, depth=32), D.report(0)], quiet=True)
    exits = m.threads[0].exits
    m.close()
    assert job.cmds[1].value > 0
    assert exits - setup_exits < 100, (setup_exits, exits)
