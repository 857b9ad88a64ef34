"""Fuzz target: the virtio-pci transport (virtio/pci.py): common configuration, notify, ISR,
device configuration and MSI-X accesses through BAR 0, config-space writes, and the device's
interrupts, in any order.

    python -m tests.fuzz.fuzz_virtio_pci [libFuzzer flags] [tests/fuzz/corpus/fuzz_virtio_pci]

A two-queue device without threads (tests/fuzz/fakes.py) over a 64 KiB guest memory, fake
interrupt routing and ioeventfds.  Asserts after each access:
  * every read fits its size; num_queues reads 2; a field of no queue reads 0;
  * a queue is ready only with a power-of-2 size up to its maximum and its three areas
    aligned and in guest RAM (else NEEDS_RESET); DRIVER_OK / FEATURES_OK only with features
    the device offers, VERSION_1 among them;
  * MSI-X on and function-masked exactly as Message Control says; vectors in use are in the
    table or NO_VECTOR; INTx is raised exactly when the ISR
    is non-zero, MSI-X off and INTx not disabled;
  * one ioeventfd per queue while BAR 0 is mapped, none otherwise.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.fakes import FakeIrq, FakeVm, tiny_device_class
    from tests.fuzz.guestmem import CheckedMemory
    from tests.fuzz.ops import accesses
    from virtio.device import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1
    from virtio.pci import VIRTIO_MSI_NO_VECTOR, VirtioPciDevice
    from virtio.queue import avail_ring_size, desc_table_size, used_ring_size
    from vmm.pci.msix import MSIX_ENABLE, MSIX_FUNCTION_MASK, MSIX_MESSAGE_CONTROL

MEM = CheckedMemory(0x10000)
IRQ, VM = FakeIrq(), FakeVm()
PCI = VirtioPciDevice(tiny_device_class()(MEM), irq=IRQ, vm=VM)
PCI.intx_gsi = 17
LAYOUT = PCI.layout
BAR_ADDRESS = 0xC000_0000


def _check_queues() -> None:
    for i, q in enumerate(PCI.device.queues):
        if not q.ready:
            continue
        check(0 < q.size <= q.max_size and not q.size & (q.size - 1), f"queue {i} ready with size {q.size}")
        for gpa, length, align in ((q.desc_table, desc_table_size(q.size), 16),
                                   (q.avail_ring, avail_ring_size(q.size), 2),
                                   (q.used_ring, used_ring_size(q.size), 4)):
            check(gpa % align == 0 and MEM.contains(gpa, length), f"queue {i} ready with an area at {gpa:#x}")


def _check_state(mapped: bool) -> None:
    dev = PCI.device
    _check_queues()
    if dev.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK):
        check(not dev.driver_features & ~dev.device_features and dev.has_feature(VIRTIO_F_VERSION_1),
              f"FEATURES_OK with driver features {dev.driver_features:#x}")
    if dev.status & VIRTIO_CONFIG_S_DRIVER_OK:
        check(dev.status & VIRTIO_CONFIG_S_FEATURES_OK, "DRIVER_OK without FEATURES_OK")
    for vector in [PCI.config_vector, *PCI.queue_vectors]:
        check(vector == VIRTIO_MSI_NO_VECTOR or vector < PCI.msix.size, f"MSI-X vector {vector} is not in the table")
    control = PCI.msix.get(MSIX_MESSAGE_CONTROL, 2)
    check((PCI.msix.enabled, PCI.msix.function_masked) == (bool(control & MSIX_ENABLE), bool(control & MSIX_FUNCTION_MASK)),
          f"MSI-X state is not Message Control's {control:#x}")
    intx = PCI.isr != 0 and not PCI.msix.enabled and not PCI.config.intx_disabled
    check(IRQ.lines.get(17, False) == intx, f"INTx is {IRQ.lines.get(17)}, ISR {PCI.isr:#x}")
    check(len(VM.ioeventfds) == (len(dev.queues) if mapped else 0), f"{len(VM.ioeventfds)} ioeventfds")


class _Bar:
    """BAR 0 as a region device."""

    def read(self, offset: int, size: int) -> int:
        return PCI.bar_read(0, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        PCI.bar_write(0, offset, size, value)


BAR = _Bar()
REGIONS = [(8, 0, 0x3F), (2, LAYOUT.isr, LAYOUT.isr + 1), (2, LAYOUT.device, LAYOUT.device + 9),
           (3, LAYOUT.notify, LAYOUT.notify + 12), (2, LAYOUT.msix_table, LAYOUT.msix_pba + 8), (1, 0, LAYOUT.size)]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    PCI.reset()
    PCI.msix.reset()
    PCI.bar_mapped(0, BAR_ADDRESS)
    mapped = True
    for op in accesses(fdp, REGIONS, max_ops=32):
        kind = fdp.ConsumeIntInRange(0, 9)
        if kind <= 6:
            got = op.apply(BAR)
            if got is not None and op.offset == 0x12 and op.size == 2:
                check(got == len(PCI.device.queues), f"num_queues reads {got}")
        elif kind == 7:
            size = op.size if op.size < 8 else 4  # a config cycle: 1, 2 or 4 bytes, naturally aligned
            PCI.config.write(op.offset % 0x100 // size * size, size, op.value & 0xFFFFFFFF)
        elif kind == 8:
            what = op.value % 4
            if what < 3:
                PCI.device.signal_used(op.offset % 3 - 1 if what else -1)
            else:
                PCI.device.needs_reset("fuzz")
        else:
            mapped = not mapped
            PCI.bar_mapped(0, BAR_ADDRESS + 0x10000 * (op.offset % 4) if mapped else None)
        _check_state(mapped)
    PCI.bar_mapped(0, None)


if __name__ == "__main__":
    harness.main(one_input)
