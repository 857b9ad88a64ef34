"""The PC's CMOS RAM and real-time clock (a Motorola MC146818), at ports 0x70/0x71.

The guest writes a register number to the index port 0x70 and then reads or
writes that register through the data port 0x71.  Bit 7 of the index byte is
not part of the register number: on the PC it is the NMI-disable bit, which
this device remembers (``nmi_disabled``) and masks off.  128 registers are
reachable: the 14 clock registers, the century byte at 0x32, and battery-backed
RAM.  The device takes offsets from 0x70 (the index port at offset 0, the data
port at offset 1); the index port reads as 0xFF, as it does on PC chipsets
where it is write-only, and so does anything past offset 1.

Register and bit names follow the MC146818 datasheet as Linux spells them in
``include/linux/mc146818rtc.h``; the CMOS RAM layout is the IBM PC AT BIOS's
(with the memory-above-4-GiB bytes that SeaBIOS reads).

The clock
---------
There is no ticking counter.  The time registers are computed, when the guest
reads them, from the host clock (``clock()``, seconds since the epoch, read as
UTC) plus a guest offset, and are encoded as register B asks: BCD or binary
(RTC_DM_BINARY), 24-hour or 12-hour with the PM flag in bit 7 (RTC_24H).
Because the encoding is applied at read time, changing those two bits of
register B re-encodes the current time at once (a real chip would leave the
stored bytes as they were until the guest rewrote them).  Daylight-saving
(RTC_DST_EN) is stored but has no effect.

Writing a time register sets the guest's clock and never the host's: the
device stores the difference as an offset, so the guest's clock keeps running
at the host's rate from the value it was given.  As on the chip, setting
RTC_SET in register B (or putting the divider in reset, DV2-0 = 11x in
register A) stops the clock: reads return the time as it stood, writes collect
in those frozen fields, and the new time starts to run when both are released.
This is the sequence Linux's ``mc146818_set_time`` uses.  Values the guest
writes are clamped to their field's range (seconds 0-59, month 1-12, ...); a
day past the end of its month is pulled back to the last day when the clock
runs again.  As on the chip, the day of week (1-7) is a register of its own:
it starts out matching the date (1 = Sunday), advances at midnight, and only a
write to it changes it (setting the date leaves it alone).

The update cycle is instantaneous, so RTC_UIP in register A always reads 0: a
reader polling for it (Linux's ``mc146818_avoid_UIP``) never waits.  Readers
that want a consistent snapshot re-read the seconds, as Linux does.

Register D always reads RTC_VRT (the RAM and time are valid).  Alarm registers
are plain storage.

Interrupts
----------
No interrupts are generated: periodic, alarm and update-ended interrupts would
need a timer, and neither firmware nor Linux's boot-time clock read needs
them.  The enable bits of register B (RTC_PIE, RTC_AIE, RTC_UIE) and the rate
bits of register A are stored and read back but do nothing; register C (the
interrupt flags) always reads 0.  ``set_irq`` is accepted for a future
interrupt-capable version and is not called.  A guest program that waits for
an RTC interrupt (``hwclock`` using the RTC_UIE_ON ioctl, for one) times out.

CMOS RAM
--------
The constructor fills the bytes firmware reads: base memory (always 640 KiB),
extended memory above 1 MiB in KiB (both copies, capped at 0xFFFF), memory
above 16 MiB in 64 KiB units (capped at 0xFFFF), memory above 4 GiB in 64 KiB
units (24 bits, capped), the equipment byte, and the AT checksum over
0x10-0x2D (a 16-bit sum, high byte at 0x2E).  The checksum is computed once:
like the chip, the device does not recompute it when the guest writes RAM.
Everything else, the shutdown status byte 0x0F included, is RAM the guest may
read and write, and starts at 0.

Locking: one per-device lock guards all state; ``clock`` is called with it
held and must not call back into the device.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from . import byte_writes, read_bytes

log = logging.getLogger(__name__)

BASE_PORT = 0x70
INDEX_PORT = 0x70  # write: register number, bit 7 = NMI disable
DATA_PORT = 0x71
PORT_RANGE_SIZE = DATA_PORT - BASE_PORT + 1

INDEX_OFFSET = INDEX_PORT - BASE_PORT
DATA_OFFSET = DATA_PORT - BASE_PORT

RTC_IRQ = 8

CMOS_SIZE = 128
NMI_DISABLE = 0x80  # bit 7 of the byte written to the index port
INDEX_MASK = CMOS_SIZE - 1

# --- Clock registers (MC146818 datasheet, Figure "Address Map") ------------
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_FREQ_SELECT = RTC_REG_A
RTC_CONTROL = RTC_REG_B
RTC_INTR_FLAGS = RTC_REG_C
RTC_VALID = RTC_REG_D

RTC_ALARM_DONT_CARE = 0xC0  # an alarm byte of 11xxxxxx matches any value

# Register A
RTC_UIP = 0x80  # update in progress (read-only; always 0 here)
RTC_DIV_CTL = 0x70  # DV2-0: divider control
RTC_REF_CLCK_4MHZ = 0x00
RTC_REF_CLCK_1MHZ = 0x10
RTC_REF_CLCK_32KHZ = 0x20  # the PC's 32.768 kHz crystal
RTC_DIV_RESET1 = 0x60  # DV2-0 = 11x: divider held in reset, the clock stops
RTC_DIV_RESET2 = 0x70
RTC_RATE_SELECT = 0x0F  # RS3-0: periodic interrupt rate
RTC_RATE_1024HZ = 0x06
REG_A_DEFAULT = RTC_REF_CLCK_32KHZ | RTC_RATE_1024HZ  # 0x26

# Register B
RTC_SET = 0x80  # stop updates while the time is set
RTC_PIE = 0x40  # periodic interrupt enable
RTC_AIE = 0x20  # alarm interrupt enable
RTC_UIE = 0x10  # update-ended interrupt enable
RTC_SQWE = 0x08  # square-wave output enable
RTC_DM_BINARY = 0x04  # data mode: 1 = binary, 0 = BCD
RTC_24H = 0x02  # 1 = 24-hour mode, 0 = 12-hour mode
RTC_DST_EN = 0x01  # daylight-saving enable (no effect here)
REG_B_DEFAULT = RTC_24H  # 0x02: 24-hour, BCD, no interrupts

# Register C (read-only; reading clears it on the chip)
RTC_IRQF = 0x80  # an enabled interrupt is pending
RTC_PF = 0x40  # periodic
RTC_AF = 0x20  # alarm
RTC_UF = 0x10  # update ended

# Register D (read-only)
RTC_VRT = 0x80  # valid RAM and time

# 12-hour mode: bit 7 of the hours byte (and the hours alarm) is PM.
RTC_HOURS_PM = 0x80

# --- CMOS RAM (IBM PC AT BIOS layout, plus the bytes SeaBIOS reads) ---------
CMOS_DIAGNOSTIC_STATUS = 0x0E
CMOS_SHUTDOWN_STATUS = 0x0F
CMOS_FLOPPY_TYPES = 0x10
CMOS_DISK_TYPES = 0x12
CMOS_EQUIPMENT = 0x14
CMOS_BASE_MEM_LOW = 0x15  # base memory in KiB (640)
CMOS_BASE_MEM_HIGH = 0x16
CMOS_EXT_MEM_LOW = 0x17  # memory above 1 MiB in KiB, as set up
CMOS_EXT_MEM_HIGH = 0x18
CMOS_CHECKSUM_HIGH = 0x2E  # 16-bit sum of 0x10..0x2D, big-endian
CMOS_CHECKSUM_LOW = 0x2F
CMOS_EXT_MEM_ACTUAL_LOW = 0x30  # memory above 1 MiB in KiB, as found by POST
CMOS_EXT_MEM_ACTUAL_HIGH = 0x31
CMOS_CENTURY = 0x32  # part of the clock here (BCD or binary, like the year)
CMOS_MEM_ABOVE_16M_LOW = 0x34  # memory above 16 MiB in 64 KiB units
CMOS_MEM_ABOVE_16M_HIGH = 0x35
CMOS_MEM_ABOVE_4G_LOW = 0x5B  # memory above 4 GiB in 64 KiB units, 24 bits
CMOS_MEM_ABOVE_4G_MID = 0x5C
CMOS_MEM_ABOVE_4G_HIGH = 0x5D

CHECKSUM_FIRST = 0x10
CHECKSUM_LAST = 0x2D

# Equipment byte: bit 0 floppy drives present, bit 1 math coprocessor, bits 5:4
# primary display (00 = EGA/VGA or none), bits 7:6 floppy drives - 1.
EQUIPMENT_COPROCESSOR = 0x02
EQUIPMENT_DEFAULT = EQUIPMENT_COPROCESSOR  # an FPU, no floppies, no CGA/MDA

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BASE_MEMORY_KIB = 640

# --- Time fields -------------------------------------------------------------
_TIME_REGISTERS = frozenset(
    {
        RTC_SECONDS,
        RTC_MINUTES,
        RTC_HOURS,
        RTC_DAY_OF_WEEK,
        RTC_DAY_OF_MONTH,
        RTC_MONTH,
        RTC_YEAR,
        CMOS_CENTURY,
    }
)

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_SECONDS_PER_DAY = 86400
# The clock covers years 1..9999 (what datetime.date can hold).
_MIN_TIME = (datetime.date(1, 1, 1).toordinal() - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
_MAX_TIME = (datetime.date(9999, 12, 31).toordinal() - _EPOCH_ORDINAL + 1) * _SECONDS_PER_DAY - 1


@dataclass(frozen=True)
class _Fields:
    """A broken-down time, in plain integers: what the clock registers hold."""

    year: int  # full year, century included
    month: int  # 1..12
    day: int  # 1..31
    hour: int  # 0..23
    minute: int
    second: int
    weekday: int  # 1..7, 1 = Sunday


def _sunday_one_weekday(date: datetime.date) -> int:
    return date.isoweekday() % 7 + 1  # isoweekday: Monday 1 .. Sunday 7


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _fields_from_seconds(seconds: int, weekday_adjust: int) -> _Fields:
    seconds = _clamp(seconds, _MIN_TIME, _MAX_TIME)
    days, of_day = divmod(seconds, _SECONDS_PER_DAY)
    date = datetime.date.fromordinal(_EPOCH_ORDINAL + days)
    hour, rest = divmod(of_day, 3600)
    minute, second = divmod(rest, 60)
    weekday = (_sunday_one_weekday(date) - 1 + weekday_adjust) % 7 + 1
    return _Fields(date.year, date.month, date.day, hour, minute, second, weekday)


def _days_in_month(year: int, month: int) -> int:
    """28-31 (the calendar module would do, at ~3 ms of import on every start)."""
    if month == 12:
        return 31
    return (datetime.date(year, month + 1, 1) - datetime.date(year, month, 1)).days


def _seconds_from_fields(f: _Fields) -> tuple[int, int]:
    """The time the fields name, and the weekday adjustment that keeps their day of week."""
    year = _clamp(f.year, 1, 9999)
    month = _clamp(f.month, 1, 12)
    day = _clamp(f.day, 1, _days_in_month(year, month))
    date = datetime.date(year, month, day)
    seconds = (date.toordinal() - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
    seconds += _clamp(f.hour, 0, 23) * 3600 + _clamp(f.minute, 0, 59) * 60 + _clamp(f.second, 0, 59)
    weekday_adjust = (f.weekday - _sunday_one_weekday(date)) % 7
    return seconds, weekday_adjust


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """CMOS RAM and MC146818 clock at ports 0x70/0x71; ``offset`` is the port minus 0x70."""

    def __init__(
        self,
        *,
        mem_below_4g: int,
        mem_above_4g: int,
        clock: Callable[[], float] = time.time,
        set_irq: Callable[[int], None] | None = None,
    ) -> None:
        if not 0 <= mem_below_4g <= 4 * GiB:
            raise ValueError(f"mem_below_4g out of range: {mem_below_4g:#x}")
        if mem_above_4g < 0:
            raise ValueError(f"mem_above_4g out of range: {mem_above_4g:#x}")
        self._clock = clock
        self._set_irq = set_irq  # not called: no interrupts are generated
        self._lock = threading.Lock()

        self._ram = bytearray(CMOS_SIZE)
        self._index = 0
        self._nmi_disabled = False
        self._reg_a = REG_A_DEFAULT
        self._reg_b = REG_B_DEFAULT
        # Guest time = host clock + offset, while the clock runs.
        self._offset = 0.0
        self._weekday_adjust = 0  # days the guest's day of week is ahead of the date's
        self._frozen: _Fields | None = None  # the stopped clock, while SET or divider reset

        self._fill_ram(mem_below_4g, mem_above_4g)

    # ------------------------------------------------------------------
    # Port I/O
    # ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return read_bytes(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for reg, byte in byte_writes(offset, size, value):
                self._write_byte(reg, byte)

    # ------------------------------------------------------------------
    # For the VMM
    # ------------------------------------------------------------------

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last byte written to the index port."""
        with self._lock:
            return self._nmi_disabled

    def guest_time(self) -> float:
        """The guest's clock, in seconds since the epoch (UTC)."""
        with self._lock:
            if self._frozen is not None:
                return float(_seconds_from_fields(self._frozen)[0])
            return self._clock() + self._offset

    def reset(self) -> None:
        """The chip's RESET pin (a system reset): interrupt enables and the square
        wave are turned off; time, RAM and the other register bits survive."""
        with self._lock:
            self._reg_b &= ~(RTC_PIE | RTC_AIE | RTC_UIE | RTC_SQWE)

    # ------------------------------------------------------------------
    # Called with the lock held
    # ------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset == DATA_OFFSET:
            return self._read_register(self._index)
        return 0xFF  # the index port is write-only; nothing lies past the data port

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == INDEX_OFFSET:
            self._nmi_disabled = bool(value & NMI_DISABLE)
            self._index = value & INDEX_MASK
        elif offset == DATA_OFFSET:
            self._write_register(self._index, value)

    def _read_register(self, reg: int) -> int:
        if reg in _TIME_REGISTERS:
            return self._read_time_register(reg)
        if reg == RTC_REG_A:
            return self._reg_a  # RTC_UIP is never set
        if reg == RTC_REG_B:
            return self._reg_b
        if reg == RTC_REG_C:
            return 0  # no interrupt flag is ever raised
        if reg == RTC_REG_D:
            return RTC_VRT
        return self._ram[reg]

    def _write_register(self, reg: int, value: int) -> None:
        if reg in _TIME_REGISTERS:
            self._write_time_register(reg, value)
        elif reg == RTC_REG_A:
            was_halted = self._halted()
            self._reg_a = value & ~RTC_UIP
            self._halt_changed(was_halted)
        elif reg == RTC_REG_B:
            was_halted = self._halted()
            if value & RTC_SET:
                value &= ~RTC_UIE  # the datasheet: SET going high clears UIE
            self._reg_b = value
            self._halt_changed(was_halted)
        elif reg in (RTC_REG_C, RTC_REG_D):
            log.debug("cmos: ignoring write of %#04x to read-only register %#04x", value, reg)
        else:
            self._ram[reg] = value

    # --- the clock -------------------------------------------------------

    def _halted(self) -> bool:
        return bool(self._reg_b & RTC_SET) or (self._reg_a & RTC_DIV_RESET1) == RTC_DIV_RESET1

    def _halt_changed(self, was_halted: bool) -> None:
        halted = self._halted()
        if halted and not was_halted:
            self._frozen = self._now()[0]
        elif was_halted and not halted:
            assert self._frozen is not None
            self._start_clock(self._frozen, 0.0)
            self._frozen = None

    def _now(self) -> tuple[_Fields, float]:
        """The guest's time as fields, and the fraction of a second past them."""
        if self._frozen is not None:
            return self._frozen, 0.0
        now = self._clock() + self._offset
        whole = math.floor(now)
        return _fields_from_seconds(whole, self._weekday_adjust), now - whole

    def _start_clock(self, fields: _Fields, fraction: float) -> None:
        """Run the guest's clock from ``fields`` (plus ``fraction``) as of now."""
        seconds, self._weekday_adjust = _seconds_from_fields(fields)
        self._offset = seconds + fraction - self._clock()

    def _binary(self) -> bool:
        return bool(self._reg_b & RTC_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._binary() else _from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if self._reg_b & RTC_24H:
            return self._encode(hour)
        pm = RTC_HOURS_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int:
        if self._reg_b & RTC_24H:
            return self._decode(value)
        hour = self._decode(value & ~RTC_HOURS_PM) % 12  # 12 AM is 0, 12 PM is 12
        return hour + 12 if value & RTC_HOURS_PM else hour

    def _read_time_register(self, reg: int) -> int:
        f = self._now()[0]
        if reg == RTC_SECONDS:
            return self._encode(f.second)
        if reg == RTC_MINUTES:
            return self._encode(f.minute)
        if reg == RTC_HOURS:
            return self._encode_hour(f.hour)
        if reg == RTC_DAY_OF_WEEK:
            return self._encode(f.weekday)
        if reg == RTC_DAY_OF_MONTH:
            return self._encode(f.day)
        if reg == RTC_MONTH:
            return self._encode(f.month)
        if reg == RTC_YEAR:
            return self._encode(f.year % 100)
        assert reg == CMOS_CENTURY
        return self._encode(f.year // 100)

    def _write_time_register(self, reg: int, value: int) -> None:
        f, fraction = self._now()
        if reg == RTC_SECONDS:
            f = replace(f, second=_clamp(self._decode(value), 0, 59))
        elif reg == RTC_MINUTES:
            f = replace(f, minute=_clamp(self._decode(value), 0, 59))
        elif reg == RTC_HOURS:
            f = replace(f, hour=_clamp(self._decode_hour(value), 0, 23))
        elif reg == RTC_DAY_OF_WEEK:
            f = replace(f, weekday=_clamp(self._decode(value), 1, 7))
        elif reg == RTC_DAY_OF_MONTH:
            f = replace(f, day=_clamp(self._decode(value), 1, 31))
        elif reg == RTC_MONTH:
            f = replace(f, month=_clamp(self._decode(value), 1, 12))
        elif reg == RTC_YEAR:
            f = replace(f, year=f.year // 100 * 100 + _clamp(self._decode(value), 0, 99))
        else:
            assert reg == CMOS_CENTURY
            f = replace(f, year=_clamp(self._decode(value), 0, 99) * 100 + f.year % 100)
        if self._frozen is not None:
            self._frozen = f
        else:
            self._start_clock(f, fraction)

    # --- RAM contents ------------------------------------------------------

    def _put16(self, low: int, high: int, value: int) -> None:
        self._ram[low] = value & 0xFF
        self._ram[high] = (value >> 8) & 0xFF

    def _fill_ram(self, mem_below_4g: int, mem_above_4g: int) -> None:
        self._ram[CMOS_EQUIPMENT] = EQUIPMENT_DEFAULT
        self._put16(CMOS_BASE_MEM_LOW, CMOS_BASE_MEM_HIGH, BASE_MEMORY_KIB)

        extended_kib = min(max(mem_below_4g - 1 * MiB, 0) // KiB, 0xFFFF)
        self._put16(CMOS_EXT_MEM_LOW, CMOS_EXT_MEM_HIGH, extended_kib)
        self._put16(CMOS_EXT_MEM_ACTUAL_LOW, CMOS_EXT_MEM_ACTUAL_HIGH, extended_kib)

        above_16m = min(max(mem_below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        self._put16(CMOS_MEM_ABOVE_16M_LOW, CMOS_MEM_ABOVE_16M_HIGH, above_16m)

        above_4g = min(mem_above_4g // (64 * KiB), 0xFFFFFF)
        self._ram[CMOS_MEM_ABOVE_4G_LOW] = above_4g & 0xFF
        self._ram[CMOS_MEM_ABOVE_4G_MID] = (above_4g >> 8) & 0xFF
        self._ram[CMOS_MEM_ABOVE_4G_HIGH] = (above_4g >> 16) & 0xFF

        checksum = sum(self._ram[CHECKSUM_FIRST : CHECKSUM_LAST + 1]) & 0xFFFF
        self._ram[CMOS_CHECKSUM_HIGH] = checksum >> 8
        self._ram[CMOS_CHECKSUM_LOW] = checksum & 0xFF
