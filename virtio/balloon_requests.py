"""What virtio-balloon's queues carry, parsed and checked (OASIS virtio 1.2, 5.5.6).

    inflateq / deflateq   one or more device-readable buffers: le32 page frame numbers (4 KiB pages)
    statsq                one device-readable buffer: struct virtio_balloon_stat { le16 tag; le64 val; }[]
    reporting_vq          device-writable buffers, each a run of free guest memory (page-aligned)

Every value is the guest's: a pfn outside guest RAM, a length that is not whole entries, a buffer
of the wrong direction or too long raises BadRequest, and that request alone fails.  The results
are ranges of the memfd (`GuestMemory.offset`), so the backend never sees a pfn or a descriptor.
"""

from __future__ import annotations

import struct

from vmm.memory import GuestMemory, GuestMemoryError
from .queue import DescriptorChain

VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE = 1 << VIRTIO_BALLOON_PFN_SHIFT
PFN = struct.Struct("<I")
STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat (packed: 10 bytes)
MAX_PFNS = 4096  # per request (Linux sends at most 256: VIRTIO_BALLOON_ARRAY_PFNS_MAX)
MAX_STATS = 64  # entries per statistics buffer (Linux 6.1 sends 10)

# Statistics tags (5.5.6.3)
STAT_NAMES = {0: "swap-in", 1: "swap-out", 2: "major-faults", 3: "minor-faults", 4: "free-memory",
              5: "total-memory", 6: "available-memory", 7: "disk-caches", 8: "hugetlb-allocations",
              9: "hugetlb-failures", 10: "oom-kills", 11: "alloc-stalls", 12: "async-scans",
              13: "direct-scans", 14: "async-reclaims", 15: "direct-reclaims"}


class BadRequest(Exception):
    """A request the driver got wrong: completed with length 0, nothing done."""


def _readable_bytes(mem: GuestMemory, chain: DescriptorChain, limit: int, what: str) -> bytes:
    if chain.writable:
        raise BadRequest(f"{what} has device-writable buffers")
    if chain.readable_len > limit:
        raise BadRequest(f"{what} of {chain.readable_len} bytes is longer than {limit}")
    return b"".join(mem.read(gpa, n) for gpa, n in chain.readable)


def read_pfns(mem: GuestMemory, chain: DescriptorChain) -> list[int]:
    """The page frame numbers of an inflate or deflate request."""
    data = _readable_bytes(mem, chain, MAX_PFNS * PFN.size, "pfn array")
    if len(data) % PFN.size:
        raise BadRequest(f"pfn array of {len(data)} bytes is not whole le32 entries")
    return [pfn for (pfn,) in PFN.iter_unpack(data)]


def pfn_ranges(mem: GuestMemory, pfns: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive pfns as (memfd offset, length); every page must be guest RAM."""
    runs: list[list[int]] = []
    for pfn in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1][1] += 1
        else:
            runs.append([pfn, 1])
    return [_ram_range(mem, first << VIRTIO_BALLOON_PFN_SHIFT, count << VIRTIO_BALLOON_PFN_SHIFT)
            for first, count in runs]


def _ram_range(mem: GuestMemory, gpa: int, length: int) -> tuple[int, int]:
    """(memfd offset, length) of a guest range wholly in RAM.  A run cannot straddle two RAM
    regions (the MMIO hole lies between them), so one offset() says it all."""
    try:
        return mem.offset(gpa, length), length
    except GuestMemoryError:
        raise BadRequest(f"pages {gpa:#x}+{length:#x} are not guest RAM") from None


def reported_ranges(mem: GuestMemory, chain: DescriptorChain) -> list[tuple[int, int]]:
    """The free runs of a free page reporting request, as (memfd offset, length)."""
    if chain.readable:
        raise BadRequest("free page report has device-readable buffers")
    ranges = []
    for gpa, length in chain.writable:
        if gpa % BALLOON_PAGE or length % BALLOON_PAGE:
            raise BadRequest(f"reported range {gpa:#x}+{length:#x} is not whole 4 KiB pages")
        ranges.append(_ram_range(mem, gpa, length))
    return ranges


def read_stats(mem: GuestMemory, chain: DescriptorChain) -> dict[int, int]:
    """The statistics of a statsq buffer, by tag (the last value of a repeated tag)."""
    data = _readable_bytes(mem, chain, MAX_STATS * STAT.size, "statistics buffer")
    if len(data) % STAT.size:
        raise BadRequest(f"statistics buffer of {len(data)} bytes is not whole 10-byte entries")
    return dict(STAT.iter_unpack(data))


def stat_name(tag: int) -> str:
    return STAT_NAMES.get(tag, f"tag-{tag}")
