"""MSI-X capability, vector table and PBA, over real MsiVectors with a fake IrqRouter (no KVM).

`FakeIrqRouter` is shared with the PCI host and virtio-pci tests.
"""

import os

import pytest

from vmm.irq import MsiVector
from vmm.pci.config import PciConfigSpace
from vmm.pci.msix import (
    MSIX_ENABLE,
    MSIX_FUNCTION_MASK,
    MsixCapability,
)


class RecordingVector(MsiVector):
    """A real MsiVector (eventfd, pending logic) that records what it is told."""

    def __init__(self, router, gsi):
        super().__init__(router, gsi)
        self.programs: list[tuple[int, int, bool]] = []

    def program(self, address, data, masked):
        self.programs.append((address, data, masked))
        super().program(address, data, masked)

    def fired(self) -> int:
        """How many times the irqfd was signalled since the last call."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


class FakeIrqRouter:
    """IrqRouter's interface without KVM: allocate() / set_line(); commit() counts."""

    def __init__(self):
        self.vectors: list[RecordingVector] = []
        self.commits = 0
        self.lines: list[tuple[int, bool]] = []
        self.level: dict[int, bool] = {}

    def allocate(self):
        v = RecordingVector(self, 24 + len(self.vectors))
        self.vectors.append(v)
        return v

    def commit(self):
        self.commits += 1

    def set_line(self, gsi, level):
        self.lines.append((gsi, level))
        self.level[gsi] = level

    def close(self):
        for v in self.vectors:
            os.close(v.fd)
        self.vectors = []


@pytest.fixture
def irq():
    router = FakeIrqRouter()
    yield router
    router.close()


TABLE_OFF, PBA_OFF = 0x4000, 0x5000


def make(irq, n=3):
    cs = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0x020000)
    cap = MsixCapability(irq, n, table_bar=0, table_offset=TABLE_OFF, pba_bar=0, pba_offset=PBA_OFF)
    off = cs.add_capability(cap)
    return cs, cap, off


def set_control(cs, off, value):
    cs.write(off + 2, 2, value)


def program_entry(cap, i, address, data, *, masked=False, width=4):
    base = 16 * i
    if width == 8:
        cap.table.write(base, 8, address)
        cap.table.write(base + 8, 8, data | (int(masked) << 32))
    else:
        cap.table.write(base, 4, address & 0xFFFF_FFFF)
        cap.table.write(base + 4, 4, address >> 32)
        cap.table.write(base + 8, 4, data)
        cap.table.write(base + 12, 4, int(masked))


def test_capability_fields(irq):
    cs, cap, off = make(irq, 3)
    assert cs.read(off, 1) == 0x11
    assert cs.read(off + 2, 2) == 2  # table size N-1, disabled, not masked
    assert cs.read(off + 4, 4) == TABLE_OFF | 0  # BIR 0
    assert cs.read(off + 8, 4) == PBA_OFF | 0
    cs.write(off + 2, 2, 0xFFFF)  # only bits 14 and 15 are writable
    assert cs.read(off + 2, 2) == 0xC002
    cs.write(off + 4, 4, 0)
    cs.write(off + 8, 4, 0)
    assert cs.read(off + 4, 4) == TABLE_OFF and cs.read(off + 8, 4) == PBA_OFF
    assert cap.table.length == 48 and cap.pba.length == 8
    assert len(irq.vectors) == 3


def test_entries_start_masked_and_programmed_masked(irq):
    cs, cap, off = make(irq, 2)
    for i in range(2):
        assert cap.table.read(16 * i + 12, 4) == 1
        assert irq.vectors[i].programs == [(0, 0, True)]


def test_table_access_widths(irq):
    cs, cap, off = make(irq, 2)
    program_entry(cap, 1, 0xFEE0_1000, 0x4041, masked=True, width=4)
    assert cap.table.read(16, 4) == 0xFEE0_1000
    assert cap.table.read(20, 4) == 0
    assert cap.table.read(24, 4) == 0x4041
    assert cap.table.read(28, 4) == 1
    assert cap.table.read(16, 8) == 0xFEE0_1000
    assert cap.table.read(24, 8) == 0x1_0000_4041
    program_entry(cap, 0, 0x1_FEE0_2000, 0x55, masked=False, width=8)
    assert cap.table.read(0, 8) == 0x1_FEE0_2000
    assert cap.table.read(0, 4) == 0xFEE0_2000 and cap.table.read(4, 4) == 1
    assert cap.table.read(8, 8) == 0x55
    # reserved vector control bits read 0
    cap.table.write(12, 4, 0xFFFF_FFFE)
    assert cap.table.read(12, 4) == 0
    # unaligned or odd-width writes are ignored; reads past the table give 0; nothing raises
    cap.table.write(2, 4, 0xDEAD)
    cap.table.write(0, 2, 0xDEAD)
    cap.table.write(4, 8, 0xDEAD)
    cap.table.write(32, 4, 1)
    cap.table.write(-4, 4, 1)
    assert cap.table.read(0, 4) == 0xFEE0_2000
    assert cap.table.read(32, 4) == 0 and cap.table.read(-8, 8) == 0 and cap.table.read(14, 4) == 0


def test_programming_follows_entry_and_function_masks(irq):
    cs, cap, off = make(irq, 2)
    v = irq.vectors[0]
    program_entry(cap, 0, 0xFEE0_0000, 0x31, masked=True)
    assert v.programs[-1] == (0xFEE0_0000, 0x31, True)  # MSI-X not enabled yet: masked
    cap.table.write(12, 4, 0)  # unmask the entry: still masked, MSI-X is off
    assert v.programs[-1] == (0xFEE0_0000, 0x31, True)
    set_control(cs, off, MSIX_ENABLE)
    assert cap.enabled and v.programs[-1] == (0xFEE0_0000, 0x31, False)
    assert irq.vectors[1].programs[-1] == (0, 0, True)  # entry 1 still masked by its own bit
    set_control(cs, off, MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert cap.function_masked and v.programs[-1] == (0xFEE0_0000, 0x31, True)
    set_control(cs, off, MSIX_ENABLE)
    assert v.programs[-1] == (0xFEE0_0000, 0x31, False)
    cap.table.write(12, 4, 1)
    assert v.programs[-1] == (0xFEE0_0000, 0x31, True)
    set_control(cs, off, 0)
    cap.table.write(12, 4, 0)
    assert v.programs[-1] == (0xFEE0_0000, 0x31, True)
    n = len(v.programs)
    cap.table.write(8, 4, 0x31)  # same value again: nothing to reprogram
    assert len(v.programs) == n


def test_enable_callback(irq):
    cs, cap, off = make(irq, 1)
    seen = []
    cap.on_enable_change = seen.append
    set_control(cs, off, MSIX_FUNCTION_MASK)
    set_control(cs, off, MSIX_ENABLE | MSIX_FUNCTION_MASK)
    set_control(cs, off, MSIX_ENABLE)
    set_control(cs, off, 0)
    assert seen == [True, False]


def test_trigger_delivers_or_pends_with_pba(irq):
    cs, cap, off = make(irq, 3)
    v1 = irq.vectors[1]
    program_entry(cap, 1, 0xFEE0_0000, 0x41, masked=True)
    set_control(cs, off, MSIX_ENABLE)
    assert cap.pba.read(0, 8) == 0
    cap.trigger(1)
    assert v1.fired() == 0 and v1.pending
    assert cap.pba.read(0, 8) == 0b010
    assert cap.pba.read(0, 4) == 0b010 and cap.pba.read(0, 1) == 0b010
    cap.pba.write(0, 8, 0)  # read-only
    assert cap.pba.read(0, 8) == 0b010
    cap.table.write(16 + 12, 4, 0)  # unmask: the pending message goes out
    assert v1.fired() == 1 and not v1.pending
    assert cap.pba.read(0, 8) == 0
    cap.trigger(1)
    assert v1.fired() == 1
    # function mask: pending again, delivered on unmask
    set_control(cs, off, MSIX_ENABLE | MSIX_FUNCTION_MASK)
    cap.trigger(1)
    assert v1.fired() == 0 and cap.pba.read(0, 8) == 0b010
    set_control(cs, off, MSIX_ENABLE)
    assert v1.fired() == 1 and cap.pba.read(0, 8) == 0
    cap.trigger(7)  # out of range: ignored
    cap.trigger(-1)
    assert cap.pba.read(8, 8) == 0 and cap.pba.read(3, 8) == 0


def test_reset_masks_everything(irq):
    cs, cap, off = make(irq, 2)
    seen = []
    cap.on_enable_change = seen.append
    program_entry(cap, 0, 0xFEE0_0000, 0x41)
    set_control(cs, off, MSIX_ENABLE)
    cap.reset()
    assert not cap.enabled and seen == [True, False]
    assert cs.read(off + 2, 2) == 1
    assert cap.table.read(0, 8) == 0 and cap.table.read(12, 4) == 1
    assert irq.vectors[0].programs[-1] == (0, 0, True)


def test_bad_shapes(irq):
    with pytest.raises(ValueError):
        MsixCapability(irq, 0, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    with pytest.raises(ValueError):
        MsixCapability(irq, 4, table_bar=0, table_offset=4, pba_bar=0, pba_offset=0x800)
