"""Giving guest RAM back to the host: punch holes in the memfd that backs it (virtio-balloon).

Guest RAM is one memfd mapped MAP_SHARED (vmm/memory.py).  fallocate(FALLOC_FL_PUNCH_HOLE |
FALLOC_FL_KEEP_SIZE) frees the pages of a range in the file itself: the memfd's st_blocks and the
process's RSS both drop, and KVM's mappings of them are invalidated (through the mmu notifier), so
a later guest access faults in a fresh zeroed page.  madvise(MADV_DONTNEED) would not do: on a
shared mapping it only drops this process's page table entries, and the file keeps the pages
(measured: 64 MiB DONTNEED left st_blocks unchanged; the same punched freed 64 MiB of both).
MADV_REMOVE on the mapping is the same as the punch.

`RamDiscard` takes (file offset, length) ranges - `GuestMemory.offset` gives them - and never
sees a descriptor or a page frame number.
"""

from __future__ import annotations

from typing import Iterable

from .raw import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate


class RamDiscard:
    """Punch holes in the guest RAM file `fd` (the memfd is the VM's: not closed here)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.discarded = 0  # bytes given back so far (ranges punched, holes or not)

    def discard(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Free every (offset, length) range of the file; return the bytes; raises OSError."""
        total = 0
        for offset, length in ranges:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            total += length
        self.discarded += total
        return total
