"""Load a static ELF64 x86-64 executable into guest RAM at its physical addresses.

Used for the Linux vmlinux and for pyvmm's own freestanding test guests.  Every
PT_LOAD segment is copied to its p_paddr, the part of p_memsz beyond p_filesz is
zeroed, and everything is checked: segments must lie inside the file and inside
guest RAM, must not overlap, and the entry point must fall in one of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.memory import GuestMemory, GuestMemoryError

from .errors import KernelImageError

# e_ident
ELFMAG = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
EI_VERSION = 6
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1

ET_EXEC = 2
ET_DYN = 3
EM_X86_64 = 62

PT_LOAD = 1
PT_NOTE = 4

# Elf64_Ehdr after e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Nhdr: n_namesz, n_descsz, n_type
ELF_NHDR = struct.Struct("<III")

# Xen ELF notes (xen/include/public/elfnote.h): the 32-bit PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"


@dataclass(frozen=True)
class ProgramHeader:
    """One Elf64_Phdr."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass(frozen=True)
class ElfImage:
    """A parsed and checked ELF executable (nothing loaded yet)."""

    data: bytes | memoryview = field(repr=False)  # (a view: of a cached kernel's mapping, not copied)
    e_type: int
    e_machine: int
    e_entry: int
    program_headers: tuple[ProgramHeader, ...]

    @property
    def segments(self) -> list[ProgramHeader]:
        """The PT_LOAD segments that occupy memory."""
        return [ph for ph in self.program_headers if ph.p_type == PT_LOAD and ph.p_memsz]

    @property
    def entry(self) -> int:
        """Physical entry point: e_entry, moved from p_vaddr to p_paddr if it is virtual."""
        for ph in self.segments:
            if ph.p_vaddr <= self.e_entry < ph.p_vaddr + ph.p_memsz:
                return self.e_entry - ph.p_vaddr + ph.p_paddr
        return self.e_entry

    @property
    def low(self) -> int:
        """Lowest physical address loaded."""
        return min(ph.p_paddr for ph in self.segments)

    @property
    def high(self) -> int:
        """End (exclusive) of the highest physical range loaded."""
        return max(ph.p_paddr + ph.p_memsz for ph in self.segments)

    def notes(self):
        """(name, type, desc) of every note in the PT_NOTE segments."""
        for ph in self.program_headers:
            if ph.p_type != PT_NOTE:
                continue
            note = self.data[ph.p_offset : ph.p_offset + ph.p_filesz]
            pos = 0
            while pos + ELF_NHDR.size <= len(note):
                namesz, descsz, ntype = ELF_NHDR.unpack_from(note, pos)
                pos += ELF_NHDR.size
                name = bytes(note[pos : pos + namesz]).rstrip(b"\0")
                pos += _align4(namesz)
                desc = bytes(note[pos : pos + descsz])
                pos += _align4(descsz)
                if pos > len(note):
                    break               # a truncated note: stop, notes are informational
                yield name, ntype, desc

    @property
    def pvh_entry(self) -> int | None:
        """The 32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), if the image has one."""
        for name, ntype, desc in self.notes():
            if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                return int.from_bytes(desc, "little")
        return None


def _align4(n: int) -> int:
    return (n + 3) & ~3


def is_elf(data: bytes) -> bool:
    return bytes(data[:4]) == ELFMAG


def parse_elf(data: bytes | memoryview, *, file_size: int | None = None) -> ElfImage:
    """Parse and check an ELF64 x86-64 executable; KernelImageError if it cannot be loaded.
    A memoryview is kept as it is (a mapped file is not read into memory).  With `file_size`,
    `data` may be the file's first bytes only (its headers): segments are checked against the size."""
    if not isinstance(data, memoryview):
        data = bytes(data)
    if len(data) < ELF64_EHDR.size or not is_elf(data):
        raise KernelImageError("not an ELF file (no \\x7fELF magic)")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = ELF64_EHDR.unpack_from(data)
    if ident[EI_CLASS] != ELFCLASS64:
        raise KernelImageError(f"ELF file is not 64-bit (EI_CLASS {ident[EI_CLASS]})")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise KernelImageError("ELF file is not little-endian")
    if e_machine != EM_X86_64:
        raise KernelImageError(f"ELF file is for machine {e_machine}, not x86-64 (62)")
    if e_type != ET_EXEC:
        raise KernelImageError(
            f"ELF file is not a static executable (e_type {e_type}); "
            "link it with -static -no-pie at a fixed address")
    if e_phnum == 0:
        raise KernelImageError("ELF file has no program headers")
    if e_phentsize != ELF64_PHDR.size:
        raise KernelImageError(f"ELF program header size is {e_phentsize}, not {ELF64_PHDR.size}")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise KernelImageError("ELF program headers lie past the end of the file")

    headers = tuple(
        ProgramHeader(*ELF64_PHDR.unpack_from(data, e_phoff + i * e_phentsize))
        for i in range(e_phnum)
    )
    image = ElfImage(data, e_type, e_machine, e_entry, headers)
    _check_segments(image, len(data) if file_size is None else file_size)
    return image


def _check_segments(image: ElfImage, file_size: int) -> None:
    segments = image.segments
    if not segments:
        raise KernelImageError("ELF file has no loadable (PT_LOAD) segment")
    for i, ph in enumerate(image.program_headers):
        if ph.p_type not in (PT_LOAD, PT_NOTE):
            continue
        if ph.p_offset + ph.p_filesz > file_size:
            raise KernelImageError(
                f"ELF segment {i} (file bytes {ph.p_offset:#x}+{ph.p_filesz:#x}) "
                f"lies past the end of the file ({file_size:#x} bytes)")
        if ph.p_type == PT_LOAD and ph.p_filesz > ph.p_memsz:
            raise KernelImageError(
                f"ELF segment {i} has p_filesz {ph.p_filesz:#x} > p_memsz {ph.p_memsz:#x}")
    ordered = sorted(segments, key=lambda ph: ph.p_paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.p_paddr + a.p_memsz > b.p_paddr:
            raise KernelImageError(
                f"ELF segments at physical {a.p_paddr:#x} and {b.p_paddr:#x} overlap")
    entry = image.entry
    if not any(ph.p_paddr <= entry < ph.p_paddr + ph.p_memsz for ph in segments):
        raise KernelImageError(f"ELF entry point {image.e_entry:#x} is in no loaded segment")


@dataclass(frozen=True)
class LoadedElf:
    """What load_elf put in guest memory."""

    entry: int              # physical entry point
    low: int                # lowest physical address loaded
    high: int               # end (exclusive) of the highest physical range loaded
    pvh_entry: int | None   # XEN_ELFNOTE_PHYS32_ENTRY, for information
    image: ElfImage | None = field(repr=False)


def load_elf(mem: GuestMemory, data: bytes | ElfImage, source_fd: int | None = None) -> LoadedElf:
    """Copy the PT_LOAD segments of an ELF executable to their p_paddr in guest RAM.  With
    `source_fd`, the open ELF file the image was parsed from, segments go from the file into guest
    memory in the kernel (GuestMemory.load_file) instead of through Python."""
    image = data if isinstance(data, ElfImage) else parse_elf(data)
    check_fits(mem, image)
    copy_segments(mem, image, source_fd)
    return LoadedElf(image.entry, image.low, image.high, image.pvh_entry, image)


def check_fits(mem: GuestMemory, image: ElfImage) -> None:
    """KernelImageError unless every PT_LOAD segment lies in guest RAM."""
    for ph in image.segments:
        if not mem.contains(ph.p_paddr, ph.p_memsz):
            raise KernelImageError(
                f"ELF segment [{ph.p_paddr:#x}, {ph.p_paddr + ph.p_memsz:#x}) "
                f"is not in guest RAM ({_ram_text(mem)})")


def copy_segments(mem: GuestMemory, image: ElfImage, source_fd: int | None = None) -> None:
    """The segments' bytes into guest RAM (checked by check_fits), the rest of p_memsz zeroed."""
    for ph in image.segments:
        try:
            if source_fd is not None:
                mem.load_file(ph.p_paddr, ph.p_filesz, source_fd, ph.p_offset)
            else:
                with mem.view(ph.p_paddr, ph.p_filesz) as dest:
                    dest[:] = memoryview(image.data)[ph.p_offset : ph.p_offset + ph.p_filesz]
            mem.fill(ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz)
        except GuestMemoryError as e:  # checked by check_fits; kept for a clear message
            raise KernelImageError(str(e)) from e
        except OSError as e:
            raise KernelImageError(f"cannot read an ELF segment: {e.strerror}") from e


def _ram_text(mem: GuestMemory) -> str:
    return ", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in mem.regions)
