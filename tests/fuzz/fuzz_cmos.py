"""Fuzz target: the CMOS RTC (vmm/devices/cmos.py): index and data port writes and reads of
every size, clock registers in BCD and binary, 12/24-hour, SET and divider resets, while
the host clock moves on (by seconds or by years) between accesses.

    python -m tests.fuzz.fuzz_cmos [libFuzzer flags] [tests/fuzz/corpus/fuzz_cmos]

Asserts after each step:
  * every read fits its size; the index stays 7 bits; registers C and D read 0 and VRT;
  * RAM bytes (0x0E..0x7F but the century) read back what was last written there;
  * guest_time() is a finite number; while the clock is halted (SET, divider reset) it
    does not move when the host clock does;
  * nothing raises, whatever time the guest writes (any BCD garbage, any date).
"""

from __future__ import annotations

import math

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.ops import accesses
    from vmm.devices import cmos

START = 1_795_000_000.0  # late 2026


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _plain_ram(index: int) -> bool:
    return index >= 0x0E and index not in cmos._TIME_REGISTERS  # (the century byte is a clock register)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    clock = _Clock(START + fdp.ConsumeIntInRange(-(1 << 34), 1 << 36) if fdp.ConsumeBool() else START)
    rtc = cmos.CmosRtc(mem_below_4g=fdp.ConsumeIntInRange(0, 4 << 30), mem_above_4g=fdp.ConsumeIntInRange(0, 1 << 40),
                       clock=clock)
    ram: dict[int, int] = {}
    for op in accesses(fdp, [(3, 0, 0), (3, 1, 1), (1, 0, 4)], max_ops=24):
        if op.write and op.offset == cmos.INDEX_OFFSET and op.size == 1 and fdp.ConsumeBool():
            op = type(op)(True, 0, 1, fdp.ConsumeIntInRange(0, 0x0D) | fdp.ConsumeIntInRange(0, 1) << 7)
        index = rtc._index
        got = op.apply(rtc)
        if op.write and op.offset == cmos.DATA_OFFSET and op.size == 1 and _plain_ram(index):
            ram[index] = op.value
        elif op.write and op.offset <= cmos.DATA_OFFSET < op.offset + op.size:
            ram.clear()  # a wide write: index and data in one go (followed by the bytes past the ports)
        if got is not None and op.offset == cmos.DATA_OFFSET and op.size == 1:
            if index == cmos.RTC_REG_C:
                check(got == 0, f"register C reads {got:#x}")
            elif index in ram:
                check(got == ram[index], f"CMOS RAM {index:#x} reads {got:#x}, {ram[index]:#x} was written")
        check(0 <= rtc._index < cmos.CMOS_SIZE, f"index {rtc._index}")
        before = rtc.guest_time()
        check(math.isfinite(before), f"guest time {before}")
        step = fdp.ConsumeIntInRange(0, 3)
        clock.now += (0, 1, 3600, 400 * 86400 * 365)[step]
        if rtc._halted():
            check(rtc.guest_time() == before, "a halted clock moved")


if __name__ == "__main__":
    harness.main(one_input)
