"""kernel/bzimage.py: setup header parsing, on synthetic images and the real guest kernel."""

import os
import struct
from pathlib import Path

import pytest

from kernel.bzimage import (
    FIELD_OFFSETS,
    LOADED_HIGH,
    SETUP_HEADER_END,
    SETUP_HEADER_OFFSET,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    is_bzimage,
    parse_bzimage,
    read_bzimage,
)
from kernel.decompress import decompress, detect_format
from kernel.elf import parse_elf
from kernel.errors import KernelImageError
from tests.unit.test_elf import make_kernel_like_elf

DECOMPRESSOR_STUB = b"\xcc" * 0x300      # stands in for the in-guest decompressor code
TAIL = b"\xee" * 0x40                     # what follows the payload (relocs, CRC)


def make_bzimage(payload: bytes, *, setup_sects: int = 4, version: int = 0x020F,
                 header_end: int = SETUP_HEADER_END, **fields) -> bytes:
    """A synthetic bzImage: boot sector + setup sectors with a header, then
    protected-mode code holding `payload` after a stub.  `fields` override header fields."""
    values = {
        "setup_sects": setup_sects,
        "boot_flag": 0xAA55,
        "jump": 0xEB | ((header_end - 0x202) << 8),
        "header": 0x53726448,
        "version": version,
        "vid_mode": 0xFFFF,
        "loadflags": LOADED_HIGH,
        "code32_start": 0x100000,
        "initrd_addr_max": 0x7FFFFFFF,
        "kernel_alignment": 0x200000,
        "relocatable_kernel": 1,
        "min_alignment": 21,
        "xloadflags": XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
        "cmdline_size": 2047,
        "payload_offset": len(DECOMPRESSOR_STUB),
        "payload_length": len(payload),
        "pref_address": 0x1000000,
        "init_size": 4 << 20,
    }
    values.update(fields)
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    for name, value in values.items():
        offset, fmt = FIELD_OFFSETS[name]
        struct.pack_into("<" + fmt, setup, offset, value)
    protected = DECOMPRESSOR_STUB + payload + TAIL
    struct.pack_into("<I", setup, FIELD_OFFSETS["syssize"][0], (len(protected) + 15) // 16)
    return bytes(setup) + protected


def real_kernel_path() -> Path | None:
    """The guest kit's kernel, if it has been built."""
    kit = os.environ.get("PYVMM_KIT_DIR")
    candidates = [Path(kit) / "vmlinuz"] if kit else []
    candidates.append(Path.home() / ".cache/pyvmm/kit/vmlinuz")
    return next((p for p in candidates if p.is_file()), None)


needs_real_kernel = pytest.mark.skipif(
    real_kernel_path() is None,
    reason="no guest kit kernel ($PYVMM_KIT_DIR/vmlinuz or ~/.cache/pyvmm/kit/vmlinuz)")


@pytest.fixture
def payload():
    return make_kernel_like_elf() + struct.pack("<I", 1234)   # "uncompressed" + a trailer


def test_parse_good_image(payload):
    data = make_bzimage(payload)
    assert is_bzimage(data)
    image = parse_bzimage(data)
    hdr = image.header
    assert hdr.boot_flag == 0xAA55
    assert hdr.header == 0x53726448
    assert hdr.protocol == "2.15"
    assert hdr.version == 0x020F
    assert hdr.setup_sects == 4
    assert hdr.kernel_alignment == 0x200000
    assert hdr.relocatable_kernel == 1
    assert hdr.min_alignment == 21
    assert hdr.xloadflags & XLF_KERNEL_64
    assert hdr.cmdline_size == 2047
    assert hdr.pref_address == 0x1000000
    assert hdr.init_size == 4 << 20
    assert hdr.header_end == SETUP_HEADER_END
    assert image.kernel_offset == 5 * 512
    assert bytes(image.protected_mode_kernel) == DECOMPRESSOR_STUB + payload + TAIL
    assert bytes(image.payload) == payload
    assert image.setup_header_bytes == data[SETUP_HEADER_OFFSET:SETUP_HEADER_END]
    assert image.supports_64bit_entry


def test_setup_sects_zero_means_four(payload):
    image = parse_bzimage(make_bzimage(payload, setup_sects=0))
    assert image.header.setup_sects == 0
    assert image.kernel_offset == 5 * 512
    assert bytes(image.payload) == payload


def test_fields_past_a_short_header_read_as_zero(payload):
    # A 2.08 kernel's header ends after payload_length (0x250): later fields are setup code.
    data = bytearray(make_bzimage(payload, version=0x0208, header_end=0x250))
    data[0x250:0x26C] = b"\xab" * 0x1C
    hdr = parse_bzimage(bytes(data)).header
    assert hdr.payload_length == len(payload)
    assert hdr.pref_address == 0 and hdr.init_size == 0 and hdr.kernel_info_offset == 0
    assert len(parse_bzimage(bytes(data)).setup_header_bytes) == 0x250 - SETUP_HEADER_OFFSET


def test_too_short():
    with pytest.raises(KernelImageError, match="too short"):
        parse_bzimage(b"\0" * 0x200)


def test_bad_boot_flag(payload):
    data = bytearray(make_bzimage(payload))
    data[0x1FE:0x200] = b"\0\0"
    assert not is_bzimage(bytes(data))
    with pytest.raises(KernelImageError, match="boot_flag"):
        parse_bzimage(bytes(data))


def test_no_hdrs(payload):
    data = bytearray(make_bzimage(payload))
    data[0x202:0x206] = b"XXXX"
    with pytest.raises(KernelImageError, match='no "HdrS"'):
        parse_bzimage(bytes(data))


def test_old_protocol(payload):
    with pytest.raises(KernelImageError, match=r"boot protocol 2\.05 is older than 2\.06"):
        parse_bzimage(make_bzimage(payload, version=0x0205))


def test_zimage_rejected(payload):
    with pytest.raises(KernelImageError, match="zImage"):
        parse_bzimage(make_bzimage(payload, loadflags=0))


def test_truncated_setup(payload):
    data = make_bzimage(payload, setup_sects=30)
    with pytest.raises(KernelImageError, match="truncated"):
        parse_bzimage(data[: 20 * 512])


def test_payload_past_end_of_file(payload):
    data = make_bzimage(payload)
    with pytest.raises(KernelImageError, match="past the end"):
        parse_bzimage(data[: -len(TAIL) - 10])
    with pytest.raises(KernelImageError, match="past the end"):
        parse_bzimage(make_bzimage(payload, payload_offset=0x10000))


def test_no_64bit_entry(payload):
    data = make_bzimage(payload, xloadflags=0)
    assert not parse_bzimage(data).supports_64bit_entry
    with pytest.raises(KernelImageError, match="XLF_KERNEL_64"):
        parse_bzimage(data, require_64bit_entry=True)


def test_no_payload_fields_before_2_08(payload):
    image = parse_bzimage(make_bzimage(payload, version=0x0206, header_end=0x23C))
    with pytest.raises(KernelImageError, match="payload_length is 0"):
        image.payload


@needs_real_kernel
def test_real_kernel_header():
    image = read_bzimage(str(real_kernel_path()), require_64bit_entry=True)
    hdr = image.header
    assert hdr.version >= 0x020C
    assert hdr.xloadflags & XLF_KERNEL_64
    assert hdr.relocatable_kernel
    assert hdr.kernel_alignment & (hdr.kernel_alignment - 1) == 0
    assert hdr.cmdline_size >= 255
    assert hdr.init_size > hdr.payload_length
    assert detect_format(image.payload) in ("lz4", "gzip", "xz", "zstd", "lzma", "bzip2")


@needs_real_kernel
def test_real_kernel_decompresses_to_vmlinux():
    image = read_bzimage(str(real_kernel_path()))
    fmt, vmlinux = decompress(image.payload)
    size_trailer = struct.unpack("<I", bytes(image.payload[-4:]))[0]
    assert len(vmlinux) == size_trailer              # the appended size matches
    elf = parse_elf(vmlinux)
    assert elf.low >= 0x100000
    assert elf.low <= elf.entry < elf.high
    assert elf.high - elf.low <= image.header.init_size
    assert elf.pvh_entry is not None and elf.low <= elf.pvh_entry < elf.high
