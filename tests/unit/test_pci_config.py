"""PCI configuration space: header fields, BAR sizing, capability list, access widths."""

import pytest

from vmm.pci.config import (
    BAR0,
    CAPABILITIES_POINTER,
    CLASS_CODE,
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_MEMORY,
    EXTENDED_CONFIG_SPACE_SIZE,
    HEADER_TYPE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    STATUS,
    STATUS_CAPABILITIES_LIST,
    STATUS_INTERRUPT,
    BarKind,
    Capability,
    PciConfigSpace,
)


def make_space(**kw) -> PciConfigSpace:
    args = dict(vendor_id=0x1AF4, device_id=0x1042, class_code=0x018000, revision_id=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
    args.update(kw)
    return PciConfigSpace(**args)


def test_header_identity_and_widths():
    cs = make_space()
    assert cs.read(0, 4) == 0x1042_1AF4
    assert cs.read(0, 2) == 0x1AF4 and cs.read(2, 2) == 0x1042
    assert [cs.read(i, 1) for i in range(4)] == [0xF4, 0x1A, 0x42, 0x10]
    assert cs.read(8, 4) == 0x0180_0001  # class 01 80 00, revision 1
    assert cs.read(CLASS_CODE + 2, 1) == 0x01 and cs.read(CLASS_CODE + 1, 1) == 0x80
    assert cs.read(HEADER_TYPE, 1) == 0
    assert cs.read(0x2C, 4) == 0x1100_1AF4
    assert cs.read(INTERRUPT_PIN, 1) == 1  # INTA
    # every aligned width at every offset agrees with the bytes
    raw = bytes(cs.read(i, 1) for i in range(256))
    for off in range(0, 256, 2):
        assert cs.read(off, 2) == int.from_bytes(raw[off : off + 2], "little")
    for off in range(0, 256, 4):
        assert cs.read(off, 4) == int.from_bytes(raw[off : off + 4], "little")


def test_read_only_fields_ignore_writes():
    cs = make_space()
    before = [cs.read(i, 1) for i in range(256)]
    for off in (0, 2, 8, 0x0E, 0x2C, 0x2E, 0x30, CAPABILITIES_POINTER, INTERRUPT_PIN):
        cs.write(off, 1, 0x5A)
        cs.write(off & ~3, 4, 0xFFFF_FFFF)
    cs.write(0, 4, 0)
    after = [cs.read(i, 1) for i in range(256)]
    # only Command (and Cache Line Size, Interrupt Line, via the dword writes) may change
    changed = {i for i in range(256) if before[i] != after[i]}
    assert changed <= {COMMAND, COMMAND + 1, 0x0C, INTERRUPT_LINE}
    assert cs.read(0, 4) == 0x1042_1AF4
    assert cs.read(0x30, 4) == 0  # no expansion ROM: sizing reads 0


def test_writable_command_and_interrupt_line():
    cs = make_space()
    cs.write(COMMAND, 2, 0xFFFF)
    assert cs.read(COMMAND, 2) == 0x0547
    assert cs.memory_enabled and cs.io_enabled and cs.bus_master and cs.intx_disabled
    cs.write(COMMAND, 2, COMMAND_MEMORY)
    assert cs.memory_enabled and not cs.intx_disabled
    cs.write(INTERRUPT_LINE, 1, 0x11)
    assert cs.read(0x3C, 4) & 0xFFFF == 0x0111


def test_status_is_read_only_but_device_sets_interrupt_status():
    cs = make_space()
    cs.write(STATUS, 2, 0xFFFF)
    assert cs.read(STATUS, 2) == 0
    cs.set_interrupt_status(True)
    assert cs.read(STATUS, 2) == STATUS_INTERRUPT
    assert cs.read(COMMAND, 4) >> 16 == STATUS_INTERRUPT
    cs.set_interrupt_status(False)
    assert cs.read(STATUS, 2) == 0


def test_bar_sizing_32bit():
    cs = make_space()
    cs.add_bar(1, 0x4000, BarKind.MEM32)
    cs.set_bar_address(1, 0xC000_4000)
    off = BAR0 + 4
    saved = cs.read(off, 4)
    assert saved == 0xC000_4000
    cs.write(off, 4, 0xFFFF_FFFF)
    assert cs.read(off, 4) == 0xFFFF_C000  # size mask, type bits 0 (32-bit, not prefetchable)
    cs.write(off, 4, saved)
    assert cs.read(off, 4) == saved and cs.bar_address(1) == 0xC000_4000


def test_bar_sizing_64bit_prefetchable():
    cs = make_space()
    cs.add_bar(2, 0x8000, BarKind.MEM64, prefetchable=True)
    cs.set_bar_address(2, 0x10_0000_8000)
    lo, hi = BAR0 + 8, BAR0 + 12
    assert cs.read(lo, 4) == 0x0000_8000 | 0b1100 and cs.read(hi, 4) == 0x10
    saved_lo, saved_hi = cs.read(lo, 4), cs.read(hi, 4)
    cs.write(lo, 4, 0xFFFF_FFFF)
    cs.write(hi, 4, 0xFFFF_FFFF)
    assert cs.read(lo, 4) == 0xFFFF_8000 | 0b1100
    assert cs.read(hi, 4) == 0xFFFF_FFFF
    size = ~((cs.read(hi, 4) << 32 | cs.read(lo, 4)) & ~0xF) & (2**64 - 1)
    assert size + 1 == 0x8000
    cs.write(lo, 4, saved_lo)
    cs.write(hi, 4, saved_hi)
    assert cs.bar_address(2) == 0x10_0000_8000


def test_bar_low_bits_and_unimplemented_bars():
    cs = make_space()
    cs.add_bar(0, 0x1000, BarKind.MEM32)
    cs.add_bar(1, 0x20, BarKind.IO)
    cs.write(BAR0, 4, 0x1234_5FFF)
    assert cs.read(BAR0, 4) == 0x1234_5000
    cs.write(BAR0 + 4, 4, 0xFFFF_FFFF)
    assert cs.read(BAR0 + 4, 4) == 0xFFFF_FFE1  # I/O: bit 0 set, size 32
    for index in range(2, 6):  # absent BARs read 0 and stay 0
        cs.write(BAR0 + 4 * index, 4, 0xFFFF_FFFF)
        assert cs.read(BAR0 + 4 * index, 4) == 0
    # byte writes to a BAR's low byte keep the type bits
    cs.write(BAR0, 1, 0xFF)
    assert cs.read(BAR0, 1) == 0x00


def test_add_bar_rejects_bad_shapes():
    cs = make_space()
    with pytest.raises(ValueError):
        cs.add_bar(0, 0x1800, BarKind.MEM32)  # not a power of two
    with pytest.raises(ValueError):
        cs.add_bar(0, 0x800, BarKind.MEM32)  # below a page
    with pytest.raises(ValueError):
        cs.add_bar(5, 0x1000, BarKind.MEM64)  # needs slot 6
    cs.add_bar(0, 0x1000, BarKind.MEM64)
    with pytest.raises(ValueError):
        cs.add_bar(1, 0x1000, BarKind.MEM32)  # upper half of BAR 0


def test_mapping_and_command_hooks():
    cs = make_space()
    cs.add_bar(0, 0x1000, BarKind.MEM64)
    calls = []
    cs.on_mapping_change = lambda: calls.append("map")
    cs.on_command_change = lambda old, new: calls.append(("cmd", old, new))
    cs.write(COMMAND, 2, COMMAND_MEMORY)
    assert calls == [("cmd", 0, COMMAND_MEMORY), "map"]
    calls.clear()
    cs.write(COMMAND, 2, COMMAND_MEMORY | COMMAND_INTX_DISABLE)  # not a decode change
    assert calls == [("cmd", COMMAND_MEMORY, COMMAND_MEMORY | COMMAND_INTX_DISABLE)]
    calls.clear()
    cs.write(BAR0 + 4, 4, 0x1)  # the upper half moves the BAR
    assert calls == ["map"]
    calls.clear()
    cs.write(BAR0 + 4, 4, 0x1)  # same value: nothing changed
    cs.write(INTERRUPT_LINE, 1, 5)
    assert calls == []


class Recording(Capability):
    def __init__(self, cap_id, body, writable=None):
        super().__init__(cap_id, body, writable)
        self.events = []

    def before_read(self, rel, size):
        self.events.append(("read", rel, size))

    def after_write(self, rel, size):
        self.events.append(("write", rel, size))


def test_capability_list_walk():
    cs = make_space()
    a = Recording(0x09, bytes([6, 1, 2, 3]))
    b = Recording(0x11, bytes(10), writable=b"\x00\xc0" + bytes(8))
    c = Recording(0x05, bytes(3))
    offsets = [cs.add_capability(x) for x in (a, b, c)]
    assert cs.read(STATUS, 2) & STATUS_CAPABILITIES_LIST
    found = []
    ptr = cs.read(CAPABILITIES_POINTER, 1) & ~3
    while ptr:
        found.append((ptr, cs.read(ptr, 1)))
        ptr = cs.read(ptr + 1, 1)
    assert found == list(zip(offsets, [0x09, 0x11, 0x05]))
    assert all(off % 4 == 0 and off >= 0x40 for off in offsets)
    assert cs.read(offsets[0] + 2, 4) == 0x03020106
    # ID and next pointer are read-only; the writable mask applies
    cs.write(offsets[1], 4, 0xFFFF_FFFF)
    assert b.events[-1] == ("write", 0, 4)
    assert cs.read(offsets[1], 4) == 0xC000_0000 | (offsets[2] << 8) | 0x11
    cs.read(offsets[1] + 2, 2)
    assert b.events[-1] == ("read", 2, 2)


def test_capability_space_runs_out():
    cs = make_space()
    for _ in range(6):
        cs.add_capability(Capability(0x09, bytes(30)))
    with pytest.raises(ValueError):
        cs.add_capability(Capability(0x09, bytes(30)))


def test_extended_space_and_bad_accesses():
    cs = make_space()
    assert cs.read(0x100, 4) == 0
    assert cs.read(EXTENDED_CONFIG_SPACE_SIZE - 4, 4) == 0
    cs.write(0x100, 4, 0xFFFF_FFFF)
    assert cs.read(0x100, 4) == 0
    assert cs.read(EXTENDED_CONFIG_SPACE_SIZE, 4) == 0xFFFF_FFFF
    assert cs.read(-1, 1) == 0xFF
    assert cs.read(0, 3) == 0
    cs.write(0xFF, 4, 0xFFFF_FFFF)  # crosses the end: clipped, no error
    cs.write(0, 8, 0)
    # unaligned reads still give the bytes
    assert cs.read(1, 2) == 0x421A
    assert cs.read(0xFE, 4) == cs.read(0xFE, 2)
