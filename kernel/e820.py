"""The BIOS e820 memory map handed to Linux in boot_params.

Built from the guest's RAM regions and the ranges the machine reserves:

    usable    [0, EBDA_START)                 conventional memory
    reserved  [EBDA_START, 1 MiB)             EBDA, VGA hole, option ROMs, ACPI tables, BIOS
    usable    [1 MiB, end of low RAM)
    usable    [4 GiB, end of high RAM)        when RAM goes past the 32-bit hole
    + any extra ranges given (an ECAM window, ACPI reclaim/NVS, ...)

Where ranges overlap, the stronger type wins (anything beats usable RAM); the
result is sorted, non-overlapping, and adjacent ranges of one type are merged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from . import layout
from .errors import KernelImageError

# enum e820_type
E820_TYPE_RAM = 1
E820_TYPE_RESERVED = 2
E820_TYPE_ACPI = 3
E820_TYPE_NVS = 4
E820_TYPE_UNUSABLE = 5
E820_TYPE_PMEM = 7

# struct boot_e820_entry { u64 addr; u64 size; u32 type; } __packed
E820_ENTRY = struct.Struct("<QQI")
E820_MAX_ENTRIES_ZEROPAGE = 128

# Which type wins where ranges overlap (higher wins).
_PRECEDENCE = {
    E820_TYPE_RAM: 0,
    E820_TYPE_ACPI: 1,
    E820_TYPE_NVS: 2,
    E820_TYPE_PMEM: 3,
    E820_TYPE_UNUSABLE: 4,
    E820_TYPE_RESERVED: 5,
}


@dataclass(frozen=True)
class E820Entry:
    """One range of the e820 memory map (struct boot_e820_entry)."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)


def build_e820(regions, reserved: Iterable = ()) -> list[E820Entry]:
    """The e820 map for guest RAM `regions` (GuestMemory.regions) plus `reserved`.

    `reserved` holds E820Entry items or (addr, size) / (addr, size, type) tuples;
    a missing type means E820_TYPE_RESERVED.
    """
    ranges: list[E820Entry] = []
    for region in regions:
        ranges.extend(_ram_ranges(region.gpa, region.end))
    ranges.append(E820Entry(layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START,
                            E820_TYPE_RESERVED))
    for item in reserved:
        entry = item if isinstance(item, E820Entry) else _entry(*item)
        if entry.type not in _PRECEDENCE:
            raise ValueError(f"unknown e820 type {entry.type}")
        if entry.size > 0:
            ranges.append(entry)
    table = _flatten(ranges)
    if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
        raise KernelImageError(
            f"e820 map has {len(table)} entries, more than the zero page holds "
            f"({E820_MAX_ENTRIES_ZEROPAGE})")
    return table


def _entry(addr: int, size: int, type: int = E820_TYPE_RESERVED) -> E820Entry:
    return E820Entry(addr, size, type)


def _ram_ranges(start: int, end: int) -> list[E820Entry]:
    """RAM [start, end) as usable entries, without the legacy hole below 1 MiB."""
    out = []
    for lo, hi in ((start, min(end, layout.EBDA_START)), (max(start, layout.HIMEM_START), end)):
        if lo < hi:
            out.append(E820Entry(lo, hi - lo, E820_TYPE_RAM))
    return out


def _flatten(ranges: list[E820Entry]) -> list[E820Entry]:
    """Cut overlapping ranges at every boundary, keep the strongest type, merge neighbours."""
    bounds = sorted({r.addr for r in ranges} | {r.end for r in ranges})
    table: list[E820Entry] = []
    for lo, hi in zip(bounds, bounds[1:]):
        types = [r.type for r in ranges if r.addr < hi and r.end > lo]
        if not types:
            continue
        kind = max(types, key=_PRECEDENCE.__getitem__)
        last = table[-1] if table else None
        if last is not None and last.end == lo and last.type == kind:
            table[-1] = E820Entry(last.addr, hi - last.addr, kind)
        else:
            table.append(E820Entry(lo, hi - lo, kind))
    return table


def usable_ranges(table: Iterable[E820Entry]) -> list[tuple[int, int]]:
    """(start, end) of every usable RAM entry."""
    return [(e.addr, e.end) for e in table if e.type == E820_TYPE_RAM]
