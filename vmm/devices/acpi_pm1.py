"""ACPI PM1a event and control blocks: the fixed hardware of a full (non-hardware-reduced) FADT.

A firmware boot describes the platform as a PC (kernel/acpi.py, ``AcpiConfig.pm1``), so the OS
knows about the 8259 the BIOS used.  Such a FADT must name a PM1a event block and a PM1a control
block; here they are in I/O space at 0x604 (4 bytes) and 0x608 (2 bytes), as ``kernel.acpi.Pm1Config``
says by default.

PM1 event block (ACPI 6.x, 4.8.3.1):
    +0  PM1_STS  16 bits, write 1 to clear: PWRBTN_STS (8), WAK_STS (15), ...
    +2  PM1_EN   16 bits, read/write: the events that raise the SCI
PM1 control block (4.8.3.2):
    +0  PM1_CNT  SCI_EN (0) reads 1: there is no SMI command port, the platform is always in ACPI
                 mode; SLP_TYPx (12:10); SLP_EN (13) write-only: go to sleep state SLP_TYPx

Only S5 (soft off) is a sleep state here: SLP_EN with the DSDT's \\_S5 value calls on_poweroff().
Any other sleep type is refused with a log line and the platform wakes at once (WAK_STS set), so an
OS waiting for the wake does not spin.  Nothing raises the SCI: no fixed event is ever signalled.

Locking: one lock per device; the callback runs after it is released.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from . import byte_writes, read_bytes
from .acpi_pm import S5_SLP_TYP  # the DSDT's \_S5 value, shared with the hardware-reduced registers

log = logging.getLogger(__name__)

EVENT_PORT = 0x604
EVENT_SIZE = 4
CONTROL_PORT = 0x608
CONTROL_SIZE = 2

# PM1_STS / PM1_EN bits
PWRBTN = 1 << 8
WAK_STS = 1 << 15
EN_BITS = 0x0001 | 0x0020 | PWRBTN | 0x0200 | 0x0400 | 0x4000  # defined enable bits

# PM1_CNT bits
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_RW_BITS = 0x0002 | 0x0004 | SLP_TYP_MASK  # BM_RLD, GBL_RLS (write-only, reads 0 on real parts), SLP_TYP


class Pm1Event:
    """PM1_STS (offset 0-1) and PM1_EN (offset 2-3)."""

    def __init__(self, control: "Pm1Control") -> None:
        self._control = control

    def read(self, offset: int, size: int) -> int:
        return read_bytes(self._control.read_event_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._control.write_event(offset, size, value)


class Pm1Control:
    """PM1_CNT (offset 0-1); also keeps the event registers, which a sleep request sets."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._lock = threading.Lock()
        self._sts = self._en = 0
        self._cnt = SCI_EN
        self.event = Pm1Event(self)

    # -- the control block ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return read_bytes(lambda i: (self._cnt >> (8 * i)) & 0xFF if i < CONTROL_SIZE else 0xFF, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            new = self._cnt
            for reg, byte in byte_writes(offset, size, value):
                if reg < CONTROL_SIZE:
                    new = (new & ~(0xFF << (8 * reg))) | (byte << (8 * reg))
            self._cnt = (new & CNT_RW_BITS) | SCI_EN
            slp_typ = (new & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            sleep = bool(new & SLP_EN)
            if sleep:
                self._sts |= WAK_STS  # back in the working state by the time the OS looks
        if not sleep:
            return
        if slp_typ == S5_SLP_TYP:
            log.info("acpi: S5 (soft off) requested through PM1_CNT")
            self._on_poweroff()
        else:
            log.info("acpi: ignoring request for unsupported sleep type SLP_TYP=%d", slp_typ)

    # -- the event block (through Pm1Event) ------------------------------------------------
    def read_event_byte(self, offset: int) -> int:
        with self._lock:
            if offset < 2:
                return (self._sts >> (8 * offset)) & 0xFF
            if offset < EVENT_SIZE:
                return (self._en >> (8 * (offset - 2))) & 0xFF
            return 0xFF

    def write_event(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for reg, byte in byte_writes(offset, size, value):
                if reg < 2:  # write 1 to clear
                    self._sts &= ~(byte << (8 * reg)) & 0xFFFF
                elif reg < EVENT_SIZE:
                    shift = 8 * (reg - 2)
                    self._en = ((self._en & ~(0xFF << shift)) | (byte << shift)) & EN_BITS
