"""The DSDT's power button: a Generic Event Device (ACPI0013) that notifies a power button
device (PNP0C0C), as on QEMU's microvm and Cloud Hypervisor.

A hardware-reduced platform has no PM1 event block and no SCI, so no fixed-feature power button
(ACPI 6.x 4.8.2.2.1.3 needs PWRBTN_STS).  Its events go through a GED instead (5.6.9): a device
whose _CRS names an interrupt and whose _EVT method the OS runs, with the interrupt's GSI as
Arg0, when it fires.  Here _EVT reads an event selector register (one byte in I/O space, cleared
by the read: vmm/devices/ged.py) and, for the power-button bit, notifies \\_SB.PWRB with 0x80
("button pressed", 5.6.6), which Linux's button driver turns into a KEY_POWER input event.

The same AML serves the full (PC) FADT of firmware boots, whose flags say "no fixed-feature power
button", so the OS finds only this one.

    Device (GED) {
        Name (_HID, "ACPI0013")
        Name (_UID, Zero)
        Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {GSI} })
        OperationRegion (GDRG, SystemIO, PORT, One)
        Field (GDRG, ByteAcc, NoLock, WriteAsZeros) { GSEL, 8 }
        Method (_EVT, 1, Serialized) {
            Local0 = GSEL
            If (Local0 & POWER_BUTTON) { Notify (\\_SB.PWRB, 0x80) }
        }
    }
    Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel import aml, aml_code as code

GED_HID = "ACPI0013"
POWER_BUTTON_HID = "PNP0C0C"
POWER_BUTTON_PATH = "\\_SB.PWRB"


@dataclass(frozen=True)
class GedConfig:
    """The GED's interrupt (an I/O APIC input: edge-triggered, active high), the I/O port of its
    one-byte event selector, and the selector bit that means "the power button was pressed"."""

    gsi: int
    selector_port: int
    power_button_bit: int = 0x01

    def __post_init__(self):
        if not 0 <= self.gsi <= 0xFFFF_FFFF:
            raise ValueError(f"GED GSI {self.gsi} out of range")
        if not 0 <= self.selector_port <= 0xFFFF:
            raise ValueError(f"GED selector port {self.selector_port:#x} is not an I/O port")
        if self.power_button_bit not in (1 << n for n in range(8)):
            raise ValueError("the power button's selector bit must be one bit of a byte")


def ged_aml(ged: GedConfig) -> bytes:
    """Device (GED): the Generic Event Device; it sits in \\_SB."""
    interrupt = aml.extended_interrupt(ged.gsi, flags=aml.EXT_IRQ_CONSUMER | aml.EXT_IRQ_EDGE)
    event = code.store(aml.name_path("GSEL"), code.local(0)) + code.if_(
        code.and_(code.local(0), aml.integer(ged.power_button_bit)),
        code.notify(POWER_BUTTON_PATH, aml.integer(code.NOTIFY_BUTTON_PRESSED)))
    return aml.device(
        "GED",
        aml.name("_HID", aml.string(GED_HID)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(interrupt)),
        code.operation_region("GDRG", code.REGION_SYSTEM_IO, aml.integer(ged.selector_port), aml.integer(1)),
        code.field("GDRG", code.ACCESS_BYTE | code.UPDATE_WRITE_AS_ZEROS, ("GSEL", 8)),
        aml.method("_EVT", 1, event, serialized=True),
    )


def power_button_aml() -> bytes:
    """Device (PWRB): a control-method power button; it sits in \\_SB."""
    return aml.device(
        "PWRB",
        aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)),
        aml.name("_UID", aml.integer(0)),
    )
