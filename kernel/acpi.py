"""ACPI tables for a pyvmm guest.

Debian's 6.1 cloud kernel has no MP-table parser, so the guest finds its
CPUs, the I/O APIC, the PCI root bridge and the serial ports only through
ACPI: RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG}.  For direct kernel boot
the platform is *hardware-reduced* ACPI (no PM1/GPE blocks, no SCI):
power-off goes through the FADT's SLEEP_CONTROL_REG and reset through
RESET_REG, both I/O ports.

A firmware boot needs the full (PC) form instead (``AcpiConfig.pm1``): the
BIOS uses the 8259 PIC and the PIT, and leaves the PIT's IRQ 0 unmasked at
the BIOS's vector 8 with LINT0 in ExtINT mode.  An OS told the platform is
hardware-reduced never touches the 8259 (Linux: "no legacy PIC"), so that
tick arrives as a double fault the moment it enables interrupts.  With a
full FADT (PM1a event and control blocks, SCI, a FACS) the OS knows the
8259 is there and masks and reprograms it, as on any PC.

Building happens in two steps so that the same tables serve two ways of
publishing them:

1. :func:`build_tables` makes each table as bytes (a :class:`Table`) together
   with the pointer fields it holds (offset, size, name of the target table)
   and its checksum fields.  Pointer fields are left 0.
2. :func:`link` patches the pointer fields with the targets' addresses and
   then computes every checksum.

For direct kernel boot, :func:`build` lays the tables out at fixed guest
physical addresses (by default from 0xE0000, where Linux also scans for the
RSDP) and returns ``{gpa: bytes}``.  For firmware loading through fw_cfg's
"etc/table-loader", the same :class:`Table` list maps onto ALLOCATE,
ADD_POINTER (``Table.pointers``) and ADD_CHECKSUM (``Table.checksums``)
commands: :func:`link` with file offsets in place of addresses gives the
blob contents that the loader then relocates.

Footprint (see :func:`footprint`), laid out from 0xE0000: with one serial
port, PCI with ECAM and a 64-bit window, 2452 bytes for 1 CPU, + 8 bytes per
CPU up to 255, + 16 bytes per CPU beyond (2460 for 2 CPUs, 2956 for 64, 4484
for 255, 5220 for 300, 16804 for 1024).  The BIOS area [0xE0000, 0x100000)
holds the set for up to 8165 CPUs, well past KVM's vCPU limit; a larger set
(or large extra tables) can be spilled to a caller-given ``high_addr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from kernel import aml
from kernel.acpi_ged import GedConfig, ged_aml, power_button_aml

# ----------------------------------------------------------------- constants

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has XsdtAddress, Length, Extended Checksum
RSDP_LENGTH = 36
HEADER_LENGTH = 36  # System Description Table Header
HEADER_CHECKSUM_OFFSET = 9

XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_VERSION = 5  # ACPI 6.5
FADT_LENGTH = 276
MADT_REVISION = 5
DSDT_REVISION = 2  # 2 or more: AML integers are 64 bits
MCFG_REVISION = 1

# FADT Fixed Feature Flags (5.2.9, Table 5.10)
PWR_BUTTON = 1 << 4  # no fixed-feature power button
SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
RESET_REG_SUP = 1 << 10
HW_REDUCED_ACPI = 1 << 20

# FADT IA-PC Boot Architecture Flags (5.2.9.3)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Generic Address Structure (5.2.3.2)
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# Sleep Control Register (4.8.3.7): the guest writes
# (SLP_TYPx << 2) | SLP_EN there.  Our _S5_ object gives SLP_TYP 5 for S5
# (soft off), so a power-off is the byte SLEEP_CONTROL_S5 = 0x34.  Before
# that, Linux writes WAK_STS (0x80) to the Sleep Status Register.
S5_SLP_TYP = 5
SLP_TYP_SHIFT = 2
SLP_EN = 1 << 5
SLEEP_CONTROL_S5 = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN
WAK_STS = 1 << 7

# FACS (5.2.10): 64 bytes, 64-byte aligned, no checksum
FACS_LENGTH = 64
FACS_VERSION = 2

# MADT (5.2.12)
PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
MADT_LOCAL_X2APIC_NMI = 10
LAPIC_ENABLED = 1 << 0
MAX_XAPIC_ID = 254  # 255 is the xAPIC broadcast id; ids from 255 up use x2APIC entries
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_X2UID = 0xFFFFFFFF

# MPS INTI flags (Table 5.26)
POLARITY_CONFORMS = 0b00
POLARITY_ACTIVE_HIGH = 0b01
POLARITY_ACTIVE_LOW = 0b11
TRIGGER_CONFORMS = 0b00 << 2
TRIGGER_EDGE = 0b01 << 2
TRIGGER_LEVEL = 0b11 << 2

CMOS_PORT = 0x70  # CMOS index/data: 0x70-0x71
CMOS_RTC_IRQ = 8
ECAM_BUS_SIZE = 1 << 20  # 32 devices x 8 functions x 4 KiB
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # CONFIG_ADDRESS + CONFIG_DATA: 0xCF8-0xCFF

BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000


# ----------------------------------------------------------------- config


@dataclass(frozen=True)
class InterruptOverride:
    """MADT Interrupt Source Override: ISA IRQ ``source`` arrives at ``gsi``."""

    source: int
    gsi: int
    flags: int = POLARITY_ACTIVE_HIGH | TRIGGER_EDGE
    bus: int = 0  # ISA


def swizzled_gsi(slot: int, pin: int) -> int:
    """Default _PRT rule: slot ``slot``'s INTx pin (0 = INTA .. 3 = INTD) goes
    to GSI 16 + (slot + pin) % 8, the upper 8 pins of a 24-pin I/O APIC.
    Per ACPI, GSIs from a _PRT without link devices are level-triggered,
    active-low."""
    return 16 + (slot + pin) % 8


@dataclass
class PciHostConfig:
    """One PCI root bridge (PNP0A08), its windows and its interrupt routing.

    ``ecam_base`` is the MCFG Base Address: where bus 0's configuration space
    would be; buses ``bus_start``..``bus_end`` get 1 MiB each from there.
    Windows are inclusive (first, last) address pairs.
    """

    segment: int = 0
    bus_start: int = 0
    bus_end: int = 0xFF
    ecam_base: int | None = None
    io_window: tuple[int, int] = (0x1000, 0xFFFF)
    mmio32_window: tuple[int, int] = (0xC000_0000, 0xFEBF_FFFF)
    mmio64_window: tuple[int, int] | None = None
    gsi_for_slot_pin: Callable[[int, int], int] = swizzled_gsi
    slots: int = 32  # _PRT entries for device slots 0..slots-1, pins INTA..INTD

    def ecam_range(self) -> tuple[int, int] | None:
        """(first, last) address of the ECAM area the buses use, or None."""
        if self.ecam_base is None:
            return None
        first = self.ecam_base + self.bus_start * ECAM_BUS_SIZE
        return first, self.ecam_base + (self.bus_end + 1) * ECAM_BUS_SIZE - 1


@dataclass(frozen=True)
class Pm1Config:
    """The PM1a event block (PM1_STS, PM1_EN: 2 + 2 bytes) and control block (PM1_CNT: 2 bytes)
    of a full FADT, in I/O space, and the SCI's ISA IRQ (level, active high)."""

    event_port: int = 0x604
    control_port: int = 0x608
    sci_irq: int = 9


@dataclass
class AcpiConfig:
    """What the tables describe.  CPUs have local APIC ids 0..num_cpus-1.

    ``ioapic_id`` defaults to 0, the reset value of KVM's in-kernel I/O APIC
    ID register (I/O APIC ids are their own namespace on x86-64).
    """

    num_cpus: int
    ioapic_id: int = 0
    ioapic_address: int = 0xFEC0_0000
    ioapic_gsi_base: int = 0
    lapic_address: int = 0xFEE0_0000
    interrupt_overrides: list[InterruptOverride] = field(
        default_factory=lambda: [InterruptOverride(source=0, gsi=2)]
    )
    lint1_nmi: bool = True  # Local APIC NMI on LINT1 for all processors
    serial_ports: list[tuple[int, int]] = field(default_factory=lambda: [(0x3F8, 4)])
    cmos_rtc: bool = False  # describe an MC146818 RTC (PNP0B00) at 0x70-0x71, IRQ 8
    pci: PciHostConfig | None = field(default_factory=PciHostConfig)
    sleep_control_port: int = 0x600
    sleep_status_port: int = 0x601
    reset_port: int = 0x602
    reset_value: int = 0x01
    pm1: Pm1Config | None = None  # a full FADT with PM1 blocks, SCI and FACS; else hardware-reduced
    ged: GedConfig | None = None  # a power button through a Generic Event Device (kernel/acpi_ged.py)
    iapc_boot_arch: int = IAPC_VGA_NOT_PRESENT
    oem_id: bytes = b"PYVMM "
    oem_table_id: bytes = b"PYVMMACP"
    oem_revision: int = 1
    creator_id: bytes = b"PYVM"
    creator_revision: int = 1
    hypervisor_vendor_id: bytes = b"PYVMM"


def validate(config: AcpiConfig) -> None:
    """Raise ValueError for a config the tables cannot describe."""
    if config.num_cpus < 1:
        raise ValueError("num_cpus must be at least 1")
    for label, value, size in (
        ("oem_id", config.oem_id, 6),
        ("oem_table_id", config.oem_table_id, 8),
        ("creator_id", config.creator_id, 4),
        ("hypervisor_vendor_id", config.hypervisor_vendor_id, 8),
    ):
        if len(value) > size:
            raise ValueError(f"{label} {value!r} is longer than {size} bytes")
    if not 0 <= config.ioapic_id <= 0xFF:
        raise ValueError("ioapic_id must fit in a byte")
    if len(config.serial_ports) > 9:
        raise ValueError("at most 9 serial ports (COM1-COM9)")
    if config.pci is not None:
        _validate_pci(config.pci)


def _validate_pci(pci: PciHostConfig) -> None:
    if not 0 <= pci.bus_start <= pci.bus_end <= 0xFF:
        raise ValueError("bad PCI bus range")
    if not 0 < pci.slots <= 32:
        raise ValueError("PCI slots must be 1-32")
    windows = [pci.io_window, pci.mmio32_window]
    if pci.mmio64_window is not None:
        windows.append(pci.mmio64_window)
    for first, last in windows:
        if last < first:
            raise ValueError(f"empty window {first:#x}-{last:#x}")
    if pci.io_window[1] > 0xFFFF or pci.mmio32_window[1] > 0xFFFF_FFFF:
        raise ValueError("I/O window must be below 64 KiB, mmio32 window below 4 GiB")
    ecam = pci.ecam_range()
    if ecam is not None:
        if pci.ecam_base % ECAM_BUS_SIZE:
            raise ValueError("ECAM base must be 1 MiB aligned")
        for first, last in windows[1:]:
            if ecam[0] <= last and first <= ecam[1]:
                raise ValueError("ECAM area overlaps an MMIO window")


# ----------------------------------------------------------------- tables


@dataclass(frozen=True)
class Pointer:
    """A field at ``offset`` (``size`` bytes) that holds the address of the
    table named ``target``.  A ``legacy`` 32-bit field is written 0 when the
    target lies above 4 GiB (the FADT's DSDT next to its X_DSDT)."""

    offset: int
    size: int
    target: str
    legacy: bool = False


@dataclass(frozen=True)
class Checksum:
    """A checksum byte at ``offset`` that makes data[start:start+length] sum to 0."""

    offset: int
    start: int
    length: int


@dataclass
class Table:
    """One table as bytes, with its pointer and checksum fields.

    ``name`` is unique within a set and is what pointers refer to; it is
    the signature for the standard tables ("FACP" for the FADT, "APIC" for
    the MADT, "RSDP" for the root pointer).
    """

    name: str
    data: bytes
    pointers: tuple[Pointer, ...] = ()
    checksums: tuple[Checksum, ...] = ()
    alignment: int = 8

    @classmethod
    def sdt(cls, name: str, data: bytes, pointers: Sequence[Pointer] = ()) -> Table:
        """A table with the standard header: one checksum over all of it."""
        return cls(name, data, tuple(pointers), (Checksum(HEADER_CHECKSUM_OFFSET, 0, len(data)),))


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte as 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt_header(config: AcpiConfig, signature: bytes, length: int, revision: int) -> bytes:
    """System Description Table Header (5.2.6); its checksum is left 0."""
    return struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,
        config.oem_id.ljust(6, b" "),
        config.oem_table_id.ljust(8, b" "),
        config.oem_revision,
        config.creator_id.ljust(4, b" "),
        config.creator_revision,
    )


def _sdt(config: AcpiConfig, signature: bytes, revision: int, body: bytes,
         pointers: Sequence[Pointer] = (), name: str | None = None) -> Table:
    data = sdt_header(config, signature, HEADER_LENGTH + len(body), revision) + body
    return Table.sdt(name or signature.decode(), data, pointers)


def rsdp(config: AcpiConfig, xsdt_name: str = "XSDT") -> Table:
    """Root System Description Pointer (5.2.5.3), revision 2, RSDT 0."""
    data = struct.pack(
        "<8sB6sBIIQB3x",
        RSDP_SIGNATURE, 0, config.oem_id.ljust(6, b" "), RSDP_REVISION, 0, RSDP_LENGTH, 0, 0,
    )
    return Table(
        "RSDP",
        data,
        pointers=(Pointer(24, 8, xsdt_name),),
        # The first checksum covers the ACPI 1.0 part; the extended one,
        # computed after it, covers all 36 bytes.
        checksums=(Checksum(8, 0, 20), Checksum(32, 0, RSDP_LENGTH)),
        alignment=16,  # the OS scans for it on 16-byte boundaries
    )


def xsdt(config: AcpiConfig, entries: Sequence[str]) -> Table:
    """Extended System Description Table: 64-bit pointers to ``entries``."""
    pointers = [Pointer(HEADER_LENGTH + 8 * i, 8, name) for i, name in enumerate(entries)]
    return _sdt(config, b"XSDT", XSDT_REVISION, bytes(8 * len(entries)), pointers)


def generic_address(space: int, address: int, bit_width: int = 8,
                    access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """Generic Address Structure (5.2.3.2), 12 bytes."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def fadt(config: AcpiConfig, dsdt_name: str = "DSDT", facs_name: str = "FACS") -> Table:
    """Fixed ACPI Description Table, revision 6: hardware-reduced, or with PM1 blocks (config.pm1)."""
    body = bytearray(FADT_LENGTH - HEADER_LENGTH)

    def put(offset: int, fmt: str, *values) -> None:  # offsets as in the spec
        struct.pack_into(fmt, body, offset - HEADER_LENGTH, *values)

    # DSDT (40) and X_DSDT (140): filled in by link().  PM2/PM_TMR/GPE blocks, SMI_CMD: 0 (no SMI
    # command port: the platform is always in ACPI mode, SCI_EN reads 1).
    pointers = [Pointer(40, 4, dsdt_name, legacy=True), Pointer(140, 8, dsdt_name)]
    pm1 = config.pm1
    if pm1 is None:  # hardware-reduced: no FACS, no SCI, no PM1 blocks
        put(112, "<I", HW_REDUCED_ACPI | RESET_REG_SUP)  # Flags
    else:
        pointers.append(Pointer(36, 4, facs_name))  # FIRMWARE_CTRL (X_FIRMWARE_CTRL stays 0)
        put(46, "<H", pm1.sci_irq)  # SCI_INT
        put(56, "<I", pm1.event_port)  # PM1a_EVT_BLK
        put(64, "<I", pm1.control_port)  # PM1a_CNT_BLK
        put(88, "<BB", 4, 2)  # PM1_EVT_LEN, PM1_CNT_LEN
        put(112, "<I", PWR_BUTTON | SLP_BUTTON | RESET_REG_SUP)  # Flags
        put(148, "12s", generic_address(GAS_SYSTEM_IO, pm1.event_port, 32))  # X_PM1a_EVT_BLK
        put(172, "12s", generic_address(GAS_SYSTEM_IO, pm1.control_port, 16))  # X_PM1a_CNT_BLK
    put(109, "<H", config.iapc_boot_arch)  # IAPC_BOOT_ARCH
    put(116, "12s", generic_address(GAS_SYSTEM_IO, config.reset_port))  # RESET_REG
    put(128, "<B", config.reset_value)  # RESET_VALUE
    put(131, "<B", FADT_MINOR_VERSION)  # FADT Minor Version
    put(244, "12s", generic_address(GAS_SYSTEM_IO, config.sleep_control_port))  # SLEEP_CONTROL_REG
    put(256, "12s", generic_address(GAS_SYSTEM_IO, config.sleep_status_port))  # SLEEP_STATUS_REG
    put(268, "8s", config.hypervisor_vendor_id.ljust(8, b" "))  # Hypervisor Vendor Identity
    return _sdt(config, b"FACP", FADT_REVISION, bytes(body), pointers)


def facs() -> Table:
    """Firmware ACPI Control Structure: no waking vector, no global lock holder, no checksum."""
    head = struct.pack("<4sIIIII", b"FACS", FACS_LENGTH, 0, 0, 0, 0) + bytes(8)
    return Table("FACS", (head + bytes([FACS_VERSION])).ljust(FACS_LENGTH, b"\0"), alignment=64)


def madt_entries(config: AcpiConfig) -> bytes:
    """The MADT's Interrupt Controller Structures."""
    out = []
    for cpu in range(config.num_cpus):
        if cpu <= MAX_XAPIC_ID:  # Processor Local APIC: uid = APIC id = index
            out.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED))
        else:  # Processor Local x2APIC
            out.append(struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, cpu, LAPIC_ENABLED, cpu))
    out.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, config.ioapic_id, 0,
                           config.ioapic_address, config.ioapic_gsi_base))
    overrides = list(config.interrupt_overrides)
    if config.pm1 is not None:  # the SCI: level-triggered, active high
        overrides.append(InterruptOverride(config.pm1.sci_irq, config.pm1.sci_irq,
                                           POLARITY_ACTIVE_HIGH | TRIGGER_LEVEL))
    for iso in overrides:
        out.append(struct.pack("<BBBBIH", MADT_INTERRUPT_SOURCE_OVERRIDE, 10,
                               iso.bus, iso.source, iso.gsi, iso.flags))
    if config.lint1_nmi:
        flags = POLARITY_CONFORMS | TRIGGER_CONFORMS
        out.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, flags, 1))
        if config.num_cpus > MAX_XAPIC_ID + 1:
            out.append(struct.pack("<BBHIB3x", MADT_LOCAL_X2APIC_NMI, 12, flags,
                                   ALL_PROCESSORS_X2UID, 1))
    return b"".join(out)


def madt(config: AcpiConfig) -> Table:
    """Multiple APIC Description Table (signature "APIC")."""
    body = struct.pack("<II", config.lapic_address, PCAT_COMPAT) + madt_entries(config)
    return _sdt(config, b"APIC", MADT_REVISION, body)


def mcfg(config: AcpiConfig) -> Table:
    """PCI Express memory-mapped configuration space table (PCI Firmware spec)."""
    pci = config.pci
    allocation = struct.pack("<QHBB4x", pci.ecam_base, pci.segment, pci.bus_start, pci.bus_end)
    return _sdt(config, b"MCFG", MCFG_REVISION, bytes(8) + allocation)


def dsdt(config: AcpiConfig) -> Table:
    """Differentiated System Description Table: header + AML."""
    return _sdt(config, b"DSDT", DSDT_REVISION, dsdt_aml(config))


# ----------------------------------------------------------------- DSDT AML


def dsdt_aml(config: AcpiConfig) -> bytes:
    """\\_SB with PCI0 (+ MBRD reserving ECAM), COMn, RTC, GED and PWRB devices, and \\_S5_."""
    devices = []
    if config.pci is not None:
        devices.append(pci_root_aml(config.pci))
        if config.pci.ecam_base is not None:
            devices.append(ecam_reservation_aml(config.pci))
    for index, (io_base, irq) in enumerate(config.serial_ports):
        devices.append(serial_aml(index + 1, io_base, irq))
    if config.cmos_rtc:
        devices.append(rtc_aml())
    if config.ged is not None:
        devices += [ged_aml(config.ged), power_button_aml()]
    s5 = aml.name("\\_S5_", aml.package(*(aml.integer(v) for v in (S5_SLP_TYP, S5_SLP_TYP, 0, 0))))
    return aml.scope("\\_SB_", *devices) + s5


def pci_root_aml(pci: PciHostConfig) -> bytes:
    """Device (PCI0): a PCI Express root bridge with its _CRS and _PRT."""
    windows = [
        aml.word_bus_number(pci.bus_start, pci.bus_end),
        aml.io(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8),
        aml.word_io(*pci.io_window),
        aml.dword_memory(*pci.mmio32_window),
    ]
    if pci.mmio64_window is not None:
        windows.append(aml.qword_memory(*pci.mmio64_window))
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", aml.integer(pci.segment)),
        aml.name("_BBN", aml.integer(pci.bus_start)),
        aml.name("_UID", aml.integer(pci.segment)),
        aml.name("_CRS", aml.resource_template(*windows)),
        aml.name("_PRT", prt_aml(pci)),
    )


def prt_aml(pci: PciHostConfig) -> bytes:
    """_PRT: Package { Address (slot << 16 | 0xFFFF), Pin, Source 0, GSI }."""
    entries = [
        aml.package(
            aml.integer((slot << 16) | 0xFFFF),
            aml.integer(pin),
            aml.integer(0),  # no link device: the last element is a GSI
            aml.integer(pci.gsi_for_slot_pin(slot, pin)),
        )
        for slot in range(pci.slots)
        for pin in range(4)
    ]
    return aml.package(*entries)


def ecam_reservation_aml(pci: PciHostConfig) -> bytes:
    """Device (MBRD): PNP0C02 motherboard resources claiming the ECAM area
    (Linux only uses MMCONFIG that is reserved here or in the E820 map)."""
    first, last = pci.ecam_range()
    if last <= 0xFFFF_FFFF:
        region = aml.memory32_fixed(first, last - first + 1)
    else:
        consumer = aml.CONSUMER | aml.MIN_FIXED | aml.MAX_FIXED
        region = aml.qword_memory(first, last, consumer, aml.MEM_NON_CACHEABLE | aml.MEM_READ_WRITE)
    return aml.device(
        "MBRD",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(region)),
    )


def serial_aml(number: int, io_base: int, irq: int) -> bytes:
    """Device (COMn): a 16550 UART (PNP0501) with 8 ports and one IRQ."""
    if irq < 16:
        interrupt = aml.irq_no_flags(irq)
    else:
        interrupt = aml.extended_interrupt(irq, flags=aml.EXT_IRQ_CONSUMER | aml.EXT_IRQ_EDGE)
    return aml.device(
        f"COM{number}",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(number)),
        aml.name("_CRS", aml.resource_template(aml.io(io_base, io_base, 1, 8), interrupt)),
    )


def rtc_aml() -> bytes:
    """Device (RTC): the CMOS real-time clock (PNP0B00) at 0x70, IRQ 8.

    On a hardware-reduced platform Linux has no legacy PIC and so no
    ready-made IRQ 8: its rtc_cmos driver only gets a working interrupt when
    the RTC is described here."""
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(aml.io(CMOS_PORT, CMOS_PORT, 1, 2),
                                               aml.irq_no_flags(CMOS_RTC_IRQ))),
    )


# ----------------------------------------------------------------- layout


def build_tables(config: AcpiConfig, extra_tables: Iterable[Table] = ()) -> list[Table]:
    """All tables, RSDP first, pointers unfilled.  ``extra_tables`` (each
    with a unique name) are listed in the XSDT after ours."""
    validate(config)
    extra = list(extra_tables)
    tables = [fadt(config), dsdt(config), madt(config)]
    if config.pm1 is not None:
        tables.append(facs())
    if config.pci is not None and config.pci.ecam_base is not None:
        tables.append(mcfg(config))
    tables += extra
    names = [t.name for t in tables]
    if len(set(names)) != len(names) or {"RSDP", "XSDT"} & set(names):
        raise ValueError(f"table names must be unique: {names}")
    entries = [name for name in names if name not in ("DSDT", "FACS")]  # the FADT points to those
    return [rsdp(config), xsdt(config, entries)] + tables


def link(tables: Sequence[Table], addresses: Mapping[str, int]) -> dict[str, bytes]:
    """Fill every pointer field with its target's address, then compute the
    checksums (in the order listed, so the RSDP's extended checksum covers
    its first one).  Returns the final bytes by table name."""
    out = {}
    for table in tables:
        data = bytearray(table.data)
        for ptr in table.pointers:
            value = addresses[ptr.target]
            if value >= 1 << (8 * ptr.size):
                if not ptr.legacy:
                    raise ValueError(f"{table.name}: {ptr.target} at {value:#x} "
                                     f"does not fit in {ptr.size} bytes")
                value = 0
            data[ptr.offset:ptr.offset + ptr.size] = value.to_bytes(ptr.size, "little")
        for cs in table.checksums:
            data[cs.offset] = 0
            data[cs.offset] = checksum(data[cs.start:cs.start + cs.length])
        out[table.name] = bytes(data)
    return out


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def place(tables: Sequence[Table], start: int) -> tuple[dict[str, int], int]:
    """Addresses for ``tables`` laid out one after another from ``start``,
    each at its alignment; also returns the end address."""
    addresses, cursor = {}, start
    for table in tables:
        cursor = _align(cursor, table.alignment)
        addresses[table.name] = cursor
        cursor += len(table.data)
    return addresses, cursor


def footprint(config: AcpiConfig, extra_tables: Iterable[Table] = ()) -> int:
    """Bytes the tables take when laid out from ``BIOS_AREA_START``."""
    tables = build_tables(config, extra_tables)
    return place(tables, BIOS_AREA_START)[1] - BIOS_AREA_START


def build(
    config: AcpiConfig,
    rsdp_addr: int = BIOS_AREA_START,
    tables_addr: int | None = None,
    limit: int = BIOS_AREA_END,
    high_addr: int | None = None,
    extra_tables: Iterable[Table] = (),
) -> dict[int, bytes]:
    """Tables at fixed guest physical addresses, for direct kernel boot.

    The RSDP goes at ``rsdp_addr`` (16-byte aligned; pass it to the kernel in
    boot_params.acpi_rsdp_addr or leave it in [0xE0000, 0x100000) where Linux
    scans), the other tables from ``tables_addr`` (default: right after the
    RSDP).  If they would reach past ``limit``, they go to ``high_addr``
    instead, or ValueError is raised when none is given.  Returns
    ``{gpa: bytes}``; the caller marks those ranges reserved in its E820 map.
    """
    if rsdp_addr % 16:
        raise ValueError("the RSDP must be 16-byte aligned")
    tables = build_tables(config, extra_tables)
    root, rest = tables[0], tables[1:]
    if tables_addr is None:
        tables_addr = rsdp_addr + len(root.data)
    addresses, end = place(rest, tables_addr)
    if end > limit:
        if high_addr is None:
            raise ValueError(f"ACPI tables end at {end:#x}, past {limit:#x}; give a high_addr")
        addresses, end = place(rest, high_addr)
    first = addresses[rest[0].name]
    if first < rsdp_addr + len(root.data) and rsdp_addr < end:
        raise ValueError("the RSDP overlaps the tables")
    addresses[root.name] = rsdp_addr
    linked = link(tables, addresses)
    return {addresses[name]: data for name, data in linked.items()}
