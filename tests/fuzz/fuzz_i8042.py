"""Fuzz target: the i8042 keyboard controller (vmm/devices/i8042.py): commands at 0x64,
data and their parameters at 0x60, reads of both, accesses of every size.

    python -m tests.fuzz.fuzz_i8042 [libFuzzer flags] [tests/fuzz/corpus/fuzz_i8042]

Asserts after each access:
  * every read fits its size; the status port's OBF is set exactly when a byte waits, and
    reading 0x60 empties the buffer; no write but to 0x60 / 0x64 changes anything;
  * the reset callback runs only on a write, at most once per written byte, and only for a
    pulse or an output-port write that clears the reset line;
  * the state stays bytes: the command byte, the output port, the output buffer.
"""

from __future__ import annotations

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from tests.fuzz.ops import accesses
    from vmm.devices import i8042 as kbc

COMMANDS = (0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAD, 0xAE, 0xC0, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xF0, 0xFE, 0xFF)


def _state(dev: kbc.I8042) -> tuple:
    return dev._ccb, dev._output_port, dev._output_buffer, dev._output_from_aux, dev._last_output, dev._pending_command


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    resets: list[int] = []
    dev = kbc.I8042(on_reset=lambda: resets.append(1))
    for op in accesses(fdp, [(4, 0, 0), (4, 4, 4), (1, 0, 8)], max_ops=24):
        if op.write and op.offset == kbc.COMMAND_OFFSET and op.size == 1 and fdp.ConsumeBool():
            op = type(op)(True, op.offset, 1, COMMANDS[fdp.ConsumeIntInRange(0, len(COMMANDS) - 1)])
        before, count = _state(dev), len(resets)
        got = op.apply(dev)
        touches = range(op.offset, op.offset + op.size)
        check(len(resets) - count <= (op.size if op.write else 0), f"{len(resets) - count} resets for {op}")
        if not (kbc.DATA_OFFSET in touches or kbc.COMMAND_OFFSET in touches):
            check(_state(dev) == before, f"{op} changed the controller")
        if got is not None and op.offset == kbc.DATA_OFFSET:
            check(dev._output_buffer is None or op.size > 1 and kbc.STATUS_OFFSET in touches, "0x60 read left OBF")
        ccb, port, out, _, last, pending = _state(dev)
        check(all(0 <= b <= 0xFF for b in (ccb, port, last)) and (out is None or 0 <= out <= 0xFF),
              "a register holds more than a byte")
        check(pending is None or pending in kbc.COMMANDS_WITH_PARAMETER, f"pending command {pending}")
        status = dev.read(kbc.STATUS_OFFSET, 1)
        check(bool(status & kbc.STATUS_OBF) == (dev._output_buffer is not None), "OBF is not the output buffer")


if __name__ == "__main__":
    harness.main(one_input)
