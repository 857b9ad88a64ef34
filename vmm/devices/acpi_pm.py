"""ACPI hardware-reduced power management: sleep control/status and the reset register.

A hardware-reduced ACPI platform (FADT flag HW_REDUCED_ACPI) has no PM1
register blocks.  Instead the FADT points at two byte-wide registers, the
Sleep Control Register (SLEEP_CONTROL_REG) and the Sleep Status Register
(SLEEP_STATUS_REG), and, optionally, the reset register (RESET_REG with
RESET_VALUE).  Here all three live in I/O space at 0x600..0x602; the ACPI
tables must name the same ports (use the constants below).

Sleep Control Register (ACPI 6.x, "Sleep Control and Status Registers"):
    bits 1:0  reserved
    bits 4:2  SLP_TYPx  the sleep type, from the DSDT's \\_Sx package
    bit  5    SLP_EN    write-only: 1 starts the transition to SLP_TYPx
    bits 7:6  reserved
Sleep Status Register:
    bits 6:0  reserved
    bit  7    WAK_STS   set when the platform has gone back to the working
                        state; cleared by writing 1

Only S5 (soft off) is implemented: a write with SLP_EN set and SLP_TYP equal
to ``S5_SLP_TYP`` calls ``on_poweroff()``.  Any other sleep type is refused
with a log line, and the platform "wakes" at once: WAK_STS is set after every
sleep request, so an OS polling for it (as ACPICA does after the write) does
not spin forever.  The DSDT's \\_S5 package must carry ``S5_SLP_TYP``.

Locking: one per-device lock guards the state; the callbacks are called after
it is released, so they may touch the device (or stop the VM) freely.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from . import byte_writes, read_bytes

log = logging.getLogger(__name__)

SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT = 0x602
BASE_PORT = SLEEP_CONTROL_PORT
PORT_RANGE_SIZE = RESET_PORT - BASE_PORT + 1

SLEEP_CONTROL_OFFSET = SLEEP_CONTROL_PORT - BASE_PORT
SLEEP_STATUS_OFFSET = SLEEP_STATUS_PORT - BASE_PORT
RESET_OFFSET = RESET_PORT - BASE_PORT

# Sleep Control Register bits.
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x07 << SLP_TYP_SHIFT  # bits 4:2
SLP_EN = 0x20  # bit 5

# Sleep Status Register bits.
WAK_STS = 0x80  # bit 7

# The value the FADT's RESET_VALUE field carries.
RESET_VALUE = 0x01

# The SLP_TYP value of soft off; the DSDT's \_S5 package must match.
S5_SLP_TYP = 5


class AcpiSleepDevice:
    """SLEEP_CONTROL_REG (offset 0), SLEEP_STATUS_REG (offset 1), RESET_REG (offset 2)."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._slp_typ = 0
        self._wak_sts = False

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return read_bytes(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        poweroff = reset = False
        with self._lock:
            for reg, byte in byte_writes(offset, size, value):
                if reg == SLEEP_CONTROL_OFFSET:
                    poweroff |= self._write_sleep_control(byte)
                elif reg == SLEEP_STATUS_OFFSET:
                    if byte & WAK_STS:  # write 1 to clear
                        self._wak_sts = False
                elif reg == RESET_OFFSET:
                    if byte == RESET_VALUE:
                        reset = True
                    else:
                        log.debug("acpi: ignoring reset register write %#04x", byte)
        if poweroff:
            log.info("acpi: S5 (soft off) requested")
            self._on_poweroff()
        if reset:
            log.info("acpi: reset requested")
            self._on_reset()

    def reset(self) -> None:
        """Back to power-on state (no callback)."""
        with self._lock:
            self._slp_typ = 0
            self._wak_sts = False

    # ------------------------------------------------------------------
    # Called with the lock held
    # ------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset == SLEEP_CONTROL_OFFSET:
            return self._slp_typ << SLP_TYP_SHIFT  # SLP_EN is write-only, reads 0
        if offset == SLEEP_STATUS_OFFSET:
            return WAK_STS if self._wak_sts else 0
        if offset == RESET_OFFSET:
            return 0
        return 0xFF

    def _write_sleep_control(self, value: int) -> bool:
        """Returns True if the write asks for soft off."""
        self._slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if not value & SLP_EN:
            return False
        # Whatever happens, the platform is back in the working state by the
        # time the guest can look again.
        self._wak_sts = True
        if self._slp_typ == S5_SLP_TYP:
            return True
        log.info("acpi: ignoring request for unsupported sleep type SLP_TYP=%d", self._slp_typ)
        return False
