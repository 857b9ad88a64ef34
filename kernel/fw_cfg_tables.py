"""The fw_cfg blobs firmware (SeaBIOS) reads: e820 map, ACPI tables + loader script, boot order.

Everything here is pure: bytes in, bytes out.  :func:`platform_items` puts
them into a fw_cfg device (``vmm.devices.fw_cfg.FwCfg`` or anything with its
``add_item`` / ``add_file``).

What SeaBIOS takes from fw_cfg (its ``src/fw/paravirt.c``, ``boot.c``,
``romfile_loader.c``), and what this module gives it
------------------------------------------------------------------------------
``etc/e820``         {le64 address, le64 length, le32 type} per entry, 20 bytes
                     each, no header.  SeaBIOS uses only RAM (1) and RESERVED (2)
                     entries, ignores RAM below the low-RAM size it took from
                     CMOS and extends RAM above it (and above 4 GiB) from here.
                     Give it QEMU's kind of map (:func:`firmware_e820`): whole
                     RAM regions plus reservations; SeaBIOS lays out the first
                     MiB itself.
``etc/boot-cpus``    le16, CPUs present at boot (else SeaBIOS reads CMOS 0x5F).
``etc/table-loader`` the ACPI linker/loader script, :func:`acpi_loader_files`.
``etc/acpi/tables``, ``etc/acpi/rsdp``  the blobs that script loads.
``bootorder``        OpenFirmware device paths, one a line, :func:`bootorder_file`.
``etc/boot-fail-wait`` le32 milliseconds before rebooting after no device
                     booted; -1 (0xFFFFFFFF) never reboots.  SeaBIOS: 60 s
                     when the file is absent.
``etc/sercon-port``  le16 I/O port: SeaBIOS's text output (int 10h) goes to that
                     UART as well (SeaBIOS built with CONFIG_SERCON); 0 or absent:
                     off.
Legacy items: FW_CFG_MAX_CPUS (SeaBIOS's "etc/max-cpus"), FW_CFG_BOOT_MENU (its
"etc/show-boot-menu"; SeaBIOS maps the two names onto these numeric items, so
they are not also added as files), FW_CFG_IRQ0_OVERRIDE, and for other
firmware FW_CFG_RAM_SIZE and FW_CFG_NB_CPUS.

The ACPI table loader (QEMU's ``hw/acpi/bios-linker-loader.c``)
---------------------------------------------------------------
"etc/table-loader" is a sequence of 128-byte commands, each a le32 command
number followed by its fields (little-endian, names NUL-padded to 56 bytes),
the rest zero:

=================  ==  ======================================================
ALLOCATE            1  file[56], le32 align, u8 zone (1 HIGH, 2 FSEG): load the
                       file into guest RAM at that alignment and zone.  Comes
                       before any command that names the file.
ADD_POINTER         2  dest_file[56], src_file[56], le32 offset, u8 size
                       (1/2/4/8): the ``size``-byte little-endian number at
                       ``offset`` in dest gets the load address of src added.
ADD_CHECKSUM        3  file[56], le32 offset, le32 start, le32 length: the byte
                       at ``offset`` has the 8-bit sum of [start, start+length)
                       subtracted, so that the range sums to 0.
WRITE_POINTER       4  (firmware writes an address back to a fw_cfg file; not
                       used here.)
=================  ==  ======================================================

As in QEMU, every pointer field in the blobs holds the offset of its target
within the target's file, and every checksum byte is 0.  SeaBIOS subtracts the
range's sum from the byte, which is right whatever the byte held (it lies in
the range); a loader that instead stores the negated sum of the range, byte
included (OVMF's way), is right only when the byte starts at 0.  The commands come
in this order: ALLOCATE "etc/acpi/tables" (HIGH), ALLOCATE "etc/acpi/rsdp"
(FSEG, 16-byte aligned, where the OS scans for it), then for each table in the
order :func:`kernel.acpi.build_tables` gives them, RSDP last, its ADD_POINTERs
then its ADD_CHECKSUMs in the order the table lists them (the RSDP's extended
checksum after its first one).  Once the firmware has run the script, the
tables are byte for byte what :func:`kernel.acpi.build` makes for direct
kernel boot at the same addresses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from kernel import acpi
from kernel.e820 import E820_ENTRY, E820_TYPE_RAM, E820_TYPE_RESERVED, E820Entry

# --- fw_cfg keys used here (the same numbers as vmm.devices.fw_cfg; this layer
# does not import the device) -------------------------------------------------
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_IRQ0_OVERRIDE = 0x8002

# --- file names ------------------------------------------------------------
E820_FILE = "etc/e820"
ACPI_TABLES_FILE = "etc/acpi/tables"
ACPI_RSDP_FILE = "etc/acpi/rsdp"
TABLE_LOADER_FILE = "etc/table-loader"
BOOTORDER_FILE = "bootorder"
BOOT_CPUS_FILE = "etc/boot-cpus"
BOOT_FAIL_WAIT_FILE = "etc/boot-fail-wait"
SERCON_PORT_FILE = "etc/sercon-port"

# --- table loader ----------------------------------------------------------
LOADER_FILESZ = 56
LOADER_ENTRY_SIZE = 128
COMMAND_ALLOCATE = 1
COMMAND_ADD_POINTER = 2
COMMAND_ADD_CHECKSUM = 3
COMMAND_WRITE_POINTER = 4
ZONE_HIGH = 1
ZONE_FSEG = 2

TABLES_FILE_ALIGN = 64  # QEMU's alignment for "etc/acpi/tables"
RSDP_FILE_ALIGN = 16

_ALLOCATE = struct.Struct("<I56sIB")
_ADD_POINTER = struct.Struct("<I56s56sIB")
_ADD_CHECKSUM = struct.Struct("<I56sIII")


@dataclass(frozen=True)
class Allocate:
    file: str
    align: int
    zone: int

    def pack(self) -> bytes:
        return _entry(_ALLOCATE.pack(COMMAND_ALLOCATE, _name(self.file), self.align, self.zone))


@dataclass(frozen=True)
class AddPointer:
    dest_file: str
    src_file: str
    offset: int
    size: int

    def pack(self) -> bytes:
        return _entry(_ADD_POINTER.pack(COMMAND_ADD_POINTER, _name(self.dest_file),
                                        _name(self.src_file), self.offset, self.size))


@dataclass(frozen=True)
class AddChecksum:
    file: str
    offset: int
    start: int
    length: int

    def pack(self) -> bytes:
        return _entry(_ADD_CHECKSUM.pack(COMMAND_ADD_CHECKSUM, _name(self.file),
                                         self.offset, self.start, self.length))


LoaderCommand = Allocate | AddPointer | AddChecksum


def _name(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= LOADER_FILESZ:
        raise ValueError(f"loader file name {name!r} is longer than {LOADER_FILESZ - 1} bytes")
    return raw


def _entry(packed: bytes) -> bytes:
    return packed.ljust(LOADER_ENTRY_SIZE, b"\0")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_table_loader(blob: bytes) -> list[LoaderCommand | int]:
    """The commands of a loader script; an unknown command comes back as its
    number (firmware skips those).  ValueError if the size is not a multiple of 128."""
    if len(blob) % LOADER_ENTRY_SIZE:
        raise ValueError(f"table-loader size {len(blob)} is not a multiple of {LOADER_ENTRY_SIZE}")
    out: list[LoaderCommand | int] = []
    for pos in range(0, len(blob), LOADER_ENTRY_SIZE):
        entry = blob[pos:pos + LOADER_ENTRY_SIZE]
        command = struct.unpack_from("<I", entry)[0]
        if command == COMMAND_ALLOCATE:
            _, file, align, zone = _ALLOCATE.unpack_from(entry)
            out.append(Allocate(_cstr(file), align, zone))
        elif command == COMMAND_ADD_POINTER:
            _, dest, src, offset, size = _ADD_POINTER.unpack_from(entry)
            out.append(AddPointer(_cstr(dest), _cstr(src), offset, size))
        elif command == COMMAND_ADD_CHECKSUM:
            _, file, offset, start, length = _ADD_CHECKSUM.unpack_from(entry)
            out.append(AddChecksum(_cstr(file), offset, start, length))
        else:
            out.append(command)
    return out


def _pow2_at_least(value: int, minimum: int) -> int:
    result = minimum
    while result < value:
        result <<= 1
    return result


def acpi_loader_files(tables: Sequence[acpi.Table]) -> dict[str, bytes]:
    """"etc/acpi/rsdp", "etc/acpi/tables" and "etc/table-loader" for the tables
    of :func:`kernel.acpi.build_tables` (one of them named "RSDP")."""
    rsdp = [t for t in tables if t.name == "RSDP"]
    if len(rsdp) != 1:
        raise ValueError("the tables need exactly one RSDP")
    root = rsdp[0]
    rest = [t for t in tables if t is not root]
    for table in tables:
        if table.alignment <= 0 or table.alignment & (table.alignment - 1):
            raise ValueError(f"{table.name}: alignment {table.alignment} is not a power of 2")
    if root.alignment > RSDP_FILE_ALIGN:
        raise ValueError("the RSDP cannot need more than 16-byte alignment")
    offsets, end = acpi.place(rest, 0)
    files = {name: ACPI_TABLES_FILE for name in offsets}
    offsets[root.name] = 0
    files[root.name] = ACPI_RSDP_FILE
    tables_align = _pow2_at_least(max((t.alignment for t in rest), default=1), TABLES_FILE_ALIGN)

    blobs = {ACPI_TABLES_FILE: bytearray(end), ACPI_RSDP_FILE: bytearray(len(root.data))}
    commands: list[LoaderCommand] = [
        Allocate(ACPI_TABLES_FILE, tables_align, ZONE_HIGH),
        Allocate(ACPI_RSDP_FILE, RSDP_FILE_ALIGN, ZONE_FSEG),
    ]
    for table in rest + [root]:
        base, file = offsets[table.name], files[table.name]
        data = bytearray(table.data)
        for ptr in table.pointers:
            if ptr.target not in offsets:
                raise ValueError(f"{table.name}: pointer to unknown table {ptr.target!r}")
            if ptr.size not in (1, 2, 4, 8) or ptr.offset + ptr.size > len(data):
                raise ValueError(f"{table.name}: bad pointer field {ptr}")
            value = offsets[ptr.target]
            if value >= 1 << (8 * ptr.size):
                raise ValueError(f"{table.name}: offset {value:#x} of {ptr.target} does not fit "
                                 f"in {ptr.size} bytes")
            data[ptr.offset:ptr.offset + ptr.size] = value.to_bytes(ptr.size, "little")
            commands.append(AddPointer(file, files[ptr.target], base + ptr.offset, ptr.size))
        for cs in table.checksums:
            if not (0 <= cs.offset < len(data) and cs.start + cs.length <= len(data)):
                raise ValueError(f"{table.name}: bad checksum field {cs}")
            data[cs.offset] = 0
        for cs in table.checksums:
            commands.append(AddChecksum(file, base + cs.offset, base + cs.start, cs.length))
        blobs[file][base:base + len(data)] = data
    return {
        ACPI_RSDP_FILE: bytes(blobs[ACPI_RSDP_FILE]),
        ACPI_TABLES_FILE: bytes(blobs[ACPI_TABLES_FILE]),
        TABLE_LOADER_FILE: b"".join(c.pack() for c in commands),
    }


# ----------------------------------------------------------------- e820


def e820_file(entries: Iterable[E820Entry | tuple[int, int, int]]) -> bytes:
    """"etc/e820": {le64 address, le64 length, le32 type} per entry."""
    out = bytearray()
    for entry in entries:
        if not isinstance(entry, E820Entry):
            entry = E820Entry(*entry)
        out += E820_ENTRY.pack(entry.addr, entry.size, entry.type)
    return bytes(out)


def firmware_e820(regions, reserved: Iterable = ()) -> list[E820Entry]:
    """QEMU's kind of map for firmware: every RAM region (``GuestMemory.regions``,
    anything with ``gpa`` and ``size``) whole, then the ``reserved`` ranges
    (E820Entry, (addr, size) or (addr, size, type)), sorted by address.  The
    legacy areas below 1 MiB are the firmware's business, not reserved here."""
    out = [E820Entry(r.gpa, r.size, E820_TYPE_RAM) for r in regions if r.size > 0]
    for item in reserved:
        entry = item if isinstance(item, E820Entry) else E820Entry(*item) if len(item) == 3 \
            else E820Entry(item[0], item[1], E820_TYPE_RESERVED)
        if entry.size > 0:
            out.append(entry)
    return sorted(out, key=lambda e: (e.addr, e.size))


# ----------------------------------------------------------------- boot order

FW_PCI_ROOT = "/pci@i0cf8"  # the PCI root bus reached through ports 0xCF8/0xCFC

# The device name (QEMU names PCI devices after their class: 0x01 storage
# "scsi", 0x02 network "ethernet") and the child node QEMU appends.
_PCI_KINDS = {
    "disk": ("scsi", "/disk@0,0"),  # virtio-blk-pci
    "net": ("ethernet", "/ethernet-phy@0"),  # a NIC, booted through its option ROM
}


def pci_device_path(slot: int, function: int = 0, kind: str = "disk", *, name: str | None = None,
                    bus_path: str = FW_PCI_ROOT) -> str:
    """The OpenFirmware path of a device on the root PCI bus, as QEMU writes it
    into "bootorder": ``/pci@i0cf8/scsi@3/disk@0,0`` for a virtio-blk disk in
    slot 3, ``/pci@i0cf8/ethernet@a,1/ethernet-phy@0`` for a NIC at slot 10,
    function 1.  ``name`` replaces the class name.

    Slot and function are lower-case hex, the function only when not 0.
    SeaBIOS looks a virtio-blk disk up with the glob ``/pci@i0cf8/*@SLOT[,FN]``
    (``bootprio_find_pci_device``) and a PCI option ROM, a NIC's PXE ROM
    among them, with the same glob (``bootprio_find_pci_rom``; ``:romN``
    appended for a ROM's further boot entries).  ``*`` stands for any run of
    characters other than ``/``, and a line matches when it starts with the
    glob and goes on with ``/`` or ends: the name before ``@`` and anything
    after the device are free.  The names and children here are QEMU's.
    """
    if not 0 <= slot < 32 or not 0 <= function < 8:
        raise ValueError(f"bad PCI slot/function {slot}.{function}")
    try:
        default_name, child = _PCI_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown boot device kind {kind!r} (disk or net)") from None
    unit = f"{slot:x}" + (f",{function:x}" if function else "")
    return f"{bus_path}/{name or default_name}@{unit}{child}"


HALT = "HALT"  # a bootorder line: boot nothing after the devices above it


def bootorder_file(paths: Iterable[str], *, strict: bool = False) -> bytes:
    """"bootorder": the device paths in boot order, one a line (SeaBIOS's boot
    priority is the line number).  ``strict`` appends "HALT", so SeaBIOS tries
    no device that is not listed.  The file has no trailing newline or NUL."""
    lines = list(paths)
    for line in lines:
        if not line or "\n" in line or "\0" in line:
            raise ValueError(f"bad boot device path {line!r}")
    if strict:
        lines.append(HALT)
    return "\n".join(lines).encode("ascii")


# ----------------------------------------------------------------- all of it


def platform_items(fw, *, ram_below_4g: int, ram_above_4g: int, cpus: int,
                   e820: Iterable[E820Entry | tuple[int, int, int]],
                   acpi_tables: Sequence[acpi.Table],
                   bootorder: Iterable[str] | None = None,
                   strict_boot: bool = False,
                   max_cpus: int | None = None,
                   boot_menu: bool = False,
                   boot_fail_wait_ms: int | None = None,
                   sercon_port: int | None = None) -> dict[str, int]:
    """Fill ``fw`` with what SeaBIOS needs.  ``max_cpus``: highest APIC id + 1
    (default ``cpus``); ``boot_fail_wait_ms``: -1 never reboots, None leaves
    SeaBIOS's 60 s.  Returns the selectors of the files added, by name."""
    if cpus < 1 or (max_cpus is not None and max_cpus < cpus):
        raise ValueError("bad CPU counts")
    fw.add_item(FW_CFG_RAM_SIZE, struct.pack("<Q", ram_below_4g + ram_above_4g))
    fw.add_item(FW_CFG_NB_CPUS, struct.pack("<H", cpus))
    fw.add_item(FW_CFG_MAX_CPUS, struct.pack("<H", max_cpus or cpus))
    fw.add_item(FW_CFG_BOOT_MENU, struct.pack("<H", 1 if boot_menu else 0))
    fw.add_item(FW_CFG_IRQ0_OVERRIDE, struct.pack("<I", 1))  # ISA IRQ 0 -> GSI 2, as the MADT says

    files: dict[str, bytes] = {E820_FILE: e820_file(e820), BOOT_CPUS_FILE: struct.pack("<H", cpus)}
    files.update(acpi_loader_files(acpi_tables))
    if bootorder is not None:
        files[BOOTORDER_FILE] = bootorder_file(bootorder, strict=strict_boot)
    if boot_fail_wait_ms is not None:
        files[BOOT_FAIL_WAIT_FILE] = struct.pack("<i" if boot_fail_wait_ms < 0 else "<I", boot_fail_wait_ms)
    if sercon_port is not None:
        files[SERCON_PORT_FILE] = struct.pack("<H", sercon_port)
    return {name: fw.add_file(name, data) for name, data in files.items()}

