"""Fuzz target: PCI configuration space through both mechanisms: ports 0xCF8/0xCFC (and
0xCF9's reset bit) and the ECAM window (vmm/pci/host.py, vmm/pci/config.py).

    python -m tests.fuzz.fuzz_pci_config [libFuzzer flags] [tests/fuzz/corpus/fuzz_pci_config]

A PciHost on fresh buses with the host bridge, a virtio-pci function, a plain one with
an I/O BAR and an expansion ROM and empty slots; the input's config cycles of every size and alignment, BAR
sizing and moves, decode switches, capability writes.  Asserts after each access:
  * every read fits its size; an empty slot or function reads all ones; IDs never change;
  * each BAR is mapped on its bus exactly where its register says while its decode is on,
    aligned to its size (or not at all, when the guest put it over something else), and the
    bus never holds two overlapping mappings; the ROM likewise;
  * the ioeventfds follow BAR 0; a reset request calls on_reset and nothing else.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.fakes import FakeIrq, FakeVm, tiny_device_class
    from tests.fuzz.guestmem import CheckedMemory
    from tests.fuzz.ops import accesses
    from vmm.bus import Bus
    from vmm.pci.config import BarKind, PciConfigSpace
    from vmm.pci.host import PciDevice, PciHost
    from vmm.pci.layout import DEFAULT_LAYOUT
    from virtio.pci import VirtioPciDevice

MEM = CheckedMemory(0x10000)
ECAM_BASE, ECAM_SIZE = DEFAULT_LAYOUT.ecam_range[0], DEFAULT_LAYOUT.ecam_size
TinyDevice = tiny_device_class()


class _Plain(PciDevice):
    """A function with an I/O BAR, a 32-bit memory BAR and an expansion ROM (no capabilities)."""

    name = "fuzz-plain"

    def __init__(self) -> None:
        self.config = PciConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0x020000)
        self.config.add_bar(0, 0x100, BarKind.IO)
        self.config.add_bar(2, 0x1000, BarKind.MEM32)
        self.config.add_expansion_rom(b"\x55\xaa" + bytes(0x7FE))
        self.vm = FakeVm()


class _Machine:
    def __init__(self) -> None:
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.resets = 0
        self.host = PciHost(pio=self.pio, mmio=self.mmio, on_reset=self._reset)
        self.functions = [VirtioPciDevice(TinyDevice(MEM), irq=FakeIrq(), vm=FakeVm()), _Plain()]
        self.slots = [self.host.add_device(f) for f in self.functions]
        self.ids = {slot: self.host.devices[slot].config.get(0, 4) for slot in range(len(self.host.devices))
                    if self.host.devices[slot] is not None}

    def _reset(self) -> None:
        self.resets += 1


class _ConfigPorts:
    """Ports 0xCF8-0xCFF as offsets 0-7 of one device."""

    def __init__(self, pio: Bus):
        self.pio = pio

    def read(self, offset: int, size: int) -> int:
        return self.pio.read(0xCF8 + offset % 8, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.pio.write(0xCF8 + offset % 8, size, value)


class _Ecam:
    def __init__(self, mmio: Bus):
        self.mmio = mmio

    def read(self, offset: int, size: int) -> int:
        return self.mmio.read(ECAM_BASE + offset % ECAM_SIZE, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(ECAM_BASE + offset % ECAM_SIZE, size, value)


def _check(m: _Machine) -> None:
    host = m.host
    for slot, ident in m.ids.items():
        check(host.devices[slot].config.get(0, 4) == ident, f"slot {slot}: IDs changed")
    for slot, fn in zip(m.slots, m.functions):
        config = fn.config
        for index, bar in config.bars.items():
            mapped = host.mapped_address(slot, index)
            if mapped is not None:
                check(config.bar_decoding(index) and mapped == config.bar_address(index) and mapped % bar.size == 0,
                      f"slot {slot} BAR {index} mapped at {mapped:#x}, its register says {config.bar_address(index):#x}")
        rom = host.rom_mapped_address(slot)
        if rom is not None:
            check(config.rom_decoding() and rom == config.rom_address, f"slot {slot}: ROM mapped at {rom:#x}")
        if isinstance(fn, VirtioPciDevice):
            notify = host.mapped_address(slot, 0)
            check(len(fn.vm.ioeventfds) == (len(fn.device.queues) if notify is not None else 0),
                  f"slot {slot}: {len(fn.vm.ioeventfds)} ioeventfds, BAR 0 at {notify}")
    for bus in (m.pio, m.mmio):
        maps = bus._maps
        for a, b in zip(maps, maps[1:]):
            check(a.end <= b.base, f"{bus.name}: {a.name} and {b.name} overlap")


def _cf8(slot: int, function: int, register: int) -> int:
    return 1 << 31 | slot << 11 | function << 8 | register & 0xFC


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    m = _Machine()
    ports, ecam = _ConfigPorts(m.pio), _Ecam(m.mmio)
    try:
        for op in accesses(fdp, [(6, 0, 0x48), (3, 0x48, 0xFF), (1, 0x100, 0xFFF)], max_ops=24):
            slot, function = fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(0, 8) // 8
            if fdp.ConsumeBool():
                ports.write(0, 4, _cf8(slot, function, op.offset))
                lane = op.offset % 4 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 3)
                got = type(op)(op.write, 4 + lane, op.size, op.value).apply(ports)
            else:
                got = type(op)(op.write, slot << 15 | function << 12 | op.offset % 0x1000, op.size, op.value).apply(ecam)
            if got is not None and (slot == 4 or function) and op.size <= 4:
                check(got == (1 << 8 * op.size) - 1, f"an empty slot read {got:#x}")
            if not fdp.ConsumeIntInRange(0, 15):  # 0xCF9 reset control, or any byte of 0xCF8-0xCFB
                resets = m.resets
                ports.write(fdp.ConsumeIntInRange(0, 3), 1, fdp.ConsumeIntInRange(0, 0xFF))
                check(m.resets - resets <= 1, "one write, several resets")
            _check(m)
    finally:
        m.host.close()


if __name__ == "__main__":
    harness.main(one_input)
