"""The power button in the DSDT (kernel/acpi_ged.py, kernel/aml_code.py): the AML's bytes, iasl's
reading of them, and ACPICA's interpreter running _EVT (a Notify to PWRB only for the power-button bit)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kernel import acpi, aml, aml_code as code
from kernel.acpi_ged import GedConfig, ged_aml, power_button_aml
from tests.unit.test_acpi import disassemble, make_config, write_tables

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) not installed")
needs_acpiexec = pytest.mark.skipif(IASL is None or ACPIEXEC is None, reason="acpica-tools not installed")

GED = GedConfig(gsi=5, selector_port=0x603)


# ---------------------------------------------------------------- encodings (ACPI 6.x chapter 20)


def test_locals_and_args():
    assert code.local(0) == b"\x60" and code.local(7) == b"\x67"
    assert code.arg(0) == b"\x68" and code.arg(6) == b"\x6e"
    for bad in (lambda: code.local(8), lambda: code.arg(7), lambda: code.local(-1)):
        with pytest.raises(ValueError):
            bad()


def test_operation_region_and_field():
    region = code.operation_region("GDRG", code.REGION_SYSTEM_IO, aml.integer(0x603), aml.integer(1))
    assert region == b"\x5b\x80GDRG\x01\x0b\x03\x06\x01"
    field = code.field("GDRG", code.ACCESS_BYTE | code.UPDATE_WRITE_AS_ZEROS, ("GSEL", 8), ("WIDE", 100))
    # ExtOp FieldOp PkgLength NameString FieldFlags (NameSeg bit-length)...; 100 bits needs two bytes
    assert field == b"\x5b\x81" + bytes([1 + 4 + 1 + 5 + 6]) + b"GDRG\x41GSEL\x08WIDE\x44\x06"
    with pytest.raises(ValueError):
        code.field("GDRG", 0)
    with pytest.raises(ValueError):
        code.field("GDRG", 0, ("NONE", 0))


def test_statements():
    assert code.store(aml.integer(1), code.local(0)) == b"\x70\x01\x60"
    assert code.and_(code.local(0), aml.integer(4)) == b"\x7b\x60\x0a\x04\x00"  # NullName target
    assert code.and_(code.local(0), aml.integer(4), code.local(1)) == b"\x7b\x60\x0a\x04\x61"
    assert code.notify("\\_SB.PWRB", aml.integer(0x80)) == b"\x86\\\x2e_SB_PWRB\x0a\x80"
    body = code.notify("PWRB", aml.integer(0x80))
    assert code.if_(code.local(0), body) == b"\xa0" + bytes([1 + 1 + len(body)]) + b"\x60" + body


def test_ged_config_checks():
    for kw in (dict(gsi=-1, selector_port=0x603), dict(gsi=5, selector_port=0x10000),
               dict(gsi=5, selector_port=0x603, power_button_bit=3), dict(gsi=5, selector_port=0x603, power_button_bit=0)):
        with pytest.raises(ValueError):
            GedConfig(**kw)


def test_the_dsdt_has_the_power_button_only_when_configured():
    without = acpi.dsdt_aml(make_config())
    with_ged = acpi.dsdt_aml(make_config(ged=GED))
    assert b"ACPI0013" not in without and b"PWRB" not in without
    assert ged_aml(GED) in with_ged and power_button_aml() in with_ged


# ---------------------------------------------------------------- iasl and acpiexec


@needs_iasl
@pytest.mark.parametrize("pm1", [None, acpi.Pm1Config()], ids=["hardware-reduced", "pc"])
def test_iasl_reads_the_ged_and_the_power_button(tmp_path, pm1):
    dsl = disassemble(write_tables(tmp_path, acpi.build(make_config(ged=GED, pm1=pm1)))[b"DSDT"])
    for needle in (
        "Device (GED)",
        'Name (_HID, "ACPI0013" /* Generic Event Device */)',
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {\n"
        "                    0x00000005,",
        "OperationRegion (GDRG, SystemIO, 0x0603, One)",
        "Field (GDRG, ByteAcc, NoLock, WriteAsZeros)\n            {\n                GSEL,   8",
        "Method (_EVT, 1, Serialized)",
        "Local0 = GSEL",
        "If ((Local0 & One))",
        "Notify (\\_SB.PWRB, 0x80)",
        "Device (PWRB)",
        'Name (_HID, EisaId ("PNP0C0C") /* Power Button Device */)',
    ):
        assert needle in dsl, needle


@needs_iasl
def test_iasl_recompiles_the_ged_to_the_same_aml(tmp_path):
    """iasl -on turns the disassembled DSDT back into our bytes (but End Tag checksums, left 0)."""
    path = write_tables(tmp_path, acpi.build(make_config(ged=GED)))[b"DSDT"]
    disassemble(path)
    result = subprocess.run([IASL, "-on", "-p", "recompiled", "DSDT.dsl"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0 and "0 Errors, 0 Warnings" in result.stdout, result.stdout
    ours, theirs = path.read_bytes(), (tmp_path / "recompiled.aml").read_bytes()
    assert len(ours) == len(theirs)
    diffs = [i for i in range(36, len(ours)) if ours[i] != theirs[i]]
    assert all(ours[i - 1] == 0x79 and theirs[i] == 0 for i in diffs)


# An SSDT that sets the selector as the device would, then runs _EVT as Linux's evged does.
PRESS_ASL = """DefinitionBlock ("", "SSDT", 2, "PYVMM ", "PRESS", 1) {
    External (\\_SB.GED.GSEL, FieldUnitObj)
    External (\\_SB.GED._EVT, MethodObj)
    Method (PRES, 1) {
        \\_SB.GED.GSEL = Arg0
        \\_SB.GED._EVT (5)
    }
}
"""


@needs_acpiexec
@pytest.mark.parametrize("selector, notified", [(0, False), (1, True), (0xFE, False), (0xFF, True)])
def test_acpica_runs_evt_and_notifies_the_power_button_for_its_bit(tmp_path, selector, notified):
    paths = write_tables(tmp_path, acpi.build(make_config(ged=GED)))
    (tmp_path / "press.asl").write_text(PRESS_ASL)
    compiled = subprocess.run([IASL, "press.asl"], capture_output=True, text=True, cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    tables = [str(paths[sig]) for sig in (b"FACP", b"DSDT", b"APIC", b"MCFG")] + [str(tmp_path / "press.aml")]
    result = subprocess.run([ACPIEXEC, "-b", f"evaluate \\_SB.PWRB._HID; execute \\PRES {selector}", *tables],
                            capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "AE_" not in out, out
    assert "[Integer] = 000000000C0CD041" in out  # EisaId("PNP0C0C")
    assert ("Received a Device Notify on [PWRB]" in out and "Value 0x80" in out) == notified, out


def test_the_tables_of_both_platforms_still_fit_below_the_reset_vector():
    """pyvmm's own tables with the GED, for as many vCPUs as any KVM allows, end before the reset
    vector's code (direct boot writes them from 0xE0000)."""
    from kernel import layout
    from vmm.boot import acpi_config
    from vmm.pci.layout import DEFAULT_LAYOUT

    for pc_platform in (False, True):
        config = acpi_config(4096, DEFAULT_LAYOUT.acpi_config(), pc_platform=pc_platform)
        assert config.ged is not None
        placed = acpi.build(config, rsdp_addr=layout.ACPI_START)
        assert max(gpa + len(data) for gpa, data in placed.items()) <= layout.ACPI_END
