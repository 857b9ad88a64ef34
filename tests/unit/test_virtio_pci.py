"""virtio-pci modern transport, driven as a Linux driver would through config space and BAR 0.

No KVM: a FakeVm records ioeventfd calls, FakeIrqRouter (tests/unit/test_msix.py)
records INTx lines and gives real MsiVectors whose irqfds we read.
"""

import os
import struct

import pytest

from tests.unit.test_msix import FakeIrqRouter
from virtio.device import (
    CONFIG,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from virtio.pci import (
    COMMON_CFG_LENGTH,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VirtioPciDevice,
)
from vmm.memory import GuestMemory, MiB
from vmm.pci.config import BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEMORY, STATUS

# struct virtio_pci_common_cfg offsets
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUM_QUEUES, STATUS_, CFG_GEN = 0, 4, 8, 12, 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESCLO, Q_DESCHI, Q_AVAILLO, Q_AVAILHI, Q_USEDLO, Q_USEDHI, Q_NDATA, Q_RESET = (
    0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3A)

FEATURE_X = 3  # a device feature bit our fake offers


class FakeVm:
    def __init__(self):
        self.ioeventfds: dict[tuple[int, int], int] = {}  # (addr, len) -> fd
        self.calls = []

    def ioeventfd(self, fd, addr, length, *, datamatch=None, pio=False, deassign=False):
        self.calls.append((fd, addr, length, datamatch, pio, deassign))
        assert datamatch is None and not pio
        if deassign:
            assert self.ioeventfds.pop((addr, length)) == fd
        else:
            assert (addr, length) not in self.ioeventfds
            self.ioeventfds[(addr, length)] = fd


class FakeDevice(VirtioDevice):
    device_id = 2
    name = "fake"

    def __init__(self, mem):
        super().__init__(mem, num_queues=2, queue_size=64, features=1 << FEATURE_X)
        self.config = bytearray(b"\x10\x20\x30\x40\x50\x60\x70\x80")
        self.config_writes = []
        self.activations = 0

    def config_bytes(self):
        return bytes(self.config)

    def write_config(self, offset, size, value):
        self.config_writes.append((offset, size, value))

    def activate(self):
        self.activations += 1


@pytest.fixture
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


@pytest.fixture
def irq():
    router = FakeIrqRouter()
    yield router
    router.close()


BAR_ADDR = 0xC000_0000


@pytest.fixture
def dev(mem, irq):
    vm = FakeVm()
    d = VirtioPciDevice(FakeDevice(mem), irq=irq, vm=vm)
    d.vm_fake = vm
    d.intx_gsi = 17
    d.config.set_bar_address(0, BAR_ADDR)
    d.config.write(COMMAND, 2, COMMAND_MEMORY)
    d.bar_mapped(0, BAR_ADDR)
    yield d
    d.close()


@pytest.mark.parametrize("device_id, class_code", [(1, 0x020000), (2, 0x018000), (3, 0x078000), (4, 0xFF0000),
                                                    (5, 0xFF0000), (19, 0x078000)])
def test_the_class_code_says_what_the_device_is(mem, irq, device_id, class_code):
    """net: Ethernet; blk: other mass storage; console and vsock: other communication; rng, balloon: other."""
    kind = type("Kind", (FakeDevice,), {"device_id": device_id})
    d = VirtioPciDevice(kind(mem), irq=irq, vm=FakeVm())
    try:
        assert d.config.read(8, 4) >> 8 == class_code
        assert d.config.read(2, 2) == 0x1040 + device_id  # (modern device ID: 0x1040 + the virtio ID)
    finally:
        d.close()


class Driver:
    """The driver's side: capabilities found by walking config space, then BAR accesses."""

    def __init__(self, dev: VirtioPciDevice):
        self.dev = dev
        self.caps = {}
        self.cap_offsets = {}
        self.msix_cap = None
        cs = dev.config
        ptr = cs.read(CAPABILITIES_POINTER, 1)
        while ptr:
            cap_id = cs.read(ptr, 1)
            if cap_id == 0x09:
                cap_len, cfg_type, bar = cs.read(ptr + 2, 1), cs.read(ptr + 3, 1), cs.read(ptr + 4, 1)
                offset, length = cs.read(ptr + 8, 4), cs.read(ptr + 12, 4)
                extra = cs.read(ptr + 16, 4) if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG else None
                # the driver uses the first capability of each type
                self.caps.setdefault(cfg_type, (bar, offset, length, cap_len, extra))
                self.cap_offsets.setdefault(cfg_type, ptr)
            elif cap_id == 0x11:
                self.msix_cap = ptr
            ptr = cs.read(ptr + 1, 1)
        self.common = self.caps[VIRTIO_PCI_CAP_COMMON_CFG][1]
        self.isr = self.caps[VIRTIO_PCI_CAP_ISR_CFG][1]
        self.device = self.caps[VIRTIO_PCI_CAP_DEVICE_CFG][1]
        self.notify = self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG][1]
        self.multiplier = self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG][4]

    def r(self, off, size):
        return self.dev.bar_read(0, self.common + off, size)

    def w(self, off, size, value):
        self.dev.bar_write(0, self.common + off, size, value)

    def status(self):
        return self.r(STATUS_, 1)

    def add_status(self, bits):
        self.w(STATUS_, 1, self.status() | bits)

    def features(self):
        self.w(DFSELECT, 4, 0)
        lo = self.r(DF, 4)
        self.w(DFSELECT, 4, 1)
        return self.r(DF, 4) << 32 | lo

    def set_features(self, features):
        for sel in (0, 1):
            self.w(GFSELECT, 4, sel)
            self.w(GF, 4, (features >> (32 * sel)) & 0xFFFF_FFFF)

    def setup_queue(self, index, size, base, vector):
        self.w(Q_SELECT, 2, index)
        assert self.r(Q_ENABLE, 2) == 0
        assert self.r(Q_SIZE, 2) >= size
        self.w(Q_SIZE, 2, size)
        self.w(Q_MSIX, 2, vector)
        assert self.r(Q_MSIX, 2) == vector
        desc, avail, used = base, base + 16 * size, base + 0x1000
        for lo, addr in ((Q_DESCLO, desc), (Q_AVAILLO, avail), (Q_USEDLO, used)):
            self.w(lo, 4, addr & 0xFFFF_FFFF)
            self.w(lo + 4, 4, addr >> 32)
        self.w(Q_ENABLE, 2, 1)
        return self.r(Q_NOFF, 2)

    def msix_control(self, value):
        self.dev.config.write(self.msix_cap + 2, 2, value)

    def msix_entry(self, i, address, data, masked=False):
        table = self.dev.config.read(self.msix_cap + 4, 4) & ~7
        for off, v in ((0, address & 0xFFFF_FFFF), (4, address >> 32), (8, data), (12, int(masked))):
            self.dev.bar_write(0, table + 16 * i + off, 4, v)


def test_pci_identity(dev):
    cs = dev.config
    assert cs.read(0, 2) == 0x1AF4 and cs.read(2, 2) == 0x1042
    assert cs.read(8, 1) == 1  # revision 1: modern only
    assert cs.read(8, 4) >> 8 == 0x018000
    assert cs.read(0x2C, 2) == 0x1AF4 and cs.read(0x2E, 2) == 0x1100
    assert cs.read(0x3D, 1) == 1
    bar_lo = cs.read(BAR0, 4)
    assert bar_lo & 0xF == 0b0100  # memory, 64-bit, not prefetchable
    cs.write(BAR0, 4, 0xFFFF_FFFF)
    cs.write(BAR0 + 4, 4, 0xFFFF_FFFF)
    size = (~(cs.read(BAR0, 4) & ~0xF) & 0xFFFF_FFFF) + 1
    assert size == dev.layout.size == 0x8000


def test_capabilities_as_a_driver_finds_them(dev):
    d = Driver(dev)
    assert set(d.caps) == {1, 2, 3, 4, 5}
    assert all(c[0] == 0 for c in d.caps.values())  # all in BAR 0
    bar, off, length, cap_len, _ = d.caps[VIRTIO_PCI_CAP_COMMON_CFG]
    assert (off, length, cap_len) == (0, COMMON_CFG_LENGTH, 16)
    assert d.caps[VIRTIO_PCI_CAP_ISR_CFG][1:3] == (0x1000, 1)
    assert d.caps[VIRTIO_PCI_CAP_DEVICE_CFG][1:3] == (0x2000, 8)
    bar, off, length, cap_len, mult = d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert (off, cap_len, mult) == (0x3000, 20, 4)
    assert length >= 1 * mult + 2  # covers the last queue's notify address
    assert d.caps[VIRTIO_PCI_CAP_PCI_CFG][3] == 20
    assert d.msix_cap is not None
    assert dev.config.read(d.msix_cap + 2, 2) & 0x7FF == 2  # num_queues + 1 vectors
    table = dev.config.read(d.msix_cap + 4, 4)
    pba = dev.config.read(d.msix_cap + 8, 4)
    assert table & 7 == 0 and pba & 7 == 0
    assert (table, pba) == (dev.layout.msix_table, dev.layout.msix_pba) == (0x4000, 0x5000)
    # structures do not overlap each other
    spans = sorted([(0, COMMON_CFG_LENGTH), (0x1000, 1), (0x2000, 8), (0x3000, length),
                    (table, 48), (pba, 8)])
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] <= dev.layout.size


def test_full_initialisation_sequence(dev, mem):
    d = Driver(dev)
    fake = dev.device
    # 3.1.1: reset, ACKNOWLEDGE, DRIVER
    d.w(STATUS_, 1, 0)
    assert d.status() == 0
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    d.add_status(VIRTIO_CONFIG_S_DRIVER)
    offered = d.features()
    assert offered >> VIRTIO_F_VERSION_1 & 1 and offered >> FEATURE_X & 1
    assert offered == fake.device_features
    d.w(DFSELECT, 4, 2)
    assert d.r(DF, 4) == 0  # no feature words past 64 bits
    wanted = (1 << VIRTIO_F_VERSION_1) | (1 << FEATURE_X)
    d.set_features(wanted)
    assert fake.driver_features == wanted
    d.w(GFSELECT, 4, 1)
    assert d.r(GF, 4) == 1  # VERSION_1 is bit 32
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    assert d.status() & VIRTIO_CONFIG_S_FEATURES_OK
    # features are frozen after FEATURES_OK
    d.w(GFSELECT, 4, 0)
    d.w(GF, 4, 0)
    assert fake.driver_features == wanted
    # device configuration
    assert d.r(CFG_GEN, 1) == fake.config_generation
    assert dev.bar_read(0, d.device, 4) == 0x4030_2010
    assert dev.bar_read(0, d.device + 4, 2) == 0x6050
    assert dev.bar_read(0, d.device + 7, 1) == 0x80
    dev.bar_write(0, d.device + 2, 2, 0xBEEF)
    assert fake.config_writes == [(2, 2, 0xBEEF)]
    # MSI-X: config vector 0, queues 1 and 2
    d.w(MSIX_CONFIG, 2, 0)
    assert d.r(MSIX_CONFIG, 2) == 0
    assert d.r(NUM_QUEUES, 2) == 2
    for q in range(2):
        noff = d.setup_queue(q, 16, 0x10000 + q * 0x4000, q + 1)
        assert noff == q
        assert d.r(Q_ENABLE, 2) == 1
        queue = fake.queues[q]
        assert queue.ready and queue.size == 16
        assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (
            0x10000 + q * 0x4000, 0x10000 + q * 0x4000 + 256, 0x11000 + q * 0x4000)
        assert d.r(Q_DESCLO, 4) == queue.desc_table and d.r(Q_DESCLO, 8) == queue.desc_table
        assert d.r(Q_NDATA, 2) == q and d.r(Q_RESET, 2) == 0
    d.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
    assert d.status() & VIRTIO_CONFIG_S_DRIVER_OK and not d.status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert fake.activations == 1 and fake.active
    # enabled queues refuse reconfiguration
    d.w(Q_SELECT, 2, 0)
    d.w(Q_SIZE, 2, 8)
    d.w(Q_DESCLO, 4, 0x9000)
    assert fake.queues[0].size == 16 and fake.queues[0].desc_table == 0x10000


@pytest.mark.parametrize("features", [
    1 << FEATURE_X,  # no VERSION_1
    (1 << VIRTIO_F_VERSION_1) | (1 << 5),  # not offered
])
def test_features_ok_refused(dev, features):
    d = Driver(dev)
    d.w(STATUS_, 1, 0)
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.set_features(features)
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    assert not d.status() & VIRTIO_CONFIG_S_FEATURES_OK


def test_bad_queue_setup_sets_needs_reset(dev):
    d = Driver(dev)
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.set_features(1 << VIRTIO_F_VERSION_1)
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_SIZE, 2, 12)  # not a power of two
    d.w(Q_ENABLE, 2, 1)
    assert d.r(Q_ENABLE, 2) == 0
    assert d.status() & VIRTIO_CONFIG_S_NEEDS_RESET
    d.w(Q_SIZE, 2, 16)
    d.w(Q_DESCLO, 4, 0xFFFF_0000)  # not RAM
    d.w(Q_ENABLE, 2, 1)
    assert d.r(Q_ENABLE, 2) == 0


def test_msix_interrupts_follow_vectors(dev, irq):
    d = Driver(dev)
    d.w(MSIX_CONFIG, 2, 0)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_MSIX, 2, 2)
    d.w(Q_SELECT, 2, 1)
    d.w(Q_MSIX, 2, VIRTIO_MSI_NO_VECTOR)
    for i in range(3):
        d.msix_entry(i, 0xFEE0_0000, 0x40 + i)
    d.msix_control(0x8000)
    v = irq.vectors
    dev.device.signal_used(0)
    assert [x.fired() for x in v] == [0, 0, 1]
    dev.device.signal_used(1)  # NO_VECTOR: nothing
    dev.device.config_changed()  # not DRIVER_OK: the device does not notify
    dev._interrupt(CONFIG)
    assert [x.fired() for x in v] == [1, 0, 0]
    assert dev.isr == 0 and irq.lines == []  # MSI-X: no ISR, no INTx
    # masked entry: pending, visible in the PBA, delivered on unmask
    d.msix_entry(2, 0xFEE0_0000, 0x42, masked=True)
    dev.device.signal_used(0)
    assert v[2].fired() == 0
    pba = dev.config.read(d.msix_cap + 8, 4) & ~7
    assert dev.bar_read(0, pba, 8) == 0b100
    d.msix_entry(2, 0xFEE0_0000, 0x42, masked=False)
    assert v[2].fired() == 1 and dev.bar_read(0, pba, 8) == 0


def test_intx_interrupts_and_isr(dev, irq):
    d = Driver(dev)
    dev.device.signal_used(1)
    assert irq.level[17] is True
    assert dev.config.read(STATUS, 2) & 0x8
    dev._interrupt(CONFIG)
    assert irq.lines == [(17, True)]  # already high
    assert dev.bar_read(0, d.isr, 1) == 0b11
    assert irq.level[17] is False and not dev.config.read(STATUS, 2) & 0x8
    assert dev.bar_read(0, d.isr, 1) == 0  # read cleared it
    # Interrupt Disable keeps the line low, and raises it when cleared again
    dev.config.write(COMMAND, 2, COMMAND_MEMORY | COMMAND_INTX_DISABLE)
    dev.device.signal_used(0)
    assert irq.level[17] is False and dev.isr == 1
    dev.config.write(COMMAND, 2, COMMAND_MEMORY)
    assert irq.level[17] is True
    # enabling MSI-X lowers INTx
    d.msix_control(0x8000)
    assert irq.level[17] is False
    d.msix_control(0)
    assert irq.level[17] is True
    dev.bar_read(0, d.isr, 4)
    assert irq.level[17] is False


def test_notify_ioeventfds_and_python_fallback(dev):
    d = Driver(dev)
    vm = dev.vm_fake
    events = dev.device.queue_events
    for q in range(2):
        addr = BAR_ADDR + d.notify + q * d.multiplier
        assert vm.ioeventfds[(addr, 2)] == events[q]
    # a notify that reaches Python (here: a 4-byte store) signals the eventfd itself
    dev.bar_write(0, d.notify + 4, 4, 1)
    assert os.eventfd_read(events[1]) == 1
    dev.bar_write(0, d.notify, 2, 0)
    assert os.eventfd_read(events[0]) == 1
    dev.bar_write(0, d.notify + 2, 2, 0)  # between queues: ignored
    dev.bar_write(0, d.notify + 4 * 7, 2, 7)  # no such queue
    for fd in events:
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    assert dev.bar_read(0, d.notify, 2) == 0
    # unmapping removes them, mapping elsewhere adds them there
    dev.bar_mapped(0, None)
    assert vm.ioeventfds == {}
    dev.bar_mapped(0, 0xC010_0000)
    assert set(vm.ioeventfds) == {(0xC010_3000, 2), (0xC010_3004, 2)}


def test_reset_clears_transport_state(dev, irq):
    d = Driver(dev)
    d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    d.set_features(1 << VIRTIO_F_VERSION_1)
    d.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
    d.w(MSIX_CONFIG, 2, 1)
    d.setup_queue(1, 32, 0x20000, 2)
    dev.device.signal_used(1)  # INTx pending
    assert irq.level[17]
    d.w(DFSELECT, 4, 1)
    d.w(STATUS_, 1, 0)
    assert d.status() == 0
    assert d.r(MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    assert d.r(Q_SELECT, 2) == 0 and d.r(DFSELECT, 4) == 0
    for q in range(2):
        d.w(Q_SELECT, 2, q)
        assert d.r(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
        assert d.r(Q_ENABLE, 2) == 0
        assert d.r(Q_SIZE, 2) == 64  # back to the maximum
        assert d.r(Q_DESCLO, 8) == 0
    assert dev.device.driver_features == 0
    assert dev.isr == 0 and irq.level[17] is False


def test_bad_guest_values_never_raise(dev):
    d = Driver(dev)
    d.w(Q_SELECT, 2, 9)  # out of range
    assert d.r(Q_SIZE, 2) == 0 and d.r(Q_ENABLE, 2) == 0 and d.r(Q_NOFF, 2) == 0
    assert d.r(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    for off, size in ((Q_SIZE, 2), (Q_MSIX, 2), (Q_ENABLE, 2), (Q_DESCLO, 4), (Q_RESET, 2)):
        d.w(off, size, 1)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_MSIX, 2, 3)  # table has 3 entries: 0..2
    assert d.r(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.w(MSIX_CONFIG, 2, 0x1234)
    assert d.r(MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    d.w(NUM_QUEUES, 2, 7)  # read-only
    assert d.r(NUM_QUEUES, 2) == 2
    # partial and odd accesses: byte reads of a word, writes across fields ignored
    assert d.r(NUM_QUEUES, 1) == 2 and d.r(NUM_QUEUES + 1, 1) == 0
    assert d.r(MSIX_CONFIG, 4) == 0x0002_FFFF
    d.w(Q_SELECT - 1, 4, 0xFFFF_FFFF)  # spans device_status.. : ignored
    assert d.status() == 0 and d.r(Q_SELECT, 2) == 0
    d.w(Q_SELECT, 1, 1)
    assert d.r(Q_SELECT, 2) == 1
    # outside the structures and outside the BAR
    size = dev.layout.size
    for off, width in ((COMMON_CFG_LENGTH, 4), (0x0FFC, 4), (0x1001, 1), (size - 4, 8), (size, 4),
                       (-4, 4), (0x3000, 3), (0x6000, 8)):
        assert dev.bar_read(0, off, width) == 0
        dev.bar_write(0, off, width, 0xFFFF_FFFF)
    assert dev.bar_read(1, 0, 4) == 0
    dev.bar_write(1, 0, 4, 0)


def test_pci_cfg_capability_window(dev):
    d = Driver(dev)
    cap = d.cap_offsets[VIRTIO_PCI_CAP_PCI_CFG]
    cs = dev.config

    def window(offset, length, bar=0):
        cs.write(cap + 4, 1, bar)
        cs.write(cap + 8, 4, offset)
        cs.write(cap + 12, 4, length)

    window(NUM_QUEUES, 2)
    assert cs.read(cap + 16, 4) & 0xFFFF == 2
    window(Q_SELECT, 2)
    cs.write(cap + 16, 4, 1)
    assert dev.queue_select == 1
    window(d.device, 4)
    assert cs.read(cap + 16, 4) == 0x4030_2010
    # a notification through the window
    window(d.notify + 4, 2)
    cs.write(cap + 16, 2, 1)
    assert os.eventfd_read(dev.device.queue_events[1]) == 1
    # ISR read through the window clears it
    dev.device.signal_used(0)
    window(d.isr, 1)
    assert cs.read(cap + 16, 1) == 1 and dev.isr == 0
    # invalid windows are ignored: other BAR, bad length, unaligned, past the BAR
    before = dev.queue_select
    for args in ((Q_SELECT, 2, 1), (Q_SELECT, 3), (Q_SELECT + 1, 2), (dev.layout.size, 4)):
        window(*args)
        cs.write(cap + 16, 4, 0)
        cs.read(cap + 16, 4)
    assert dev.queue_select == before


def test_device_without_config_has_no_device_cap(mem, irq):
    class Bare(FakeDevice):
        def config_bytes(self):
            return b""

    d = VirtioPciDevice(Bare(mem), irq=irq, vm=FakeVm())
    try:
        caps = []
        ptr = d.config.read(CAPABILITIES_POINTER, 1)
        while ptr:
            if d.config.read(ptr, 1) == 0x09:
                caps.append(d.config.read(ptr + 3, 1))
            ptr = d.config.read(ptr + 1, 1)
        assert caps == [1, 2, 3, 5]
    finally:
        d.close()


def test_close_removes_ioeventfds_and_closes_device(mem, irq):
    vm = FakeVm()
    fake = FakeDevice(mem)
    d = VirtioPciDevice(fake, irq=irq, vm=vm)
    d.bar_mapped(0, BAR_ADDR)
    assert len(vm.ioeventfds) == 2
    d.close()
    assert vm.ioeventfds == {} and fake.queue_events == []


def test_ioeventfd_failure_falls_back_to_exits(mem, irq):
    class FailingVm(FakeVm):
        def ioeventfd(self, fd, addr, length, **kw):
            raise OSError(17, "File exists")

    d = VirtioPciDevice(FakeDevice(mem), irq=irq, vm=FailingVm())
    try:
        d.bar_mapped(0, BAR_ADDR)  # logged, not raised
        d.bar_write(0, d.layout.notify, 2, 0)
        assert os.eventfd_read(d.device.queue_events[0]) == 1
    finally:
        d.close()


def test_common_cfg_layout_matches_spec():
    from virtio.pci import COMMON_CFG_FIELDS

    # struct virtio_pci_common_cfg: packed, natural alignment, in this order (4.1.4.3)
    fmt = "<IIIIHHBBHHHHHQQQHH"
    assert struct.calcsize(fmt) == COMMON_CFG_LENGTH
    offset = 0
    for (name, off, size), code in zip(COMMON_CFG_FIELDS, fmt[1:]):
        assert off == offset, name
        assert size == struct.calcsize("<" + code)
        offset += size


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm on this host")
def test_with_real_kvm_routes_and_ioeventfds(mem):
    """The same transport over a real VM: ioeventfds (length 2) assigned, moved and removed,
    MSI routes committed through a real IrqRouter, INTx through KVM_IRQ_LINE."""
    from vmm.bus import Bus
    from vmm.irq import IrqRouter
    from vmm.kvm import Kvm
    from vmm.pci.host import PciHost

    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        router = IrqRouter(vm)
        host = PciHost(pio=Bus("pio"), mmio=Bus("mmio"))
        dev = VirtioPciDevice(FakeDevice(mem), irq=router, vm=vm)
        host.add_device(dev)
        d = Driver(dev)
        bar = dev.config.bar_address(0)
        assert [addr for _, addr in dev._ioeventfds] == [bar + 0x3000, bar + 0x3004]
        # move the BAR: the old ioeventfds are deassigned, new ones assigned
        dev.config.write(BAR0, 4, 0xD000_0000)
        assert [addr for _, addr in dev._ioeventfds] == [0xD000_3000, 0xD000_3004]
        # MSI-X programming goes through KVM_SET_GSI_ROUTING
        d.msix_entry(0, 0xFEE0_0000, 0x41)
        d.msix_control(0x8000)
        d.w(MSIX_CONFIG, 2, 0)
        dev._interrupt(CONFIG)
        assert not router.vectors[0].pending  # sent to its irqfd (KVM consumes the count at once)
        d.msix_entry(0, 0xFEE0_0000, 0x41, masked=True)
        dev._interrupt(CONFIG)
        assert router.vectors[0].pending
        d.msix_control(0)
        dev.device.signal_used(0)  # INTx via KVM_IRQ_LINE
        assert dev.bar_read(0, d.isr, 1) == 1
        events = list(dev.device.queue_events)
        host.close()
        # every ioeventfd was removed: assigning the same one again succeeds
        fd = os.eventfd(0)
        try:
            vm.ioeventfd(fd, 0xD000_3000, 2)
            vm.ioeventfd(fd, 0xD000_3000, 2, deassign=True)
        finally:
            os.close(fd)
        assert events and dev.device.queue_events == []
        router.close()
    finally:
        vm.close()
