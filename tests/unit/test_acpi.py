"""Tests for kernel.acpi: table contents, checksums, layout, and iasl's view."""

import shutil
import struct
import subprocess

import pytest

from kernel import acpi

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) not installed")

ECAM_BASE = 0xB000_0000
MMIO64 = (0x80_0000_0000, 0xFF_FFFF_FFFF)


def make_config(num_cpus: int = 2, **kw) -> acpi.AcpiConfig:
    pci = acpi.PciHostConfig(ecam_base=ECAM_BASE, mmio64_window=MMIO64)
    return acpi.AcpiConfig(num_cpus=num_cpus, pci=pci, **kw)


def by_signature(placed: dict[int, bytes]) -> dict[bytes, tuple[int, bytes]]:
    out = {}
    for gpa, data in placed.items():
        sig = b"RSDP" if data.startswith(acpi.RSDP_SIGNATURE) else data[:4]
        out[sig] = (gpa, data)
    return out


def header(data: bytes) -> dict:
    sig, length, rev, csum, oem, table_id, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", data)
    return dict(signature=sig, length=length, revision=rev, oem_id=oem, oem_table_id=table_id,
                creator_id=creator)


def madt_entries(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 44
    while offset < len(data):
        etype, elen = data[offset], data[offset + 1]
        assert elen >= 2
        out.append((etype, data[offset:offset + elen]))
        offset += elen
    assert offset == len(data)
    return out


@pytest.fixture
def placed():
    return acpi.build(make_config())


# ---------------------------------------------------------------- checksums, headers


def test_every_table_checksum_length_and_oem(placed):
    tables = by_signature(placed)
    assert set(tables) == {b"RSDP", b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG"}
    for sig, (gpa, data) in tables.items():
        if sig == b"RSDP":
            continue
        h = header(data)
        assert h["signature"] == sig
        assert h["length"] == len(data)
        assert sum(data) % 256 == 0, sig
        assert h["oem_id"] == b"PYVMM "
        assert h["oem_table_id"] == b"PYVMMACP"
        assert h["creator_id"] == b"PYVM"


def test_rsdp(placed):
    gpa, rsdp = by_signature(placed)[b"RSDP"]
    assert gpa == 0xE0000 and len(rsdp) == 36
    sig, _, oem, rev, rsdt, length, xsdt_addr, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (sig, oem, rev, rsdt, length) == (b"RSD PTR ", b"PYVMM ", 2, 0, 36)
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    assert xsdt_addr == by_signature(placed)[b"XSDT"][0]


def test_xsdt_points_at_placed_tables(placed):
    tables = by_signature(placed)
    _, xsdt = tables[b"XSDT"]
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert [placed[addr][:4] for addr in entries] == [b"FACP", b"APIC", b"MCFG"]


def test_tables_fit_in_bios_area_aligned_and_disjoint(placed):
    spans = sorted((gpa, gpa + len(data)) for gpa, data in placed.items())
    assert spans[0][0] == 0xE0000 and spans[-1][1] <= 0x100000
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert all(gpa % 8 == 0 for gpa in placed)


# ---------------------------------------------------------------- FADT


def test_fadt(placed):
    tables = by_signature(placed)
    _, fadt = tables[b"FACP"]
    dsdt_addr = tables[b"DSDT"][0]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == acpi.FADT_MINOR_VERSION
    assert struct.unpack_from("<I", fadt, 36)[0] == 0  # no FACS
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_addr
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_addr
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags == acpi.HW_REDUCED_ACPI | acpi.RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] == acpi.IAPC_VGA_NOT_PRESENT
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # SCI_INT
    assert fadt[56:96] == bytes(40)  # no PM1/PM2/PM_TMR/GPE blocks
    # RESET_REG, SLEEP_CONTROL_REG, SLEEP_STATUS_REG: system I/O, 8 bits, byte access
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x602)
    assert fadt[128] == 0x01
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, 0x600)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, 0x601)
    assert fadt[268:276] == b"PYVMM   "
    assert fadt[148:244] == bytes(96)  # X_PM*/X_GPE* blocks empty


def test_sleep_control_value():
    assert acpi.SLEEP_CONTROL_S5 == 0x34  # SLP_TYP 5 in bits 2-4, SLP_EN bit 5


# ---------------------------------------------------------------- MADT


@pytest.mark.parametrize("num_cpus", [1, 2, 4, 64, 254, 255, 256, 300])
def test_madt_cpus(num_cpus):
    data = by_signature(acpi.build(make_config(num_cpus)))[b"APIC"][1]
    assert struct.unpack_from("<II", data, 36) == (0xFEE0_0000, acpi.PCAT_COMPAT)
    entries = madt_entries(data)
    ids = []
    for etype, body in entries:
        if etype == acpi.MADT_LOCAL_APIC:
            uid, apic_id, flags = struct.unpack("<2xBBI", body)
            assert apic_id < 255
            assert uid == apic_id and flags == acpi.LAPIC_ENABLED
            ids.append(apic_id)
        elif etype == acpi.MADT_LOCAL_X2APIC:
            x2apic_id, flags, uid = struct.unpack("<4xIII", body)
            assert x2apic_id >= 255
            assert uid == x2apic_id and flags == acpi.LAPIC_ENABLED
            ids.append(x2apic_id)
    assert ids == list(range(num_cpus))

    ioapics = [b for t, b in entries if t == acpi.MADT_IO_APIC]
    assert [struct.unpack("<2xBxII", b) for b in ioapics] == [(0, 0xFEC0_0000, 0)]
    overrides = [b for t, b in entries if t == acpi.MADT_INTERRUPT_SOURCE_OVERRIDE]
    assert [struct.unpack("<2xBBIH", b) for b in overrides] == [(0, 0, 2, 0b0101)]
    nmis = [b for t, b in entries if t == acpi.MADT_LOCAL_APIC_NMI]
    assert [struct.unpack("<2xBHB", b) for b in nmis] == [(0xFF, 0, 1)]
    x2nmis = [b for t, b in entries if t == acpi.MADT_LOCAL_X2APIC_NMI]
    assert len(x2nmis) == (1 if num_cpus > 255 else 0)


def test_madt_custom_ioapic_and_overrides():
    sci = acpi.InterruptOverride(9, 9, acpi.POLARITY_ACTIVE_HIGH | acpi.TRIGGER_LEVEL)
    config = make_config(1, ioapic_id=1, ioapic_gsi_base=0,
                         interrupt_overrides=[acpi.InterruptOverride(0, 2), sci])
    entries = madt_entries(acpi.madt(config).data)
    assert [struct.unpack("<2xBxII", b) for t, b in entries if t == acpi.MADT_IO_APIC] == [
        (1, 0xFEC0_0000, 0)]
    overrides = [struct.unpack("<2xBBIH", b) for t, b in entries
                 if t == acpi.MADT_INTERRUPT_SOURCE_OVERRIDE]
    assert overrides == [(0, 0, 2, 0b0101), (0, 9, 9, 0b1101)]


# ---------------------------------------------------------------- MCFG, DSDT bytes


def test_mcfg(placed):
    data = by_signature(placed)[b"MCFG"][1]
    assert len(data) == 60
    assert struct.unpack_from("<QHBB", data, 44) == (ECAM_BASE, 0, 0, 0xFF)


def test_no_mcfg_without_ecam():
    placed = acpi.build(acpi.AcpiConfig(num_cpus=1))
    assert b"MCFG" not in by_signature(placed)
    assert b"MBRD" not in by_signature(placed)[b"DSDT"][1]


def test_no_pci():
    placed = acpi.build(acpi.AcpiConfig(num_cpus=1, pci=None))
    dsdt = by_signature(placed)[b"DSDT"][1]
    assert b"PCI0" not in dsdt and b"COM1" in dsdt and b"_S5_" in dsdt


def test_cmos_rtc_device_is_optional():
    assert b"RTC_" not in acpi.dsdt_aml(make_config())
    rtc = acpi.dsdt_aml(make_config(cmos_rtc=True))
    assert b"RTC_" in rtc and b"\x47\x01\x70\x00\x70\x00\x01\x02" in rtc  # IO 0x70, 2 ports
    assert b"\x22\x00\x01" in rtc  # IRQNoFlags {8}


def test_prt_rule_is_a_parameter():
    pci = acpi.PciHostConfig(gsi_for_slot_pin=lambda slot, pin: 20, slots=2)
    aml_bytes = acpi.prt_aml(pci)
    assert aml_bytes[0] == 0x12 and aml_bytes.count(b"\x0a\x14") == 8  # 8 entries, GSI 20
    assert acpi.swizzled_gsi(0, 0) == 16 and acpi.swizzled_gsi(5, 3) == 16
    assert acpi.swizzled_gsi(31, 3) == 18


# ---------------------------------------------------------------- layout API


def test_spill_to_high_addr():
    config = make_config(64)
    with pytest.raises(ValueError):
        acpi.build(config, limit=0xE0400)
    placed = acpi.build(config, limit=0xE0400, high_addr=0x1_0000_0000 + 0x1000)
    tables = by_signature(placed)
    assert tables[b"RSDP"][0] == 0xE0000
    assert all(gpa >= 0x1_0000_1000 for sig, (gpa, _) in tables.items() if sig != b"RSDP")
    fadt = tables[b"FACP"][1]
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # DSDT above 4 GiB: legacy field 0
    assert struct.unpack_from("<Q", fadt, 140)[0] == tables[b"DSDT"][0]
    assert all(sum(d) % 256 == 0 for s, (_, d) in tables.items() if s != b"RSDP")


def test_explicit_tables_addr_and_overlap():
    placed = acpi.build(make_config(), rsdp_addr=0xF0000, tables_addr=0xE0000)
    assert by_signature(placed)[b"RSDP"][0] == 0xF0000
    assert min(placed) == 0xE0000
    with pytest.raises(ValueError):
        acpi.build(make_config(), rsdp_addr=0xE0010, tables_addr=0xE0000)
    with pytest.raises(ValueError):
        acpi.build(make_config(), rsdp_addr=0xE0008)


def test_link_with_offsets_for_firmware_loader():
    tables = acpi.build_tables(make_config())
    assert tables[0].name == "RSDP" and tables[1].name == "XSDT"
    offsets, _ = acpi.place(tables[1:], 0)
    offsets["RSDP"] = 0
    linked = acpi.link(tables, offsets)
    fadt = next(t for t in tables if t.name == "FACP")
    assert {(p.offset, p.size, p.target) for p in fadt.pointers} == {
        (40, 4, "DSDT"), (140, 8, "DSDT")}
    assert struct.unpack_from("<Q", linked["FACP"], 140)[0] == offsets["DSDT"]
    assert struct.unpack_from("<Q", linked["RSDP"], 24)[0] == offsets["XSDT"]
    for table in tables:
        for cs in table.checksums:
            assert sum(linked[table.name][cs.start:cs.start + cs.length]) % 256 == 0


def test_extra_tables_listed_in_xsdt():
    config = make_config()
    body = b"\x10\x06\\_SB_"  # Scope (\_SB) {}
    ssdt = acpi.Table.sdt("SSDT", acpi.sdt_header(config, b"SSDT", 36 + len(body), 2) + body)
    placed = acpi.build(config, extra_tables=[ssdt])
    tables = by_signature(placed)
    xsdt = tables[b"XSDT"][1]
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert tables[b"SSDT"][0] in entries and sum(tables[b"SSDT"][1]) % 256 == 0
    with pytest.raises(ValueError):
        acpi.build(config, extra_tables=[ssdt, ssdt])


def test_footprint_and_max_cpus_in_bios_area():
    assert acpi.footprint(make_config(1)) == 2452
    assert acpi.footprint(make_config(255)) - acpi.footprint(make_config(1)) == 254 * 8
    acpi.build(make_config(8165))
    with pytest.raises(ValueError):
        acpi.build(make_config(8166))


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_cpus=0),
        dict(oem_id=b"TOOLONG"),
        dict(pci=acpi.PciHostConfig(ecam_base=0xC000_0000)),  # inside the mmio32 window
        dict(pci=acpi.PciHostConfig(ecam_base=0xB000_1000)),  # not 1 MiB aligned
        dict(pci=acpi.PciHostConfig(bus_start=2, bus_end=1)),
        dict(pci=acpi.PciHostConfig(io_window=(0x1000, 0x10000))),
    ],
)
def test_invalid_configs(kw):
    kw.setdefault("num_cpus", 1)
    with pytest.raises(ValueError):
        acpi.build(acpi.AcpiConfig(**kw))


# ---------------------------------------------------------------- iasl / acpiexec


def write_tables(tmp_path, placed) -> dict[bytes, object]:
    paths = {}
    for sig, (_, data) in by_signature(placed).items():
        paths[sig] = tmp_path / f"{sig.decode()}.dat"
        paths[sig].write_bytes(data)
    return paths


def disassemble(path) -> str:
    result = subprocess.run([IASL, "-d", str(path)], capture_output=True, text=True,
                            cwd=path.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    dsl = path.with_suffix(".dsl").read_text()
    for bad in ("Incorrect checksum", "Error", "Warning", "Invalid"):
        assert bad not in output and bad not in dsl, (bad, output)
    return dsl


@needs_iasl
def test_iasl_dsdt(tmp_path, placed):
    dsl = disassemble(write_tables(tmp_path, placed)[b"DSDT"])
    for needle in (
        'DefinitionBlock ("", "DSDT", 2, "PYVMM ", "PYVMMACP", 0x00000001)',
        "Scope (\\_SB)",
        "Device (PCI0)",
        'Name (_HID, EisaId ("PNP0A08")',
        'Name (_CID, EisaId ("PNP0A03")',
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode",
        "0x0CF8,             // Range Minimum",
        "0xF000,             // Length",  # WordIO 0x1000-0xFFFF
        "0xFEBFFFFF,         // Range Maximum",
        "0x000000FFFFFFFFFF, // Range Maximum",
        "Name (_PRT, Package (0x80)",
        "0x001FFFFF, \n                    0x03, \n"
        "                    Zero, \n                    0x12",  # slot 31 INTD -> GSI 18
        "Device (MBRD)",
        'EisaId ("PNP0C02")',
        "Memory32Fixed (ReadWrite,\n                    0xB0000000,         // Address Base\n"
        "                    0x10000000,         // Address Length",
        "Device (COM1)",
        'Name (_HID, EisaId ("PNP0501")',
        "Name (_UID, One)",
        "0x03F8,             // Range Minimum",
        "IRQNoFlags ()\n                    {4}",
        "Name (\\_S5, Package (0x04)",
    ):
        assert needle in dsl, needle


@needs_iasl
def test_iasl_dsdt_rtc_and_second_serial(tmp_path):
    config = make_config(cmos_rtc=True, serial_ports=[(0x3F8, 4), (0x2F8, 3)])
    dsl = disassemble(write_tables(tmp_path, acpi.build(config))[b"DSDT"])
    for needle in ('Device (RTC)', 'EisaId ("PNP0B00")', "IRQNoFlags ()\n                    {8}",
                   "Device (COM2)", "Name (_UID, 0x02)", "0x02F8,             // Range Minimum",
                   "IRQNoFlags ()\n                    {3}"):
        assert needle in dsl, needle


@needs_iasl
def test_iasl_recompiles_dsdt_to_the_same_aml(tmp_path, placed):
    """iasl -on (no name optimisation) turns our disassembled DSDT back into
    the same bytes, except End Tag checksums, which iasl leaves 0."""
    path = write_tables(tmp_path, placed)[b"DSDT"]
    disassemble(path)
    result = subprocess.run([IASL, "-on", "-p", "recompiled", "DSDT.dsl"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "0 Errors, 0 Warnings" in result.stdout, result.stdout
    ours, theirs = path.read_bytes(), (tmp_path / "recompiled.aml").read_bytes()
    assert len(ours) == len(theirs)
    diffs = [i for i in range(36, len(ours)) if ours[i] != theirs[i]]
    assert all(ours[i - 1] == 0x79 and theirs[i] == 0 for i in diffs)


@needs_iasl
@pytest.mark.parametrize("num_cpus", [2, 300])
def test_iasl_data_tables(tmp_path, num_cpus):
    paths = write_tables(tmp_path, acpi.build(make_config(num_cpus)))
    dsl = {sig: disassemble(paths[sig]) for sig in (b"XSDT", b"FACP", b"APIC", b"MCFG")}
    assert "Hardware Reduced (V5) : 1" in dsl[b"FACP"]
    assert "Reset Register Supported (V2) : 1" in dsl[b"FACP"]
    assert "VGA Not Present (V4) : 1" in dsl[b"FACP"]
    assert "Address : 0000000000000600" in dsl[b"FACP"]
    assert dsl[b"APIC"].count("[Processor Local APIC]") == min(num_cpus, 255)
    assert dsl[b"APIC"].count("[Processor Local x2APIC]") == max(num_cpus - 255, 0)
    assert "[I/O APIC]" in dsl[b"APIC"] and "[Interrupt Source Override]" in dsl[b"APIC"]
    assert "Base Address : 00000000B0000000" in dsl[b"MCFG"]
    assert dsl[b"XSDT"].count("ACPI Table Address") == 3


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (acpica-tools) not installed")
def test_acpiexec_loads_namespace(tmp_path, placed):
    """ACPICA's interpreter (as in Linux) loads the DSDT and evaluates objects."""
    paths = write_tables(tmp_path, placed)
    commands = "evaluate \\_S5_; evaluate \\_SB.COM1._HID; evaluate \\_SB.PCI0._BBN"
    result = subprocess.run(
        [ACPIEXEC, "-b", commands, str(paths[b"FACP"]), str(paths[b"DSDT"]),
         str(paths[b"APIC"]), str(paths[b"MCFG"])],
        capture_output=True, text=True, timeout=60,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Incorrect checksum" not in out and "AE_" not in out, out
    assert "[Package] Contains 4 Elements:" in out
    assert "[Integer] = 0000000000000005" in out
    assert "[Integer] = 000000000105D041" in out  # EisaId("PNP0501")


# ---------------------------------------------------------------- the full (PC) FADT of firmware boots


def test_pc_platform_fadt_has_pm1_blocks_sci_and_a_facs():
    placed = acpi.build(make_config(pm1=acpi.Pm1Config()))
    tables = by_signature(placed)
    _, fadt = tables[b"FACP"]
    facs_addr, facs = tables[b"FACS"]
    assert facs_addr % 64 == 0 and len(facs) == 64 and struct.unpack_from("<I", facs, 4)[0] == 64
    assert facs[32] == acpi.FACS_VERSION  # Version
    assert struct.unpack_from("<I", fadt, 36)[0] == facs_addr  # FIRMWARE_CTRL
    assert struct.unpack_from("<Q", fadt, 132)[0] == 0  # X_FIRMWARE_CTRL: one of the two only
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & acpi.HW_REDUCED_ACPI and flags & acpi.RESET_REG_SUP
    assert flags & acpi.PWR_BUTTON and flags & acpi.SLP_BUTTON  # no fixed-feature buttons
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<II", fadt, 56)[0] == 0x604 and struct.unpack_from("<I", fadt, 64)[0] == 0x608
    assert fadt[88:90] == bytes([4, 2])  # PM1_EVT_LEN, PM1_CNT_LEN
    assert struct.unpack_from("<I", fadt, 76)[0] == 0 and fadt[91] == 0  # no PM timer
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 1, 0x604)  # X_PM1a_EVT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 1, 0x608)  # X_PM1a_CNT_BLK
    # the FACS hangs off the FADT, not the XSDT; the SCI has its override: IRQ 9, level, active high
    _, xsdt = tables[b"XSDT"]
    assert facs_addr not in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    isos = [struct.unpack_from("<BBIH", e, 2) for t, e in madt_entries(tables[b"APIC"][1]) if t == 2]
    assert (0, 9, 9, acpi.POLARITY_ACTIVE_HIGH | acpi.TRIGGER_LEVEL) in isos
    for data in placed.values():  # every table but the FACS (which has none) checks out
        if data[:4] not in (b"FACS",) and not data.startswith(acpi.RSDP_SIGNATURE):
            assert sum(data) % 256 == 0


@needs_iasl
def test_iasl_reads_the_pc_platform_fadt(tmp_path):
    paths = write_tables(tmp_path, acpi.build(make_config(pm1=acpi.Pm1Config())))
    dsl = disassemble(paths[b"FACP"])
    assert "Hardware Reduced (V5) : 0" in dsl
    assert "SCI Interrupt : 0009" in dsl
    assert "PM1A Event Block Address : 00000604" in dsl and "PM1A Control Block Address : 00000608" in dsl
    facs = disassemble(paths[b"FACS"])
    assert "Signature : \"FACS\"" in facs and "Version : 02" in facs
