"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the Pending Bit Array.

The capability (in configuration space) holds Message Control (table size N-1,
Function Mask, MSI-X Enable) and where the table and the PBA live: a BAR index
(BIR) in the low 3 bits and a QWORD-aligned offset in the rest.  The table and
the PBA are memory in that BAR, served here by `MsixTable` and `MsixPba`, which
the device's BAR handler forwards to.

Each table entry is backed by a `vmm.irq.MsiVector` (a GSI with an MSI route and
an irqfd).  Whenever what an entry means changes (its message, its mask bit,
the function mask, the enable bit), the vector is reprogrammed with
`program(address, data, masked)`, masked being true when the entry or the whole
function is masked or MSI-X is off.  `MsiVector` keeps an interrupt raised while
masked pending and delivers it on unmask; that is the entry's PBA bit.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Callable

from .config import BAR_COUNT, CAP_ID_MSIX, Capability

log = logging.getLogger(__name__)

# Message Control (6.8.2.3)
MSIX_TABLE_SIZE_MASK = 0x7FF
MSIX_FUNCTION_MASK = 1 << 14
MSIX_ENABLE = 1 << 15
MSIX_MAX_VECTORS = 2048

# Offsets in the capability (ID, next pointer, then these).
MSIX_MESSAGE_CONTROL = 2
MSIX_TABLE = 4  # Table Offset / Table BIR
MSIX_PBA = 8  # PBA Offset / PBA BIR
MSIX_CAP_LENGTH = 12
MSIX_BIR_MASK = 0x7

# Table entries (6.8.2.6-6.8.2.9)
MSIX_ENTRY_SIZE = 16
ENTRY_ADDRESS_LO = 0
ENTRY_ADDRESS_HI = 4
ENTRY_DATA = 8
ENTRY_VECTOR_CONTROL = 12
VECTOR_CONTROL_MASK = 1 << 0

_ENTRY = struct.Struct("<QII")  # message address, message data, vector control


def table_bytes(vectors: int) -> int:
    return MSIX_ENTRY_SIZE * vectors


def pba_bytes(vectors: int) -> int:
    """The PBA is an array of QWORDs, one bit per vector."""
    return 8 * ((vectors + 63) // 64)


class MsixEntry:
    __slots__ = ("address", "data", "control")

    def __init__(self) -> None:
        self.address = 0
        self.data = 0
        self.control = VECTOR_CONTROL_MASK  # every entry starts masked

    @property
    def masked(self) -> bool:
        return bool(self.control & VECTOR_CONTROL_MASK)


class MsixCapability(Capability):
    """The MSI-X capability of one function and the state of its N vectors."""

    def __init__(self, irq, vectors: int, *, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int):
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {vectors} is not in 1..{MSIX_MAX_VECTORS}")
        if not (0 <= table_bar < BAR_COUNT and 0 <= pba_bar < BAR_COUNT):
            raise ValueError("MSI-X table and PBA must be in BARs 0-5")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be QWORD aligned")
        body = struct.pack("<HII", vectors - 1, table_offset | table_bar, pba_offset | pba_bar)
        writable = struct.pack("<HII", MSIX_FUNCTION_MASK | MSIX_ENABLE, 0, 0)
        super().__init__(CAP_ID_MSIX, body, writable)
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.entries = [MsixEntry() for _ in range(vectors)]
        self.vectors = [irq.allocate() for _ in range(vectors)]
        self._programmed: list[tuple[int, int, bool] | None] = [None] * vectors
        self._lock = threading.Lock()
        self._control = 0  # Message Control bits 14-15, as last seen
        self.table = MsixTable(self)
        self.pba = MsixPba(self)
        # Called with the new enable state when the driver turns MSI-X on or off.
        self.on_enable_change: Callable[[bool], None] | None = None
        self._sync_all()

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def enabled(self) -> bool:
        return bool(self._control & MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control & MSIX_FUNCTION_MASK)

    def after_write(self, rel: int, size: int) -> None:
        if rel + size <= MSIX_MESSAGE_CONTROL or rel >= MSIX_MESSAGE_CONTROL + 2:
            return
        control = self.get(MSIX_MESSAGE_CONTROL, 2) & (MSIX_FUNCTION_MASK | MSIX_ENABLE)
        with self._lock:
            was_enabled = self.enabled
            if control == self._control:
                return
            self._control = control
            self._sync_all()
        if self.enabled != was_enabled and self.on_enable_change is not None:
            self.on_enable_change(self.enabled)

    def reset(self) -> None:
        """Function reset: MSI-X off, function unmasked, every entry masked (6.8.2.3, 6.8.2.9)."""
        self.put(MSIX_MESSAGE_CONTROL, 2, self.size - 1)
        with self._lock:
            was_enabled = self.enabled
            self._control = 0
            for entry in self.entries:
                entry.address = entry.data = 0
                entry.control = VECTOR_CONTROL_MASK
            self._sync_all()
        if was_enabled and self.on_enable_change is not None:
            self.on_enable_change(False)

    # -- delivery ---------------------------------------------------------------------
    def trigger(self, vector: int) -> None:
        """Raise table entry `vector` (any thread); pending if masked, ignored if out of range."""
        if 0 <= vector < len(self.vectors):
            self.vectors[vector].trigger()

    def _sync(self, i: int) -> None:
        entry = self.entries[i]
        masked = entry.masked or self.function_masked or not self.enabled
        state = (entry.address, entry.data, masked)
        if state != self._programmed[i]:
            self._programmed[i] = state
            self.vectors[i].program(entry.address, entry.data, masked)

    def _sync_all(self) -> None:
        for i in range(len(self.entries)):
            self._sync(i)

    # -- the table and the PBA (reached through a BAR) -----------------------------------
    def read_table(self, offset: int, size: int) -> int:
        index, rel = divmod(offset, MSIX_ENTRY_SIZE)
        if offset < 0 or index >= len(self.entries) or rel + size > MSIX_ENTRY_SIZE or size not in (1, 2, 4, 8):
            return 0
        entry = self.entries[index]
        raw = _ENTRY.pack(entry.address, entry.data, entry.control)
        return int.from_bytes(raw[rel : rel + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        """DWORD and aligned QWORD writes (6.8.2: other sizes are not defined); others are ignored."""
        index, rel = divmod(offset, MSIX_ENTRY_SIZE)
        if offset < 0 or index >= len(self.entries) or size not in (4, 8) or rel % size:
            log.debug("MSI-X table: ignored %d-byte write at %#x", size, offset)
            return
        with self._lock:
            entry = self.entries[index]
            raw = bytearray(_ENTRY.pack(entry.address, entry.data, entry.control))
            raw[rel : rel + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            address, data, control = _ENTRY.unpack(raw)
            entry.address, entry.data = address, data
            entry.control = control & VECTOR_CONTROL_MASK  # the other bits are reserved
            self._sync(index)

    def read_pba(self, offset: int, size: int) -> int:
        if offset < 0 or size not in (1, 2, 4, 8) or offset + size > pba_bytes(len(self.vectors)):
            return 0
        value = 0
        first = 8 * offset
        for bit in range(8 * size):
            vector = first + bit
            if vector < len(self.vectors) and self.vectors[vector].pending:
                value |= 1 << bit
        return value


class MsixTable:
    """The vector table as a region device: read(offset, size) / write(offset, size, value)."""

    def __init__(self, cap: MsixCapability):
        self.cap = cap

    @property
    def length(self) -> int:
        return table_bytes(self.cap.size)

    def read(self, offset: int, size: int) -> int:
        return self.cap.read_table(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.cap.write_table(offset, size, value)


class MsixPba:
    """The Pending Bit Array as a region device; read-only (writes are ignored)."""

    def __init__(self, cap: MsixCapability):
        self.cap = cap

    @property
    def length(self) -> int:
        return pba_bytes(self.cap.size)

    def read(self, offset: int, size: int) -> int:
        return self.cap.read_pba(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        pass
