"""Tests for kernel.aml, the AML encoder."""

import shutil
import struct
import subprocess

import pytest

from kernel import acpi, aml


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at the start of ``data``."""
    follow = data[0] >> 6
    if follow == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


# ---------------------------------------------------------------- PkgLength


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x04"),
        (4095, b"\x4f\xff"),
        (4096, b"\x80\x00\x01"),
        ((1 << 20) - 1, b"\x8f\xff\xff"),
        (1 << 20, b"\xc0\x00\x00\x01"),
        ((1 << 28) - 1, b"\xcf\xff\xff\xff"),
    ],
)
def test_encode_pkg_length_boundaries(value, encoded):
    assert aml.encode_pkg_length(value) == encoded
    assert decode_pkg_length(encoded) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_encode_pkg_length_out_of_range(value):
    with pytest.raises(ValueError):
        aml.encode_pkg_length(value)


@pytest.mark.parametrize(
    "body, size",
    [(0, 1), (62, 1), (63, 2), (64, 2), (4093, 2), (4094, 3), (4095, 3),
     ((1 << 20) - 4, 3), ((1 << 20) - 3, 4), (1 << 20, 4)],
)
def test_pkg_length_counts_itself(body, size):
    encoded = aml.pkg_length(body)
    assert len(encoded) == size
    assert decode_pkg_length(encoded) == (body + size, size)


# ---------------------------------------------------------------- data


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e" + struct.pack("<Q", 1 << 32)),
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integer_widths(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value):
    with pytest.raises(ValueError):
        aml.integer(value)


def test_string():
    assert aml.string("PYVMM") == b"\x0dPYVMM\x00"
    with pytest.raises(ValueError):
        aml.string("a\x00b")


def test_eisa_id():
    assert aml.eisa_id_value("PNP0A03") == 0x030AD041
    assert aml.eisa_id_value("PNP0A08") == 0x080AD041
    assert aml.eisa_id_value("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    for bad in ("PNP0A0", "pnp0a03", "P1P0A03"):
        with pytest.raises(ValueError):
            aml.eisa_id_value(bad)


def test_buffer_and_package():
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(aml.integer(5)) == b"\x12\x04\x01\x0a\x05"
    big = aml.package(*[aml.integer(0)] * 300)
    assert big[0] == aml.VAR_PACKAGE_OP
    value, used = decode_pkg_length(big[1:])
    assert value == len(big) - 1
    assert big[1 + used:1 + used + 3] == b"\x0b\x2c\x01"  # NumElements 300 as a Word


# ---------------------------------------------------------------- names


def test_name_seg_pads_and_validates():
    assert aml.name_seg("_S5") == b"_S5_"
    assert aml.name_seg("PCI0") == b"PCI0"
    for bad in ("", "TOOLONG", "0ABC", "abcd", "A-B"):
        with pytest.raises(ValueError):
            aml.name_seg(bad)


@pytest.mark.parametrize(
    "path, encoded",
    [
        ("COM1", b"COM1"),
        ("\\", b"\\\x00"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
        ("_SB.PCI0.ISA", b"\x2f\x03_SB_PCI0ISA_"),
        ("\\_SB.PCI0.S08.S00", b"\\\x2f\x04_SB_PCI0S08_S00_"),
        ("^FOO", b"^FOO_"),
        ("^^PCI0.S08", b"^^\x2ePCI0S08_"),
    ],
)
def test_name_paths(path, encoded):
    assert aml.name_path(path) == encoded


def test_name_scope_device_method():
    assert aml.name("_UID", aml.integer(1)) == b"\x08_UID\x01"
    assert aml.scope("\\_SB", b"") == b"\x10\x06\\_SB_"
    dev = aml.device("COM1", aml.name("_UID", aml.integer(1)))
    assert dev == b"\x5b\x82\x0b" + b"COM1" + b"\x08_UID\x01"
    meth = aml.method("_STA", 0, aml.return_(aml.integer(0x0F)))
    assert meth == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("FOO", 2, serialized=True)[6] == 0x0A
    with pytest.raises(ValueError):
        aml.method("FOO", 8)


# ---------------------------------------------------------------- resources


def test_small_descriptors():
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.irq_no_flags(4) == bytes.fromhex("221000")
    assert aml.irq_no_flags(3, 4) == bytes.fromhex("221800")
    with pytest.raises(ValueError):
        aml.irq_no_flags(16)


def test_address_descriptors():
    bus = aml.word_bus_number(0, 0xFF)
    assert bus == bytes.fromhex("880d00" "020c00" "0000" "0000" "ff00" "0000" "0001")
    wio = aml.word_io(0x1000, 0xFFFF)
    assert wio[:6] == bytes.fromhex("880d00010c03") and wio[-2:] == b"\x00\xf0"
    dmem = aml.dword_memory(0xC000_0000, 0xFEBF_FFFF)
    assert dmem[:3] == b"\x87\x17\x00" and len(dmem) == 3 + 0x17
    assert struct.unpack_from("<5I", dmem, 6) == (0, 0xC000_0000, 0xFEBF_FFFF, 0, 0x3EC0_0000)
    qmem = aml.qword_memory(1 << 39, (1 << 40) - 1)
    assert qmem[:3] == b"\x8a\x2b\x00" and len(qmem) == 3 + 0x2B
    assert struct.unpack_from("<5Q", qmem, 6) == (0, 1 << 39, (1 << 40) - 1, 0, 1 << 39)
    with pytest.raises(ValueError):
        aml.word_io(0x2000, 0x1000)


def test_memory32_fixed_and_extended_interrupt():
    assert aml.memory32_fixed(0xB000_0000, 0x1000_0000) == bytes.fromhex(
        "860900" "01" "000000b0" "00000010")
    ext = aml.extended_interrupt(5, 33, flags=aml.EXT_IRQ_CONSUMER | aml.EXT_IRQ_EDGE)
    assert ext == bytes.fromhex("890a00" "03" "02" "05000000" "21000000")


def test_resource_template_end_tag_checksum():
    rt = aml.resource_template(aml.io(0x3F8, 0x3F8, 1, 8), aml.irq_no_flags(4))
    assert rt[:3] == b"\x11\x10\x0a"  # BufferOp, PkgLength 16, BufferSize 13
    assert rt[3] == 0x0D
    data = rt[4:]
    assert len(data) == 13 and data[-2] == 0x79
    assert sum(data) % 256 == 0


# ---------------------------------------------------------------- iasl


def _ssdt(body: bytes) -> bytes:
    table = acpi.Table.sdt("SSDT", acpi.sdt_header(
        acpi.AcpiConfig(num_cpus=1), b"SSDT", 36 + len(body), 2) + body)
    return acpi.link([table], {})["SSDT"]


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_iasl_disassembles_every_construct(tmp_path):
    body = aml.scope(
        "\\_SB",
        aml.device(
            "DEV0",
            aml.name("_HID", aml.eisa_id("PNP0C02")),
            aml.name("_STR", aml.string("pyvmm")),
            aml.name("BIGN", aml.integer(1 << 40)),
            aml.name("_CRS", aml.resource_template(
                aml.io(0x600, 0x600, 1, 4),
                aml.irq_no_flags(5),
                aml.word_bus_number(0, 0x7F),
                aml.word_io(0x1000, 0x1FFF),
                aml.dword_memory(0xC000_0000, 0xC00F_FFFF),
                aml.qword_memory(1 << 36, (1 << 37) - 1),
                aml.memory32_fixed(0xB000_0000, 0x0100_0000),
                aml.extended_interrupt(40),
            )),
            aml.method("_STA", 0, aml.return_(aml.integer(0x0F))),
        ),
    ) + aml.name("\\_SB.DEV0.PKG", aml.package(aml.integer(2), aml.string("x")))
    path = tmp_path / "SSDT.dat"
    path.write_bytes(_ssdt(body))
    result = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "SSDT.dsl").read_text()
    assert "Incorrect checksum" not in result.stdout + result.stderr + dsl
    for needle in (
        "Device (DEV0)",
        'EisaId ("PNP0C02")',
        '"pyvmm"',
        "0x0000010000000000",
        "IO (Decode16",
        "IRQNoFlags ()\n                    {5}",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode",
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite",
        "Memory32Fixed (ReadWrite",
        "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )",
        "Method (_STA, 0, NotSerialized)",
        "Return (0x0F)",
        "Name (\\_SB.DEV0.PKG, Package (0x02)",
    ):
        assert needle in dsl, needle
