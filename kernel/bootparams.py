"""struct boot_params, the "zero page" (Documentation/arch/x86/zero-page.rst).

A 4096-byte page the 64-bit entry finds through RSI.  Its setup header part
(0x1f1 onwards) is a copy of the image's header with the loader's fields
written in; the rest carries the e820 map, the ACPI RSDP address and the high
halves of the initrd and command line pointers.
"""

from __future__ import annotations

import struct

from .bzimage import (
    BOOT_FLAG_MAGIC,
    CAN_USE_HEAP,
    FIELD_OFFSETS,
    HDRS_MAGIC,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
)
from .e820 import E820_ENTRY, E820_MAX_ENTRIES_ZEROPAGE, E820Entry
from .errors import KernelImageError

BOOT_PARAMS_SIZE = 4096

# Zero page offsets outside the setup header (zero-page.rst).
ACPI_RSDP_ADDR = 0x070          # u64
EXT_RAMDISK_IMAGE = 0x0C0       # u32: ramdisk_image high 32 bits
EXT_RAMDISK_SIZE = 0x0C4        # u32: ramdisk_size high 32 bits
EXT_CMD_LINE_PTR = 0x0C8        # u32: cmd_line_ptr high 32 bits
E820_ENTRIES = 0x1E8            # u8
SENTINEL = 0x1EF                # u8: must stay 0, or the kernel wipes fields it distrusts
E820_TABLE = 0x2D0              # struct boot_e820_entry[128]

# type_of_loader: "undefined" boot loader.
LOADER_TYPE_UNDEFINED = 0xFF

# What pyvmm writes when the kernel is a bare vmlinux with no setup header.
SYNTHETIC_BOOT_PROTOCOL = 0x020F
SYNTHETIC_KERNEL_ALIGNMENT = 0x200000      # CONFIG_PHYSICAL_ALIGN default on x86-64
DEFAULT_CMDLINE_SIZE = 2047                # COMMAND_LINE_SIZE (2048) - 1


class BootParams:
    """A zero page being filled in: header fields by name, the rest by offset."""

    def __init__(self, setup_header: bytes | None = None):
        self.data = bytearray(BOOT_PARAMS_SIZE)
        if setup_header is None:
            self.synthesize_header()
        else:
            end = SETUP_HEADER_OFFSET + len(setup_header)
            if end > E820_TABLE:
                raise KernelImageError(f"setup header is {len(setup_header)} bytes, too long")
            self.data[SETUP_HEADER_OFFSET:end] = setup_header

    # -- setup header fields ---------------------------------------------------
    def __getitem__(self, name: str) -> int:
        offset, fmt = FIELD_OFFSETS[name]
        return struct.unpack_from("<" + fmt, self.data, offset)[0]

    def __setitem__(self, name: str, value: int) -> None:
        offset, fmt = FIELD_OFFSETS[name]
        struct.pack_into("<" + fmt, self.data, offset, value)

    def synthesize_header(self) -> None:
        """The minimal header a bare vmlinux needs (it has none of its own)."""
        self["boot_flag"] = BOOT_FLAG_MAGIC
        self["header"] = HDRS_MAGIC
        self["version"] = SYNTHETIC_BOOT_PROTOCOL
        self["vid_mode"] = 0xFFFF                  # "normal"
        self["loadflags"] = LOADED_HIGH
        self["kernel_alignment"] = SYNTHETIC_KERNEL_ALIGNMENT
        self["cmdline_size"] = DEFAULT_CMDLINE_SIZE

    # -- what the loader writes --------------------------------------------------
    def set_loader(self, heap_end_ptr: int) -> None:
        """type_of_loader, and a valid heap_end_ptr (loadflags CAN_USE_HEAP)."""
        self["type_of_loader"] = LOADER_TYPE_UNDEFINED
        self["heap_end_ptr"] = heap_end_ptr
        self["loadflags"] = self["loadflags"] | CAN_USE_HEAP

    def set_cmdline(self, gpa: int) -> None:
        self["cmd_line_ptr"] = gpa & 0xFFFFFFFF
        self._put("<I", EXT_CMD_LINE_PTR, gpa >> 32)

    def set_initrd(self, gpa: int, size: int) -> None:
        self["ramdisk_image"] = gpa & 0xFFFFFFFF
        self["ramdisk_size"] = size & 0xFFFFFFFF
        self._put("<I", EXT_RAMDISK_IMAGE, gpa >> 32)
        self._put("<I", EXT_RAMDISK_SIZE, size >> 32)

    def set_e820(self, table: list[E820Entry]) -> None:
        if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
            raise KernelImageError(
                f"e820 map has {len(table)} entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
        self.data[E820_ENTRIES] = len(table)
        for i, entry in enumerate(table):
            E820_ENTRY.pack_into(self.data, E820_TABLE + i * E820_ENTRY.size,
                                 entry.addr, entry.size, entry.type)

    def set_acpi_rsdp(self, gpa: int) -> None:
        self._put("<Q", ACPI_RSDP_ADDR, gpa)

    def _put(self, fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, self.data, offset, value)

    def to_bytes(self) -> bytes:
        return bytes(self.data)
