"""Guest physical memory: one memfd, one MAP_SHARED mapping, bounds-checked access.

RAM is laid out as KVM will see it: from guest physical address 0 up to the
start of the 32-bit MMIO hole, and the rest (if any) from 4 GiB upwards.  Both
regions live in one memfd, one after the other, so a device process can map the
same file and see the same bytes.

Every access names a guest physical address (gpa) and a length and is checked to
lie wholly inside one RAM region.  Nothing outside the mapping can be reached
through this class: that is what lets device code treat guest-supplied addresses
as untrusted input.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30

# RAM stops here below 4 GiB; [MMIO_HOLE_START, 4 GiB) is left for devices
# (PCI BARs, the IOAPIC, the local APICs, the firmware image).
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB


class GuestMemoryError(Exception):
    """A guest physical range is not (wholly) inside guest RAM."""


@dataclass(frozen=True)
class Region:
    """A run of guest RAM: guest physical [gpa, gpa+size) is file offset [offset, ...)."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def layout(size: int, hole_start: int = MMIO_HOLE_START) -> list[Region]:
    """Split `size` bytes of RAM around the 32-bit MMIO hole."""
    if size <= 0:
        raise ValueError("guest memory size must be positive")
    low = min(size, hole_start)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(MMIO_HOLE_END, size - low, low))
    return regions


def advise_huge_pages(buffer: mmap.mmap) -> None:
    """Ask for transparent huge pages for guest RAM: fewer faults to populate it, and KVM maps 2 MiB
    at a time in its nested page tables.  The host decides: shared memory gets them where
    /sys/kernel/mm/transparent_hugepage/shmem_enabled says `advise` (or `within_size`, `always`);
    Debian's default, `never`, keeps 4 KiB pages."""
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: EINVAL
        pass


class GuestMemory:
    """All of a guest's RAM.

    `buffer` is the writable mmap; `offset(gpa, n)` turns a checked guest range into
    an index into it.  Hot paths use those two with `struct.unpack_from` /
    `pack_into`; everything else uses `view`, `read` and `write`.
    """

    def __init__(self, size: int, *, hole_start: int = MMIO_HOLE_START, name: str = "pyvmm-ram"):
        self.regions = layout(size, hole_start)
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.buffer = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        advise_huge_pages(self.buffer)
        self._view = memoryview(self.buffer)
        # The mapping as 16-bit words (x86 byte order): `u16[offset >> 1]` is one aligned 2-byte load
        # or store.  Virtqueue indices must be accessed this way: struct.pack_into zero-fills before
        # it writes and struct.unpack_from('<H') reads byte by byte, so a driver on another CPU could
        # see, or cause us to see, a torn index.
        self.u16 = self._view.cast("H")
        self._low = self.regions[0]
        self._high = self.regions[1] if len(self.regions) > 1 else None
        # For hot paths that inline the common case of offset(): a guest range that ends at or
        # below `direct_limit` is RAM at the same offset in `buffer` (and in `bytes_view`, the
        # whole mapping as one memoryview).  Anything else goes through offset().
        self.direct_limit = self._low.size if self._low.offset == 0 else 0
        self.bytes_view = self._view

    # -- address translation -------------------------------------------------
    def offset(self, gpa: int, length: int) -> int:
        """Offset in `buffer` of guest range [gpa, gpa+length), which must be RAM."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        low = self._low
        if gpa + length <= low.size:
            return gpa
        high = self._high
        if high is not None and gpa >= high.gpa and gpa + length <= high.end:
            return gpa - high.gpa + high.offset
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, region: Region) -> int:
        """Host virtual address of a region's first byte (for KVM_SET_USER_MEMORY_REGION)."""
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        return base + region.offset

    # -- access ----------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM: no copy, usable by os.preadv/readv."""
        off = self.offset(gpa, length)
        return self._view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return self.buffer[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self.offset(gpa, len(data))
        self.buffer[off : off + len(data)] = data

    def load_file(self, gpa: int, length: int, src_fd: int, src_offset: int = 0) -> None:
        """Put `length` bytes of a file, from `src_offset`, into guest RAM at `gpa`, in the kernel:
        sendfile(2) into the memfd (the pages are filled as they are allocated, none zeroed first or
        faulted in through the mapping; ~40% faster than preadv into a view).  Through a file
        description of its own, so loads may run in parallel.  Where that cannot be had, preadv."""
        off = self.offset(gpa, length)
        done = 0
        try:
            out = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.lseek(out, off, os.SEEK_SET)
                while done < length:
                    n = os.sendfile(out, src_fd, src_offset + done, length - done)
                    if n == 0:
                        break
                    done += n
            finally:
                os.close(out)
        except OSError:  # no /proc, or a file sendfile cannot read: the rest by preadv
            pass
        if done < length:
            with self._view[off : off + length] as dest:
                while done < length:
                    n = os.preadv(src_fd, [dest[done:]], src_offset + done)
                    if n == 0:
                        raise GuestMemoryError(f"the file ends {length - done} bytes short of {length}")
                    done += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        off = self.offset(gpa, length)
        self.buffer[off : off + length] = bytes([byte]) * length

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def unpack(self, st: struct.Struct, gpa: int) -> tuple:
        return st.unpack_from(self.buffer, self.offset(gpa, st.size))

    def pack(self, st: struct.Struct, gpa: int, *values) -> None:
        st.pack_into(self.buffer, self.offset(gpa, st.size), *values)

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        if self.buffer is None:
            return
        self.u16.release()
        self._view.release()
        try:
            self.buffer.close()
        except BufferError:
            pass  # a live memoryview elsewhere; the mapping goes with the process
        os.close(self.fd)
        self.buffer = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
