"""The Generic Event Device's event selector: how the guest learns that its power button was pressed.

The DSDT (kernel/acpi_ged.py) describes a GED (ACPI0013) with an edge-triggered, active-high
interrupt on GSI ``GSI`` and a one-byte register at I/O port ``SELECTOR_PORT``:

    bit 0  POWER_BUTTON  the power button was pressed since the last read
    bits 7:1             reserved, read 0

A read returns the pending events and clears them (the OS's _EVT reads the register once per
interrupt and notifies \\_SB.PWRB for bit 0); writes are ignored.  ``press_power_button()`` (any
thread) sets the bit and pulses the interrupt: the line goes up and down again, an edge the I/O APIC
latches.  A press while an earlier one is still pending pulses again; the guest sees one event.

Locking: one lock guards the pending bits; the interrupt is pulsed after it is released.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

SELECTOR_PORT = 0x603  # right after the hardware-reduced sleep and reset registers (acpi_pm.py)
SELECTOR_SIZE = 1
# ISA IRQ 5: free on both of pyvmm's platforms (COM1 has 4, the RTC 8, a firmware boot's SCI 9,
# PCI INTx 16-23), identity-mapped to the I/O APIC's pin 5 (no Interrupt Source Override names it).
GSI = 5

POWER_BUTTON = 0x01
EVENT_BITS = POWER_BUTTON


class GenericEventDevice:
    """The event selector register (offset 0) and the interrupt that announces new events."""

    def __init__(self, set_irq: Callable[[int], None]) -> None:
        """`set_irq(level)` drives the GED's interrupt line (KVM_IRQ_LINE on GSI)."""
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._pending = 0
        self.presses = 0  # power-button presses so far

    def press_power_button(self) -> None:
        with self._lock:
            self._pending |= POWER_BUTTON
            self.presses += 1
        log.info("ged: power button pressed")
        self._set_irq(1)
        self._set_irq(0)

    def read(self, offset: int, size: int) -> int:
        if offset != 0:
            return (1 << (8 * size)) - 1  # nothing decodes there: the bus floats high
        with self._lock:
            events, self._pending = self._pending, 0
        return events & EVENT_BITS

    def write(self, offset: int, size: int, value: int) -> None:
        log.debug("ged: ignoring write %#x to the event selector", value)

    def reset(self) -> None:
        """Back to power-on state: nothing pending."""
        with self._lock:
            self._pending = 0
