"""What fw_cfg holds for the firmware: RAM sizes, the e820 map, CPUs, ACPI tables, the boot order."""

from __future__ import annotations

from kernel.fw_cfg_tables import firmware_e820 as qemu_style_e820, pci_device_path, platform_items


def bootorder_paths(entries: list[tuple[str, int]]) -> list[str]:
    """The lines of fw_cfg's "bootorder" file: OpenFirmware device paths as QEMU writes them
    (SeaBIOS matches /pci@i0cf8/*@SLOT against each line's start)."""
    return [pci_device_path(slot, kind=kind) for kind, slot in entries]


def firmware_e820(regions, reserved) -> list:
    """The e820 map the firmware gets (etc/e820), QEMU's kind: each RAM region whole, plus
    `reserved` (ECAM, the image with the TSS pages below it).  SeaBIOS lays out the first MiB
    itself: its final map (what it hands the OS) has the EBDA at 0x9FC00 and its own
    0xF0000-0xFFFFF reserved and nothing at 0xA0000-0xEFFFF, like pyvmm's map for Linux."""
    return qemu_style_e820(regions, reserved)


RESERVED_MEMORY_END_FILE = "etc/reserved-memory-end"


def setup_fw_cfg(fw, *, mem, cpus: int, e820, acpi_tables, bootorder: list[str] | None,
                 serial_port: int | None = None, mmio64_start: int | None = None) -> None:
    """Fill fw_cfg with what the firmware reads (kernel.fw_cfg_tables.platform_items);
    `serial_port`: where SeaBIOS also writes its screen output (etc/sercon-port);
    `mmio64_start`: where SeaBIOS may put 64-bit BARs that do not fit below 4 GiB
    (etc/reserved-memory-end, as QEMU gives it): the start of the DSDT's 64-bit window."""
    low = mem.regions[0].size
    high = sum(r.size for r in mem.regions[1:])
    platform_items(fw, ram_below_4g=low, ram_above_4g=high, cpus=cpus, e820=e820,
                   acpi_tables=acpi_tables, bootorder=bootorder, sercon_port=serial_port)
    if mmio64_start is not None:
        fw.add_file(RESERVED_MEMORY_END_FILE, mmio64_start.to_bytes(8, "little"))
