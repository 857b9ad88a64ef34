"""Decompress a bzImage payload on the host, giving the vmlinux ELF.

The kernel build compresses vmlinux with one of gzip, bzip2, lzma, xz, lzo,
lz4 or zstd and appends the uncompressed size as 4 little-endian bytes
(scripts/Makefile.lib, size_append).  Each decoder here stops at the end of its
own stream and ignores what follows, so that trailer does no harm.  The format
is found from the magic numbers listed in boot.rst (payload_offset).
"""

from __future__ import annotations

import struct

from .errors import KernelImageError

ELF_MAGIC = b"\x7fELF"
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"          # properties byte 0x5d, then dictionary size (LE)
XZ_MAGIC = b"\xfd7zXZ\x00"
LZ4_LEGACY_MAGIC = 0x184C2102          # stored little-endian: 02 21 4c 18
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZO_MAGIC = b"\x89LZO\x00\r\n\x1a\n"

# lz4 "legacy" frames (lz4 -l): blocks of at most 8 MiB of output each.
LZ4_LEGACY_BLOCK_SIZE = 8 << 20


def detect_format(data: bytes) -> str | None:
    """Name of the compression format of `data` ('gzip', 'xz', ... or 'elf'), None if unknown."""
    head = bytes(data[:10])
    if head.startswith(ELF_MAGIC):
        return "elf"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == LZ4_LEGACY_MAGIC:
        return "lz4"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    if head.startswith(LZO_MAGIC):
        return "lzo"
    if head.startswith(LZMA_MAGIC):
        return "lzma"
    return None


# (each decoder's module is loaded when a payload needs it: a boot from the kernel cache needs none)
def _gzip(data: bytes) -> bytes:
    import zlib

    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)   # gzip wrapper, trailer checked
    out = d.decompress(data) + d.flush()
    if not d.eof:
        raise KernelImageError("gzip payload is truncated")
    return out


def _bzip2(data: bytes) -> bytes:
    import bz2

    d = bz2.BZ2Decompressor()
    out = d.decompress(data)
    if not d.eof:
        raise KernelImageError("bzip2 payload is truncated")
    return out


def _lzma(data: bytes, name: str) -> bytes:
    # FORMAT_XZ verifies the check (the kernel uses CRC32) and undoes BCJ filters
    # such as --x86; FORMAT_ALONE takes a size of -1 (end marker) or the real size.
    import lzma

    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE)
    out = d.decompress(data)
    if not d.eof:
        raise KernelImageError(f"{name} payload is truncated")
    return out


def _lz4_legacy(data: bytes) -> bytes:
    """lz4 legacy frame: magic, then blocks of (u32 compressed length, lz4 block).

    Another magic in place of a length starts a concatenated frame.  What is left
    when fewer than 4 bytes remain, or when a length runs past the data in the
    last 4 bytes (the size the kernel build appends), is trailing data.
    """
    import lz4.block

    view = memoryview(data)
    pos = 4
    chunks = []
    while len(view) - pos >= 4:
        (length,) = struct.unpack_from("<I", view, pos)
        if length == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if length == 0 or pos + 4 + length > len(view):
            if len(view) - pos == 4 or length == 0:
                break                       # the appended size, or an end mark
            raise KernelImageError(
                f"lz4 payload is truncated: block at {pos:#x} of {length} bytes "
                f"runs past the end ({len(view):#x})")
        block = view[pos + 4 : pos + 4 + length]
        chunks.append(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK_SIZE))
        pos += 4 + length
    if not chunks:
        raise KernelImageError("lz4 payload holds no data block")
    return b"".join(chunks)


def _zstd(data: bytes) -> bytes:
    # Streaming: the kernel's frame need not record its content size.
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(data)
    if not d.eof:
        raise KernelImageError("zstd payload is truncated")
    return out


def _decoder_errors() -> tuple[type[BaseException], ...]:
    """The exceptions the decoders raise on corrupt input."""
    import lzma
    import zlib

    errors: list[type[BaseException]] = [zlib.error, lzma.LZMAError, OSError, EOFError]
    try:
        import lz4.block

        errors.append(lz4.block.LZ4BlockError)
    except ImportError:
        pass
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def decompress(data: bytes) -> tuple[str, bytes]:
    """Decompress `data` by its magic; return (format name, output).  No ELF check."""
    data = bytes(data)
    fmt = detect_format(data)
    decoders = {
        "elf": bytes,
        "gzip": _gzip,
        "bzip2": _bzip2,
        "lzma": lambda d: _lzma(d, "lzma"),
        "xz": lambda d: _lzma(d, "xz"),
        "lz4": _lz4_legacy,
        "zstd": _zstd,
    }
    if fmt is None:
        raise KernelImageError(
            f"kernel payload has an unknown compression format (starts {bytes(data[:4]).hex()})")
    if fmt not in decoders:
        raise KernelImageError(f"kernel payload is {fmt}-compressed, which pyvmm cannot decompress")
    try:
        return fmt, decoders[fmt](data)
    except ImportError as e:
        raise KernelImageError(f"cannot decompress a {fmt} kernel payload: {e}") from e
    except _decoder_errors() as e:
        raise KernelImageError(f"{fmt} kernel payload is corrupt: {e}") from e


def decompress_payload(data: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage payload; KernelImageError if it is anything else."""
    fmt, out = decompress(data)
    if not out.startswith(ELF_MAGIC):
        raise KernelImageError(
            f"{fmt} kernel payload does not decompress to an ELF file "
            f"(starts {out[:4].hex() or 'empty'})")
    return out
