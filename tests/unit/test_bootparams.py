"""kernel/bootparams.py, kernel/e820.py, kernel/linux.py: the zero page, e820, placement."""

import struct

import pytest

from kernel import layout
from kernel.bootparams import (
    ACPI_RSDP_ADDR,
    E820_ENTRIES,
    E820_TABLE,
    SENTINEL,
    BootParams,
)
from kernel.bzimage import CAN_USE_HEAP, LOADED_HIGH, SETUP_HEADER_END
from kernel.e820 import (
    E820_TYPE_ACPI,
    E820_TYPE_NVS,
    E820_TYPE_RAM,
    E820_TYPE_RESERVED,
    E820Entry,
    build_e820,
)
from kernel.errors import KernelImageError
from kernel.linux import load_linux, load_linux_image, place_initrd
from tests.unit.test_bzimage import make_bzimage, needs_real_kernel, real_kernel_path
from tests.unit.test_elf import make_elf, make_kernel_like_elf
from vmm.memory import GuestMemory
from vmm.memory import layout as ram_layout

MiB = 1 << 20
GiB = 1 << 30
RAM, RSV = E820_TYPE_RAM, E820_TYPE_RESERVED
LEGACY = [(0, 0x9FC00, RAM), (0x9FC00, 0x100000 - 0x9FC00, RSV)]


def e820_of(size, reserved=()):
    return [(e.addr, e.size, e.type) for e in build_e820(ram_layout(size), reserved)]


# -- e820 -----------------------------------------------------------------------
@pytest.mark.parametrize("size, rest", [
    (64 * MiB, [(MiB, 63 * MiB, RAM)]),
    (512 * MiB, [(MiB, 511 * MiB, RAM)]),
    (3 * GiB, [(MiB, 3 * GiB - MiB, RAM)]),
    (3 * GiB + 1, [(MiB, 3 * GiB - MiB, RAM), (4 * GiB, 1, RAM)]),
    (8 * GiB, [(MiB, 3 * GiB - MiB, RAM), (4 * GiB, 5 * GiB, RAM)]),
])
def test_e820_for_ram_sizes(size, rest):
    assert e820_of(size) == LEGACY + rest


def test_e820_extra_ranges():
    ecam = (0xE0000000, 256 * MiB)                       # in the 32-bit hole: not RAM
    nvs = E820Entry(32 * MiB, 64 * 1024, E820_TYPE_NVS)  # carved out of RAM
    acpi = (0x100000, 0x1000, E820_TYPE_ACPI)            # right after the legacy area
    assert e820_of(64 * MiB, [ecam, nvs, acpi]) == [
        *LEGACY,
        (0x100000, 0x1000, E820_TYPE_ACPI),
        (0x101000, 32 * MiB - 0x101000, RAM),
        (32 * MiB, 64 * 1024, E820_TYPE_NVS),
        (32 * MiB + 64 * 1024, 32 * MiB - 64 * 1024, RAM),
        (0xE0000000, 256 * MiB, RSV),
    ]


def test_e820_reserved_overlaps_merge():
    # Reserved ranges that touch or overlap the legacy area become one entry.
    assert e820_of(64 * MiB, [(0x90000, 0x10000), (0xF0000, 0x20000)]) == [
        (0, 0x90000, RAM), (0x90000, 0x110000 - 0x90000, RSV), (0x110000, 64 * MiB - 0x110000, RAM)]


def test_e820_is_sorted_and_disjoint():
    table = build_e820(ram_layout(8 * GiB), [(0xFEC00000, 0x1000), (0xB0000000, 0x1000),
                                             (5 * GiB, 4096, E820_TYPE_ACPI)])
    for a, b in zip(table, table[1:]):
        assert a.end <= b.addr
        assert not (a.end == b.addr and a.type == b.type)


def test_e820_too_many_entries():
    holes = [(16 * MiB + i * 0x2000, 0x1000) for i in range(130)]
    with pytest.raises(KernelImageError, match="e820 map has"):
        build_e820(ram_layout(64 * MiB), holes)


# -- initrd placement -----------------------------------------------------------------
def test_place_initrd_highest_page_aligned():
    table = build_e820(ram_layout(64 * MiB))
    start = place_initrd(table, MiB + 1, limit=1 << 32, avoid=[(16 * MiB, 20 * MiB)])
    assert start == (64 * MiB - MiB - 1) & ~0xFFF
    assert start % 4096 == 0 and start + MiB + 1 <= 64 * MiB


def test_place_initrd_respects_limit_and_kernel():
    table = build_e820(ram_layout(64 * MiB))
    # Below a limit that falls inside the kernel: it goes under the kernel.
    start = place_initrd(table, 3 * MiB, limit=18 * MiB, avoid=[(16 * MiB, 20 * MiB)])
    assert start == 13 * MiB
    # Never under 1 MiB, never across a reserved range.
    with pytest.raises(KernelImageError, match="does not fit"):
        place_initrd(table, 16 * MiB, limit=18 * MiB, avoid=[(16 * MiB, 20 * MiB)])


def test_place_initrd_avoids_reserved_e820():
    table = build_e820(ram_layout(64 * MiB), [(60 * MiB, 4 * MiB)])
    assert place_initrd(table, MiB, limit=1 << 32) == 59 * MiB


# -- the zero page ------------------------------------------------------------------
@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


def zp(mem, fmt, offset):
    return struct.unpack_from("<" + fmt, mem.read(layout.ZERO_PAGE + offset, 8))[0]


def test_zero_page_fields(mem):
    vmlinux = make_kernel_like_elf()
    image = make_bzimage(vmlinux)
    initrd = b"INITRD" * 1000
    boot = load_linux_image(mem, image, initrd, "console=ttyS0 quiet", acpi_rsdp_addr=0xE0000)

    assert boot.mode == "vmlinux" and boot.payload_format == "elf"
    assert boot.entry == 0x1000000
    assert boot.zero_page == layout.ZERO_PAGE
    assert boot.kernel_start == 0x1000000
    assert boot.kernel_end == 0x1000000 + (4 << 20)            # init_size room
    assert boot.boot_protocol == "2.15"
    assert boot.pvh_entry == 0x1000040
    assert mem.read(0x1000000, 4) == b"\x90" * 4

    # The image's setup header, copied to 0x1f1..
    assert mem.read(layout.ZERO_PAGE + 0x1F1, 1)[0] == 4        # setup_sects
    assert zp(mem, "H", 0x1FE) == 0xAA55                         # boot_flag
    assert mem.read(layout.ZERO_PAGE + 0x202, 4) == b"HdrS"
    assert zp(mem, "H", 0x206) == 0x020F                         # version
    assert zp(mem, "I", 0x230) == 0x200000                       # kernel_alignment
    # What the loader writes.
    assert zp(mem, "B", 0x210) == 0xFF                           # type_of_loader
    assert zp(mem, "B", 0x211) == LOADED_HIGH | CAN_USE_HEAP     # loadflags
    assert zp(mem, "H", 0x224) == 0xFE00                         # heap_end_ptr
    assert zp(mem, "I", 0x228) == layout.CMDLINE                 # cmd_line_ptr
    assert mem.read(layout.CMDLINE, 20) == b"console=ttyS0 quiet\0"
    assert zp(mem, "I", 0x218) == boot.initrd_start              # ramdisk_image
    assert zp(mem, "I", 0x21C) == len(initrd)                    # ramdisk_size
    assert mem.read(boot.initrd_start, len(initrd)) == initrd
    assert boot.initrd_start % 4096 == 0 and boot.initrd_end <= 64 * MiB
    assert zp(mem, "I", 0x0C0) == 0 and zp(mem, "I", 0x0C4) == 0  # ext_ramdisk_*
    assert zp(mem, "Q", ACPI_RSDP_ADDR) == 0xE0000
    assert zp(mem, "B", SENTINEL) == 0
    # The e820 table.
    assert zp(mem, "B", E820_ENTRIES) == 3
    entries = [struct.unpack("<QQI", mem.read(layout.ZERO_PAGE + E820_TABLE + 20 * i, 20))
               for i in range(3)]
    assert entries == [(0, 0x9FC00, RAM), (0x9FC00, 0x60400, RSV), (MiB, 63 * MiB, RAM)]
    assert [(e.addr, e.size, e.type) for e in boot.e820] == entries
    # Nothing past the header's end is touched in the header area.
    assert mem.read(layout.ZERO_PAGE + SETUP_HEADER_END, E820_TABLE - SETUP_HEADER_END) == \
        bytes(E820_TABLE - SETUP_HEADER_END)


def test_no_initrd_no_rsdp(mem):
    boot = load_linux_image(mem, make_bzimage(make_kernel_like_elf()))
    assert (boot.initrd_start, boot.initrd_size) == (0, 0)
    assert zp(mem, "I", 0x218) == 0 and zp(mem, "I", 0x21C) == 0
    assert zp(mem, "Q", ACPI_RSDP_ADDR) == 0
    assert mem.read(layout.CMDLINE, 1) == b"\0"


def test_extra_reserved_ranges_reach_the_zero_page(mem):
    boot = load_linux_image(mem, make_bzimage(make_kernel_like_elf()),
                            reserved=[(0xB0000000, 0x10000000)])
    assert zp(mem, "B", E820_ENTRIES) == 4
    assert boot.e820[-1] == E820Entry(0xB0000000, 0x10000000, RSV)


def test_initrd_below_initrd_addr_max(mem):
    image = make_bzimage(make_kernel_like_elf(), initrd_addr_max=0x1FFFFFF)
    boot = load_linux_image(mem, image, b"x" * (MiB + 1))
    assert boot.initrd_end <= 0x2000000
    assert boot.initrd_start >= boot.kernel_end                # above the kernel's 20 MiB
    # A limit inside the kernel puts it below the kernel.
    image = make_bzimage(make_kernel_like_elf(), initrd_addr_max=0x13FFFFF)
    boot = load_linux_image(mem, image, b"x" * (3 * MiB))
    assert boot.initrd_start == 13 * MiB


def test_initrd_too_big(mem):
    with pytest.raises(KernelImageError, match="initrd of"):
        load_linux_image(mem, make_bzimage(make_kernel_like_elf()), b"x" * (60 * MiB))


def test_cmdline_length_checked(mem):
    image = make_bzimage(make_kernel_like_elf(), cmdline_size=100)
    load_linux_image(mem, image, None, "a" * 100)
    assert mem.read(layout.CMDLINE, 101) == b"a" * 100 + b"\0"
    with pytest.raises(KernelImageError, match="command line is 101 bytes.*at most 100"):
        load_linux_image(mem, image, None, "a" * 101)
    with pytest.raises(KernelImageError, match="NUL"):
        load_linux_image(mem, image, None, "a\0b")


def test_raw_vmlinux_gets_a_synthetic_header(mem):
    boot = load_linux_image(mem, make_kernel_like_elf(), b"RD" * 10, "root=/dev/vda")
    assert boot.mode == "vmlinux" and boot.payload_format is None and boot.boot_protocol is None
    assert boot.entry == 0x1000000
    assert zp(mem, "H", 0x1FE) == 0xAA55
    assert mem.read(layout.ZERO_PAGE + 0x202, 4) == b"HdrS"
    assert zp(mem, "H", 0x206) == 0x020F
    assert zp(mem, "B", 0x210) == 0xFF
    assert zp(mem, "I", 0x228) == layout.CMDLINE
    assert zp(mem, "I", 0x230) == 0x200000
    assert zp(mem, "I", 0x218) == boot.initrd_start and zp(mem, "I", 0x21C) == 20
    with pytest.raises(KernelImageError, match="at most 2047"):
        load_linux_image(mem, make_kernel_like_elf(), None, "x" * 2048)


def test_bzimage_entry(mem):
    image = make_bzimage(make_kernel_like_elf())
    boot = load_linux_image(mem, image, None, "", entry="bzimage")
    assert boot.mode == "bzimage"
    assert boot.kernel_start == 0x1000000                      # pref_address
    assert boot.entry == 0x1000000 + 0x200
    assert zp(mem, "I", 0x214) == 0x1000000                    # code32_start
    setup_size = 5 * 512
    assert mem.read(0x1000000, 0x100) == image[setup_size : setup_size + 0x100]


def test_bzimage_entry_falls_back_when_ram_is_small():
    image = make_bzimage(make_kernel_like_elf(), init_size=8 * MiB)
    with GuestMemory(16 * MiB) as small:
        boot = load_linux_image(small, image, None, "", entry="bzimage")
        assert boot.kernel_start == 2 * MiB                    # 1 MiB aligned up to 2 MiB
        assert boot.entry == 2 * MiB + 0x200
    fixed = make_bzimage(make_kernel_like_elf(), relocatable_kernel=0)
    with GuestMemory(16 * MiB) as small:
        assert load_linux_image(small, fixed, entry="bzimage").kernel_start == MiB
    with GuestMemory(8 * MiB) as tiny, pytest.raises(KernelImageError, match="too small"):
        load_linux_image(tiny, image, entry="bzimage")


def test_bzimage_entry_needs_xlf_kernel_64(mem):
    image = make_bzimage(make_kernel_like_elf(), xloadflags=0)
    with pytest.raises(KernelImageError, match="XLF_KERNEL_64"):
        load_linux_image(mem, image, entry="bzimage")
    load_linux_image(mem, image)                               # the ELF entry does not need it


def test_bad_kernel_files(mem, tmp_path):
    with pytest.raises(KernelImageError, match="neither a bzImage nor an ELF"):
        load_linux_image(mem, b"garbage" * 100)
    with pytest.raises(KernelImageError, match="needs a bzImage"):
        load_linux_image(mem, make_kernel_like_elf(), entry="bzimage")
    with pytest.raises(KernelImageError, match="cannot read kernel"):
        load_linux(mem, str(tmp_path / "missing"))
    with pytest.raises(KernelImageError, match="below 1 MiB"):
        load_linux_image(mem, make_elf([(0x10000, 0x10000, b"x", 1)], 0x10000))


def test_boot_params_by_name():
    params = BootParams()
    params["cmdline_size"] = 1234
    assert params["cmdline_size"] == 1234
    assert params.to_bytes()[0x238:0x23C] == struct.pack("<I", 1234)


# -- the real guest kernel ---------------------------------------------------------------
@needs_real_kernel
@pytest.mark.parametrize("entry", ["vmlinux", "bzimage"])
def test_real_kernel_loads_into_512m(tmp_path, entry):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * (5 * MiB))
    with GuestMemory(512 * MiB) as mem:
        boot = load_linux(mem, str(real_kernel_path()), str(initrd), "console=ttyS0",
                          entry=entry)
        assert zp(mem, "H", 0x206) >= 0x020C                  # version: XLF_KERNEL_64 exists
        assert boot.kernel_start >= MiB and boot.kernel_start % 0x200000 == 0
        assert boot.kernel_start <= boot.entry < boot.kernel_end
        assert boot.initrd_start >= boot.kernel_end and boot.initrd_end <= 512 * MiB
        assert mem.read(boot.initrd_start, 16) == b"\x07" * 16
        assert zp(mem, "I", 0x228) == layout.CMDLINE
        if entry == "vmlinux":
            assert boot.payload_format == "lz4"
            assert boot.entry == 0x1000000                     # startup_64 at LOAD_PHYSICAL_ADDR
            assert boot.pvh_entry is not None
