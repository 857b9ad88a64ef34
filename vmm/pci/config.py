"""The configuration space of one PCI function (PCI Local Bus 3.0, chapter 6).

A type-0 header (6.1-6.2), Base Address Registers with their sizing rules
(6.2.5.1), and a linked list of capabilities (6.7), as the host bridge's
configuration mechanisms (vmm/pci/host.py) reach them.

The space is stored as bytes, with a second array saying which bits the driver
may write: a write keeps the read-only bits and takes the writable ones.  That
one rule gives the BAR sizing protocol for free: a BAR's writable bits are the
address bits above its size, so writing all-ones and reading back yields the
size mask with the read-only type bits, as the spec requires.

Accesses are 1, 2 or 4 bytes at any offset (Linux reads every width); bytes
past the 256-byte PCI space (the PCI Express extended space, reachable through
ECAM) read 0, which a driver takes as "no extended capabilities".

An optional expansion ROM (6.2.5.2, 6.3): `add_expansion_rom(image)` makes the
Expansion ROM Base Address register at 0x30 live.  Its address bits above the
ROM's size are writable (sizing works as for BARs: write 0xFFFFF800, read back
the size mask) and so is bit 0, the enable bit; the ROM decodes only while that
bit and the Command register's Memory Space bit are both set.  The image is
read through the mapping (`ExpansionRom.read`), never written.

The owner learns about changes through two hooks:
  * `on_mapping_change()`: a BAR's value, the expansion ROM register or the
    Command register's I/O or memory decode bit changed; the host bridge moves
    the BAR and ROM regions.
  * `on_command_change(old, new)`: any change of the Command register (the
    device looks at Interrupt Disable).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 256
EXTENDED_CONFIG_SPACE_SIZE = 4096

# Type-0 header (6.1, figure 6-1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, sub-class, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
BAR_COUNT = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
HEADER_END = 0x40  # capabilities go after the header

HEADER_TYPE_NORMAL = 0x00
INTERRUPT_PIN_NONE = 0
INTERRUPT_PIN_INTA = 1

# Command register (6.2.2)
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_PARITY_ERROR_RESPONSE = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY_ERROR_RESPONSE
                    | COMMAND_SERR | COMMAND_INTX_DISABLE)
COMMAND_DECODE = COMMAND_IO | COMMAND_MEMORY

# Status register (6.2.3)
STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES_LIST = 1 << 4

# Base Address Register low bits (6.2.5.1)
BAR_SPACE_IO = 1 << 0
BAR_MEM_TYPE_64 = 0b10 << 1
BAR_MEM_PREFETCHABLE = 1 << 3
BAR_IO_FLAGS_MASK = 0x3
BAR_MEM_FLAGS_MASK = 0xF

# Capability IDs (PCI Code and ID Assignment)
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11

# Expansion ROM Base Address register (6.2.5.2)
EXPANSION_ROM_ENABLE = 1 << 0
EXPANSION_ROM_ADDRESS_MASK = 0xFFFF_F800
MIN_EXPANSION_ROM_SIZE = 2048  # bits 10:1 are reserved: 2 KiB is the smallest ROM
MAX_EXPANSION_ROM_SIZE = 16 << 20  # PCI 3.0 allows up to 16 MiB
ROM_SIGNATURE = b"\x55\xaa"
PCIR_SIGNATURE = b"PCIR"

# Memory BARs are at least a page, so that each can be mapped (and trapped) on its own.
MIN_MEMORY_BAR_SIZE = 4096
MIN_IO_BAR_SIZE = 4


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class Bar:
    """One Base Address Register (a 64-bit one also takes slot index + 1)."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def flags(self) -> int:
        """The read-only low bits that say what the BAR is."""
        if self.is_io:
            return BAR_SPACE_IO
        flags = BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return flags | (BAR_MEM_PREFETCHABLE if self.prefetchable else 0)

    @property
    def slots(self) -> int:
        return 2 if self.kind is BarKind.MEM64 else 1


class ExpansionRom:
    """An expansion ROM image behind the ROM BAR: `size` (a power of 2, at least 2 KiB,
    what sizing reports) covers the image; bytes past the image read as 0xFF."""

    def __init__(self, image: bytes, size: int | None = None):
        image = bytes(image)
        if not image:
            raise ValueError("an expansion ROM cannot be empty")
        need = max(MIN_EXPANSION_ROM_SIZE, 1 << (len(image) - 1).bit_length())
        if size is None:
            size = need
        if size < need or size & (size - 1):
            raise ValueError(f"expansion ROM size {size:#x} is not a power of 2 holding {len(image)} bytes")
        if size > MAX_EXPANSION_ROM_SIZE:
            raise ValueError(f"expansion ROM of {len(image)} bytes is larger than 16 MiB")
        self.image = image + b"\xff" * (size - len(image))
        self.size = size

    def read(self, offset: int, size: int) -> int:
        """The ROM region as a bus device."""
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.image[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        pass  # a ROM


def patch_rom_ids(image: bytes, vendor_id: int, device_id: int) -> bytes:
    """The first image of a PCI option ROM with its PCI data structure's vendor and device IDs
    set to the function's, as QEMU's pci_patch_ids does: firmware (SeaBIOS's map_pcirom) runs
    a ROM only if they match, and one ROM (iPXE's virtio one) serves several IDs.  The byte
    at offset 6 (iPXE/etherboot's checksum byte) is adjusted so the image still sums to 0.
    Anything that is not a valid ROM is returned unchanged."""
    if len(image) < 0x1A or image[:2] != ROM_SIGNATURE:
        return bytes(image)
    pcir = int.from_bytes(image[0x18:0x1A], "little")
    if pcir + 8 > len(image) or image[pcir : pcir + 4] != PCIR_SIGNATURE:
        return bytes(image)
    out = bytearray(image)
    for offset, want in ((pcir + 4, vendor_id), (pcir + 6, device_id)):
        have = int.from_bytes(out[offset : offset + 2], "little")
        if have != want:
            delta = (want & 0xFF) + (want >> 8) - (have & 0xFF) - (have >> 8)
            out[6] = (out[6] - delta) & 0xFF
            out[offset : offset + 2] = want.to_bytes(2, "little")
    return bytes(out)


class Capability:
    """One entry in the capability list: an ID, then `body` (everything after the
    2-byte ID/next header), of which the bits set in `writable` are the driver's.

    Subclasses with behaviour override `before_read` (refresh the stored bytes
    before the driver reads them) and `after_write` (act on what the driver
    wrote).  Both get the access relative to the capability's first byte.
    """

    def __init__(self, cap_id: int, body: bytes, writable: bytes | None = None):
        if writable is not None and len(writable) != len(body):
            raise ValueError("capability write mask must match its body")
        self.cap_id = cap_id
        self.body = bytes(body)
        self.writable = bytes(writable) if writable is not None else bytes(len(body))
        self.space: PciConfigSpace | None = None
        self.offset = 0  # set when added to a config space

    @property
    def length(self) -> int:
        return 2 + len(self.body)

    def before_read(self, rel: int, size: int) -> None:
        pass

    def after_write(self, rel: int, size: int) -> None:
        pass

    # Raw access to this capability's stored bytes (no write mask, no hooks).
    def get(self, rel: int, size: int) -> int:
        return self.space.get(self.offset + rel, size)

    def put(self, rel: int, size: int, value: int) -> None:
        self.space.put(self.offset + rel, size, value)


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class PciConfigSpace:
    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision_id: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 interrupt_pin: int = INTERRUPT_PIN_INTA, header_type: int = HEADER_TYPE_NORMAL):
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self.capabilities: list[Capability] = []
        self.rom: ExpansionRom | None = None
        self._next_cap_offset = HEADER_END
        self.on_mapping_change: Callable[[], None] | None = None
        self.on_command_change: Callable[[int, int], None] | None = None

        self.put(VENDOR_ID, 2, vendor_id)
        self.put(DEVICE_ID, 2, device_id)
        self.put(REVISION_ID, 1, revision_id)
        self.put(CLASS_CODE, 3, class_code)
        self.put(HEADER_TYPE, 1, header_type)
        self.put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.put(SUBSYSTEM_ID, 2, subsystem_id)
        self.put(INTERRUPT_PIN, 1, interrupt_pin)
        self._set_writable(COMMAND, 2, COMMAND_WRITABLE)
        self._set_writable(CACHE_LINE_SIZE, 1, 0xFF)
        self._set_writable(INTERRUPT_LINE, 1, 0xFF)

    # -- building --------------------------------------------------------------------
    def _set_writable(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset : offset + size] = _le(mask, size)

    def add_bar(self, index: int, size: int, kind: BarKind, *, prefetchable: bool = False) -> Bar:
        bar = Bar(index, size, kind, prefetchable)
        minimum = MIN_IO_BAR_SIZE if bar.is_io else MIN_MEMORY_BAR_SIZE
        if size < minimum or size & (size - 1):
            raise ValueError(f"BAR {index}: size {size:#x} is not a power of 2 of at least {minimum:#x}")
        if bar.is_io and size > 256:
            raise ValueError(f"BAR {index}: I/O BARs are at most 256 bytes")
        if kind is BarKind.MEM32 and size > 1 << 31:
            raise ValueError(f"BAR {index}: a 32-bit BAR cannot be {size:#x} bytes")
        if prefetchable and bar.is_io:
            raise ValueError("I/O BARs are not prefetchable")
        taken = {i + k for i, b in self.bars.items() for k in range(b.slots)}
        wanted = set(range(index, index + bar.slots))
        if not 0 <= index or index + bar.slots > BAR_COUNT or wanted & taken:
            raise ValueError(f"BAR {index} is out of range or already taken")
        self.bars[index] = bar
        offset = BAR0 + 4 * index
        self.put(offset, 4, bar.flags)
        address_mask = ~(size - 1)
        self._set_writable(offset, 4, address_mask & ~(BAR_IO_FLAGS_MASK if bar.is_io else BAR_MEM_FLAGS_MASK))
        if kind is BarKind.MEM64:
            self._set_writable(offset + 4, 4, address_mask >> 32)
        return bar

    def add_expansion_rom(self, image: bytes | ExpansionRom, size: int | None = None) -> ExpansionRom:
        """Give the function an expansion ROM: the register at 0x30 becomes sizable and
        programmable; the host bridge maps the image while it is enabled."""
        if self.rom is not None:
            raise ValueError("the function already has an expansion ROM")
        rom = image if isinstance(image, ExpansionRom) else ExpansionRom(image, size)
        self.rom = rom
        self.put(EXPANSION_ROM, 4, 0)
        self._set_writable(EXPANSION_ROM, 4, (~(rom.size - 1) & EXPANSION_ROM_ADDRESS_MASK) | EXPANSION_ROM_ENABLE)
        return rom

    def add_capability(self, cap: Capability) -> int:
        """Append `cap` to the list; return its offset in the space."""
        offset = self._next_cap_offset
        if offset + cap.length > CONFIG_SPACE_SIZE:
            raise ValueError("no room left in configuration space for another capability")
        cap.space, cap.offset = self, offset
        self.put(offset, 1, cap.cap_id)
        self.put(offset + 1, 1, 0)
        self._data[offset + 2 : offset + cap.length] = cap.body
        self._wmask[offset + 2 : offset + cap.length] = cap.writable
        if self.capabilities:
            self.put(self.capabilities[-1].offset + 1, 1, offset)
        else:
            self.put(CAPABILITIES_POINTER, 1, offset)
            self.put(STATUS, 2, self.get(STATUS, 2) | STATUS_CAPABILITIES_LIST)
        self.capabilities.append(cap)
        self._next_cap_offset = (offset + cap.length + 3) & ~3
        return offset

    # -- raw access (the device's own view: no write mask, no hooks) ---------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        self._data[offset : offset + size] = _le(value, size)

    # -- the driver's access ----------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > EXTENDED_CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        if offset >= CONFIG_SPACE_SIZE:
            return 0
        cap = self._capability_at(offset)
        if cap is not None:
            cap.before_read(offset - cap.offset, size)
        data = self._data[offset : offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset >= CONFIG_SPACE_SIZE:
            return
        size = min(size, CONFIG_SPACE_SIZE - offset)
        old_command = self.command
        old_bars = self._data[BAR0 : BAR0 + 4 * BAR_COUNT]
        old_rom = self._data[EXPANSION_ROM : EXPANSION_ROM + 4]
        new = _le(value, size)
        for i in range(size):
            mask = self._wmask[offset + i]
            if mask:  # read-only bytes are not even rewritten (the device may be updating Status)
                self._data[offset + i] = (self._data[offset + i] & ~mask) | (new[i] & mask)

        command = self.command
        if command != old_command and self.on_command_change is not None:
            self.on_command_change(old_command, command)
        decode_changed = (command ^ old_command) & COMMAND_DECODE
        moved = (old_bars != self._data[BAR0 : BAR0 + 4 * BAR_COUNT]
                 or old_rom != self._data[EXPANSION_ROM : EXPANSION_ROM + 4])
        if (decode_changed or moved) and self.on_mapping_change:
            self.on_mapping_change()
        cap = self._capability_at(offset)
        if cap is not None:
            cap.after_write(offset - cap.offset, size)

    def _capability_at(self, offset: int) -> Capability | None:
        if offset < HEADER_END:
            return None
        for cap in self.capabilities:
            if cap.offset <= offset < cap.offset + cap.length:
                return cap
        return None

    # -- state the owner looks at ------------------------------------------------------
    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & COMMAND_MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & COMMAND_IO)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        """The Status register's Interrupt Status bit: the device's INTx state."""
        status = self.get(STATUS, 2)
        self.put(STATUS, 2, status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT)

    def bar_address(self, index: int) -> int:
        """The address BAR `index` holds now (the type bits cleared)."""
        bar = self.bars[index]
        low = self.get(BAR0 + 4 * index, 4)
        if bar.is_io:
            return low & ~BAR_IO_FLAGS_MASK
        address = low & ~BAR_MEM_FLAGS_MASK
        if bar.kind is BarKind.MEM64:
            address |= self.get(BAR0 + 4 * index + 4, 4) << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware would (the host bridge's assignment); no hooks."""
        bar = self.bars[index]
        if address & (bar.size - 1):
            raise ValueError(f"BAR {index}: {address:#x} is not aligned to its size {bar.size:#x}")
        self.put(BAR0 + 4 * index, 4, (address & 0xFFFF_FFFF) | bar.flags)
        if bar.kind is BarKind.MEM64:
            self.put(BAR0 + 4 * index + 4, 4, address >> 32)
        elif address >> 32:
            raise ValueError(f"BAR {index}: a 32-bit BAR cannot hold {address:#x}")

    @property
    def rom_address(self) -> int:
        """The address the expansion ROM register holds (enable bit cleared); 0 without a ROM."""
        return self.get(EXPANSION_ROM, 4) & EXPANSION_ROM_ADDRESS_MASK if self.rom is not None else 0

    @property
    def rom_enabled(self) -> bool:
        return self.rom is not None and bool(self.get(EXPANSION_ROM, 4) & EXPANSION_ROM_ENABLE)

    def rom_decoding(self) -> bool:
        """Whether the ROM answers at its address: enable bit and Memory Space both set."""
        return self.rom_enabled and self.memory_enabled

    def set_rom_address(self, address: int, *, enable: bool = False) -> None:
        """Program the expansion ROM register as firmware would; no hooks."""
        if self.rom is None:
            raise ValueError("the function has no expansion ROM")
        if address & (self.rom.size - 1) or address >> 32:
            raise ValueError(f"expansion ROM: {address:#x} is not a 32-bit address aligned to {self.rom.size:#x}")
        self.put(EXPANSION_ROM, 4, address | (EXPANSION_ROM_ENABLE if enable else 0))

    def set_command(self, value: int) -> None:
        """Set the Command register as firmware would; no hooks."""
        self.put(COMMAND, 2, value & COMMAND_WRITABLE)

    def bar_decoding(self, index: int) -> bool:
        """Whether the Command register lets BAR `index` decode its range."""
        return self.io_enabled if self.bars[index].is_io else self.memory_enabled
