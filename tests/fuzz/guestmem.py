"""A guest memory that tells where a device wrote, and where the buffers it used lie.

`CheckedMemory(size)` is `size` bytes of guest RAM, [0, size), inside a mapping with guard
bytes after it (and, with `skew`, before it: guest address g at mapping offset g + skew, so
code that indexes the mapping with a guest address instead of `offset()` reads and writes the
wrong bytes).  A target fills it, takes a `snapshot()`, lets the device work, and then:

    mem.check_writes(before, allowed)   # every changed byte is inside one of `allowed`
    mem.check_views(views, allowed)     # every memoryview lies inside one of `allowed`

`allowed` is a list of (gpa, length) ranges: the device-writable buffers of the chains it
completed, the used ring.  A changed guard byte, a write elsewhere, a view outside raise
InvariantError.  `gpa_of(view)` turns a memoryview of the mapping (or of a host address
inside it, as iovec rows give) back into a guest address.
"""

from __future__ import annotations

import numpy as np

from tests.fuzz.harness import InvariantError
from vmm.memory import GuestMemory, GuestMemoryError

GUARD = 4096
GUARD_BYTE = 0xA5
FILL_BYTE = 0xEE  # what guest RAM holds before a target lays anything out


class CheckedMemory(GuestMemory):
    def __init__(self, size: int, *, skew: int = 0):
        super().__init__(skew + size + GUARD, name="pyvmm-fuzz-ram")
        self.ram_size = size
        self.skew = skew
        # fast paths index the mapping with guest addresses only where they are the same
        self.direct_limit = size if skew == 0 else 0
        self._array = np.frombuffer(self.buffer, dtype=np.uint8)
        self._base = self._array.ctypes.data
        self._blank = bytes([GUARD_BYTE]) * skew + bytes([FILL_BYTE]) * size + bytes([GUARD_BYTE]) * GUARD

    def offset(self, gpa: int, length: int) -> int:
        if gpa < 0 or length < 0 or gpa + length > self.ram_size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        return gpa + self.skew

    def clear(self) -> None:
        """Guards and RAM back to their fill bytes."""
        self.buffer[:] = self._blank

    def snapshot(self) -> bytes:
        return bytes(self.buffer)

    def changed(self, before: bytes) -> np.ndarray:
        """Guest addresses of the bytes that differ from `before`; a changed guard byte raises."""
        where = np.flatnonzero(np.frombuffer(before, dtype=np.uint8) != self._array)
        outside = where[(where < self.skew) | (where >= self.skew + self.ram_size)]
        if len(outside):
            raise InvariantError(f"a guard byte changed: mapping offsets {outside[:8].tolist()}")
        return where - self.skew

    def check_writes(self, before: bytes, allowed: list[tuple[int, int]], what: str = "device") -> None:
        where = self.changed(before)
        if not len(where):
            return
        mask = np.zeros(self.ram_size, dtype=bool)
        for gpa, length in allowed:
            if length > 0:
                mask[max(gpa, 0) : max(min(gpa + length, self.ram_size), 0)] = True
        bad = where[~mask[where]]
        if len(bad):
            raise InvariantError(f"{what} wrote guest bytes outside what it may write: {bad[:8].tolist()} "
                                 f"(allowed {allowed[:8]})")

    def gpa_of_address(self, address: int) -> int:
        return address - self._base - self.skew

    def gpa_of(self, view: memoryview) -> int:
        return self.gpa_of_address(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else -1

    def in_mapping(self, view: memoryview) -> bool:
        """Whether any of the view is in this memory's mapping (else it is host memory of its own)."""
        gpa = self.gpa_of(view)
        return len(view) > 0 and -self.skew - len(view) < gpa < self.ram_size + GUARD

    def check_views(self, views, allowed: list[tuple[int, int]], what: str = "buffer") -> None:
        for view in views:
            n = len(view)
            gpa = self.gpa_of(view)
            if n and not any(a <= gpa and gpa + n <= a + length for a, length in allowed):
                raise InvariantError(f"{what} {gpa:#x}+{n:#x} is not inside the chain's buffers {allowed[:8]}")
