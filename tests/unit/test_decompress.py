"""kernel/decompress.py: each payload format, made by the host's compressors at test time."""

import random
import shutil
import struct
import subprocess

import pytest

from kernel.decompress import decompress, decompress_payload, detect_format
from kernel.errors import KernelImageError
from tests.unit.test_elf import make_kernel_like_elf

# The command lines the kernel build uses (scripts/Makefile.lib), at lower levels.
COMPRESSORS = {
    "gzip": ["gzip", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2", "-c"],
    "lz4": ["lz4", "-l", "-9", "-c"],
    "zstd": ["zstd", "-19", "-q", "-c"],
}


def compress_with(fmt: str, data: bytes) -> bytes:
    cmd = COMPRESSORS[fmt]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True).stdout


def size_append(data: bytes, size: int) -> bytes:
    """What the kernel build appends to every compressed vmlinux."""
    return data + struct.pack("<I", size)


def sample_vmlinux(extra: int = 200_000) -> bytes:
    """An ELF followed by code-like bytes (E8/E9 rel32 calls for the x86 BCJ filter)."""
    rng = random.Random(1234)
    code = bytearray()
    while len(code) < extra:
        code += bytes([0xE8]) + rng.randrange(1 << 32).to_bytes(4, "little")
        code += bytes(rng.choice([b"\x48\x89\xe5", b"\x90", b"\xc3", b"\x0f\x1f\x00"]))
    return make_kernel_like_elf() + bytes(code) + bytes(50_000)


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
@pytest.mark.parametrize("trailer", [True, False], ids=["size-appended", "bare"])
def test_round_trip(fmt, trailer):
    vmlinux = sample_vmlinux()
    payload = compress_with(fmt, vmlinux)
    if trailer:
        payload = size_append(payload, len(vmlinux))
    assert detect_format(payload) == fmt
    assert decompress_payload(payload) == vmlinux


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_truncated_stream(fmt):
    payload = compress_with(fmt, sample_vmlinux())
    with pytest.raises(KernelImageError, match=fmt):
        decompress_payload(payload[: len(payload) // 2])


def test_lz4_several_blocks_and_concatenated_frames():
    # More than one 8 MiB block per frame, then a second legacy frame.
    first = sample_vmlinux() + bytes(range(256)) * (36 << 10)
    second = bytes(range(256)) * 1000
    assert len(first) > 8 << 20
    payload = compress_with("lz4", first) + compress_with("lz4", second)
    payload = size_append(payload, len(first) + len(second))
    assert decompress(payload) == ("lz4", first + second)


def test_lzma_header_with_real_size():
    vmlinux = sample_vmlinux()
    payload = bytearray(compress_with("lzma", vmlinux))
    assert payload[5:13] == b"\xff" * 8            # size unknown: end marker
    payload[5:13] = struct.pack("<Q", len(vmlinux))
    assert decompress_payload(size_append(bytes(payload), len(vmlinux))) == vmlinux


def test_zstd_frame_with_content_size():
    zstandard = pytest.importorskip("zstandard")
    vmlinux = sample_vmlinux()
    payload = zstandard.ZstdCompressor(write_content_size=True).compress(vmlinux)
    assert decompress_payload(size_append(payload, len(vmlinux))) == vmlinux


def test_uncompressed_elf_payload():
    vmlinux = sample_vmlinux(extra=10)
    assert decompress(vmlinux) == ("elf", vmlinux)


def test_unknown_format():
    with pytest.raises(KernelImageError, match="unknown compression format"):
        decompress_payload(b"\x00\x01\x02\x03" + bytes(100))


def test_lzo_is_named_but_unsupported():
    with pytest.raises(KernelImageError, match="lzo"):
        decompress_payload(b"\x89LZO\x00\r\n\x1a\n" + bytes(100))


def test_output_must_be_elf():
    payload = compress_with("gzip", b"not an elf file" * 100)
    with pytest.raises(KernelImageError, match="does not decompress to an ELF"):
        decompress_payload(payload)


def test_corrupt_gzip():
    payload = bytearray(compress_with("gzip", sample_vmlinux()))
    payload[len(payload) // 2] ^= 0xFF
    with pytest.raises(KernelImageError, match="gzip kernel payload is corrupt"):
        decompress_payload(bytes(payload))


def test_corrupt_lz4_block():
    payload = bytearray(compress_with("lz4", sample_vmlinux()))
    payload[8:16] = b"\xff" * 8                    # inside the first block
    with pytest.raises(KernelImageError, match="lz4"):
        decompress_payload(bytes(payload))


def test_lz4_block_past_end():
    payload = compress_with("lz4", sample_vmlinux())
    with pytest.raises(KernelImageError, match="truncated"):
        decompress_payload(payload[:-100])
