"""The PCI host bridge: CF8/CFC and ECAM, absent functions, BAR placement and moves, layout."""

import pytest

from kernel import acpi
from tests.unit.test_msix import FakeIrqRouter
from tests.unit.test_virtio_pci import FakeDevice, FakeVm
from virtio.pci import VirtioPciDevice
from vmm.bus import Bus
from vmm.memory import GuestMemory, MiB
from vmm.pci.config import BAR0, COMMAND, COMMAND_MEMORY, BarKind, PciConfigSpace
from vmm.pci.host import PciDevice, PciError, PciHost
from vmm.pci.layout import DEFAULT_LAYOUT, PciLayout, pci_host_config

ECAM = DEFAULT_LAYOUT.ecam_base
MMIO32_FIRST, MMIO32_LAST = DEFAULT_LAYOUT.mmio32_window


class SimpleDevice(PciDevice):
    """A function with a 32-bit 8 KiB BAR 0 and a 64-bit 64 KiB BAR 2 that echo their offsets."""

    def __init__(self):
        self.config = PciConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)
        self.config.add_bar(0, 0x2000, BarKind.MEM32)
        self.config.add_bar(2, 0x10000, BarKind.MEM64)
        self.mapped = []
        self.writes = []
        self.closed = False

    def bar_read(self, index, offset, size):
        return (index << 24 | offset) & ((1 << 8 * size) - 1)

    def bar_write(self, index, offset, size, value):
        self.writes.append((index, offset, size, value))

    def bar_mapped(self, index, address):
        self.mapped.append((index, address))

    def close(self):
        self.closed = True


@pytest.fixture
def host():
    pio, mmio = Bus("pio"), Bus("mmio")
    h = PciHost(pio=pio, mmio=mmio)
    yield h


def cf8(host, slot, reg, bus=0, fn=0, enable=True):
    host.pio.write(0xCF8, 4, (enable << 31) | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC))


def cfc_read(host, slot, reg, size, **kw):
    cf8(host, slot, reg, **kw)
    return host.pio.read(0xCFC + (reg & 3), size)


def cfc_write(host, slot, reg, size, value, **kw):
    cf8(host, slot, reg, **kw)
    host.pio.write(0xCFC + (reg & 3), size, value)


def ecam_read(host, slot, reg, size, bus=0, fn=0):
    return host.mmio.read(ECAM + (bus << 20 | slot << 15 | fn << 12 | reg), size)


def ecam_write(host, slot, reg, size, value, bus=0, fn=0):
    host.mmio.write(ECAM + (bus << 20 | slot << 15 | fn << 12 | reg), size, value)


def test_host_bridge_at_00_0(host):
    assert cfc_read(host, 0, 0, 4) == 0x0008_1B36
    assert cfc_read(host, 0, 8, 4) >> 8 == 0x060000
    assert cfc_read(host, 0, 0x0E, 1) == 0
    assert cfc_read(host, 0, 0x3D, 1) == 0  # no interrupt pin
    assert ecam_read(host, 0, 0, 4) == 0x0008_1B36


def test_config_address_register(host):
    # Linux's pci_check_type1: a byte to 0xCFB is not a config cycle; CF8 reads back
    host.pio.write(0xCFB, 1, 0x01)
    host.pio.write(0xCF8, 4, 0x8000_0000)
    assert host.pio.read(0xCF8, 4) == 0x8000_0000
    host.pio.write(0xCF8, 4, 0x8123_4567)
    assert host.pio.read(0xCF8, 4) == 0x8023_4564  # reserved bits and the low two bits read 0
    assert host.pio.read(0xCF9, 1) == 0xFF


def test_absent_functions_read_all_ones(host):
    slot = host.add_device(SimpleDevice())
    assert slot == 1
    assert cfc_read(host, 5, 0, 4) == 0xFFFF_FFFF
    assert cfc_read(host, 5, 0, 2) == 0xFFFF
    assert cfc_read(host, 1, 0, 4, fn=1) == 0xFFFF_FFFF
    assert cfc_read(host, 1, 0, 4, bus=1) == 0xFFFF_FFFF
    assert cfc_read(host, 1, 0, 4, enable=False) == 0xFFFF_FFFF
    assert ecam_read(host, 5, 0, 4) == 0xFFFF_FFFF
    assert ecam_read(host, 1, 0, 4, bus=3) == 0xFFFF_FFFF
    assert ecam_read(host, 1, 0, 2, fn=7) == 0xFFFF
    cfc_write(host, 5, 4, 2, 0xFFFF)  # swallowed
    ecam_write(host, 5, 4, 2, 0xFFFF)
    cfc_write(host, 1, 4, 2, 0xFFFF, enable=False)
    assert cfc_read(host, 1, 0, 4) == 0x5678_1234


def test_cfc_byte_lanes(host):
    host.add_device(SimpleDevice())
    assert [cfc_read(host, 1, i, 1) for i in range(4)] == [0x34, 0x12, 0x78, 0x56]
    assert cfc_read(host, 1, 2, 2) == 0x5678
    assert cfc_read(host, 1, 0, 2) == 0x1234
    assert host.pio.read(0xCFE, 4) == 0xFFFF_FFFF  # crosses the dword: not a config access
    cfc_write(host, 1, 0x3C, 1, 0x0A)  # Interrupt Line through lane 0
    assert cfc_read(host, 1, 0x3C, 4) & 0xFFFF == 0x010A
    cfc_write(host, 1, 0x3D, 1, 0x04)  # Interrupt Pin is read-only (lane 1)
    assert cfc_read(host, 1, 0x3D, 1) == 1
    cfc_write(host, 1, COMMAND, 2, 0)  # Command, low word
    assert cfc_read(host, 1, COMMAND, 2) == 0
    cfc_write(host, 1, COMMAND + 1, 1, 0x04)  # Interrupt Disable through lane 1
    assert cfc_read(host, 1, COMMAND, 2) == 0x0400


def test_ecam_offsets_and_widths(host):
    host.add_device(SimpleDevice())
    host.add_device(SimpleDevice())
    assert ecam_read(host, 2, 0, 4) == 0x5678_1234
    assert ecam_read(host, 2, 2, 2) == 0x5678
    assert ecam_read(host, 2, 3, 1) == 0x56
    assert ecam_read(host, 2, 0x100, 4) == 0  # extended space: no extended capabilities
    assert ecam_read(host, 2, 0xFFC, 4) == 0
    assert ecam_read(host, 2, 1, 2) == 0xFFFF  # misaligned: not a config access
    assert ecam_read(host, 2, 0, 8) == 0xFFFF_FFFF_FFFF_FFFF
    ecam_write(host, 2, 0x3C, 1, 0x33)
    assert cfc_read(host, 2, 0x3C, 1) == 0x33
    assert cfc_read(host, 1, 0x3C, 1) != 0x33


def test_bars_assigned_in_window_aligned_and_mapped(host):
    devs = [SimpleDevice() for _ in range(3)]
    slots = [host.add_device(d) for d in devs]
    ranges = []
    for d, slot in zip(devs, slots):
        assert d.config.memory_enabled  # firmware-style: decode on
        for index, bar in d.config.bars.items():
            addr = d.config.bar_address(index)
            assert MMIO32_FIRST <= addr and addr + bar.size - 1 <= MMIO32_LAST
            assert addr % bar.size == 0
            assert host.mapped_address(slot, index) == addr
            assert (index, addr) in d.mapped
            ranges.append((addr, addr + bar.size))
            # the MMIO bus reaches the device's BAR handler
            assert host.mmio.read(addr + 0x10, 4) == index << 24 | 0x10
        assert d.intx_gsi == 16 + slot % 8 == acpi.swizzled_gsi(slot, 0)
        assert d.config.read(0x3C, 1) == d.intx_gsi
    ranges.sort()
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    host.mmio.write(devs[1].config.bar_address(2) + 8, 4, 0xAB)
    assert devs[1].writes == [(2, 8, 4, 0xAB)]


def test_add_device_without_enable(host):
    d = SimpleDevice()
    slot = host.add_device(d, enable=False)
    assert not d.config.memory_enabled and d.mapped == []
    assert host.mapped_address(slot, 0) is None
    cfc_write(host, slot, COMMAND, 2, COMMAND_MEMORY)
    assert host.mapped_address(slot, 0) == d.config.bar_address(0)


def test_bar_sizing_and_move(host):
    d = SimpleDevice()
    slot = host.add_device(d)
    old = d.config.bar_address(0)
    # the Linux sequence: decode off, size, restore, decode on
    cfc_write(host, slot, COMMAND, 2, 0)
    assert host.mapped_address(slot, 0) is None and set(d.mapped[-2:]) == {(0, None), (2, None)}
    assert host.mmio.read(old, 4) == 0xFFFF_FFFF  # nobody there
    saved = cfc_read(host, slot, BAR0, 4)
    cfc_write(host, slot, BAR0, 4, 0xFFFF_FFFF)
    assert cfc_read(host, slot, BAR0, 4) == 0xFFFF_E000
    cfc_write(host, slot, BAR0, 4, saved)
    assert host.mapped_address(slot, 0) is None
    cfc_write(host, slot, COMMAND, 2, COMMAND_MEMORY)
    assert host.mapped_address(slot, 0) == old
    # move the BAR with decode on
    new = 0xD000_0000
    d.mapped.clear()
    ecam_write(host, slot, BAR0, 4, new)
    assert d.mapped == [(0, new)]
    assert host.mmio.read(old, 4) == 0xFFFF_FFFF
    assert host.mmio.read(new + 4, 4) == 4
    # a 64-bit BAR moved above 4 GiB in two halves
    d.mapped.clear()
    cfc_write(host, slot, BAR0 + 8, 4, 0x0002_0000)
    cfc_write(host, slot, BAR0 + 12, 4, 0x10)
    assert d.mapped[-1] == (2, 0x10_0002_0000)
    assert host.mmio.read(0x10_0002_0000 + 8, 4) == 2 << 24 | 8


def test_bar_moved_onto_something_else_stays_unmapped(host):
    a, b = SimpleDevice(), SimpleDevice()
    host.add_device(a)
    slot_b = host.add_device(b)
    b.mapped.clear()
    cfc_write(host, slot_b, BAR0, 4, ECAM)  # over the ECAM area
    assert host.mapped_address(slot_b, 0) is None and b.mapped == [(0, None)]
    assert ecam_read(host, 0, 0, 4) == 0x0008_1B36  # ECAM still works
    cfc_write(host, slot_b, BAR0, 4, a.config.bar_address(0))  # over another device's BAR
    assert host.mapped_address(slot_b, 0) is None
    cfc_write(host, slot_b, BAR0, 4, 0xD800_0000)
    assert host.mapped_address(slot_b, 0) == 0xD800_0000


def test_virtio_notify_ioeventfds_follow_bar(host):
    irq, vm = FakeIrqRouter(), FakeVm()
    with GuestMemory(4 * MiB) as mem:
        dev = VirtioPciDevice(FakeDevice(mem), irq=irq, vm=vm)
        slot = host.add_device(dev)
        bar = dev.config.bar_address(0)
        assert set(vm.ioeventfds) == {(bar + 0x3000, 2), (bar + 0x3004, 2)}
        assert host.mmio.read(bar + 0x12, 2) == 2  # num_queues through the MMIO bus
        cfc_write(host, slot, COMMAND, 2, 0)
        assert vm.ioeventfds == {}
        cfc_write(host, slot, BAR0, 4, 0xD000_0000)
        cfc_write(host, slot, BAR0 + 4, 4, 0)
        cfc_write(host, slot, COMMAND, 2, COMMAND_MEMORY)
        assert set(vm.ioeventfds) == {(0xD000_3000, 2), (0xD000_3004, 2)}
        assert vm.ioeventfds[(0xD000_3004, 2)] == dev.device.queue_events[1]
        assert host.mmio.read(bar + 0x12, 2) == 0xFFFF
        assert host.mmio.read(0xD000_0012, 2) == 2
        host.close()
        assert vm.ioeventfds == {} and dev.device.queue_events == []
    irq.close()


def test_slots_and_windows_run_out():
    small = PciLayout(mmio32_window=(0xC000_0000, 0xC001_FFFF), mmio64_window=(64 << 30, (64 << 30) + 0xFFFF))
    h = PciHost(pio=Bus("pio"), mmio=Bus("mmio"), layout=small)
    h.add_device(SimpleDevice())  # 64 KiB + 8 KiB fit in 128 KiB
    h.add_device(SimpleDevice())  # the 64-bit BAR goes to the 64-bit window
    with pytest.raises(PciError):
        h.add_device(SimpleDevice())
    big = PciHost(pio=Bus("pio"), mmio=Bus("mmio"))
    for _ in range(31):
        big.add_device(SimpleDevice())
    with pytest.raises(PciError):
        big.add_device(SimpleDevice())


def test_close_unregisters_everything(host):
    d = SimpleDevice()
    host.add_device(d)
    addr = d.config.bar_address(0)
    host.close()
    assert d.closed and d.mapped[-1][1] is None
    assert host.mmio.find(addr) is None and host.mmio.find(ECAM) is None
    assert host.pio.find(0xCF8) is None
    host.close()  # twice is harmless


def test_layout_matches_acpi_description():
    layout = DEFAULT_LAYOUT
    layout.check()
    cfg = pci_host_config()
    assert cfg.ecam_base == 0xE000_0000 and cfg.ecam_range() == (0xE000_0000, 0xE00F_FFFF)
    assert layout.ecam_range == cfg.ecam_range()
    assert cfg.mmio32_window == (0xC000_0000, 0xDFFF_FFFF)
    assert cfg.mmio64_window == (0x10_0000_0000, 0x1F_FFFF_FFFF)
    assert cfg.io_window == (0x1000, 0xFFFF)
    assert (cfg.bus_start, cfg.bus_end) == (0, 0)  # the one bus PciHost has: Linux probes no other
    assert layout.e820_reserved() == [(0xE000_0000, 1 * MiB)]
    config = acpi.AcpiConfig(num_cpus=1, pci=cfg)
    acpi.validate(config)
    tables = acpi.build(config, rsdp_addr=0xE0000)
    assert tables  # DSDT and MCFG build from it
    with pytest.raises(ValueError):
        PciLayout(mmio32_window=(0xC000_0000, 0xE00F_FFFF)).check()  # over ECAM
    with pytest.raises(ValueError):
        PciLayout(mmio32_window=(0x8000_0000, 0xBFFF_FFFF)).check()  # over RAM
    with pytest.raises(ValueError):
        PciLayout(ecam_base=0xF000_0000, bus_end=255).check()  # over the IOAPIC
