"""The CMOS RAM and MC146818 real-time clock at ports 0x70/0x71."""

from __future__ import annotations

import calendar
import threading

import pytest

from vmm.devices.cmos import (
    CMOS_BASE_MEM_HIGH,
    CMOS_BASE_MEM_LOW,
    CMOS_CENTURY,
    CMOS_CHECKSUM_HIGH,
    CMOS_CHECKSUM_LOW,
    CMOS_EQUIPMENT,
    CMOS_EXT_MEM_ACTUAL_HIGH,
    CMOS_EXT_MEM_ACTUAL_LOW,
    CMOS_EXT_MEM_HIGH,
    CMOS_EXT_MEM_LOW,
    CMOS_MEM_ABOVE_16M_HIGH,
    CMOS_MEM_ABOVE_16M_LOW,
    CMOS_MEM_ABOVE_4G_HIGH,
    CMOS_MEM_ABOVE_4G_LOW,
    CMOS_MEM_ABOVE_4G_MID,
    CMOS_SHUTDOWN_STATUS,
    DATA_PORT,
    INDEX_PORT,
    NMI_DISABLE,
    PORT_RANGE_SIZE,
    RTC_24H,
    RTC_AIE,
    RTC_DAY_OF_MONTH,
    RTC_DAY_OF_WEEK,
    RTC_DIV_RESET2,
    RTC_DM_BINARY,
    RTC_HOURS,
    RTC_HOURS_ALARM,
    RTC_MINUTES,
    RTC_MINUTES_ALARM,
    RTC_MONTH,
    RTC_PIE,
    RTC_REG_A,
    RTC_REG_B,
    RTC_REG_C,
    RTC_REG_D,
    RTC_SECONDS,
    RTC_SECONDS_ALARM,
    RTC_SET,
    RTC_SQWE,
    RTC_UIE,
    RTC_UIP,
    RTC_VRT,
    RTC_YEAR,
    CmosRtc,
)

INDEX = INDEX_PORT - 0x70
DATA = DATA_PORT - 0x70

MiB = 1 << 20
GiB = 1 << 30


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, now: float = utc(2026, 11, 24, 23, 59, 59), **mem: int) -> None:
        self.clock = FakeClock(now)
        self.irqs: list[int] = []
        mem.setdefault("mem_below_4g", 512 * MiB)
        mem.setdefault("mem_above_4g", 0)
        self.rtc = CmosRtc(clock=self.clock, set_irq=self.irqs.append, **mem)

    def read(self, reg: int) -> int:
        """Linux's CMOS_READ(): outb(reg, 0x70); inb(0x71)."""
        self.rtc.write(INDEX, 1, reg)
        return self.rtc.read(DATA, 1)

    def write(self, reg: int, value: int) -> None:
        self.rtc.write(INDEX, 1, reg)
        self.rtc.write(DATA, 1, value)

    def time_bytes(self) -> tuple[int, ...]:
        """(century, year, month, day, hours, minutes, seconds), as the registers hold them."""
        regs = (
            CMOS_CENTURY,
            RTC_YEAR,
            RTC_MONTH,
            RTC_DAY_OF_MONTH,
            RTC_HOURS,
            RTC_MINUTES,
            RTC_SECONDS,
        )
        return tuple(self.read(r) for r in regs)

    def linux_set_time(self, *values: int) -> None:
        """mc146818_set_time(): stop the clock with SET and the divider reset, write, restore.

        ``values`` are (century, year, month, day, hours, minutes, seconds) as register bytes.
        """
        century, year, month, day, hour, minute, second = values
        control = self.read(RTC_REG_B)
        self.write(RTC_REG_B, control | RTC_SET)
        freq_select = self.read(RTC_REG_A)
        self.write(RTC_REG_A, freq_select | RTC_DIV_RESET2)
        for reg, value in (
            (RTC_YEAR, year),
            (RTC_MONTH, month),
            (RTC_DAY_OF_MONTH, day),
            (RTC_HOURS, hour),
            (RTC_MINUTES, minute),
            (RTC_SECONDS, second),
            (CMOS_CENTURY, century),
        ):
            self.write(reg, value)
        self.write(RTC_REG_B, control)
        self.write(RTC_REG_A, freq_select)


@pytest.fixture
def h() -> Harness:
    return Harness()


# --- ports ------------------------------------------------------------------


def test_port_layout() -> None:
    assert (INDEX, DATA, PORT_RANGE_SIZE) == (0, 1, 2)


def test_index_port_reads_ff(h: Harness) -> None:
    h.rtc.write(INDEX, 1, RTC_REG_A)
    assert h.rtc.read(INDEX, 1) == 0xFF


def test_nmi_bit_is_remembered_and_masked_from_the_index(h: Harness) -> None:
    assert not h.rtc.nmi_disabled
    h.rtc.write(INDEX, 1, NMI_DISABLE | CMOS_SHUTDOWN_STATUS)
    assert h.rtc.nmi_disabled
    h.rtc.write(DATA, 1, 0x0A)
    h.rtc.write(INDEX, 1, NMI_DISABLE | RTC_REG_A)
    assert h.rtc.read(DATA, 1) == 0x26  # register A, not 0x8A
    h.rtc.write(INDEX, 1, CMOS_SHUTDOWN_STATUS)
    assert not h.rtc.nmi_disabled
    assert h.rtc.read(DATA, 1) == 0x0A


def test_word_write_sets_index_then_data(h: Harness) -> None:
    h.rtc.write(INDEX, 2, 0x5A << 8 | 0x40)  # outw: index 0x40, data 0x5A
    assert h.read(0x40) == 0x5A


# --- reading the clock --------------------------------------------------------


def test_default_registers(h: Harness) -> None:
    assert h.read(RTC_REG_A) == 0x26
    assert h.read(RTC_REG_B) == 0x02
    assert h.read(RTC_REG_C) == 0
    assert h.read(RTC_REG_D) == RTC_VRT


def test_bcd_24h_across_midnight(h: Harness) -> None:
    assert h.time_bytes() == (0x20, 0x26, 0x11, 0x24, 0x23, 0x59, 0x59)
    assert h.read(RTC_DAY_OF_WEEK) == 3  # Tuesday, 1 = Sunday
    h.clock.now += 1
    assert h.time_bytes() == (0x20, 0x26, 0x11, 0x25, 0x00, 0x00, 0x00)
    assert h.read(RTC_DAY_OF_WEEK) == 4


def test_binary_24h(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_DM_BINARY | RTC_24H)
    assert h.time_bytes() == (20, 26, 11, 24, 23, 59, 59)
    h.clock.now += 1
    assert h.time_bytes() == (20, 26, 11, 25, 0, 0, 0)


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [
        (0, 0x12, 12),  # 12 AM
        (1, 0x01, 1),
        (11, 0x11, 11),
        (12, 0x92, 0x80 | 12),  # 12 PM
        (13, 0x81, 0x80 | 1),
        (23, 0x91, 0x80 | 11),
    ],
)
def test_12_hour_mode(hour: int, bcd: int, binary: int) -> None:
    h = Harness(utc(2026, 11, 24, hour, 30, 0))
    h.write(RTC_REG_B, 0)  # 12-hour, BCD
    assert h.read(RTC_HOURS) == bcd
    h.write(RTC_REG_B, RTC_DM_BINARY)  # 12-hour, binary
    assert h.read(RTC_HOURS) == binary


def test_year_and_century_roll_over() -> None:
    h = Harness(utc(2099, 12, 31, 23, 59, 59))
    assert h.time_bytes() == (0x20, 0x99, 0x12, 0x31, 0x23, 0x59, 0x59)
    h.clock.now += 1
    assert h.time_bytes() == (0x21, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00)


def test_leap_day() -> None:
    h = Harness(utc(2028, 2, 28, 23, 59, 59))
    h.clock.now += 1
    assert h.time_bytes()[2:4] == (0x02, 0x29)


def test_fractional_host_time_is_truncated() -> None:
    h = Harness(utc(2026, 11, 24, 12, 0, 0) + 0.999)
    assert h.read(RTC_SECONDS) == 0x00


# --- the guest setting the clock ------------------------------------------------


def test_linux_set_time_moves_only_the_guest_clock(h: Harness) -> None:
    host_before = h.clock.now
    h.linux_set_time(0x20, 0x30, 0x01, 0x02, 0x03, 0x04, 0x05)
    assert h.clock.now == host_before  # nothing touched the host clock
    assert h.time_bytes() == (0x20, 0x30, 0x01, 0x02, 0x03, 0x04, 0x05)
    assert h.rtc.guest_time() == utc(2030, 1, 2, 3, 4, 5)

    h.clock.now += 3600 + 2
    assert h.time_bytes() == (0x20, 0x30, 0x01, 0x02, 0x04, 0x04, 0x07)

    other = CmosRtc(mem_below_4g=512 * MiB, mem_above_4g=0, clock=h.clock)
    other.write(INDEX, 1, RTC_YEAR)
    assert other.read(DATA, 1) == 0x26  # a fresh device still shows the host's time


def test_clock_stands_still_while_set(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_24H | RTC_SET)
    frozen = h.time_bytes()
    h.clock.now += 10
    assert h.time_bytes() == frozen
    h.write(RTC_MINUTES, 0x15)
    h.clock.now += 10
    assert h.time_bytes() == (0x20, 0x26, 0x11, 0x24, 0x23, 0x15, 0x59)
    h.write(RTC_REG_B, RTC_24H)  # runs again from the value written
    h.clock.now += 1
    assert h.time_bytes() == (0x20, 0x26, 0x11, 0x24, 0x23, 0x16, 0x00)


def test_divider_reset_stops_the_clock(h: Harness) -> None:
    h.write(RTC_REG_A, RTC_DIV_RESET2 | 0x06)
    h.clock.now += 5
    assert h.read(RTC_SECONDS) == 0x59
    h.write(RTC_REG_A, 0x26)
    h.clock.now += 5
    assert h.read(RTC_SECONDS) == 0x04


def test_single_register_write_keeps_the_rest_and_the_phase() -> None:
    h = Harness(utc(2026, 11, 24, 10, 20, 30) + 0.75)
    h.write(RTC_MINUTES, 0x45)
    assert h.time_bytes() == (0x20, 0x26, 0x11, 0x24, 0x10, 0x45, 0x30)
    h.clock.now += 0.25  # the second ticks when the host's would have
    assert h.read(RTC_SECONDS) == 0x31


def test_set_time_in_binary_and_12_hour_mode(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_DM_BINARY | RTC_SET)  # binary, 12-hour, stopped
    h.write(RTC_HOURS, 0x80 | 7)  # 7 PM
    h.write(RTC_MINUTES, 5)
    h.write(RTC_SECONDS, 0)
    h.write(RTC_DAY_OF_MONTH, 1)
    h.write(RTC_MONTH, 3)
    h.write(RTC_YEAR, 27)
    h.write(RTC_REG_B, RTC_DM_BINARY)
    assert h.rtc.guest_time() == utc(2027, 3, 1, 19, 5, 0)
    h.write(RTC_REG_B, RTC_24H)  # the same time, read back as BCD 24-hour
    assert h.time_bytes() == (0x20, 0x27, 0x03, 0x01, 0x19, 0x05, 0x00)


def test_12_am_written_in_12_hour_mode_is_midnight(h: Harness) -> None:
    h.write(RTC_REG_B, 0)
    h.write(RTC_HOURS, 0x12)
    assert h.rtc.guest_time() == utc(2026, 11, 24, 0, 59, 59)


def test_century_write(h: Harness) -> None:
    h.write(CMOS_CENTURY, 0x19)
    assert h.time_bytes()[:2] == (0x19, 0x26)
    assert h.rtc.guest_time() == utc(1926, 11, 24, 23, 59, 59)


def test_out_of_range_values_are_clamped_not_raised(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_24H | RTC_SET)
    h.write(RTC_MONTH, 0x02)
    h.write(RTC_DAY_OF_MONTH, 0x31)
    h.write(RTC_HOURS, 0x99)
    h.write(RTC_MINUTES, 0xFF)  # not BCD at all
    h.write(RTC_REG_B, RTC_24H)
    assert h.rtc.guest_time() == utc(2026, 2, 28, 23, 59, 59)
    h.write(CMOS_CENTURY, 0)
    h.write(RTC_YEAR, 0)  # year 0 does not exist; the clock stops at year 1
    assert h.read(RTC_YEAR) == 0x01


def test_day_of_week_is_its_own_register(h: Harness) -> None:
    h.write(RTC_DAY_OF_WEEK, 7)
    assert h.read(RTC_DAY_OF_WEEK) == 7
    h.clock.now += 1  # midnight: 7 wraps to 1
    assert h.read(RTC_DAY_OF_WEEK) == 1
    h.write(RTC_DAY_OF_MONTH, 0x01)  # setting the date leaves it alone
    assert h.read(RTC_DAY_OF_WEEK) == 1


def test_alarm_registers_are_stored(h: Harness) -> None:
    alarms = ((RTC_SECONDS_ALARM, 0x30), (RTC_MINUTES_ALARM, 0xC0), (RTC_HOURS_ALARM, 0x07))
    for reg, value in alarms:
        h.write(reg, value)
        assert h.read(reg) == value
    assert h.read(RTC_SECONDS) == 0x59  # the time is untouched


# --- status registers -----------------------------------------------------------


def test_uip_never_holds_a_polling_reader(h: Harness) -> None:
    """mc146818_avoid_UIP(): read seconds, check UIP, read the time, check UIP and the
    seconds again, retrying on any of them; it must finish on the first or second try."""
    for _ in range(2000):
        h.clock.now += 0.0007  # sweep through every phase of the second
        for attempt in range(2):
            seconds = h.read(RTC_SECONDS)
            if h.read(RTC_REG_A) & RTC_UIP:
                continue
            h.time_bytes()
            if h.read(RTC_REG_A) & RTC_UIP:
                continue
            if h.read(RTC_SECONDS) == seconds:
                break
            h.clock.now += 0.0001  # the second ticked mid-read: retry
        else:
            pytest.fail("the reader retried more than once")


def test_uip_is_read_only(h: Harness) -> None:
    h.write(RTC_REG_A, RTC_UIP | 0x26)
    assert h.read(RTC_REG_A) == 0x26


def test_register_b_is_stored_and_set_clears_uie(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_24H | RTC_PIE | RTC_AIE | RTC_UIE | RTC_SQWE)
    assert h.read(RTC_REG_B) == RTC_24H | RTC_PIE | RTC_AIE | RTC_UIE | RTC_SQWE
    h.write(RTC_REG_B, RTC_24H | RTC_SET | RTC_UIE)
    assert h.read(RTC_REG_B) == RTC_24H | RTC_SET


def test_no_interrupts_register_c_reads_zero(h: Harness) -> None:
    h.write(RTC_SECONDS_ALARM, 0xC0)
    h.write(RTC_MINUTES_ALARM, 0xC0)
    h.write(RTC_HOURS_ALARM, 0xC0)
    h.write(RTC_REG_B, RTC_24H | RTC_PIE | RTC_AIE | RTC_UIE)
    h.clock.now += 5  # updates and alarms would have happened
    assert h.read(RTC_REG_C) == 0
    h.write(RTC_REG_C, 0xF0)  # read-only
    assert h.read(RTC_REG_C) == 0
    assert h.irqs == []


def test_register_d_always_valid(h: Harness) -> None:
    h.write(RTC_REG_D, 0)
    assert h.read(RTC_REG_D) == RTC_VRT


def test_reset_clears_interrupt_enables_but_keeps_the_time(h: Harness) -> None:
    h.write(RTC_REG_B, RTC_DM_BINARY | RTC_24H | RTC_PIE | RTC_UIE | RTC_SQWE)
    h.write(RTC_MINUTES, 10)
    h.rtc.reset()
    assert h.read(RTC_REG_B) == RTC_DM_BINARY | RTC_24H
    assert h.read(RTC_MINUTES) == 10


# --- CMOS RAM -------------------------------------------------------------------


def mem_fields(h: Harness) -> dict[str, int]:
    def word(low: int, high: int) -> int:
        return h.read(high) << 8 | h.read(low)

    return {
        "base_kib": word(CMOS_BASE_MEM_LOW, CMOS_BASE_MEM_HIGH),
        "ext_kib": word(CMOS_EXT_MEM_LOW, CMOS_EXT_MEM_HIGH),
        "ext_actual_kib": word(CMOS_EXT_MEM_ACTUAL_LOW, CMOS_EXT_MEM_ACTUAL_HIGH),
        "above_16m_64k": word(CMOS_MEM_ABOVE_16M_LOW, CMOS_MEM_ABOVE_16M_HIGH),
        "above_4g_64k": h.read(CMOS_MEM_ABOVE_4G_HIGH) << 16
        | h.read(CMOS_MEM_ABOVE_4G_MID) << 8
        | h.read(CMOS_MEM_ABOVE_4G_LOW),
    }


@pytest.mark.parametrize(
    ("below", "above", "expected"),
    [
        (8 * MiB, 0, dict(ext_kib=7 * 1024, above_16m_64k=0, above_4g_64k=0)),
        (512 * MiB, 0, dict(ext_kib=0xFFFF, above_16m_64k=0x1F00, above_4g_64k=0)),
        (3 * GiB, 0, dict(ext_kib=0xFFFF, above_16m_64k=0xBF00, above_4g_64k=0)),
        (3 * GiB, 5 * GiB, dict(ext_kib=0xFFFF, above_16m_64k=0xBF00, above_4g_64k=0x014000)),
        (4 * GiB, 2 << 40, dict(ext_kib=0xFFFF, above_16m_64k=0xFF00, above_4g_64k=0xFFFFFF)),
    ],
)
def test_memory_fields(below: int, above: int, expected: dict[str, int]) -> None:
    h = Harness(mem_below_4g=below, mem_above_4g=above)
    fields = mem_fields(h)
    assert fields["base_kib"] == 640
    assert fields["ext_actual_kib"] == fields["ext_kib"]
    assert {k: fields[k] for k in expected} == expected


@pytest.mark.parametrize(("below", "above"), [(512 * MiB, 0), (3 * GiB, 0), (3 * GiB, 5 * GiB)])
def test_memory_fields_as_seabios_reads_them(below: int, above: int) -> None:
    h = Harness(mem_below_4g=below, mem_above_4g=above)
    above_16m = h.read(CMOS_MEM_ABOVE_16M_HIGH) << 24 | h.read(CMOS_MEM_ABOVE_16M_LOW) << 16
    ram_size = above_16m + 16 * MiB
    over_4g = (
        h.read(CMOS_MEM_ABOVE_4G_LOW) << 16
        | h.read(CMOS_MEM_ABOVE_4G_MID) << 24
        | h.read(CMOS_MEM_ABOVE_4G_HIGH) << 32
    )
    assert (ram_size, over_4g) == (below, above)


def test_equipment_byte(h: Harness) -> None:
    assert h.read(CMOS_EQUIPMENT) == 0x02  # coprocessor; no floppies; EGA/VGA-class display


def test_checksum(h: Harness) -> None:
    # 512 MiB: equipment 0x02, base 0x0280, extended 0xFFFF; nothing else in 0x10..0x2D.
    assert (h.read(CMOS_CHECKSUM_HIGH), h.read(CMOS_CHECKSUM_LOW)) == (0x02, 0x82)
    for below, above in ((3 * GiB, 5 * GiB), (8 * MiB, 0)):
        other = Harness(mem_below_4g=below, mem_above_4g=above)
        total = sum(other.read(r) for r in range(0x10, 0x2E))
        assert other.read(CMOS_CHECKSUM_HIGH) << 8 | other.read(CMOS_CHECKSUM_LOW) == total


def test_shutdown_status_and_ram_are_writable(h: Harness) -> None:
    assert h.read(CMOS_SHUTDOWN_STATUS) == 0
    h.write(CMOS_SHUTDOWN_STATUS, 0x0A)
    assert h.read(CMOS_SHUTDOWN_STATUS) == 0x0A
    h.write(0x7F, 0x55)
    assert h.read(0x7F) == 0x55


@pytest.mark.parametrize(("below", "above"), [(-1, 0), (4 * GiB + 1, 0), (GiB, -1)])
def test_bad_memory_sizes_rejected(below: int, above: int) -> None:
    with pytest.raises(ValueError):
        CmosRtc(mem_below_4g=below, mem_above_4g=above)


def test_default_clock_is_the_host_clock() -> None:
    import time

    rtc = CmosRtc(mem_below_4g=GiB, mem_above_4g=0)
    assert abs(rtc.guest_time() - time.time()) < 5


# --- threads --------------------------------------------------------------------


def test_concurrent_access_does_not_raise() -> None:
    h = Harness()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(2000):
                reg = (seed * 31 + i * 7) & 0x7F
                h.rtc.write(INDEX, 1, reg | (NMI_DISABLE if i & 1 else 0))
                if i % 3:
                    h.rtc.read(DATA, 1)
                elif reg not in (RTC_REG_A, RTC_REG_B):  # keep the clock running
                    h.rtc.write(DATA, 1, (seed + i) & 0xFF)
                h.clock.now += 0.01
                h.rtc.guest_time()
        except BaseException as e:  # noqa: BLE001 - report anything to the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert h.read(RTC_REG_D) == RTC_VRT
