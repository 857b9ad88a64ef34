"""The PCI host bridge: bus 0, its configuration mechanisms, and BAR placement.

The guest reaches configuration space two ways, both served here:
  * configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): CONFIG_ADDRESS at port 0xCF8
    (a dword: bit 31 enable, bus 23:16, device 15:11, function 10:8, register
    7:2), CONFIG_DATA at 0xCFC-0xCFF (byte, word or dword in the addressed
    dword's byte lanes);
  * ECAM (PCI Express enhanced configuration access): 4 KiB per function at
    ecam_base + (bus << 20 | device << 15 | function << 12), which the MCFG
    table describes.
Functions that are not there read all-ones and ignore writes.  Port 0xCF9, a
byte inside that range, is the PC's Reset Control Register (as on PIIX/ICH
chipsets): writing it with bit 2 (CPU reset) set resets the machine, through
`on_reset` when one is given; SeaBIOS reboots that way.

Device 00:00.0 is the host bridge itself.  `add_device` puts a device at the
next free slot, function 0, gives its BARs addresses from the layout's windows
(naturally aligned), turns decode on as firmware would, and maps each BAR's
region on the MMIO (or port-I/O) bus.  When the guest moves a BAR or switches
decode, the region moves with it and the device hears of it through
`bar_mapped(index, address or None)` (virtio-pci moves its ioeventfds there).
A function's expansion ROM (PciConfigSpace.add_expansion_rom) gets an address in
the 32-bit window too and is mapped, read-only, while its enable bit and memory
decode are both on (firmware enables it only while it copies the ROM out).

Firmware (SeaBIOS) uses fw_cfg only on a machine whose device 00:00.0 carries
the subsystem IDs of QEMU's virtual machines (1AF4:1100, its `qemu_detect`), so
the host bridge has them.  Its own IDs stay those of QEMU's gpex bridge, which
SeaBIOS knows as no chipset: it then leaves PAM registers and MMCONFIG alone
(those are for i440FX/Q35), reaches configuration space through 0xCF8, places
BARs below 0xFEC00000 and leaves INTERRUPT_LINE at 0xFF (the _PRT routes INTx).
"""

from __future__ import annotations

import logging
import threading

from vmm.bus import Bus, BusConflict
from .config import (
    COMMAND_IO,
    COMMAND_MEMORY,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    INTERRUPT_PIN_NONE,
    BarKind,
    PciConfigSpace,
)
from .layout import DEFAULT_LAYOUT, PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT, PciLayout

log = logging.getLogger(__name__)

SLOTS = 32
HOST_BRIDGE_SLOT = 0
# The host bridge presents itself as QEMU's PCIe host bridge (gpex): firmware and
# Linux know it and expect nothing of it.
HOST_BRIDGE_VENDOR_ID = 0x1B36
HOST_BRIDGE_DEVICE_ID = 0x0008
CLASS_HOST_BRIDGE = 0x060000
HOST_BRIDGE_SUBSYSTEM_VENDOR_ID = 0x1AF4  # Red Hat, Inc.
HOST_BRIDGE_SUBSYSTEM_ID = 0x1100  # "QEMU virtual machine": what SeaBIOS looks for

RESET_CONTROL_OFFSET = 1  # port 0xCF9
RESET_CONTROL_CPU_RESET = 1 << 2
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # enable, bus, device, function, register (dword aligned)


class PciError(Exception):
    """A host-side configuration mistake (no slot left, BARs that do not fit)."""


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciDevice:
    """What the host bridge needs of a function: its configuration space and its BARs.

    Subclasses serve their BARs with `bar_read` / `bar_write` (offsets relative
    to the BAR) and may act in `bar_mapped` when a BAR appears at an address
    (decode on, address set) or disappears (None).  `intx_gsi` is set by the host
    to the GSI that the _PRT routes this slot's INTA to.
    """

    config: PciConfigSpace
    intx_gsi: int | None = None
    name = "pci-device"  # for people: where its BARs are on the buses (pyvmm run --stats)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return ones(size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def bar_mapped(self, index: int, address: int | None) -> None:
        pass

    def close(self) -> None:
        pass


class HostBridge(PciDevice):
    def __init__(self) -> None:
        self.config = PciConfigSpace(vendor_id=HOST_BRIDGE_VENDOR_ID, device_id=HOST_BRIDGE_DEVICE_ID,
                                     class_code=CLASS_HOST_BRIDGE, interrupt_pin=INTERRUPT_PIN_NONE,
                                     subsystem_vendor_id=HOST_BRIDGE_SUBSYSTEM_VENDOR_ID,
                                     subsystem_id=HOST_BRIDGE_SUBSYSTEM_ID)


class BarRegion:
    """One mapped BAR as a bus device: forwards to the PCI device with the BAR's index."""

    def __init__(self, device: PciDevice, index: int):
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)


class Window:
    """A bump allocator of naturally aligned ranges in an inclusive [first, last] window."""

    def __init__(self, name: str, first: int, last: int):
        self.name = name
        self.first, self.last = first, last
        self.next = first

    def allocate(self, size: int) -> int | None:
        address = (self.next + size - 1) & ~(size - 1)
        if address + size - 1 > self.last:
            return None
        self.next = address + size
        return address


class PciHost:
    """Bus 0 of segment 0.

        host = PciHost(pio=machine.pio, mmio=machine.mmio)   # registers 0xCF8-0xCFF and ECAM
        slot = host.add_device(VirtioPciDevice(blk, irq=router, vm=vm))
        acpi_pci = host.layout.acpi_config()                  # for the DSDT and MCFG
        ...
        host.close()                                          # unmaps BARs, closes the devices
    """

    def __init__(self, *, pio: Bus, mmio: Bus, layout: PciLayout = DEFAULT_LAYOUT, on_reset=None):
        layout.check()
        self.pio, self.mmio, self.layout = pio, mmio, layout
        self.on_reset = on_reset  # called when the guest writes the reset bit to port 0xCF9
        self.devices: list[PciDevice | None] = [None] * SLOTS
        self._lock = threading.RLock()
        self._mapped: dict[tuple[int, int], int] = {}  # (slot, bar index) -> address on its bus
        self._rom_mapped: dict[int, int] = {}  # slot -> address of its expansion ROM on the MMIO bus
        self._mmio32 = Window("32-bit MMIO", *layout.mmio32_window)
        self._mmio64 = Window("64-bit MMIO", *layout.mmio64_window)
        self._io = Window("I/O", *layout.io_window)
        self.config_address = 0
        self._gsi_for_slot_pin = layout.acpi_config().gsi_for_slot_pin  # what the _PRT says
        self._closed = False
        self._place(HOST_BRIDGE_SLOT, HostBridge())
        self.ecam = Ecam(self)
        self.config_ports = ConfigPorts(self)
        pio.register(PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT, self.config_ports, "pci-config")
        mmio.register(layout.ecam_range[0], layout.ecam_size, self.ecam, "pci-ecam")

    # -- devices ---------------------------------------------------------------------
    def add_device(self, device: PciDevice, *, enable: bool = True) -> int:
        """Put `device` at the next free slot of bus 0 (function 0); return the slot.

        Its BARs get addresses from the windows, and with `enable` (what firmware
        does) memory and I/O decode are switched on, so the BARs are mapped at once.
        """
        with self._lock:
            try:
                slot = self.devices.index(None)
            except ValueError:
                raise PciError(f"no free PCI slot on bus 0 (all {SLOTS} taken)") from None
            self._assign_bars(device)
            self._place(slot, device)
            if enable:
                config = device.config
                command = config.command
                if any(not b.is_io for b in config.bars.values()):
                    command |= COMMAND_MEMORY
                if any(b.is_io for b in config.bars.values()):
                    command |= COMMAND_IO
                config.set_command(command)
            self._update_mappings(slot)
            return slot

    def _place(self, slot: int, device: PciDevice) -> None:
        self.devices[slot] = device
        if device.config.get(INTERRUPT_PIN, 1) != INTERRUPT_PIN_NONE:
            device.intx_gsi = self._gsi_for_slot_pin(slot, 0)
            device.config.put(INTERRUPT_LINE, 1, device.intx_gsi)
        device.config.on_mapping_change = lambda: self._update_mappings(slot)

    def _assign_bars(self, device: PciDevice) -> None:
        """Largest first, so that natural alignment wastes as little as possible."""
        windows = self._mmio32, self._mmio64, self._io
        saved = [w.next for w in windows]
        for bar in sorted(device.config.bars.values(), key=lambda b: -b.size):
            if bar.is_io:
                address = self._io.allocate(bar.size)
            elif bar.kind is BarKind.MEM64:
                # 64-bit BARs go below 4 GiB while there is room, like firmware does.
                address = self._mmio32.allocate(bar.size) or self._mmio64.allocate(bar.size)
            else:
                address = self._mmio32.allocate(bar.size)
            if address is None:
                for w, n in zip(windows, saved):
                    w.next = n
                raise PciError(f"no room for BAR {bar.index} ({bar.size:#x} bytes) in the PCI windows")
            device.config.set_bar_address(bar.index, address)
        rom = device.config.rom
        if rom is not None:
            address = self._mmio32.allocate(rom.size)
            if address is None:
                for w, n in zip(windows, saved):
                    w.next = n
                raise PciError(f"no room for the expansion ROM ({rom.size:#x} bytes) in the 32-bit MMIO window")
            device.config.set_rom_address(address)

    def device_at(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != 0 or function != 0 or not 0 <= slot < SLOTS:
            return None
        return self.devices[slot]

    # -- configuration accesses ------------------------------------------------------------
    def config_read(self, bus: int, slot: int, function: int, register: int, size: int) -> int:
        with self._lock:
            device = self.device_at(bus, slot, function)
            if device is None:
                return ones(size)
            return device.config.read(register, size)

    def config_write(self, bus: int, slot: int, function: int, register: int, size: int, value: int) -> None:
        with self._lock:
            device = self.device_at(bus, slot, function)
            if device is not None:
                device.config.write(register, size, value)

    # -- BAR regions on the buses ----------------------------------------------------------
    def _update_mappings(self, slot: int) -> None:
        """Make each BAR's bus mapping match its address and the decode bits."""
        with self._lock:
            device = self.devices[slot]
            for index, bar in device.config.bars.items():
                config = device.config
                address = config.bar_address(index)
                want = address if config.bar_decoding(index) and address != 0 else None
                have = self._mapped.get((slot, index))
                if want == have:
                    continue
                bus = self.pio if bar.is_io else self.mmio
                if have is not None:
                    bus.unregister(have)
                    del self._mapped[(slot, index)]
                if want is not None:
                    try:
                        bus.register(want, bar.size, BarRegion(device, index),
                                     f"{device.name} 00:{slot:02x}.0 bar{index}")
                        self._mapped[(slot, index)] = want
                    except BusConflict as e:
                        # The guest put the BAR over something else: the region stays unreachable.
                        log.warning("PCI 00:%02x.0 BAR %d not mapped: %s", slot, index, e)
                        want = None
                if want != have:
                    device.bar_mapped(index, want)
            self._update_rom_mapping(slot, device)

    def _update_rom_mapping(self, slot: int, device: PciDevice) -> None:
        config = device.config
        if config.rom is None:
            return
        address = config.rom_address
        want = address if config.rom_decoding() and address != 0 else None
        have = self._rom_mapped.get(slot)
        if want == have:
            return
        if have is not None:
            self.mmio.unregister(have)
            del self._rom_mapped[slot]
        if want is not None:
            try:
                self.mmio.register(want, config.rom.size, config.rom, f"{device.name} 00:{slot:02x}.0 rom")
                self._rom_mapped[slot] = want
            except BusConflict as e:
                log.warning("PCI 00:%02x.0 expansion ROM not mapped: %s", slot, e)

    def mapped_address(self, slot: int, index: int) -> int | None:
        """Where BAR `index` of the device at `slot` is mapped now, or None."""
        return self._mapped.get((slot, index))

    def rom_mapped_address(self, slot: int) -> int | None:
        """Where the expansion ROM of the device at `slot` is mapped now, or None."""
        return self._rom_mapped.get(slot)

    def close(self) -> None:
        """Unmap every BAR (devices drop their ioeventfds), close the devices, unregister."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for slot, device in enumerate(self.devices):
                if device is None:
                    continue
                for (s, index), address in list(self._mapped.items()):
                    if s == slot:
                        bar = device.config.bars[index]
                        (self.pio if bar.is_io else self.mmio).unregister(address)
                        del self._mapped[(s, index)]
                        device.bar_mapped(index, None)
                if slot in self._rom_mapped:
                    self.mmio.unregister(self._rom_mapped.pop(slot))
                device.close()
            self.devices = [None] * SLOTS
            self.pio.unregister(PCI_CONFIG_PORT)
            self.mmio.unregister(self.layout.ecam_range[0])


class ConfigPorts:
    """Configuration mechanism #1 as a port-I/O device at 0xCF8 (8 ports).

    CONFIG_ADDRESS is one latch shared by all vCPUs, as on real chipsets; the
    guest serialises its accesses (Linux holds pci_config_lock).
    """

    def __init__(self, host: PciHost):
        self.host = host

    def _target(self, lane: int, size: int):
        address = self.host.config_address
        if not address & CONFIG_ADDRESS_ENABLE or lane + size > 4:
            return None
        bus, slot, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        return bus, slot, function, (address & 0xFC) + lane

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.host.config_address
        if offset >= 4:
            target = self._target(offset - 4, size)
            if target is not None:
                return self.host.config_read(*target, size)
        return ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.host.config_address = value & CONFIG_ADDRESS_MASK
        elif offset >= 4:
            target = self._target(offset - 4, size)
            if target is not None:
                self.host.config_write(*target, size, value)
        elif offset == RESET_CONTROL_OFFSET and size == 1:
            if value & RESET_CONTROL_CPU_RESET and self.host.on_reset is not None:
                self.host.on_reset()
        # Other byte and word accesses to 0xCF8-0xCFB are not configuration cycles: ignored.


class Ecam:
    """The ECAM area as an MMIO device: offset = bus << 20 | device << 15 | function << 12 | register."""

    def __init__(self, host: PciHost):
        self.host = host
        self.bus_start = host.layout.bus_start

    def _target(self, offset: int, size: int):
        register = offset & 0xFFF
        if size not in (1, 2, 4) or register % size:
            return None  # unaligned or 8-byte: not a configuration access
        return self.bus_start + (offset >> 20), (offset >> 15) & 0x1F, (offset >> 12) & 0x7, register

    def read(self, offset: int, size: int) -> int:
        target = self._target(offset, size)
        return ones(size) if target is None else self.host.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        target = self._target(offset, size)
        if target is not None:
            self.host.config_write(*target, size, value)
