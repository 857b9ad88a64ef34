"""The PCI expansion ROM BAR (config offset 0x30): sizing, enable bit, decode, reading the ROM
through its mapping; patching a ROM's PCI IDs; the host bridge's firmware-facing details."""

import pytest

from vmm.bus import Bus
from vmm.pci.config import (
    COMMAND,
    COMMAND_MEMORY,
    EXPANSION_ROM,
    BarKind,
    ExpansionRom,
    PciConfigSpace,
    patch_rom_ids,
)
from vmm.pci.host import PciDevice, PciHost
from vmm.pci.layout import DEFAULT_LAYOUT

MMIO32_FIRST, MMIO32_LAST = DEFAULT_LAYOUT.mmio32_window


def rom_image(size=3000, vendor=0x1AF4, device=0x1000):
    """A minimal PCI option ROM: 55 AA, length in 512-byte units, a PCIR structure at 0x20,
    a checksum byte at 6 that makes the first image sum to 0, some filler."""
    blocks = -(-size // 512)
    img = bytearray(blocks * 512)
    img[0:2] = b"\x55\xaa"
    img[2] = blocks
    img[0x18:0x1A] = (0x20).to_bytes(2, "little")
    img[0x20:0x24] = b"PCIR"
    img[0x24:0x26] = vendor.to_bytes(2, "little")
    img[0x26:0x28] = device.to_bytes(2, "little")
    img[0x30:0x32] = blocks.to_bytes(2, "little")  # image length
    img[0x35] = 0x80  # last image
    for i in range(0x40, len(img)):
        img[i] = (i * 7) & 0xFF
    img[6] = (-sum(img)) & 0xFF
    return bytes(img)


class RomDevice(PciDevice):
    def __init__(self, image, bars=True):
        self.config = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0x020000)
        if bars:
            self.config.add_bar(0, 0x4000, BarKind.MEM64)
        self.rom = self.config.add_expansion_rom(image)


@pytest.fixture
def host():
    return PciHost(pio=Bus("pio"), mmio=Bus("mmio"))


def cfg_read(host, slot, reg, size=4):
    host.pio.write(0xCF8, 4, 1 << 31 | slot << 11 | (reg & 0xFC))
    return host.pio.read(0xCFC + (reg & 3), size)


def cfg_write(host, slot, reg, value, size=4):
    host.pio.write(0xCF8, 4, 1 << 31 | slot << 11 | (reg & 0xFC))
    host.pio.write(0xCFC + (reg & 3), size, value)


# -- the register in a configuration space -----------------------------------------------------


def test_no_rom_reads_zero_and_ignores_writes():
    c = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF0000)
    c.write(EXPANSION_ROM, 4, 0xFFFF_FFFF)
    assert c.read(EXPANSION_ROM, 4) == 0
    assert c.rom is None and c.rom_address == 0 and not c.rom_enabled and not c.rom_decoding()


def test_rom_size_is_a_power_of_two_of_at_least_2k():
    assert ExpansionRom(b"\x55\xaa").size == 2048
    assert ExpansionRom(bytes(2048)).size == 2048
    assert ExpansionRom(bytes(2049)).size == 4096
    assert ExpansionRom(bytes(75776)).size == 128 << 10
    assert ExpansionRom(bytes(100), size=1 << 16).size == 1 << 16
    for bad in (dict(image=b""), dict(image=bytes(5000), size=4096), dict(image=bytes(10), size=3072)):
        with pytest.raises(ValueError):
            ExpansionRom(bad["image"], bad.get("size"))
    with pytest.raises(ValueError):
        ExpansionRom(bytes((16 << 20) + 1))


def test_sizing_and_enable_bit():
    c = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF0000)
    rom = c.add_expansion_rom(bytes(70000))  # 128 KiB
    assert rom.size == 0x20000
    assert c.read(EXPANSION_ROM, 4) == 0
    c.write(EXPANSION_ROM, 4, 0xFFFF_F800)  # what SeaBIOS and Linux write to size it
    assert c.read(EXPANSION_ROM, 4) == 0xFFFE_0000
    c.write(EXPANSION_ROM, 4, 0xFFFF_FFFF)  # reserved bits 10:1 stay 0, enable sticks
    assert c.read(EXPANSION_ROM, 4) == 0xFFFE_0001
    c.write(EXPANSION_ROM, 4, 0xF012_3456 | 1)  # low address bits below the size are dropped
    assert c.read(EXPANSION_ROM, 4) == 0xF012_0001
    assert c.rom_address == 0xF012_0000 and c.rom_enabled
    assert not c.rom_decoding()  # memory decode is off
    c.write(COMMAND, 2, COMMAND_MEMORY)
    assert c.rom_decoding()
    c.write(EXPANSION_ROM, 1, 0)  # a byte write clears the enable bit only
    assert c.read(EXPANSION_ROM, 4) == 0xF012_0000 and not c.rom_decoding()
    with pytest.raises(ValueError):
        c.add_expansion_rom(b"\x55\xaa")


def test_rom_register_changes_call_the_mapping_hook():
    c = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF0000)
    c.add_expansion_rom(bytes(4096))
    calls = []
    c.on_mapping_change = lambda: calls.append(1)
    c.write(EXPANSION_ROM, 4, 0xC000_0000)
    c.write(EXPANSION_ROM, 4, 0xC000_0000)  # no change, no call
    c.write(EXPANSION_ROM, 4, 0xC000_0001)
    assert len(calls) == 2


def test_set_rom_address_checks_alignment():
    c = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF0000)
    c.add_expansion_rom(bytes(8192))
    c.set_rom_address(0xC000_2000)
    assert c.read(EXPANSION_ROM, 4) == 0xC000_2000
    with pytest.raises(ValueError):
        c.set_rom_address(0xC000_1000)
    with pytest.raises(ValueError):
        PciConfigSpace(vendor_id=1, device_id=2, class_code=0).set_rom_address(0xC000_0000)


def test_rom_reads_image_then_ff():
    rom = ExpansionRom(b"\x55\xaa\x01\x02" + bytes(1000))
    assert rom.read(0, 2) == 0xAA55
    assert rom.read(0, 4) == 0x0201AA55
    assert rom.read(1004, 4) == 0xFFFF_FFFF  # past the image, inside the BAR
    assert rom.read(2046, 2) == 0xFFFF
    assert rom.read(2047, 2) == 0xFFFF  # past the BAR: all-ones, no exception
    rom.write(0, 4, 0)  # ignored
    assert rom.read(0, 2) == 0xAA55


# -- through the host bridge ------------------------------------------------------------------


def test_host_assigns_the_rom_an_aligned_address_but_leaves_it_disabled(host):
    image = rom_image(3000)
    dev = RomDevice(image)
    slot = host.add_device(dev)
    address = dev.config.rom_address
    assert MMIO32_FIRST <= address and address + dev.rom.size - 1 <= MMIO32_LAST
    assert address % dev.rom.size == 0
    assert address != dev.config.bar_address(0)
    assert cfg_read(host, slot, EXPANSION_ROM) == address  # enable bit clear
    assert host.rom_mapped_address(slot) is None
    assert host.mmio.read(address, 2) == 0xFFFF  # nothing there


def test_enabled_rom_is_readable_through_its_mapping(host):
    image = rom_image(3000)
    dev = RomDevice(image)
    slot = host.add_device(dev)
    address = dev.config.rom_address
    cfg_write(host, slot, EXPANSION_ROM, address | 1)
    assert host.rom_mapped_address(slot) == address
    assert host.mmio.read(address, 2) == 0xAA55
    got = b"".join(host.mmio.read(address + i, 4).to_bytes(4, "little") for i in range(0, len(image), 4))
    assert got == image
    assert host.mmio.read(address + len(image), 4) == 0xFFFF_FFFF
    host.mmio.write(address, 4, 0)  # a ROM: writes do nothing
    assert host.mmio.read(address, 2) == 0xAA55
    # memory decode off: gone; back on: there again
    command = cfg_read(host, slot, COMMAND, 2)
    cfg_write(host, slot, COMMAND, command & ~COMMAND_MEMORY, 2)
    assert host.rom_mapped_address(slot) is None and host.mmio.read(address, 2) == 0xFFFF
    cfg_write(host, slot, COMMAND, command, 2)
    assert host.mmio.read(address, 2) == 0xAA55
    # disabled again: gone
    cfg_write(host, slot, EXPANSION_ROM, address)
    assert host.rom_mapped_address(slot) is None and host.mmio.read(address, 2) == 0xFFFF


def test_firmware_sizes_moves_and_enables_the_rom(host):
    """What SeaBIOS's map_pcirom does: size with decode on, move, enable, copy, disable."""
    dev = RomDevice(rom_image(70000))
    slot = host.add_device(dev)
    cfg_write(host, slot, EXPANSION_ROM, 0xFFFF_F800)  # sizing: not enabled, nothing mapped
    assert cfg_read(host, slot, EXPANSION_ROM) == 0xFFFE_0000
    assert host.rom_mapped_address(slot) is None
    new = 0xD000_0000
    cfg_write(host, slot, EXPANSION_ROM, new | 1)
    assert host.rom_mapped_address(slot) == new
    assert host.mmio.read(new, 2) == 0xAA55
    cfg_write(host, slot, EXPANSION_ROM, (new + 0x20000) | 1)  # moved while enabled
    assert host.rom_mapped_address(slot) == new + 0x20000
    assert host.mmio.read(new, 2) == 0xFFFF and host.mmio.read(new + 0x20000, 2) == 0xAA55
    cfg_write(host, slot, EXPANSION_ROM, new + 0x20000)
    assert host.rom_mapped_address(slot) is None


def test_rom_over_a_bar_is_not_mapped_and_does_not_break_the_bar(host):
    dev = RomDevice(rom_image(1000))
    slot = host.add_device(dev)
    bar = dev.config.bar_address(0)
    cfg_write(host, slot, EXPANSION_ROM, bar | 1)  # the guest's mistake
    assert host.rom_mapped_address(slot) is None
    assert host.mapped_address(slot, 0) == bar


def test_close_unmaps_the_rom(host):
    dev = RomDevice(rom_image(1000), bars=False)
    slot = host.add_device(dev)
    address = dev.config.rom_address
    cfg_write(host, slot, EXPANSION_ROM, address | 1)
    cfg_write(host, slot, COMMAND, COMMAND_MEMORY, 2)
    assert host.mmio.read(address, 2) == 0xAA55
    host.close()
    assert host.mmio.read(address, 2) == 0xFFFF


def test_devices_without_roms_keep_a_dead_register(host):
    class Plain(PciDevice):
        def __init__(self):
            self.config = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF0000)

    slot = host.add_device(Plain())
    cfg_write(host, slot, EXPANSION_ROM, 0xFFFF_FFFF)
    assert cfg_read(host, slot, EXPANSION_ROM) == 0


# -- patching a ROM's IDs ---------------------------------------------------------------------


def test_patch_rom_ids_sets_vendor_and_device_and_keeps_the_checksum():
    image = rom_image(3000, vendor=0x1AF4, device=0x1000)
    out = patch_rom_ids(image, 0x1AF4, 0x1041)
    assert out[0x24:0x28] == bytes.fromhex("f41a4110")
    assert sum(out[: out[2] * 512]) % 256 == 0
    assert len(out) == len(image)
    out = patch_rom_ids(image, 0x8086, 0x100E)
    assert out[0x24:0x28] == bytes.fromhex("86800e10") and sum(out) % 256 == 0


def test_patch_rom_ids_leaves_matching_and_non_roms_alone():
    image = rom_image(3000, vendor=0x1AF4, device=0x1041)
    assert patch_rom_ids(image, 0x1AF4, 0x1041) == image
    junk = b"\x00" * 100
    assert patch_rom_ids(junk, 1, 2) == junk
    no_pcir = bytearray(image)
    no_pcir[0x20:0x24] = b"XXXX"
    assert patch_rom_ids(bytes(no_pcir), 1, 2) == bytes(no_pcir)
    far = bytearray(image)
    far[0x18:0x1A] = (0xFFF0).to_bytes(2, "little")  # PCIR pointer past the end
    assert patch_rom_ids(bytes(far), 1, 2) == bytes(far)


def test_debian_ipxe_virtio_rom_matches_modern_virtio_net():
    """Debian's pxe-virtio.rom names 1AF4:1041, the modern virtio-net ID pyvmm uses."""
    path = "/usr/lib/ipxe/qemu/pxe-virtio.rom"
    try:
        image = open(path, "rb").read()
    except OSError:
        pytest.skip(f"{path} is not installed (package ipxe-qemu)")
    assert patch_rom_ids(image, 0x1AF4, 0x1041) == image
    assert sum(image[: image[2] * 512]) % 256 == 0


# -- what firmware looks at on the host bridge ------------------------------------------------


def test_host_bridge_carries_qemu_subsystem_ids(host):
    """SeaBIOS reads fw_cfg only when 00:00.0 has subsystem 1AF4:1100 (its qemu_detect)."""
    assert cfg_read(host, 0, 0x2C) == 0x1100_1AF4
    assert cfg_read(host, 0, 0) == 0x0008_1B36


def test_port_cf9_resets_the_machine():
    resets = []
    host = PciHost(pio=Bus("pio"), mmio=Bus("mmio"), on_reset=lambda: resets.append(1))
    host.pio.write(0xCF9, 1, 0x02)  # system reset bit alone: nothing yet
    assert resets == []
    host.pio.write(0xCF9, 1, 0x06)  # with CPU reset: reset
    assert resets == [1]
    host.pio.write(0xCF8, 4, 0x8000_0000)  # the configuration address register is unaffected
    assert host.pio.read(0xCF8, 4) == 0x8000_0000
    PciHost(pio=Bus("pio"), mmio=Bus("mmio")).pio.write(0xCF9, 1, 0x06)  # no callback: ignored
