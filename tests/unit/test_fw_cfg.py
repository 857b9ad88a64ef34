"""fw_cfg: the device (ports, file directory, DMA) and the blobs SeaBIOS reads from it.

The ACPI part runs the "etc/table-loader" script the way SeaBIOS's
romfile_loader.c does (and OVMF's checksum variant) on files read back through
the device, and checks the result against kernel.acpi.build() at the same
addresses.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import pytest

from kernel import acpi
from kernel import fw_cfg_tables as fct
from kernel.e820 import E820_TYPE_ACPI, E820_TYPE_RAM, E820_TYPE_RESERVED, E820Entry, build_e820
from vmm.devices import fw_cfg as fc
from vmm.devices.fw_cfg import FwCfg
from vmm.memory import GiB, MiB, GuestMemory

SEL = fc.SELECTOR_OFFSET
DATA = fc.DATA_OFFSET
CTRL = 0x1000  # where the tests put a FWCfgDmaAccess
BUF = 0x2000  # and the buffer it names


@pytest.fixture
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


@pytest.fixture
def fw(mem):
    return FwCfg(mem)


# ----------------------------------------------------------------- guest-side helpers


def select(fw: FwCfg, selector: int) -> None:
    fw.write(SEL, 2, selector)


def inb_data(fw: FwCfg, n: int) -> bytes:
    return bytes(fw.read(DATA, 1) for _ in range(n))


def be32_port_value(value: int) -> int:
    """What `outl(cpu_to_be32(value), port)` hands the device."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def start_dma(fw: FwCfg, addr: int) -> None:
    fw.write(fc.DMA_OFFSET, 4, be32_port_value(addr >> 32))
    fw.write(fc.DMA_LOW_OFFSET, 4, be32_port_value(addr & 0xFFFFFFFF))


def dma(fw: FwCfg, mem: GuestMemory, control: int, length: int, address: int, at: int = CTRL) -> int:
    mem.write(at, fc.DMA_ACCESS.pack(control, length, address))
    start_dma(fw, at)
    return struct.unpack(">I", mem.read(at, 4))[0]


def dma_read_file(fw: FwCfg, mem: GuestMemory, selector: int, size: int) -> bytes:
    control = (selector << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ
    assert dma(fw, mem, control, size, BUF) == 0
    return mem.read(BUF, size)


def read_directory(fw: FwCfg, mem: GuestMemory) -> dict[str, tuple[int, int]]:
    """The directory as SeaBIOS's qemu_cfg_init reads it: count, then entries, by DMA."""
    count = struct.unpack(">I", dma_read_file(fw, mem, fc.FW_CFG_FILE_DIR, 4))[0]
    out = {}
    for _ in range(count):
        assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 64, BUF) == 0
        size, sel, _res, name = fc.FILE_DIR_ENTRY.unpack(mem.read(BUF, 64))
        out[name.rstrip(b"\0").decode()] = (sel, size)
    return out


# ----------------------------------------------------------------- ports


def test_port_layout():
    assert (fc.BASE_PORT, fc.SELECTOR_PORT, fc.DATA_PORT, fc.DMA_PORT, fc.DMA_PORT_LOW) == (
        0x510, 0x510, 0x511, 0x514, 0x518)
    assert fc.PORT_RANGE_SIZE == 12
    assert fc.DMA_ACCESS.size == 16 and fc.FILE_DIR_ENTRY.size == 64


def test_signature_and_id_through_ports(fw):
    select(fw, fc.FW_CFG_SIGNATURE)
    assert inb_data(fw, 4) == b"QEMU"
    assert inb_data(fw, 3) == b"\0\0\0"  # past the end
    select(fw, fc.FW_CFG_ID)
    ident = struct.unpack("<I", inb_data(fw, 4))[0]
    assert ident & fc.FW_CFG_VERSION and ident & fc.FW_CFG_VERSION_DMA
    assert ident == 3


def test_signature_selected_after_reset(fw):
    select(fw, fc.FW_CFG_ID)
    fw.read(DATA, 1)
    fw.reset()
    assert inb_data(fw, 4) == b"QEMU"


def test_wide_data_read_is_a_substring(fw):
    select(fw, fc.FW_CFG_SIGNATURE)
    assert fw.read(DATA, 2).to_bytes(2, "little") == b"QE"
    assert fw.read(DATA, 4).to_bytes(4, "little") == b"MU\0\0"


def test_item_byte_by_byte_and_reselect(fw):
    fw.add_item(fc.FW_CFG_NB_CPUS, struct.pack("<H", 0x1234))
    select(fw, fc.FW_CFG_NB_CPUS)
    assert inb_data(fw, 2) == b"\x34\x12"
    assert inb_data(fw, 5) == bytes(5)
    select(fw, fc.FW_CFG_NB_CPUS)  # selecting again starts over
    assert inb_data(fw, 1) == b"\x34"


def test_bad_selectors_read_zeros(fw):
    for sel in (0x1A, 0x20, 0x3FFF, 0x8005, 0xFFFF):
        select(fw, sel)
        assert inb_data(fw, 8) == bytes(8)


def test_write_channel_bit_is_ignored_for_lookup_and_arch_items(fw):
    select(fw, fc.FW_CFG_WRITE_CHANNEL | fc.FW_CFG_SIGNATURE)
    assert inb_data(fw, 4) == b"QEMU"
    fw.add_item(fc.FW_CFG_IRQ0_OVERRIDE, b"\x01\0\0\0")
    select(fw, fc.FW_CFG_IRQ0_OVERRIDE)
    assert inb_data(fw, 4) == b"\x01\0\0\0"
    select(fw, 0x0002)  # the generic bank's 2 is another item (UUID, absent)
    assert inb_data(fw, 4) == bytes(4)


def test_selector_and_unused_ports_and_ignored_writes(fw):
    assert fw.read(SEL, 1) == 0 and fw.read(SEL, 2) == 0
    assert fw.read(2, 1) == 0xFF and fw.read(3, 1) == 0xFF
    select(fw, fc.FW_CFG_SIGNATURE)
    fw.write(DATA, 1, 0x41)  # data writes are ignored
    fw.write(SEL, 1, 0x01)  # a byte write is not a selection
    fw.write(SEL, 4, 0x01)
    fw.write(2, 2, 0xFFFF)
    fw.write(fc.DMA_OFFSET, 2, 0x1234)  # not a valid DMA register write
    assert inb_data(fw, 4) == b"QEMU"


def test_dma_signature(fw):
    assert fw.read(fc.DMA_OFFSET, 4).to_bytes(4, "little") == b"QEMU"
    assert fw.read(fc.DMA_LOW_OFFSET, 4).to_bytes(4, "little") == b" CFG"
    value = fw.read(fc.DMA_OFFSET, 8)
    assert value.to_bytes(8, "little") == b"QEMU CFG"
    assert int.from_bytes(value.to_bytes(8, "little"), "big") == 0x51454D5520434647 == fc.DMA_SIGNATURE_VALUE
    assert fw.read(fc.DMA_OFFSET + 7, 1) == ord("G")
    assert fw.read(fc.DMA_OFFSET + 6, 4) == int.from_bytes(b"FG\xff\xff", "little")  # past the range


# ----------------------------------------------------------------- the directory


def test_file_directory_sorted_big_endian(fw, mem):
    names = ["etc/table-loader", "bootorder", "etc/acpi/tables", "etc/e820", "opt/x"]
    sels = {name: fw.add_file(name, bytes([i]) * (10 + i)) for i, name in enumerate(names)}
    assert list(sels.values()) == [0x20, 0x21, 0x22, 0x23, 0x24]  # in the order added
    select(fw, fc.FW_CFG_FILE_DIR)
    raw = inb_data(fw, 4 + 64 * len(names))
    assert inb_data(fw, 1) == b"\0"
    assert raw[:4] == len(names).to_bytes(4, "big")
    entries = [fc.FILE_DIR_ENTRY.unpack_from(raw, 4 + 64 * i) for i in range(len(names))]
    assert [e[3].rstrip(b"\0").decode() for e in entries] == sorted(names)
    for size, sel, reserved, name in entries:
        name = name.rstrip(b"\0").decode()
        assert (size, sel, reserved) == (10 + names.index(name), sels[name], 0)
    # the raw bytes are big-endian: the size of "bootorder" (11) is 00 00 00 0b
    assert raw[4:8] == b"\0\0\0\x0b" and raw[8:10] == b"\0\x21"
    # every file reads back through its selector
    for name, sel in sels.items():
        select(fw, sel)
        assert inb_data(fw, 10 + names.index(name)) == fw.file_data(name)
    assert read_directory(fw, mem) == {n: (sels[n], 10 + names.index(n)) for n in names}


def test_empty_directory(fw):
    select(fw, fc.FW_CFG_FILE_DIR)
    assert inb_data(fw, 4) == bytes(4)


def test_host_side_errors(fw):
    fw.add_file("a", b"1")
    with pytest.raises(ValueError):
        fw.add_file("a", b"2")
    with pytest.raises(ValueError):
        fw.add_file("x" * 56, b"")
    fw.add_file("x" * 55, b"")  # 55 bytes + NUL fits
    with pytest.raises(ValueError):
        fw.add_file("", b"")
    for sel in (fc.FW_CFG_SIGNATURE, fc.FW_CFG_ID, fc.FW_CFG_FILE_DIR, 0x20, 0x4003, 0x10000):
        with pytest.raises(ValueError):
            fw.add_item(sel, b"")
    with pytest.raises(KeyError):
        fw.file_data("nope")


# ----------------------------------------------------------------- DMA


def test_dma_read_with_select(fw, mem):
    sel = fw.add_file("etc/thing", bytes(range(200)))
    mem.fill(BUF, 300, 0xAA)
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ
    assert dma(fw, mem, control, 100, BUF) == 0
    assert mem.read(BUF, 101) == bytes(range(100)) + b"\xAA"
    # without SELECT it goes on from the offset reached
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 50, BUF) == 0
    assert mem.read(BUF, 50) == bytes(range(100, 150))
    # and past the end it fills zeros
    mem.fill(BUF, 300, 0xAA)
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 80, BUF) == 0
    assert mem.read(BUF, 81) == bytes(range(150, 200)) + bytes(30) + b"\xAA"
    # the port interface shares the offset: it is past the end now
    assert inb_data(fw, 1) == b"\0"


def test_dma_after_port_select_and_reads(fw, mem):
    sel = fw.add_file("f", b"abcdefgh")
    select(fw, sel)
    assert inb_data(fw, 2) == b"ab"
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 3, BUF) == 0
    assert mem.read(BUF, 3) == b"cde"
    assert inb_data(fw, 1) == b"f"


def test_dma_skip_then_read(fw, mem):
    sel = fw.add_file("f", bytes(range(64)))
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_SKIP
    assert dma(fw, mem, control, 10, 0xDEAD_BEEF_0000) == 0  # the address is not used
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 4, BUF) == 0
    assert mem.read(BUF, 4) == bytes([10, 11, 12, 13])
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_SKIP, 1000, 0) == 0  # past the end: fine
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 4, BUF) == 0
    assert mem.read(BUF, 4) == bytes(4)


def test_dma_select_only_moves_nothing(fw, mem):
    sel = fw.add_file("f", b"xyz")
    mem.fill(BUF, 8, 0xAA)
    assert dma(fw, mem, (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT, 8, BUF) == 0
    assert mem.read(BUF, 8) == b"\xAA" * 8
    assert inb_data(fw, 3) == b"xyz"


def test_dma_read_of_a_bad_selector_gives_zeros(fw, mem):
    mem.fill(BUF, 16, 0xAA)
    control = (0x1234 << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ
    assert dma(fw, mem, control, 16, BUF) == 0
    assert mem.read(BUF, 16) == bytes(16)


def test_dma_read_signature_and_id(fw, mem):
    assert dma_read_file(fw, mem, fc.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert dma_read_file(fw, mem, fc.FW_CFG_ID, 4) == b"\x03\0\0\0"


def test_dma_write_to_read_only_file_is_an_error(fw, mem):
    sel = fw.add_file("ro", b"original")
    mem.write(BUF, b"CHANGED!")
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_WRITE
    assert dma(fw, mem, control, 8, BUF) == fc.FW_CFG_DMA_CTL_ERROR
    assert fw.file_data("ro") == b"original"
    # a legacy item and a missing selector refuse writes too
    for sel in (fc.FW_CFG_SIGNATURE, 0x2FFF):
        control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_WRITE
        assert dma(fw, mem, control, 4, BUF) == fc.FW_CFG_DMA_CTL_ERROR
    select(fw, fc.FW_CFG_SIGNATURE)
    assert inb_data(fw, 4) == b"QEMU"


def test_dma_write_to_writable_file(fw, mem):
    sel = fw.add_file("rw", b"0123456789", writable=True)
    mem.write(BUF, b"ABCD")
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_SKIP
    assert dma(fw, mem, control, 3, 0) == 0
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_WRITE, 4, BUF) == 0
    assert fw.file_data("rw") == b"012ABCD789"
    # a write that would run past the end is dropped whole
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_WRITE, 4, BUF) == fc.FW_CFG_DMA_CTL_ERROR
    assert fw.file_data("rw") == b"012ABCD789"
    # READ wins over WRITE when both are set
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ | fc.FW_CFG_DMA_CTL_WRITE
    assert dma(fw, mem, control, 10, BUF) == 0
    assert mem.read(BUF, 10) == b"012ABCD789"
    assert fw.file_data("rw") == b"012ABCD789"


@pytest.mark.parametrize("address", [
    4 * MiB,  # just past RAM
    4 * MiB - 8,  # straddles the end
    3 * GiB + 0x1000,  # the MMIO hole
    (1 << 64) - 8,  # wraps
])
def test_dma_buffer_outside_ram_is_an_error(fw, mem, address):
    sel = fw.add_file("f", bytes(range(32)))
    for op in (fc.FW_CFG_DMA_CTL_READ, fc.FW_CFG_DMA_CTL_WRITE):
        control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | op
        assert dma(fw, mem, control, 16, address) == fc.FW_CFG_DMA_CTL_ERROR
    # a read past the end of the item goes to zero-fill, checked the same way
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_SKIP
    assert dma(fw, mem, control, 32, 0) == 0
    assert dma(fw, mem, fc.FW_CFG_DMA_CTL_READ, 16, address) == fc.FW_CFG_DMA_CTL_ERROR


def test_dma_huge_length_is_an_error_not_a_hang(fw, mem):
    sel = fw.add_file("f", b"abc")
    control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ
    assert dma(fw, mem, control, 0xFFFF_FFFF, BUF) == fc.FW_CFG_DMA_CTL_ERROR
    # a large read that does fit: the file, then zeros to the end of RAM
    mem.fill(4 * MiB - 1, 1, 0xAA)
    assert dma(fw, mem, control, 4 * MiB - BUF, BUF) == 0
    assert mem.read(BUF, 4) == b"abc\0" and mem.read(4 * MiB - 1, 1) == b"\0"


@pytest.mark.parametrize("at", [4 * MiB, 4 * MiB - 8, 3 * GiB, (1 << 64) - 16, 0xFFFF_FFFF])
def test_dma_control_block_outside_ram(fw, mem, at):
    sel = fw.add_file("f", b"abc")
    start_dma(fw, at)  # nothing raises; the control word, not RAM, is not written
    if at == 4 * MiB - 8:  # the control word is RAM: it gets ERROR
        assert mem.read(at, 4) == b"\0\0\0\x01"
    # the address register went back to 0 and the device still works
    assert dma_read_file(fw, mem, sel, 3) == b"abc"


def test_dma_64bit_address_and_8_byte_write(mem):
    with GuestMemory(8 * MiB, hole_start=4 * MiB) as hi:  # 4 MiB at 0, 4 MiB at 4 GiB
        fw = FwCfg(hi)
        sel = fw.add_file("f", b"high memory")
        at, buf = 4 * GiB + 0x100, 4 * GiB + 0x1000
        control = (sel << 16) | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ
        assert dma(fw, hi, control, 11, buf, at=at) == 0
        assert hi.read(buf, 11) == b"high memory"
        # one 8-byte write at 0x514, big-endian
        hi.write(at, fc.DMA_ACCESS.pack(control, 4, 0x3000))
        fw.write(fc.DMA_OFFSET, 8, int.from_bytes(at.to_bytes(8, "big"), "little"))
        assert hi.read(at, 4) == bytes(4) and hi.read(0x3000, 4) == b"high"
        # a high half alone starts nothing; the low half then completes it
        hi.write(at, fc.DMA_ACCESS.pack(control, 2, 0x3000))
        fw.write(fc.DMA_OFFSET, 4, be32_port_value(at >> 32))
        assert hi.read(at, 4) != bytes(4)
        fw.write(fc.DMA_LOW_OFFSET, 4, be32_port_value(at & 0xFFFFFFFF))
        assert hi.read(at, 4) == bytes(4)


def test_concurrent_port_readers_do_not_break_the_device(fw, mem):
    sel = fw.add_file("f", bytes(range(256)) * 4)
    errors = []

    def worker():
        try:
            for _ in range(200):
                select(fw, sel)
                fw.read(DATA, 1)
                dma_read_file(fw, mem, fc.FW_CFG_SIGNATURE, 4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_guest_fuzz_never_raises(fw, mem):
    import random

    rng = random.Random(1)
    fw.add_file("rw", bytes(64), writable=True)
    fw.add_file("ro", bytes(range(100)))
    for _ in range(3000):
        offset = rng.randrange(0, fc.PORT_RANGE_SIZE)
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            fw.read(offset, size)
        else:
            if rng.random() < 0.3:
                mem.write(CTRL, fc.DMA_ACCESS.pack(rng.getrandbits(32), rng.randrange(0, 1 << 14),
                                                   rng.choice((BUF, rng.getrandbits(64), 4 * MiB - 100))))
                value = be32_port_value(rng.choice((CTRL, rng.getrandbits(32))))
                fw.write(fc.DMA_LOW_OFFSET, 4, value)
            else:
                fw.write(offset, size, rng.getrandbits(8 * size))
    assert fw.file_data("ro") == bytes(range(100))


# ----------------------------------------------------------------- e820


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def test_e820_file_layout():
    entries = build_e820([Region(0, 512 * MiB)], reserved=[(0xB000_0000, 256 * MiB)])
    blob = fct.e820_file(entries)
    assert len(blob) == 20 * len(entries)
    parsed = [struct.unpack_from("<QQI", blob, 20 * i) for i in range(len(entries))]
    assert parsed == [(e.addr, e.size, e.type) for e in entries]
    assert fct.e820_file([(0x1000, 0x2000, 2)]) == struct.pack("<QQI", 0x1000, 0x2000, 2)
    assert fct.e820_file([]) == b""


def test_firmware_e820_is_qemu_style():
    regions = [Region(0, 3 * GiB), Region(4 * GiB, GiB)]
    table = fct.firmware_e820(regions, reserved=[(0xB000_0000, 256 * MiB),
                                                 (0xFEFF_C000, 0x4000),
                                                 E820Entry(0x1000, 0x1000, E820_TYPE_ACPI)])
    assert table == [
        E820Entry(0, 3 * GiB, E820_TYPE_RAM),
        E820Entry(0x1000, 0x1000, E820_TYPE_ACPI),
        E820Entry(0xB000_0000, 256 * MiB, E820_TYPE_RESERVED),
        E820Entry(0xFEFF_C000, 0x4000, E820_TYPE_RESERVED),
        E820Entry(4 * GiB, GiB, E820_TYPE_RAM),
    ]


# ----------------------------------------------------------------- the table loader


ECAM = 0xB000_0000


def config(cpus: int = 2, **kw) -> acpi.AcpiConfig:
    pci = acpi.PciHostConfig(ecam_base=ECAM, mmio64_window=(0x80_0000_0000, 0xFF_FFFF_FFFF))
    return acpi.AcpiConfig(num_cpus=cpus, pci=pci, cmos_rtc=True, **kw)


def test_loader_commands_layout():
    files = fct.acpi_loader_files(acpi.build_tables(config()))
    loader = files[fct.TABLE_LOADER_FILE]
    assert len(loader) % 128 == 0
    # the first command, by hand: ALLOCATE "etc/acpi/tables", align 64, zone HIGH
    command, name, align, zone = struct.unpack_from("<I56sIB", loader)
    assert (command, name.rstrip(b"\0"), align, zone) == (1, b"etc/acpi/tables", 64, 1)
    assert loader[65:128] == bytes(63)
    command, name, align, zone = struct.unpack_from("<I56sIB", loader, 128)
    assert (command, name.rstrip(b"\0"), align, zone) == (1, b"etc/acpi/rsdp", 16, 2)
    cmds = fct.parse_table_loader(loader)
    kinds = [type(c).__name__ for c in cmds]
    assert kinds[:2] == ["Allocate", "Allocate"] and "Allocate" not in kinds[2:]
    pointers = [c for c in cmds if isinstance(c, fct.AddPointer)]
    # RSDP->XSDT, 4 XSDT entries (FACP, APIC, MCFG... not DSDT), FADT DSDT + X_DSDT
    tables = acpi.build_tables(config())
    assert len(pointers) == sum(len(t.pointers) for t in tables)
    p = [c for c in pointers if c.dest_file == fct.ACPI_RSDP_FILE]
    assert p == [fct.AddPointer(fct.ACPI_RSDP_FILE, fct.ACPI_TABLES_FILE, 24, 8)]
    raw = loader[128 * cmds.index(p[0]):][:128]
    assert struct.unpack_from("<I56s56sIB", raw)[3:] == (24, 8)
    assert raw[121:] == bytes(7)
    sums = [c for c in cmds if isinstance(c, fct.AddChecksum)]
    assert sums[-2:] == [fct.AddChecksum(fct.ACPI_RSDP_FILE, 8, 0, 20),
                         fct.AddChecksum(fct.ACPI_RSDP_FILE, 32, 0, 36)]
    assert len(sums) == sum(len(t.checksums) for t in tables)


def test_blobs_hold_offsets_and_zero_checksums():
    tables = acpi.build_tables(config())
    files = fct.acpi_loader_files(tables)
    blob, rsdp = files[fct.ACPI_TABLES_FILE], files[fct.ACPI_RSDP_FILE]
    offsets, end = acpi.place(tables[1:], 0)
    assert len(blob) == end and len(rsdp) == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == offsets["XSDT"]
    assert rsdp[8] == 0 and rsdp[32] == 0
    fadt = offsets["FACP"]
    assert struct.unpack_from("<I", blob, fadt + 40)[0] == offsets["DSDT"]
    assert struct.unpack_from("<Q", blob, fadt + 140)[0] == offsets["DSDT"]
    for t in tables[1:]:
        assert blob[offsets[t.name] + 9] == 0
        assert blob[offsets[t.name]:offsets[t.name] + 4] == t.data[:4]


def seabios_load(files: dict[str, bytes], loader: bytes, place, *, ovmf_checksums: bool = False):
    """Run a loader script as SeaBIOS's romfile_loader_execute does.  ``place(file,
    size, align, zone)`` gives each file's address.  Returns {file: (address, bytes)}."""
    loaded: dict[str, tuple[int, bytearray]] = {}
    for cmd in fct.parse_table_loader(loader):
        if isinstance(cmd, fct.Allocate):
            assert cmd.align & (cmd.align - 1) == 0
            assert cmd.zone in (fct.ZONE_HIGH, fct.ZONE_FSEG)
            assert cmd.file not in loaded
            addr = place(cmd.file, len(files[cmd.file]), max(cmd.align, 16), cmd.zone)
            assert addr % max(cmd.align, 16) == 0
            loaded[cmd.file] = (addr, bytearray(files[cmd.file]))
        elif isinstance(cmd, fct.AddPointer):
            dest, src = loaded[cmd.dest_file][1], loaded[cmd.src_file][0]  # allocated before use
            assert cmd.size in (1, 2, 4, 8) and cmd.offset + cmd.size <= len(dest)
            pointer = int.from_bytes(dest[cmd.offset:cmd.offset + cmd.size], "little")
            pointer = (pointer + src) & ((1 << (8 * cmd.size)) - 1)  # unsigned, truncated
            dest[cmd.offset:cmd.offset + cmd.size] = pointer.to_bytes(cmd.size, "little")
        elif isinstance(cmd, fct.AddChecksum):
            data = loaded[cmd.file][1]
            assert cmd.offset < len(data) and cmd.start + cmd.length <= len(data)
            total = sum(data[cmd.start:cmd.start + cmd.length]) & 0xFF
            if ovmf_checksums:  # OVMF: the byte becomes the negated sum of the range
                data[cmd.offset] = -total & 0xFF
            else:  # SeaBIOS: the sum is subtracted from the byte
                data[cmd.offset] = (data[cmd.offset] - total) & 0xFF
        else:  # pragma: no cover
            pytest.fail(f"unknown loader command {cmd}")
    return {name: (addr, bytes(data)) for name, (addr, data) in loaded.items()}


class Allocator:
    """SeaBIOS-like zones: HIGH grows down from the top of low RAM, FSEG in 0xF0000-0xFFFFF."""

    def __init__(self, high_top: int = 0x7FFF_0000, fseg: int = 0xF5A00):
        self.high, self.fseg = high_top, fseg

    def __call__(self, name, size, align, zone):
        if zone == fct.ZONE_HIGH:
            self.high = (self.high - size) // align * align
            return self.high
        self.fseg = -(-self.fseg // align) * align
        addr, self.fseg = self.fseg, self.fseg + size
        assert self.fseg <= 0x100000
        return addr


def check_against_direct_boot(cfg: acpi.AcpiConfig, extra=(), **loader_kw):
    tables = acpi.build_tables(cfg, extra)
    files = fct.acpi_loader_files(tables)
    loaded = seabios_load(files, files[fct.TABLE_LOADER_FILE], Allocator(), **loader_kw)
    rsdp_addr, rsdp = loaded[fct.ACPI_RSDP_FILE]
    tables_addr, blob = loaded[fct.ACPI_TABLES_FILE]
    assert 0xF0000 <= rsdp_addr < 0x100000 and rsdp_addr % 16 == 0
    direct = acpi.build(cfg, rsdp_addr=rsdp_addr, tables_addr=tables_addr, limit=1 << 32,
                        extra_tables=extra)
    assert direct[rsdp_addr] == rsdp
    for gpa, data in direct.items():
        if gpa != rsdp_addr:
            assert blob[gpa - tables_addr:gpa - tables_addr + len(data)] == data
    return rsdp_addr, rsdp, tables_addr, blob


def walk(rsdp: bytes, read):
    """Follow RSDP -> XSDT -> tables, FADT -> DSDT, checking every checksum."""
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]

    def table(addr):
        length = struct.unpack("<I", read(addr + 4, 4))[0]
        data = read(addr, length)
        assert sum(data) % 256 == 0, data[:4]
        return data

    xsdt = table(xsdt_addr)
    assert xsdt[:4] == b"XSDT"
    found = {b"XSDT": xsdt_addr}
    for i in range((len(xsdt) - 36) // 8):
        addr = struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0]
        found[table(addr)[:4]] = addr
    fadt = table(found[b"FACP"])
    dsdt32, xdsdt = struct.unpack_from("<I", fadt, 40)[0], struct.unpack_from("<Q", fadt, 140)[0]
    assert dsdt32 == xdsdt
    assert table(xdsdt)[:4] == b"DSDT"
    found[b"DSDT"] = xdsdt
    return found


@pytest.mark.parametrize("ovmf", [False, True])
@pytest.mark.parametrize("cfg", [
    config(2),
    config(1),
    config(300),  # x2APIC entries
    acpi.AcpiConfig(num_cpus=4, pci=None),  # no MCFG
], ids=["2cpu", "1cpu", "300cpu", "nopci"])
def test_loader_gives_the_direct_boot_tables(cfg, ovmf):
    rsdp_addr, rsdp, tables_addr, blob = check_against_direct_boot(cfg, ovmf_checksums=ovmf)

    def read(addr, n):
        assert tables_addr <= addr and addr + n <= tables_addr + len(blob)
        return blob[addr - tables_addr:addr - tables_addr + n]

    found = walk(rsdp, read)
    expected = {b"XSDT", b"FACP", b"DSDT", b"APIC"} | ({b"MCFG"} if cfg.pci else set())
    assert set(found) == expected
    # and the MADT lists the CPUs
    madt = read(found[b"APIC"], struct.unpack("<I", read(found[b"APIC"] + 4, 4))[0])
    assert madt.count(bytes([acpi.MADT_LOCAL_APIC, 8])) >= min(cfg.num_cpus, 255)


def test_loader_with_an_extra_table_needing_more_alignment():
    extra = acpi.Table.sdt("TEST", acpi.sdt_header(config(), b"TEST", 40, 1) + b"abcd")
    extra = acpi.Table(extra.name, extra.data, extra.pointers, extra.checksums, alignment=256)
    files = fct.acpi_loader_files(acpi.build_tables(config(), [extra]))
    alloc = fct.parse_table_loader(files[fct.TABLE_LOADER_FILE])[0]
    assert alloc.align == 256
    rsdp_addr, rsdp, tables_addr, blob = check_against_direct_boot(config(), [extra])
    found = walk(rsdp, lambda a, n: blob[a - tables_addr:a - tables_addr + n])
    assert found[b"TEST"] % 256 == 0


def test_loader_rejects_bad_input():
    tables = acpi.build_tables(config())
    with pytest.raises(ValueError):
        fct.acpi_loader_files(tables[1:])  # no RSDP
    bad = acpi.Table("X", bytes(40), (acpi.Pointer(36, 4, "NOPE"),))
    with pytest.raises(ValueError):
        fct.acpi_loader_files(tables + [bad])
    odd = acpi.Table("Y", bytes(40), alignment=24)
    with pytest.raises(ValueError):
        fct.acpi_loader_files(tables + [odd])
    with pytest.raises(ValueError):
        fct.parse_table_loader(bytes(100))


# ----------------------------------------------------------------- boot order


def glob_prefix(glob: str, s: str):
    """SeaBIOS boot.c's matcher: does ``s`` start with ``glob`` (followed by '/' or the end)?"""
    g = i = 0
    while True:
        if g == len(glob) and (i == len(s) or s[i] == "/"):
            return True
        if g < len(glob) and glob[g] == "*":
            nxt = glob[g + 1] if g + 1 < len(glob) else ""
            if i == len(s) or s[i] == "/" or s[i] == nxt:
                g += 1
            else:
                i += 1
            continue
        if g == len(glob) or i == len(s) or glob[g] != s[i]:
            return False
        g += 1
        i += 1


def seabios_pci_glob(slot: int, fn: int = 0) -> str:
    return f"/pci@i0cf8/*@{slot:x}" + (f",{fn:x}" if fn else "")


def test_pci_device_paths():
    assert fct.pci_device_path(3) == "/pci@i0cf8/scsi@3/disk@0,0"
    assert fct.pci_device_path(5, kind="net") == "/pci@i0cf8/ethernet@5/ethernet-phy@0"
    assert fct.pci_device_path(0x1F, 2) == "/pci@i0cf8/scsi@1f,2/disk@0,0"
    assert fct.pci_device_path(4, name="pci1af4,1042", kind="disk") == "/pci@i0cf8/pci1af4,1042@4/disk@0,0"
    for bad in ((32, 0), (0, 8), (-1, 0)):
        with pytest.raises(ValueError):
            fct.pci_device_path(*bad)
    with pytest.raises(ValueError):
        fct.pci_device_path(1, kind="floppy")


def test_seabios_matches_the_paths():
    for slot in (1, 3, 0xA, 0x1F):
        for fn in (0, 1):
            for kind in ("disk", "net"):
                path = fct.pci_device_path(slot, fn, kind)
                assert glob_prefix(seabios_pci_glob(slot, fn), path)
                # no other slot or function matches it
                assert not glob_prefix(seabios_pci_glob(slot, fn ^ 1), path)
                assert not glob_prefix(seabios_pci_glob((slot + 0x10) % 32, fn), path)
    assert not glob_prefix(seabios_pci_glob(1), "/pci@i0cf8/scsi@10/disk@0,0")
    assert not glob_prefix(seabios_pci_glob(3), "/pci@i0cf8/scsi@3,1/disk@0,0")


def test_bootorder_file():
    disk, nic = fct.pci_device_path(4), fct.pci_device_path(3, kind="net")
    assert fct.bootorder_file([disk, nic]) == b"/pci@i0cf8/scsi@4/disk@0,0\n/pci@i0cf8/ethernet@3/ethernet-phy@0"
    assert fct.bootorder_file([disk], strict=True) == b"/pci@i0cf8/scsi@4/disk@0,0\nHALT"
    assert fct.bootorder_file([]) == b""
    with pytest.raises(ValueError):
        fct.bootorder_file(["a\nb"])
    # SeaBIOS's priority is the line number
    lines = fct.bootorder_file([disk, nic]).decode().split("\n")
    prio = next(i + 1 for i, line in enumerate(lines) if glob_prefix(seabios_pci_glob(3), line))
    assert prio == 2


# ----------------------------------------------------------------- all of it, through the device


def test_kernel_constants_match_the_device():
    for name in ("FW_CFG_RAM_SIZE", "FW_CFG_NB_CPUS", "FW_CFG_BOOT_MENU", "FW_CFG_MAX_CPUS",
                 "FW_CFG_IRQ0_OVERRIDE"):
        assert getattr(fct, name) == getattr(fc, name)


def test_platform_items_as_seabios_reads_them(fw, mem):
    cfg = config(4)
    e820 = fct.firmware_e820([Region(0, 3 * MiB)], reserved=[(ECAM, 256 * MiB)])
    bootorder = [fct.pci_device_path(3), fct.pci_device_path(4, kind="net")]
    sels = fct.platform_items(fw, ram_below_4g=3 * GiB, ram_above_4g=GiB, cpus=4, e820=e820,
                              acpi_tables=acpi.build_tables(cfg), bootorder=bootorder,
                              boot_fail_wait_ms=-1, sercon_port=0x3F8)
    # legacy items
    select(fw, fc.FW_CFG_RAM_SIZE)
    assert struct.unpack("<Q", inb_data(fw, 8))[0] == 4 * GiB
    assert dma_read_file(fw, mem, fc.FW_CFG_NB_CPUS, 2) == b"\x04\0"
    assert dma_read_file(fw, mem, fc.FW_CFG_MAX_CPUS, 2) == b"\x04\0"
    assert dma_read_file(fw, mem, fc.FW_CFG_BOOT_MENU, 2) == b"\0\0"
    assert dma_read_file(fw, mem, fc.FW_CFG_IRQ0_OVERRIDE, 4) == b"\x01\0\0\0"
    # the files, found through the directory as SeaBIOS finds them
    directory = read_directory(fw, mem)
    assert set(directory) == {"etc/e820", "etc/boot-cpus", "etc/acpi/rsdp", "etc/acpi/tables",
                              "etc/table-loader", "bootorder", "etc/boot-fail-wait", "etc/sercon-port"}
    assert {n: s for n, (s, _) in directory.items()} == sels

    def load(name):
        sel, size = directory[name]
        return dma_read_file(fw, mem, sel, size)

    assert load("etc/e820") == fct.e820_file(e820)
    assert load("etc/boot-cpus") == b"\x04\0"
    assert load("etc/boot-fail-wait") == b"\xff\xff\xff\xff"
    assert load("etc/sercon-port") == b"\xf8\x03"
    assert load("bootorder").decode().split("\n") == bootorder
    files = {name: load(name) for name in ("etc/acpi/rsdp", "etc/acpi/tables")}
    loaded = seabios_load(files, load("etc/table-loader"), Allocator())
    rsdp_addr, rsdp = loaded["etc/acpi/rsdp"]
    tables_addr, blob = loaded["etc/acpi/tables"]
    direct = acpi.build(cfg, rsdp_addr=rsdp_addr, tables_addr=tables_addr, limit=1 << 32)
    assert direct[rsdp_addr] == rsdp
    for gpa, data in direct.items():
        if gpa != rsdp_addr:
            assert blob[gpa - tables_addr:gpa - tables_addr + len(data)] == data


def test_platform_items_minimal(fw):
    sels = fct.platform_items(fw, ram_below_4g=512 * MiB, ram_above_4g=0, cpus=1,
                              e820=[(0, 512 * MiB, 1)], acpi_tables=acpi.build_tables(config(1)))
    assert set(sels) == {"etc/e820", "etc/boot-cpus", "etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"}
    with pytest.raises(ValueError):
        fct.platform_items(FwCfg(None), ram_below_4g=0, ram_above_4g=0, cpus=0, e820=[],
                           acpi_tables=acpi.build_tables(config(1)))
