"""Where the machine's PCI lives in the guest's address spaces: the one place it is chosen.

    0x0000_0000 - 0xBFFF_FFFF   RAM (below vmm.memory.MMIO_HOLE_START, 3 GiB)
    0xC000_0000 - 0xDFFF_FFFF   32-bit MMIO window: memory BARs          (512 MiB)
    0xE000_0000 - 0xE00F_FFFF   ECAM (MMCONFIG) of bus 0, the only bus  (1 MiB)
    0xE010_0000 - 0xFEBF_FFFF   free
    0xFEC0_0000                 IOAPIC (in-kernel)
    0xFEE0_0000                 local APICs (in-kernel)
    0xFFFB_C000 - 0xFFFF_FFFF   VT-x TSS and identity map page (vmm.machine)
    4 GiB -                     RAM above the hole
    0x10_0000_0000 - 0x1F_FFFF_FFFF   64-bit MMIO window (64 GiB at 64 GiB): large BARs, later
    ports 0x0CF8 - 0x0CFF       configuration mechanism #1 (CONFIG_ADDRESS, CONFIG_DATA)
    ports 0x1000 - 0xFFFF       I/O window for I/O BARs (virtio-pci uses none)

`PciLayout.acpi_config()` gives the `kernel.acpi.PciHostConfig` that makes the
DSDT (_CRS windows, _PRT) and the MCFG describe exactly what `PciHost` emulates:
one bus.  Describing more costs every boot: Linux takes the MCFG's last bus for the
last one worth probing and looks for peer host bridges on each (arch/x86/pci:
pcibios_fixup_peer_bridges), 32 config reads a bus, two VM exits each through
0xCF8/0xCFC: buses 0-255 were 16,400 of a stock boot's 17,400 exits to pyvmm.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.acpi import ECAM_BUS_SIZE, PciHostConfig, swizzled_gsi
from vmm.memory import GiB, MMIO_HOLE_START, MiB

IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
PCI_CONFIG_PORT = 0xCF8  # CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC
PCI_CONFIG_PORT_COUNT = 8


@dataclass(frozen=True)
class PciLayout:
    """Inclusive (first, last) windows, as `PciHostConfig` has them."""

    ecam_base: int = 0xE000_0000
    bus_start: int = 0
    bus_end: int = 0  # PciHost has bus 0 alone (no bridges)
    io_window: tuple[int, int] = (0x1000, 0xFFFF)
    mmio32_window: tuple[int, int] = (MMIO_HOLE_START, 0xDFFF_FFFF)
    mmio64_window: tuple[int, int] = (64 * GiB, 128 * GiB - 1)

    @property
    def ecam_size(self) -> int:
        return (self.bus_end - self.bus_start + 1) * ECAM_BUS_SIZE

    @property
    def ecam_range(self) -> tuple[int, int]:
        """(first, last) address of the ECAM area."""
        first = self.ecam_base + self.bus_start * ECAM_BUS_SIZE
        return first, first + self.ecam_size - 1

    def acpi_config(self) -> PciHostConfig:
        """What the DSDT and MCFG must say about this layout."""
        return PciHostConfig(
            bus_start=self.bus_start,
            bus_end=self.bus_end,
            ecam_base=self.ecam_base,
            io_window=self.io_window,
            mmio32_window=self.mmio32_window,
            mmio64_window=self.mmio64_window,
            gsi_for_slot_pin=swizzled_gsi,
        )

    def e820_reserved(self) -> list[tuple[int, int]]:
        """(address, size) ranges the e820 map should mark reserved: the ECAM area
        (Linux uses MMCONFIG only if the e820 map or ACPI motherboard resources reserve it)."""
        first, last = self.ecam_range
        return [(first, last - first + 1)]

    def check(self) -> None:
        """Raise ValueError unless the windows stay clear of RAM, each other and the APICs."""
        ecam = self.ecam_range
        m32 = self.mmio32_window
        if m32[0] < MMIO_HOLE_START or m32[1] > 0xFFFF_FFFF:
            raise ValueError("the 32-bit MMIO window must lie in the MMIO hole below 4 GiB")
        ranges = [("32-bit MMIO window", m32), ("ECAM", ecam),
                  ("IOAPIC", (IOAPIC_ADDRESS, IOAPIC_ADDRESS + MiB - 1)),
                  ("LAPIC", (LAPIC_ADDRESS, LAPIC_ADDRESS + MiB - 1))]
        for i, (name_a, a) in enumerate(ranges):
            for name_b, b in ranges[i + 1 :]:
                if a[0] <= b[1] and b[0] <= a[1]:
                    raise ValueError(f"{name_a} overlaps {name_b}")
        if self.ecam_base % ECAM_BUS_SIZE:
            raise ValueError("ECAM base must be 1 MiB aligned")
        if not (PCI_CONFIG_PORT + PCI_CONFIG_PORT_COUNT <= self.io_window[0] or self.io_window[1] < PCI_CONFIG_PORT):
            raise ValueError("the I/O window overlaps the configuration ports")


DEFAULT_LAYOUT = PciLayout()


def pci_host_config(layout: PciLayout = DEFAULT_LAYOUT) -> PciHostConfig:
    """The `kernel.acpi.PciHostConfig` for `layout` (pass it as AcpiConfig.pci)."""
    return layout.acpi_config()
