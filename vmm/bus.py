"""Port-I/O and MMIO address maps: an address range -> the device that answers it.

A device implements `read(offset, size) -> int` and `write(offset, size, value)`,
with `offset` relative to the start of its range, and a short name for people
("serial", "pci-config", "virtio-blk 00:01.0 bar0": `--stats` shows it).  Addresses
nobody claims read as all-ones and swallow writes, as on a PC; each such address
is logged once.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


class BusConflict(ValueError):
    pass


@dataclass(frozen=True)
class Mapping:
    """A device at [base, base + length) of a bus."""

    base: int
    length: int
    device: object
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._bases: list[int] = []
        self._maps: list[Mapping] = []
        self._lock = threading.Lock()
        self._unclaimed_seen: set[int] = set()

    def register(self, base: int, length: int, device, name: str | None = None) -> None:
        """Map [base, base + length) to `device`, called `name` (default: its class's name)."""
        if length <= 0:
            raise ValueError("empty bus range")
        with self._lock:
            for m in self._maps:
                if base < m.end and m.base < base + length:
                    raise BusConflict(f"{self.name} {base:#x}+{length:#x} overlaps {m.base:#x}+{m.length:#x}")
            i = bisect.bisect(self._bases, base)
            self._bases.insert(i, base)
            self._maps.insert(i, Mapping(base, length, device, name or type(device).__name__))

    def unregister(self, base: int) -> None:
        with self._lock:
            i = self._bases.index(base)
            del self._bases[i]
            del self._maps[i]

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                return m
        return None

    def name_at(self, addr: int) -> str:
        """The name of the device that answers `addr`, or "unassigned"."""
        m = self.find(addr)
        return "unassigned" if m is None else m.name

    def read(self, addr: int, size: int) -> int:
        m = self.find(addr)
        if m is None:
            self._unclaimed(addr, "read")
            return (1 << (8 * size)) - 1
        return m.device.read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self.find(addr)
        if m is None:
            self._unclaimed(addr, f"write {value:#x}")
            return
        m.device.write(addr - m.base, size, value)

    def _unclaimed(self, addr: int, what: str) -> None:
        if addr not in self._unclaimed_seen and len(self._unclaimed_seen) < 4096:
            self._unclaimed_seen.add(addr)
            log.info("%s: unclaimed %s at %#x (logged once)", self.name, what, addr)
