"""The 8042 keyboard controller: reset line, and harmless answers to probes."""

from __future__ import annotations

import pytest

from vmm.devices.i8042 import (
    CCB_AUX_DISABLE,
    CCB_KBD_DISABLE,
    CCB_KBD_INT,
    CCB_XLATE,
    CMD_DISABLE_AUX,
    CMD_DISABLE_KBD,
    CMD_ENABLE_AUX,
    CMD_ENABLE_KBD,
    CMD_PULSE_RESET,
    CMD_READ_CCB,
    CMD_READ_OUTPUT_PORT,
    CMD_SELF_TEST,
    CMD_TEST_AUX,
    CMD_TEST_KBD,
    CMD_WRITE_AUX,
    CMD_WRITE_AUX_OUTPUT,
    CMD_WRITE_CCB,
    CMD_WRITE_KBD_OUTPUT,
    CMD_WRITE_OUTPUT_PORT,
    COMMAND_PORT,
    DATA_PORT,
    PORT_RANGE_SIZE,
    STATUS_AUX_OBF,
    STATUS_IBF,
    STATUS_OBF,
    I8042,
)

DATA = DATA_PORT - 0x60
COMMAND = STATUS = COMMAND_PORT - 0x60


class Harness:
    def __init__(self) -> None:
        self.resets = 0
        self.kbc = I8042(on_reset=self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, offset: int) -> int:
        return self.kbc.read(offset, 1)

    def outb(self, offset: int, value: int) -> None:
        self.kbc.write(offset, 1, value)

    def command(self, command: int) -> int | None:
        """Linux's i8042_command(): write the command, poll for one reply byte."""
        self.outb(COMMAND, command)
        if self.inb(STATUS) & STATUS_OBF:
            return self.inb(DATA)
        return None


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_port_layout() -> None:
    assert (DATA, STATUS) == (0, 4)
    assert PORT_RANGE_SIZE == 5


def test_idle_status_reads_zero(h: Harness) -> None:
    assert h.inb(STATUS) == 0


def test_linux_keyboard_reboot_pulses_reset(h: Harness) -> None:
    """native_machine_emergency_restart(), BOOT_KBD: kb_wait(), then outb(0xfe, 0x64)."""
    for _ in range(10):
        for _ in range(0x10000):  # kb_wait()
            if h.inb(STATUS) & STATUS_IBF == 0:
                break
        else:
            pytest.fail("input buffer never emptied")
        h.outb(COMMAND, CMD_PULSE_RESET)
        if h.resets:
            break
    assert h.resets == 1


def test_pulse_commands_reset_only_when_bit_0_is_pulsed(h: Harness) -> None:
    h.outb(COMMAND, 0xFF)  # pulse nothing (used after the A20 dance)
    h.outb(COMMAND, 0xFD)  # pulse bit 1 only
    assert h.resets == 0
    h.outb(COMMAND, 0xF0)  # pulse bits 3:0, reset among them
    assert h.resets == 1


def test_reset_callback_may_use_the_device() -> None:
    seen = []
    kbc = I8042(on_reset=lambda: seen.append(kbc.read(4, 1)))  # no deadlock
    kbc.write(4, 1, CMD_PULSE_RESET)
    assert seen == [0]


def test_read_command_byte(h: Harness) -> None:
    h.outb(COMMAND, CMD_READ_CCB)
    assert h.inb(STATUS) == STATUS_OBF
    assert h.inb(DATA) == 0x00
    assert h.inb(STATUS) == 0


def test_write_command_byte(h: Harness) -> None:
    h.outb(COMMAND, CMD_WRITE_CCB)
    h.outb(DATA, CCB_XLATE | CCB_KBD_INT)
    assert h.inb(STATUS) == 0
    assert h.command(CMD_READ_CCB) == CCB_XLATE | CCB_KBD_INT


def test_port_enable_disable_commands_update_command_byte(h: Harness) -> None:
    h.command(CMD_DISABLE_KBD)
    h.command(CMD_DISABLE_AUX)
    assert h.command(CMD_READ_CCB) == CCB_KBD_DISABLE | CCB_AUX_DISABLE
    h.command(CMD_ENABLE_KBD)
    h.command(CMD_ENABLE_AUX)
    assert h.command(CMD_READ_CCB) == 0


def test_self_and_interface_tests_pass(h: Harness) -> None:
    assert h.command(CMD_SELF_TEST) == 0x55
    assert h.command(CMD_TEST_KBD) == 0x00
    assert h.command(CMD_TEST_AUX) == 0x00


def test_flush_reads_until_obf_clears(h: Harness) -> None:
    """i8042_flush(): read data while OBF is set; must terminate."""
    h.outb(COMMAND, CMD_SELF_TEST)
    drained = []
    while h.inb(STATUS) & STATUS_OBF:
        drained.append(h.inb(DATA))
        assert len(drained) < 16
    assert drained == [0x55]
    assert h.inb(DATA) == 0x55  # an empty buffer still reads the last byte


def test_output_port_write_with_reset_bit_low_resets(h: Harness) -> None:
    assert h.command(CMD_READ_OUTPUT_PORT) == 0x03
    h.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    h.outb(DATA, 0xDF)  # the classic "enable A20" value: reset line stays high
    assert h.resets == 0
    assert h.command(CMD_READ_OUTPUT_PORT) == 0xDF
    h.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    h.outb(DATA, 0xDE)
    assert h.resets == 1


def test_output_buffer_loop_commands(h: Harness) -> None:
    h.outb(COMMAND, CMD_WRITE_KBD_OUTPUT)
    h.outb(DATA, 0xAB)
    assert h.inb(STATUS) == STATUS_OBF
    assert h.inb(DATA) == 0xAB
    h.outb(COMMAND, CMD_WRITE_AUX_OUTPUT)
    h.outb(DATA, 0x5A)
    assert h.inb(STATUS) == STATUS_OBF | STATUS_AUX_OBF
    assert h.inb(DATA) == 0x5A
    assert h.inb(STATUS) == 0


def test_bytes_for_absent_devices_are_dropped(h: Harness) -> None:
    h.outb(DATA, 0xF2)  # keyboard "identify": no keyboard
    h.outb(COMMAND, CMD_WRITE_AUX)
    h.outb(DATA, 0xFF)  # mouse reset: no mouse
    assert h.inb(STATUS) == 0
    assert h.resets == 0
    assert h.command(CMD_READ_CCB) == 0  # the data bytes did not land in the CCB


def test_unknown_command_is_ignored(h: Harness) -> None:
    h.outb(COMMAND, 0xC0)
    assert h.inb(STATUS) == 0
    assert h.resets == 0


def test_offsets_between_data_and_status_read_ff(h: Harness) -> None:
    for offset in (1, 2, 3):
        assert h.inb(offset) == 0xFF
        h.outb(offset, 0xFE)
    assert h.resets == 0


def test_reset_method_restores_power_on_state(h: Harness) -> None:
    h.outb(COMMAND, CMD_WRITE_CCB)
    h.outb(DATA, 0x47)
    h.outb(COMMAND, CMD_SELF_TEST)
    h.kbc.reset()
    assert h.inb(STATUS) == 0
    assert h.command(CMD_READ_CCB) == 0
    assert h.resets == 0
