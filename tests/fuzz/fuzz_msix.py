"""Fuzz target: the MSI-X capability, table and PBA (vmm/pci/msix.py).

    python -m tests.fuzz.fuzz_msix [libFuzzer flags] [tests/fuzz/corpus/fuzz_msix]

A config space with an MSI-X capability of 1..8 vectors (fake vectors, tests/fuzz/fakes.py);
the input's accesses to the table, the PBA, Message Control (through config space) and
interrupts raised by the device.  Asserts after each step:
  * every read fits its size; the table reads back what was written (DWORD / QWORD writes,
    only the mask bit of Vector Control), out-of-range reads are 0, the PBA is read-only;
  * each vector is programmed with its entry's address and data, masked exactly when the
    entry, the function or MSI-X as a whole is;
  * a PBA bit is set exactly when that vector is pending; an interrupt is pending only while
    masked, and unmasking delivers it.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.fakes import FakeIrq
    from tests.fuzz.ops import accesses
    from vmm.pci.config import PciConfigSpace
    from vmm.pci.msix import MsixCapability, pba_bytes, table_bytes

TABLE_OFF, PBA_OFF = 0x2000, 0x3000


def _check_vectors(cap: MsixCapability) -> None:
    for i, (entry, vector) in enumerate(zip(cap.entries, cap.vectors)):
        masked = entry.masked or cap.function_masked or not cap.enabled
        check((vector.address, vector.data, vector.masked) == (entry.address, entry.data, masked),
              f"vector {i} is programmed {vector.address:#x}/{vector.data:#x}/{vector.masked}, "
              f"its entry says {entry.address:#x}/{entry.data:#x}/{masked}")
        check(not vector.pending or vector.masked or not vector.address, f"vector {i} pending while deliverable")
        check(bool(cap.read_pba(i // 8, 1) >> (i % 8) & 1) == vector.pending, f"PBA bit {i} is not vector {i}'s")


def _entry(cap: MsixCapability, index: int) -> bytes:
    return b"".join(cap.read_table(16 * index + k, 8).to_bytes(8, "little") for k in (0, 8))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    vectors = fdp.ConsumeIntInRange(1, 8)
    config = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0x020000)
    cap = MsixCapability(FakeIrq(), vectors, table_bar=0, table_offset=TABLE_OFF, pba_bar=0, pba_offset=PBA_OFF)
    at = config.add_capability(cap)
    regions = [(4, 0, table_bytes(vectors) + 7), (1, 0, pba_bytes(vectors) + 7), (2, at, at + 11), (1, 0, 3)]
    for op in accesses(fdp, regions, max_ops=24):
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind <= 1:
            index, rel = divmod(op.offset, 16)
            before = _entry(cap, index)
            got = op.apply(cap.table)
            if op.write and op.size in (4, 8) and rel % op.size == 0 and index < vectors:
                expect = bytearray(before)
                expect[rel : rel + op.size] = op.value.to_bytes(op.size, "little")
                expect[12:16] = (int.from_bytes(expect[12:16], "little") & 1).to_bytes(4, "little")
                check(_entry(cap, index) == bytes(expect), f"entry {index} does not read back what was written")
            elif op.write:
                check(_entry(cap, index) == before, "an ignored table write changed the table")
            elif index >= vectors:
                check(got == 0, "a read past the table is not 0")
        elif kind == 2:
            pba = [cap.read_pba(i, 1) for i in range(pba_bytes(vectors))]
            op.apply(cap.pba)
            check(pba == [cap.read_pba(i, 1) for i in range(pba_bytes(vectors))], "a PBA access changed the PBA")
        elif kind == 3:
            op.apply(config)
        else:
            cap.trigger(op.offset % (vectors + 2))
        _check_vectors(cap)
    cap.reset()
    _check_vectors(cap)
    check(not cap.enabled and all(e.masked for e in cap.entries), "reset left MSI-X on or an entry unmasked")


if __name__ == "__main__":
    harness.main(one_input)
