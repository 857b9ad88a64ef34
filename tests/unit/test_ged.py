"""The Generic Event Device's event selector (vmm/devices/ged.py) and its AML (kernel/acpi_ged.py)
agree: the DSDT names the device's port, GSI and power-button bit."""

from __future__ import annotations

import threading

from kernel.acpi_ged import GedConfig
from vmm.boot import acpi_config
from vmm.devices import ged
from vmm.devices.ged import POWER_BUTTON, GenericEventDevice


class Line:
    """The interrupt line as KVM_IRQ_LINE sees it: every level set, in order."""

    def __init__(self) -> None:
        self.levels: list[int] = []

    def __call__(self, level: int) -> None:
        self.levels.append(level)


def test_a_press_sets_the_power_button_bit_and_pulses_the_interrupt():
    line = Line()
    dev = GenericEventDevice(set_irq=line)
    assert dev.read(0, 1) == 0 and line.levels == []
    dev.press_power_button()
    assert line.levels == [1, 0]  # an edge: up, then down again
    assert dev.read(0, 1) == POWER_BUTTON
    assert dev.read(0, 1) == 0  # the read cleared it
    assert dev.presses == 1


def test_two_presses_before_the_guest_reads_are_one_event_and_two_edges():
    line = Line()
    dev = GenericEventDevice(set_irq=line)
    dev.press_power_button()
    dev.press_power_button()
    assert line.levels == [1, 0, 1, 0]
    assert dev.read(0, 1) == POWER_BUTTON and dev.read(0, 1) == 0
    assert dev.presses == 2


def test_writes_are_ignored_and_only_offset_0_decodes():
    dev = GenericEventDevice(set_irq=Line())
    dev.press_power_button()
    dev.write(0, 1, 0xFF)  # a write neither clears nor sets anything
    assert dev.read(1, 1) == 0xFF and dev.read(2, 2) == 0xFFFF  # nothing there
    assert dev.read(0, 1) == POWER_BUTTON
    dev.write(0, 1, POWER_BUTTON)
    assert dev.read(0, 1) == 0


def test_reset_forgets_a_pending_press():
    dev = GenericEventDevice(set_irq=Line())
    dev.press_power_button()
    dev.reset()
    assert dev.read(0, 1) == 0


def test_presses_from_many_threads_each_pulse_and_none_is_lost_before_the_read():
    line = Line()
    lock = threading.Lock()

    def set_irq(level):
        with lock:
            line(level)

    dev = GenericEventDevice(set_irq=set_irq)
    threads = [threading.Thread(target=dev.press_power_button) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dev.presses == 16 and line.levels.count(1) == 16 and line.levels.count(0) == 16
    assert dev.read(0, 1) == POWER_BUTTON and dev.read(0, 1) == 0


def test_both_platforms_tables_describe_this_device():
    want = GedConfig(gsi=ged.GSI, selector_port=ged.SELECTOR_PORT, power_button_bit=POWER_BUTTON)
    assert acpi_config(2).ged == want  # direct kernel boot: hardware-reduced
    assert acpi_config(2, pc_platform=True).ged == want  # firmware boot: the PC FADT
    pc = acpi_config(2, pc_platform=True)
    assert ged.GSI != pc.pm1.sci_irq and ged.GSI not in [irq for _, irq in pc.serial_ports]
    assert ged.GSI not in [iso.source for iso in pc.interrupt_overrides]  # identity-mapped ISA IRQ
