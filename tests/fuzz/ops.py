"""Register accesses decoded from fuzz input, for the targets of devices a guest drives by
port or MMIO accesses (PCI, MSI-X, fw_cfg, the UART, CMOS, the i8042).

    for op in accesses(fdp, regions, max_ops=64):
        value = op.apply(device)   # read -> the value (checked to fit `size`), write -> None

`regions` are (weight, first offset, last offset) triples: where the offsets fall, most of
the time (now and then any offset at all).  Sizes are 1, 2, 4 or 8, mostly the first three.
"""

from __future__ import annotations

from dataclasses import dataclass

import atheris

from tests.fuzz.harness import check

SIZES = (1, 2, 4, 1, 2, 4, 8)


@dataclass(frozen=True)
class Access:
    write: bool
    offset: int
    size: int
    value: int

    def apply(self, device) -> int | None:
        """device.write(offset, size, value) or device.read(offset, size), checked."""
        if self.write:
            device.write(self.offset, self.size, self.value)
            return None
        value = device.read(self.offset, self.size)
        check(isinstance(value, int) and 0 <= value < 1 << (8 * self.size),
              f"a {self.size}-byte read at {self.offset:#x} returned {value!r}")
        return value


def offset_in(fdp: atheris.FuzzedDataProvider, regions: list[tuple[int, int, int]]) -> int:
    if not fdp.ConsumeIntInRange(0, 31):
        return fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    pick = fdp.ConsumeIntInRange(0, sum(w for w, _, _ in regions) - 1)
    for weight, first, last in regions:
        if pick < weight:
            return fdp.ConsumeIntInRange(first, last)
        pick -= weight
    raise AssertionError("unreachable")


def access(fdp: atheris.FuzzedDataProvider, regions: list[tuple[int, int, int]]) -> Access:
    write = fdp.ConsumeBool()
    offset = offset_in(fdp, regions)
    size = SIZES[fdp.ConsumeIntInRange(0, len(SIZES) - 1)]
    value = fdp.ConsumeIntInRange(0, (1 << (8 * size)) - 1) if write else 0
    return Access(write, offset, size, value)


def accesses(fdp: atheris.FuzzedDataProvider, regions: list[tuple[int, int, int]], max_ops: int = 64):
    for _ in range(max_ops):
        if not fdp.remaining_bytes():
            return
        yield access(fdp, regions)
