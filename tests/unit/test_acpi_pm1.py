"""vmm/devices/acpi_pm1.py: the PM1a event and control blocks of a firmware boot's full FADT."""

from __future__ import annotations

import pytest

from vmm.devices import acpi_pm1 as pm1
from kernel import acpi


@pytest.fixture
def dev():
    offs = []
    control = pm1.Pm1Control(on_poweroff=lambda: offs.append(True))
    control.offs = offs
    return control


def test_ports_match_what_the_tables_say():
    config = acpi.Pm1Config()
    assert (pm1.EVENT_PORT, pm1.CONTROL_PORT) == (config.event_port, config.control_port)
    assert pm1.S5_SLP_TYP == acpi.S5_SLP_TYP


def test_sci_en_always_reads_one(dev):
    assert dev.read(0, 2) & pm1.SCI_EN
    dev.write(0, 2, 0)
    assert dev.read(0, 2) == pm1.SCI_EN


def test_slp_en_with_s5_powers_off_and_other_types_do_not(dev):
    dev.write(0, 2, 5 << pm1.SLP_TYP_SHIFT)  # ACPICA writes the type first, then with SLP_EN
    assert dev.offs == [] and dev.read(0, 2) == (5 << pm1.SLP_TYP_SHIFT) | pm1.SCI_EN
    dev.write(0, 2, (3 << pm1.SLP_TYP_SHIFT) | pm1.SLP_EN)  # S3: refused, the platform wakes at once
    assert dev.offs == [] and dev.event.read(0, 2) & pm1.WAK_STS
    dev.write(0, 2, (5 << pm1.SLP_TYP_SHIFT) | pm1.SLP_EN)
    assert dev.offs == [True]
    assert not dev.read(0, 2) & pm1.SLP_EN  # write-only


def test_byte_writes_reach_the_high_byte(dev):
    dev.write(1, 1, ((5 << pm1.SLP_TYP_SHIFT) | pm1.SLP_EN) >> 8)
    assert dev.offs == [True]


def test_status_is_write_one_to_clear_and_enable_keeps_defined_bits(dev):
    dev.write(0, 2, (1 << pm1.SLP_TYP_SHIFT) | pm1.SLP_EN)
    assert dev.event.read(0, 2) == pm1.WAK_STS
    dev.event.write(0, 2, 0x0001)  # another bit: WAK_STS stays
    assert dev.event.read(0, 2) == pm1.WAK_STS
    dev.event.write(0, 4, pm1.WAK_STS | (0xFFFF << 16))
    assert dev.event.read(0, 2) == 0
    assert dev.event.read(2, 2) == pm1.EN_BITS
    assert dev.event.read(0, 4) == pm1.EN_BITS << 16

