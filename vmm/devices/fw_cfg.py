"""QEMU's firmware configuration device (fw_cfg), x86 port-I/O flavour, with DMA.

Firmware (SeaBIOS, OVMF) reads the machine's configuration through it: RAM
size, CPU counts, the e820 map, the ACPI tables with their linker/loader
script, the boot order.  The interface is QEMU's, as documented in QEMU's
``docs/specs/fw_cfg.rst``; this is an independent implementation of it.

Registers (I/O ports; the device takes offsets from ``BASE_PORT`` 0x510)
-----------------------------------------------------------------------
0x510  selector, 16-bit write (little-endian, as any port write).  Selects an
       item and sets its read offset to 0.  Bit 15 (``FW_CFG_ARCH_LOCAL``)
       picks the architecture-specific bank; bit 14 (``FW_CFG_WRITE_CHANNEL``)
       once asked for write mode and is ignored for the lookup, as in QEMU.
       Reads as 0.
0x511  data, 8-bit read: the next byte of the selected item; past the item's
       end (or for a selector with no item) reads give 0.  A wider read gives
       the next bytes in increasing order (the spec's "substring" rule).
       Writes are ignored (QEMU dropped data-port writes in v2.4).
0x514  DMA address, big-endian, 64 bits: the high half as a 32-bit write at
       0x514, then the low half as a 32-bit write at 0x518, which starts the
       transfer; or one 64-bit write at 0x514.  The register is 0 after every
       transfer, so a 32-bit guest writes only the low half.  Port values are
       little-endian integers of the bytes on the bus: the bytes are the
       big-endian address, so the device byte-swaps them (the guest did
       ``cpu_to_be32``).  Reads give the bytes of ``"QEMU CFG"`` at that
       offset (the DMA signature 0x51454d5520434647 read big-endian).
0x512-0x513 are not decoded and read as all-ones.

DMA
---
The guest writes the address of a ``FWCfgDmaAccess`` {be32 control; be32
length; be64 address}.  Control bits: ERROR 0x01, READ 0x02, SKIP 0x04,
SELECT 0x08 (selector in bits 31:16, applied first), WRITE 0x10.  READ copies
``length`` bytes of the current item from the current offset to guest memory
(zeros past the item's end); WRITE copies guest memory into the item, only for
items added ``writable`` and only when it fits wholly (else ERROR, nothing
written); SKIP advances the offset.  READ wins over WRITE, WRITE over SKIP; with
none of them nothing moves.  When done the device stores the control word
back: 0 for success or ERROR.  A control block or buffer that is not wholly
guest RAM gives ERROR (the control word is written back only if it is RAM);
guest mistakes never raise.

Items
-----
Legacy numeric items are added with :meth:`FwCfg.add_item`; named "files"
with :meth:`FwCfg.add_file`, which gives selectors from ``FW_CFG_FILE_FIRST``
(0x20) up in the order they are added.  The file directory (``FW_CFG_FILE_DIR``)
lists them sorted by name, as QEMU lists them; each entry carries its own
selector, so selectors stay what ``add_file`` returned.  ``FW_CFG_SIGNATURE``
("QEMU") and ``FW_CFG_ID`` (traditional + DMA) are always present.

Locking: one lock guards the state; a DMA transfer runs with it held.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass

from vmm.memory import GuestMemoryError

log = logging.getLogger(__name__)

# --- ports ------------------------------------------------------------------
BASE_PORT = 0x510
SELECTOR_PORT = 0x510
DATA_PORT = 0x511
DMA_PORT = 0x514  # high half of the DMA address register
DMA_PORT_LOW = 0x518  # low half; a write here starts the transfer
PORT_RANGE_SIZE = 12  # 0x510..0x51B

SELECTOR_OFFSET = SELECTOR_PORT - BASE_PORT
DATA_OFFSET = DATA_PORT - BASE_PORT
DMA_OFFSET = DMA_PORT - BASE_PORT
DMA_LOW_OFFSET = DMA_PORT_LOW - BASE_PORT
DMA_REGISTER_SIZE = 8

# --- selector keys (QEMU docs/specs/fw_cfg.rst, include/standard-headers/linux/qemu_fw_cfg.h)
FW_CFG_SIGNATURE = 0x00  # "QEMU"
FW_CFG_ID = 0x01  # le32 feature bitmap
FW_CFG_UUID = 0x02  # 16 bytes
FW_CFG_RAM_SIZE = 0x03  # le64, all guest RAM in bytes
FW_CFG_NOGRAPHIC = 0x04  # le16
FW_CFG_NB_CPUS = 0x05  # le16, CPUs present at boot
FW_CFG_MACHINE_ID = 0x06  # le32
FW_CFG_KERNEL_ADDR = 0x07  # le32
FW_CFG_KERNEL_SIZE = 0x08  # le32
FW_CFG_KERNEL_CMDLINE = 0x09  # le32 (address)
FW_CFG_INITRD_ADDR = 0x0A  # le32
FW_CFG_INITRD_SIZE = 0x0B  # le32
FW_CFG_BOOT_DEVICE = 0x0C  # le16
FW_CFG_NUMA = 0x0D  # le64 node count, then per-CPU and per-node le64s
FW_CFG_BOOT_MENU = 0x0E  # le16: SeaBIOS's "etc/show-boot-menu"
FW_CFG_MAX_CPUS = 0x0F  # le16: SeaBIOS's "etc/max-cpus" (highest APIC id + 1)
FW_CFG_KERNEL_ENTRY = 0x10  # le32
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13  # le32
FW_CFG_CMDLINE_SIZE = 0x14  # le32
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16  # le32
FW_CFG_SETUP_SIZE = 0x17  # le32
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_INVALID = 0xFFFF

# x86 architecture-local items (QEMU hw/i386/fw_cfg.h)
FW_CFG_ACPI_TABLES = FW_CFG_ARCH_LOCAL + 0
FW_CFG_SMBIOS_ENTRIES = FW_CFG_ARCH_LOCAL + 1
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3
FW_CFG_HPET = FW_CFG_ARCH_LOCAL + 4

# FW_CFG_ID bits
FW_CFG_VERSION = 0x01  # traditional interface
FW_CFG_VERSION_DMA = 0x02

# FWCfgDmaAccess control bits
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10

SIGNATURE = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"  # the DMA register's bytes; as a big-endian u64:
DMA_SIGNATURE_VALUE = 0x51454D5520434647

FW_CFG_MAX_FILE_PATH = 56  # name bytes in a directory entry, NUL included
FILE_DIR_HEADER = struct.Struct(">I")  # count
FILE_DIR_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name
DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address

_FILL_CHUNK = 1 << 20  # zero-fill guest memory this much at a time
_ZEROS = bytes(_FILL_CHUNK)


@dataclass
class _Item:
    data: bytearray
    writable: bool = False


def _key(selector: int) -> int:
    """The lookup key of a selector: the bank bit and the index, not the write bit."""
    return selector & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK)


class FwCfg:
    """The fw_cfg device at ports 0x510-0x51B; DMA goes to ``mem`` (a GuestMemory)."""

    def __init__(self, mem) -> None:
        self._mem = mem
        self._lock = threading.Lock()
        self._items: dict[int, _Item] = {}
        self._files: dict[str, int] = {}  # name -> selector
        self._next_file = FW_CFG_FILE_FIRST
        self._selector = FW_CFG_SIGNATURE
        self._offset = 0
        self._dma_addr = 0
        self._items[FW_CFG_SIGNATURE] = _Item(bytearray(SIGNATURE))
        self._items[FW_CFG_ID] = _Item(bytearray(struct.pack("<I", FW_CFG_VERSION | FW_CFG_VERSION_DMA)))
        self._update_dir()

    # ------------------------------------------------------------------ host side

    def add_item(self, selector: int, data: bytes) -> None:
        """Add (or replace) a legacy numeric item, e.g. FW_CFG_NB_CPUS with le16 bytes."""
        if not 0 <= selector <= 0xFFFF or selector & FW_CFG_WRITE_CHANNEL:
            raise ValueError(f"bad fw_cfg selector {selector:#x}")
        key = _key(selector)
        if key in (FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_FILE_DIR) or FW_CFG_FILE_FIRST <= key < FW_CFG_ARCH_LOCAL:
            raise ValueError(f"fw_cfg selector {selector:#x} is reserved (signature, id, directory or files)")
        with self._lock:
            self._items[key] = _Item(bytearray(data))

    def add_file(self, name: str, data: bytes, *, writable: bool = False) -> int:
        """Add a named file; returns its selector (0x20 up, in the order added)."""
        raw = name.encode("ascii")
        if not raw or len(raw) >= FW_CFG_MAX_FILE_PATH or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-{FW_CFG_MAX_FILE_PATH - 1} ASCII bytes")
        if len(data) >= 1 << 32:
            raise ValueError(f"fw_cfg file {name!r} is too large")
        with self._lock:
            if name in self._files:
                raise ValueError(f"fw_cfg file {name!r} already exists")
            if self._next_file > FW_CFG_ENTRY_MASK:
                raise ValueError("no fw_cfg file selectors left")
            selector = self._next_file
            self._next_file += 1
            self._files[name] = selector
            self._items[selector] = _Item(bytearray(data), writable)
            self._update_dir()
        return selector

    def file_data(self, name: str) -> bytes:
        """The current contents of a file (KeyError if there is none)."""
        with self._lock:
            return bytes(self._items[self._files[name]].data)

    def reset(self) -> None:
        """Power-on state: signature selected, offset 0, DMA address 0 (items kept)."""
        with self._lock:
            self._select(FW_CFG_SIGNATURE)
            self._dma_addr = 0

    # ------------------------------------------------------------------ port I/O

    def read(self, offset: int, size: int) -> int:
        """The register at ``offset`` decides the whole access (no access reaches two)."""
        with self._lock:
            if offset == DATA_OFFSET:
                out = self._read_data(size)  # a wide read: the next bytes of the item
            elif offset == SELECTOR_OFFSET:
                out = bytes(size)
            elif DMA_OFFSET <= offset < DMA_OFFSET + DMA_REGISTER_SIZE:
                out = DMA_SIGNATURE[offset - DMA_OFFSET:offset - DMA_OFFSET + size].ljust(size, b"\xff")
            else:
                out = b"\xff" * size
            return int.from_bytes(out, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == SELECTOR_OFFSET and size == 2:
                self._select(value & 0xFFFF)
            elif offset == DMA_OFFSET and size == 4:
                self._dma_addr = self._be(value, 4) << 32
            elif offset == DMA_LOW_OFFSET and size == 4:
                self._dma_addr |= self._be(value, 4)
                self._dma_transfer()
            elif offset == DMA_OFFSET and size == 8:
                self._dma_addr = self._be(value, 8)
                self._dma_transfer()
            else:
                log.debug("fw_cfg: ignoring %d-byte write of %#x at offset %d", size, value, offset)

    # ------------------------------------------------------------------ with the lock held

    @staticmethod
    def _be(value: int, size: int) -> int:
        """The big-endian number in the bytes of a little-endian port value."""
        return int.from_bytes((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), "big")

    def _update_dir(self) -> None:
        entries = sorted(self._files.items())
        out = bytearray(FILE_DIR_HEADER.pack(len(entries)))
        for name, selector in entries:
            out += FILE_DIR_ENTRY.pack(len(self._items[selector].data), selector, 0, name.encode("ascii"))
        self._items[FW_CFG_FILE_DIR] = _Item(out)

    def _select(self, selector: int) -> None:
        self._selector = selector
        self._offset = 0

    def _current(self) -> _Item | None:
        return self._items.get(_key(self._selector))

    def _read_data(self, n: int) -> bytes:
        item = self._current()
        if item is None or self._offset >= len(item.data):
            return bytes(n)
        chunk = bytes(item.data[self._offset:self._offset + n])
        self._offset += len(chunk)
        return chunk + bytes(n - len(chunk))

    def _dma_transfer(self) -> None:
        addr, self._dma_addr = self._dma_addr, 0
        try:
            control, length, address = DMA_ACCESS.unpack(self._mem.read(addr, DMA_ACCESS.size))
        except (GuestMemoryError, ValueError, OverflowError):
            log.debug("fw_cfg: DMA control block at %#x is not RAM", addr)
            self._store_control(addr, FW_CFG_DMA_CTL_ERROR)
            return
        if control & FW_CFG_DMA_CTL_SELECT:
            self._select(control >> 16)
        if control & FW_CFG_DMA_CTL_READ:
            op = FW_CFG_DMA_CTL_READ
        elif control & FW_CFG_DMA_CTL_WRITE:
            op = FW_CFG_DMA_CTL_WRITE
        elif control & FW_CFG_DMA_CTL_SKIP:
            op = FW_CFG_DMA_CTL_SKIP
        else:
            op, length = 0, 0
        result = 0
        if length:
            result = self._dma_move(op, length, address)
        self._store_control(addr, result)

    def _dma_move(self, op: int, length: int, address: int) -> int:
        """Do one transfer of ``length`` bytes; returns 0 or FW_CFG_DMA_CTL_ERROR."""
        item = self._current()
        available = 0 if item is None else max(0, len(item.data) - self._offset)
        n = min(length, available)  # bytes that come from (or go to) the item
        if op == FW_CFG_DMA_CTL_SKIP:
            self._offset += n
            return 0
        if not self._mem.contains(address, length):
            log.debug("fw_cfg: DMA buffer %#x+%#x is not RAM", address, length)
            return FW_CFG_DMA_CTL_ERROR
        if op == FW_CFG_DMA_CTL_READ:
            if n:
                self._mem.write(address, item.data[self._offset:self._offset + n])
                self._offset += n
            self._zero_fill(address + n, length - n)  # past the end of the item
            return 0
        # WRITE: only one that lies wholly inside a writable item is done.
        if item is None or not item.writable or n != length:
            return FW_CFG_DMA_CTL_ERROR
        item.data[self._offset:self._offset + n] = self._mem.read(address, n)
        self._offset += n
        return 0

    def _zero_fill(self, address: int, length: int) -> None:
        """Zeros to guest RAM already checked, a chunk at a time (``length`` is the guest's)."""
        while length:
            n = min(length, _FILL_CHUNK)
            self._mem.write(address, _ZEROS[:n])
            address += n
            length -= n

    def _store_control(self, addr: int, control: int) -> None:
        try:
            self._mem.write(addr, struct.pack(">I", control))
        except (GuestMemoryError, ValueError, OverflowError):
            pass
