"""Platform devices on the port-I/O bus: the 16550A UART, the i8042, the CMOS RTC, ACPI sleep/reset.

They are banks of 8-bit registers.  On the ISA bus a wider access reaches consecutive registers,
lowest address in the lowest byte; `read_bytes` / `byte_writes` split it that way."""

from __future__ import annotations

from typing import Callable, Iterator


def read_bytes(read_byte: Callable[[int], int], offset: int, size: int) -> int:
    """A `size`-byte read as `size` byte reads from `offset` up, assembled little-endian."""
    value = 0
    for i in range(size):
        value |= read_byte(offset + i) << (8 * i)
    return value


def byte_writes(offset: int, size: int, value: int) -> Iterator[tuple[int, int]]:
    """A `size`-byte write as (register, byte) pairs from `offset` up."""
    for i in range(size):
        yield offset + i, (value >> (8 * i)) & 0xFF
