"""A minimal 8042 keyboard controller: enough for reset, and for probes to pass harmlessly.

The controller sits at port 0x60 (data) and port 0x64 (status on read,
command on write).  The device takes offsets from 0x60, so the bus may map the
whole range 0x60..0x64 to it or two one-byte ranges; offsets 1..3 are not
part of the 8042 (0x61 is the PC's System Control Port B, which the bus should
route elsewhere if it models it) and read as 0xFF here.

No keyboard or mouse is attached and the controller has no interrupt line:
bytes meant for a device are dropped.  Controller commands complete at once,
so the input buffer is never full (status IBF is always 0), which is what
Linux's reboot path waits for before it writes command 0xFE, "pulse the reset
line", to port 0x64.  That command (and any other pulse command, or writing
the output port, that drives the active-low reset line low) calls
``on_reset()``.

Bit and command names follow the IBM PC AT technical reference for the 8042
(the names in Linux's ``drivers/input/serio/i8042.h`` are in comments).

Locking: one per-device lock guards the registers; ``on_reset`` is called
after the lock is released, so it may touch the device (or stop the VM)
without deadlocking.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from . import byte_writes, read_bytes

log = logging.getLogger(__name__)

BASE_PORT = 0x60
DATA_PORT = 0x60
STATUS_PORT = 0x64  # read
COMMAND_PORT = 0x64  # write
PORT_RANGE_SIZE = COMMAND_PORT - BASE_PORT + 1

DATA_OFFSET = DATA_PORT - BASE_PORT
STATUS_OFFSET = COMMAND_OFFSET = STATUS_PORT - BASE_PORT

# --- Status register ----------------------------------------------------------
STATUS_OBF = 0x01  # Output Buffer Full: a byte waits at 0x60   (I8042_STR_OBF)
STATUS_IBF = 0x02  # Input Buffer Full: never set here          (I8042_STR_IBF)
STATUS_SYS = 0x04  # System Flag              (Linux reuses it: I8042_STR_MUXERR)
STATUS_CMD_DATA = 0x08  # A2: last write was to 0x64            (I8042_STR_CMDDAT)
STATUS_INH = 0x10  # keyboard not inhibited (keylock)           (I8042_STR_KEYLOCK)
STATUS_AUX_OBF = 0x20  # the output byte came from the aux port (I8042_STR_AUXDATA)
STATUS_TIMEOUT = 0x40  # General time-out                       (I8042_STR_TIMEOUT)
STATUS_PARITY = 0x80  # Parity error                            (I8042_STR_PARITY)

# --- Controller command byte ("CTR" in Linux) -------------------------------
CCB_KBD_INT = 0x01  # enable keyboard (IRQ 1) interrupt         (I8042_CTR_KBDINT)
CCB_AUX_INT = 0x02  # enable aux (IRQ 12) interrupt             (I8042_CTR_AUXINT)
CCB_SYS = 0x04  # System Flag
CCB_IGNORE_KEYLOCK = 0x08  #                                   (I8042_CTR_IGNKEYLOCK)
CCB_KBD_DISABLE = 0x10  #                                       (I8042_CTR_KBDDIS)
CCB_AUX_DISABLE = 0x20  #                                       (I8042_CTR_AUXDIS)
CCB_XLATE = 0x40  # translate scan codes to set 1               (I8042_CTR_XLATE)

# --- Controller commands, written to port 0x64 --------------------------------
CMD_READ_CCB = 0x20  # command byte -> output buffer            (I8042_CMD_CTL_RCTR)
CMD_WRITE_CCB = 0x60  # next data byte -> command byte          (I8042_CMD_CTL_WCTR)
CMD_DISABLE_AUX = 0xA7  #                                       (I8042_CMD_AUX_DISABLE)
CMD_ENABLE_AUX = 0xA8  #                                        (I8042_CMD_AUX_ENABLE)
CMD_TEST_AUX = 0xA9  # aux interface test -> 0x00               (I8042_CMD_AUX_TEST)
CMD_SELF_TEST = 0xAA  # controller self-test -> 0x55            (I8042_CMD_CTL_TEST)
CMD_TEST_KBD = 0xAB  # keyboard interface test -> 0x00          (I8042_CMD_KBD_TEST)
CMD_DISABLE_KBD = 0xAD  #                                       (I8042_CMD_KBD_DISABLE)
CMD_ENABLE_KBD = 0xAE  #                                        (I8042_CMD_KBD_ENABLE)
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1  # next data byte -> output port
CMD_WRITE_KBD_OUTPUT = 0xD2  # next data byte reads back as keyboard data (I8042_CMD_KBD_LOOP)
CMD_WRITE_AUX_OUTPUT = 0xD3  # next data byte reads back as aux data      (I8042_CMD_AUX_LOOP)
CMD_WRITE_AUX = 0xD4  # next data byte goes to the aux device   (I8042_CMD_AUX_SEND)
CMD_PULSE_OUTPUT_PORT = 0xF0  # 0xF0..0xFF: pulse low the output-port bits 3:0 given as 0
CMD_PULSE_RESET = 0xFE  # pulse bit 0 only: reset the CPU

# Commands whose next data-port write is their parameter.
COMMANDS_WITH_PARAMETER = frozenset(
    {
        CMD_WRITE_CCB,
        CMD_WRITE_OUTPUT_PORT,
        CMD_WRITE_KBD_OUTPUT,
        CMD_WRITE_AUX_OUTPUT,
        CMD_WRITE_AUX,
    }
)

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00

# --- Output port (read with 0xD0, written with 0xD1) --------------------------
OUTPUT_PORT_RESET = 0x01  # System reset line, active low: 0 resets the CPU
OUTPUT_PORT_A20 = 0x02  # Gate A20
OUTPUT_PORT_DEFAULT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

# The command byte reads 0 until the guest writes it: no interrupts, no
# translation, both ports enabled.
CCB_DEFAULT = 0x00


class I8042:
    """The 8042 at ports 0x60/0x64; ``offset`` is the port minus 0x60."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._power_on_state()

    def _power_on_state(self) -> None:
        self._ccb = CCB_DEFAULT
        self._output_port = OUTPUT_PORT_DEFAULT
        self._output_buffer: int | None = None  # byte waiting for the guest at 0x60
        self._output_from_aux = False
        self._last_output = 0  # what 0x60 reads when the buffer is empty
        self._pending_command: int | None = None  # a command awaiting its parameter

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return read_bytes(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        reset = False
        with self._lock:
            for reg, byte in byte_writes(offset, size, value):
                reset |= self._write_byte(reg, byte)
        if reset:
            log.info("i8042: CPU reset requested")
            self._on_reset()

    def reset(self) -> None:
        """Back to power-on state (no callback)."""
        with self._lock:
            self._power_on_state()

    # ------------------------------------------------------------------
    # Called with the lock held
    # ------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset == DATA_OFFSET:
            if self._output_buffer is not None:
                self._last_output = self._output_buffer
                self._output_buffer = None
                self._output_from_aux = False
            return self._last_output
        if offset == STATUS_OFFSET:
            # SYS, A2 and the keylock bit are not modelled: an idle
            # controller reads 0.
            status = 0
            if self._output_buffer is not None:
                status |= STATUS_OBF
                if self._output_from_aux:
                    status |= STATUS_AUX_OBF
            return status
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> bool:
        """Handle one byte; returns True if it asserted the reset line."""
        if offset == COMMAND_OFFSET:
            return self._command(value)
        if offset == DATA_OFFSET:
            return self._data(value)
        return False

    def _command(self, command: int) -> bool:
        self._pending_command = None
        if command == CMD_READ_CCB:
            self._put_output(self._ccb)
        elif command in COMMANDS_WITH_PARAMETER:
            self._pending_command = command
        elif command == CMD_DISABLE_AUX:
            self._ccb |= CCB_AUX_DISABLE
        elif command == CMD_ENABLE_AUX:
            self._ccb &= ~CCB_AUX_DISABLE
        elif command in (CMD_TEST_AUX, CMD_TEST_KBD):
            self._put_output(INTERFACE_TEST_PASSED)
        elif command == CMD_SELF_TEST:
            self._put_output(SELF_TEST_PASSED)
        elif command == CMD_DISABLE_KBD:
            self._ccb |= CCB_KBD_DISABLE
        elif command == CMD_ENABLE_KBD:
            self._ccb &= ~CCB_KBD_DISABLE
        elif command == CMD_READ_OUTPUT_PORT:
            self._put_output(self._output_port)
        elif command >= CMD_PULSE_OUTPUT_PORT:
            # Bits 3:0 select (when 0) which output-port lines to pulse low;
            # bit 0 is the reset line.
            return not command & OUTPUT_PORT_RESET
        else:
            log.debug("i8042: ignoring command %#04x", command)
        return False

    def _data(self, value: int) -> bool:
        command, self._pending_command = self._pending_command, None
        if command == CMD_WRITE_CCB:
            self._ccb = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET
        elif command == CMD_WRITE_KBD_OUTPUT:
            self._put_output(value)
        elif command == CMD_WRITE_AUX_OUTPUT:
            self._put_output(value, from_aux=True)
        else:
            # A byte for the keyboard (no command pending) or, after 0xD4, for
            # the aux device: neither is attached.
            log.debug("i8042: no device to receive %#04x", value)
        return False

    def _put_output(self, value: int, *, from_aux: bool = False) -> None:
        self._output_buffer = value
        self._output_from_aux = from_aux
