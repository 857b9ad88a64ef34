"""Fuzz target: the 16550A UART (vmm/devices/serial.py): register reads and writes of every
size at every offset, with and without DLAB, FIFOs, loopback, and host input fed between.

    python -m tests.fuzz.fuzz_serial [libFuzzer flags] [tests/fuzz/corpus/fuzz_serial]

Asserts after each step:
  * every read fits its size; IIR's bits 5:4 are 0, bit 0 clear exactly when an interrupt
    is reported; LSR's Data Ready is set exactly when bytes wait;
  * set_irq is never called twice in a row with the same level, and irq_asserted is the last;
  * the receive buffer never holds more than its size; feed() takes no more than rx_space()
    said it could, and nothing in loopback;
  * bytes leave on the line only on a write (never on a read or a feed).
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.ops import accesses
    from vmm.devices import serial as uart


class _Line:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.levels: list[bool] = []

    def output(self, data: bytes) -> None:
        self.sent += data

    def set_irq(self, level: bool) -> None:
        check(not self.levels or self.levels[-1] != level, f"set_irq({level}) twice in a row")
        self.levels.append(level)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    line = _Line()
    size = fdp.ConsumeIntInRange(uart.HARDWARE_FIFO_SIZE, 64)
    dev = uart.Serial16550(line.output, line.set_irq, rx_buffer_size=size)
    for op in accesses(fdp, [(8, 0, 7), (1, 0, 16)], max_ops=24):
        sent, wrote = len(line.sent), False
        if fdp.ConsumeIntInRange(0, 5):
            wrote = op.write
            got = op.apply(dev)
            if got is not None and op.size == 1 and op.offset == uart.IIR:
                check(not got & 0x30, f"IIR reads {got:#x}")
        else:
            space = dev.rx_space()
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
            taken = dev.feed(chunk)
            check(0 <= taken <= min(len(chunk), space), f"feed took {taken} of {len(chunk)}, room for {space}")
        if not wrote:
            check(len(line.sent) == sent, "bytes sent on a read or a feed")
        check(len(dev._rx) <= size and 0 <= dev.rx_space() <= size, f"{len(dev._rx)} bytes buffered of {size}")
        check(dev.irq_asserted == (line.levels[-1] if line.levels else False), "irq_asserted is not the line")
        lsr = dev.read(uart.LSR, 1) if not fdp.ConsumeIntInRange(0, 3) else None
        if lsr is not None:
            check(bool(lsr & 1) == bool(dev._rx), f"LSR.DR {lsr & 1} with {len(dev._rx)} bytes waiting")


if __name__ == "__main__":
    harness.main(one_input)
