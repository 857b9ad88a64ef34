"""Hardware-reduced ACPI sleep control/status and reset registers."""

from __future__ import annotations

import pytest

from vmm.devices.acpi_pm import (
    BASE_PORT,
    PORT_RANGE_SIZE,
    RESET_PORT,
    RESET_VALUE,
    S5_SLP_TYP,
    SLEEP_CONTROL_PORT,
    SLEEP_STATUS_PORT,
    SLP_EN,
    SLP_TYP_SHIFT,
    WAK_STS,
    AcpiSleepDevice,
)

SLEEP_CONTROL = SLEEP_CONTROL_PORT - BASE_PORT
SLEEP_STATUS = SLEEP_STATUS_PORT - BASE_PORT
RESET = RESET_PORT - BASE_PORT


class Harness:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.dev = AcpiSleepDevice(
            on_poweroff=lambda: self.events.append("poweroff"),
            on_reset=lambda: self.events.append("reset"),
        )

    def inb(self, offset: int) -> int:
        return self.dev.read(offset, 1)

    def outb(self, offset: int, value: int) -> None:
        self.dev.write(offset, 1, value)

    def enter_sleep_state(self, slp_typ: int) -> None:
        """ACPICA's acpi_hw_extended_sleep(): clear WAK_STS, then SLP_TYP|SLP_EN in one write."""
        self.outb(SLEEP_STATUS, WAK_STS)
        self.outb(SLEEP_CONTROL, (slp_typ << SLP_TYP_SHIFT) | SLP_EN)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_port_constants() -> None:
    assert (SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, RESET_PORT) == (0x600, 0x601, 0x602)
    assert (SLEEP_CONTROL, SLEEP_STATUS, RESET) == (0, 1, 2)
    assert PORT_RANGE_SIZE == 3
    assert RESET_VALUE == 0x01
    assert S5_SLP_TYP == 5
    assert SLP_EN == 0x20 and WAK_STS == 0x80


def test_s5_write_powers_off(h: Harness) -> None:
    h.enter_sleep_state(S5_SLP_TYP)
    assert h.events == ["poweroff"]
    assert h.inb(SLEEP_STATUS) == WAK_STS


def test_slp_typ_without_slp_en_does_nothing(h: Harness) -> None:
    h.outb(SLEEP_CONTROL, S5_SLP_TYP << SLP_TYP_SHIFT)
    assert h.events == []
    assert h.inb(SLEEP_STATUS) == 0
    # SLP_TYP reads back; SLP_EN is write-only and reads 0.
    assert h.inb(SLEEP_CONTROL) == S5_SLP_TYP << SLP_TYP_SHIFT


@pytest.mark.parametrize("slp_typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_are_refused_and_wake_at_once(h: Harness, slp_typ: int) -> None:
    h.enter_sleep_state(slp_typ)
    assert h.events == []
    assert h.inb(SLEEP_STATUS) == WAK_STS  # the OS's wait-for-wake loop ends
    h.outb(SLEEP_STATUS, WAK_STS)  # write 1 to clear
    assert h.inb(SLEEP_STATUS) == 0


def test_writing_zero_to_sleep_status_keeps_wak_sts(h: Harness) -> None:
    h.enter_sleep_state(1)
    h.outb(SLEEP_STATUS, 0)
    assert h.inb(SLEEP_STATUS) == WAK_STS


def test_reset_register(h: Harness) -> None:
    h.outb(RESET, RESET_VALUE)
    assert h.events == ["reset"]
    assert h.inb(RESET) == 0


def test_other_values_in_reset_register_are_ignored(h: Harness) -> None:
    for value in (0x00, 0x02, 0x06, 0x0E, 0xFF):
        h.outb(RESET, value)
    assert h.events == []


def test_callbacks_may_use_the_device() -> None:
    seen = []
    dev = AcpiSleepDevice(
        on_poweroff=lambda: seen.append(dev.read(SLEEP_STATUS, 1)),
        on_reset=lambda: seen.append(dev.read(RESET, 1)),
    )  # no deadlock: called outside the device lock
    dev.write(SLEEP_CONTROL, 1, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN)
    dev.write(RESET, 1, RESET_VALUE)
    assert seen == [WAK_STS, 0]


def test_past_the_last_register_reads_ff(h: Harness) -> None:
    assert h.dev.read(RESET, 2) == 0xFF00


def test_reset_method_clears_state(h: Harness) -> None:
    h.enter_sleep_state(3)
    h.dev.reset()
    assert h.inb(SLEEP_STATUS) == 0
    assert h.inb(SLEEP_CONTROL) == 0
    assert h.events == []
