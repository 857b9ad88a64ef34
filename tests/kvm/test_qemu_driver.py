"""The driver guest under QEMU (scripts/qemu_driver.py): the PVH entry (tests/guest/driver/pvh.S)
lets QEMU's -kernel start the same ELF pyvmm starts, so both VMMs' virtio devices are driven by
the same guest code. pyvmm keeps starting that ELF at _start and ignores the PVH note."""

import random
import shutil
import struct
import subprocess

import pytest

from scripts import qemu_driver as Q
from tests.support import driver as D
from vmm.config import VmConfig
from vmm.machine import Machine

pytestmark = pytest.mark.kvm
MiB = 1 << 20
SECTOR = 512
Q_WINDOW = (0xC0000000, 0xFEC00000)  # where pvh.S puts the BARs a firmware left unassigned

needs_qemu = pytest.mark.skipif(not Q.have_qemu(), reason=f"{Q.QEMU} is not installed")
needs_qboot = pytest.mark.skipif(Q.qboot_rom() is None, reason="QEMU's qboot.rom is not installed")


@pytest.fixture(scope="module")
def pvh_driver(tmp_path_factory):
    if not D.have_gcc():
        pytest.skip("gcc is needed to build the driver guest")
    return Q.build_pvh_driver(tmp_path_factory.mktemp("pvh-driver"))


def symbol(elf, name):
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        addr, _, sym = line.split()
        if sym == name:
            return int(addr, 16)
    raise LookupError(name)


def image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# ---- the ELF -------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is needed")
def test_pvh_elf_declares_its_32_bit_entry_in_a_xen_note(pvh_driver):
    from kernel.elf import PT_NOTE, parse_elf

    img = parse_elf(pvh_driver.read_bytes())
    assert img.pvh_entry == symbol(pvh_driver, "pvh_start")
    assert img.e_entry == symbol(pvh_driver, "_start") != img.pvh_entry
    notes = [ph for ph in img.program_headers if ph.p_type == PT_NOTE]
    # QEMU aligns the note's name to the segment's p_align and reads a pointer-sized descriptor
    assert len(notes) == 1 and notes[0].p_align == 4
    namesz, descsz, ntype = struct.unpack_from("<3I", img.data, notes[0].p_offset)
    assert (namesz, descsz, ntype) == (4, 8, Q.XEN_ELFNOTE_PHYS32_ENTRY)
    # the 32-bit stub runs where it is loaded: physical = linked address, below 4 GiB
    assert any(ph.p_paddr <= img.pvh_entry < ph.p_paddr + ph.p_memsz and ph.p_paddr == ph.p_vaddr
               for ph in img.segments)
    assert img.pvh_entry < 1 << 32


def test_pyvmm_still_starts_the_same_elf_at_start(pvh_driver, tmp_path):
    log = tmp_path / "console.log"
    m = Machine(VmConfig(program=str(pvh_driver), console=f"file:{log}"))
    try:
        job = D.run_driver(m, [D.blk_init()], timeout=30)
    finally:
        m.close()
    assert job.exit_code == 0 and job.message == "guest powered off"
    assert (job.status, job.cmds_done, job.cmds[0].result) == (D.R_NO_DEVICE, 1, D.R_NO_DEVICE)
    assert "cmd 0 blk-init dev 0: no such device" in job.console
    assert "pvh" not in job.console  # the PVH stub is not run by pyvmm


# ---- QEMU ----------------------------------------------------------------------------------
@needs_qemu
def test_qemu_virtio_blk_round_trip_with_seabios(pvh_driver, tmp_path):
    """SeaBIOS (QEMU's default firmware) assigns the BARs; the driver writes 4 MiB, flushes,
    reads it back into another buffer and asks for the serial."""
    pattern = random.Random(7).randbytes(4 * MiB)
    src, dst, ident = D.DATA_START, D.DATA_START + 8 * MiB, D.DATA_START + 16 * MiB
    first = 2048  # sectors: the data lands 1 MiB into the disk
    disk = image(tmp_path / "disk.img", 16 * MiB)
    res = Q.run_qemu_job(
        [D.blk_init(), D.blk_write(first, len(pattern), src, depth=4, request_size=256 * 1024), D.blk_flush(),
         D.blk_read(first, len(pattern), dst, depth=4, request_size=256 * 1024), D.blk_get_id(ident)],
        workdir=tmp_path / "qemu", program=pvh_driver, disks=[Q.QemuDisk(disk, serial="qemu-serial-42")],
        load={src: pattern}, save=[(dst, len(pattern)), (ident, 20)], timeout=50)
    res.check()
    assert res.message == "job finished"
    init = res.cmds[0]
    assert init.device_status == 0x0F and init.capacity == 16 * MiB // SECTOR
    assert init.driver_features & 1 << D.VIRTIO_F_VERSION_1
    with open(disk, "rb") as f:
        f.seek(first * SECTOR)
        assert f.read(len(pattern)) == pattern
        assert f.read(SECTOR) == bytes(SECTOR)
    assert res.buffers[dst] == pattern
    assert res.buffers[ident] == b"qemu-serial-42".ljust(20, b"\0")
    assert res.cmds[4].aux == 21  # GET_ID's used length: the 20 id bytes and the status byte
    # the stages all happened, in order, and the console shows the PVH entry then the driver
    assert {"qemu_start", "firmware", "pvh_stub", "job", "total"} <= res.timings.keys()
    assert res.console.index("pvh\n") < res.console.index("driver: 5 commands")
    blk = [d for d in res.pci if d["id"] == "1af4:1042"]
    assert len(blk) == 1 and all(b["address"] not in (0, -1) for b in blk[0]["bars"])


@needs_qemu
@needs_qboot
def test_qemu_with_qboot_two_disks_multiqueue(pvh_driver, tmp_path):
    """qboot assigns no BARs: pvh.S's user-mode start does. Two disks, the second with two
    queues, each read back through its own queue."""
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    a.write_bytes(b"A" * MiB)
    b.write_bytes(bytes(range(256)) * (2 * MiB // 256))
    buf = D.DATA_START
    res = Q.run_qemu_job(
        [D.blk_init(dev=0), D.blk_init(dev=1, queues=2), D.blk_read(0, 4096, buf, dev=0),
         D.blk_read(8, 4096, buf + 4096, dev=1, queue=1), D.blk_get_id(buf + 8192, dev=1)],
        workdir=tmp_path / "qemu", program=pvh_driver, firmware="qboot",
        disks=[Q.QemuDisk(str(a), serial="first"), Q.QemuDisk(str(b), serial="second", queues=2)],
        save=[(buf, 8192 + 20)], timeout=30)
    res.check()
    assert res.cmds[1].queue == 2
    data = res.buffers[buf]
    assert data[:4096] == b"A" * 4096
    assert data[4096:8192] == (bytes(range(256)) * 16)
    assert data[8192:].rstrip(b"\0") == b"second"
    bars = [bar for d in res.pci if d["id"] == "1af4:1042" for bar in d["bars"]]
    assert len(bars) == 4 and all(Q_WINDOW[0] <= bar["address"] < Q_WINDOW[1] for bar in bars)


@needs_qemu
def test_a_job_that_does_not_finish_is_reported_with_what_it_did(pvh_driver, tmp_path):
    firmware = "qboot" if Q.qboot_rom() else "seabios"
    res = Q.run_qemu_job([D.nop(), D.delay(60_000_000), D.nop()], workdir=tmp_path, program=pvh_driver,
                         firmware=firmware, timeout=2 if firmware == "qboot" else 8)
    assert res.message.startswith("timeout") and not res.ok
    assert (res.status, res.cmds_done) == (D.R_NOT_RUN, 1)
    assert [c.result for c in res.cmds] == [D.R_OK, D.R_NOT_RUN, D.R_NOT_RUN]
    assert res.exit_code == 0  # quit through QMP
    with pytest.raises(AssertionError, match="timeout"):
        res.check()


@needs_qemu
def test_an_exception_in_the_guest_ends_qemu_and_is_reported(pvh_driver, tmp_path):
    # the config copy goes to 1 TiB, beyond the 64 GiB mapped: #PF with no IDT, a triple fault
    disk = image(tmp_path / "disk.img", MiB)
    res = Q.run_qemu_job([D.nop(), D.blk_init(config_to=1 << 40)], workdir=tmp_path, program=pvh_driver,
                         disks=[Q.QemuDisk(disk)], firmware="qboot" if Q.qboot_rom() else "seabios", timeout=30)
    assert res.message.startswith("QEMU exited") and not res.ok
    assert res.status == D.R_NOT_RUN
    assert "cmd 0 nop: ok" in res.console and "cmd 1" not in res.console


@needs_qemu
@pytest.mark.parametrize("cpu, page", [("max", "1G"), ("max,-pdpe1gb", "2M")])
def test_pvh_stub_maps_64_gib_with_either_page_size(pvh_driver, tmp_path, cpu, page):
    """Under QEMU's TCG (its -cpu max has 1 GiB pages, which this host's software KVM lacks), so
    both of the stub's paths run; the page tables are read back and checked entry by entry."""
    res = Q.run_qemu_job([D.nop()], workdir=tmp_path, program=pvh_driver, accel="tcg", cpu=cpu,
                         firmware="qboot" if Q.qboot_rom() else "seabios", save=[(0x10000, 0x42000)], timeout=30)
    res.check()
    tables = res.buffers[0x10000]

    def entries(offset, n):
        return [e & ~0x60 for e in struct.unpack_from(f"<{n}Q", tables, offset)]  # accessed/dirty aside

    assert entries(0, 512) == [0x11007] + [0] * 511
    pdpt = entries(0x1000, 512)
    assert pdpt[64:] == [0] * 448
    if page == "1G":
        assert pdpt[:64] == [g << 30 | 0x87 for g in range(64)]
    else:
        assert pdpt[:64] == [0x12000 + g * 0x1000 | 0x7 for g in range(64)]
        assert entries(0x2000, 64 * 512) == [j << 21 | 0x87 for j in range(64 * 512)]


def test_host_tsc_khz_is_what_kvm_gives_its_vcpus(pvh_driver, tmp_path):
    m = Machine(VmConfig(program=str(pvh_driver), console=f"file:{tmp_path / 'console.log'}"))
    try:
        assert Q.host_tsc_khz() == D.guest_tsc_khz(m) > 0
    finally:
        m.close()
