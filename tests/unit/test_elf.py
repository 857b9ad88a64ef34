"""kernel/elf.py: parsing and loading ELF64 executables into GuestMemory."""

import shutil
import struct
import subprocess

import pytest

from kernel.elf import (
    ELF64_EHDR,
    ELF64_PHDR,
    EM_X86_64,
    ET_EXEC,
    PT_LOAD,
    PT_NOTE,
    XEN_ELFNOTE_PHYS32_ENTRY,
    load_elf,
    parse_elf,
)
from kernel.errors import KernelImageError
from vmm.memory import GuestMemory

MiB = 1 << 20
KERNEL_VBASE = 0xFFFFFFFF81000000


def make_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b):
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(segments, entry, *, notes=b"", machine=EM_X86_64, e_type=ET_EXEC) -> bytes:
    """A minimal ELF64 file.  segments: [(vaddr, paddr, data, memsz)]."""
    phnum = len(segments) + (1 if notes else 0)
    offset = ELF64_EHDR.size + phnum * ELF64_PHDR.size
    phdrs, body = [], b""
    for vaddr, paddr, data, memsz in segments:
        phdrs.append(ELF64_PHDR.pack(PT_LOAD, 7, offset + len(body), vaddr, paddr,
                                     len(data), memsz, 0x1000))
        body += data
    if notes:
        phdrs.append(ELF64_PHDR.pack(PT_NOTE, 4, offset + len(body), 0, 0,
                                     len(notes), len(notes), 4))
        body += notes
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ELF64_EHDR.pack(ident, e_type, machine, 1, entry, ELF64_EHDR.size, 0, 0,
                           ELF64_EHDR.size, ELF64_PHDR.size, phnum, 0, 0, 0)
    return ehdr + b"".join(phdrs) + body


def make_kernel_like_elf(text: bytes = b"\x90" * 64 + b"\xf4", bss: int = 4096) -> bytes:
    """An ELF shaped like vmlinux: virtual addresses in the kernel map, physical at 16 MiB."""
    pvh = make_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000040))
    return make_elf([(KERNEL_VBASE, 0x1000000, text, len(text) + bss)],
                    entry=0x1000000, notes=pvh)


@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


def test_loads_segments_at_paddr_and_zero_fills(mem):
    mem.write(0x200000, b"\xff" * 0x3000)         # stale bytes that the bss must clear
    data = make_elf([(0x600000, 0x200000, b"ABCD", 0x2000),
                     (0x700000, 0x203000, b"EFGH", 4)], entry=0x600002)
    loaded = load_elf(mem, data)
    assert mem.read(0x200000, 4) == b"ABCD"
    assert mem.read(0x200004, 0x2000 - 4) == bytes(0x2000 - 4)
    assert mem.read(0x203000, 4) == b"EFGH"
    assert loaded.entry == 0x200002               # virtual entry moved to physical
    assert (loaded.low, loaded.high) == (0x200000, 0x203004)
    assert loaded.pvh_entry is None


def test_kernel_like_elf_entry_and_pvh_note(mem):
    loaded = load_elf(mem, make_kernel_like_elf())
    assert loaded.entry == 0x1000000              # e_entry already physical
    assert loaded.pvh_entry == 0x1000040
    assert mem.read(0x1000000, 2) == b"\x90\x90"


def test_four_byte_pvh_note():
    note = make_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000123))
    image = parse_elf(make_elf([(0x1000000, 0x1000000, b"x", 1)], 0x1000000, notes=note))
    assert image.pvh_entry == 0x1000123


@pytest.mark.parametrize("segments, entry, message", [
    ([(0x5000000, 0x5000000, b"x", 0x800000)], 0x5000000, "not in guest RAM"),  # past 64 MiB
    ([(0xC0000000, 0xC0000000, b"x", 1)], 0xC0000000, "not in guest RAM"),      # in the hole
    ([(0x400000, 0x400000, b"x", 1)], 0x500000, "in no loaded segment"),
    ([(0x400000, 0x400000, b"xy", 1)], 0x400000, "p_filesz"),
    ([(0x400000, 0x400000, b"x", 0x2000),
      (0x401000, 0x401000, b"y", 1)], 0x400000, "overlap"),
])
def test_bad_segments(mem, segments, entry, message):
    with pytest.raises(KernelImageError, match=message):
        load_elf(mem, make_elf(segments, entry))


def test_segment_beyond_end_of_file():
    data = make_elf([(0x400000, 0x400000, b"x" * 100, 100)], 0x400000)
    with pytest.raises(KernelImageError, match="past the end of the file"):
        parse_elf(data[:-10])


@pytest.mark.parametrize("data, message", [
    (b"\x7fELF", "not an ELF"),
    (b"MZ" + bytes(100), "not an ELF"),
    (make_elf([(0x400000, 0x400000, b"x", 1)], 0x400000, machine=3), "not x86-64"),
    (make_elf([(0x400000, 0x400000, b"x", 1)], 0x400000, e_type=3), "not a static executable"),
    (make_elf([], 0x400000), "no program headers"),
])
def test_bad_headers(data, message):
    with pytest.raises(KernelImageError, match=message):
        parse_elf(data)


def test_not_64bit():
    data = bytearray(make_elf([(0x400000, 0x400000, b"x", 1)], 0x400000))
    data[4] = 1                                    # ELFCLASS32
    with pytest.raises(KernelImageError, match="not 64-bit"):
        parse_elf(bytes(data))


GUEST_C = r"""
volatile unsigned long counter = 0x1122334455667788UL;
static volatile char big_bss[70000];
void _start(void) { big_bss[1] = 1; for (;;) { counter++; __asm__ volatile("hlt"); } }
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_gcc_static_guest(tmp_path, mem):
    src = tmp_path / "guest.c"
    src.write_text(GUEST_C)
    out = tmp_path / "guest"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-O2", "-ffreestanding",
                    "-Wl,-Ttext=0x400000", "-Wl,--build-id=none", "-o", str(out), str(src)],
                   check=True)
    data = out.read_bytes()
    mem.write(0x402000, b"\xaa" * 0x12000)
    loaded = load_elf(mem, data)
    image = loaded.image
    assert loaded.entry == 0x400000
    text = next(ph for ph in image.segments if ph.p_paddr == 0x400000)
    assert mem.read(0x400000, text.p_filesz) == data[text.p_offset : text.p_offset + text.p_filesz]
    data_seg = max(image.segments, key=lambda ph: ph.p_memsz)
    assert data_seg.p_memsz > data_seg.p_filesz      # .bss
    assert mem.read_int(data_seg.p_paddr, 8) == 0x1122334455667788
    bss = data_seg.p_memsz - data_seg.p_filesz
    assert mem.read(data_seg.p_paddr + data_seg.p_filesz, bss) == bytes(bss)
    assert loaded.low <= 0x400000 < 0x402000 < loaded.high
