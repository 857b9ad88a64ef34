"""A small ACPI Machine Language (AML) encoder.

Only the pieces a virtual machine's DSDT needs: names, integers, strings,
buffers, packages, scopes, devices, simple methods, and the resource
descriptors of a ``ResourceTemplate``.  Every function returns ``bytes``; a
definition block is built by nesting calls, for example::

    scope("\\_SB", device("COM1", name("_HID", eisa_id("PNP0501")), ...))

Names follow the ACPI 6.x specification: chapter 20 (AML grammar) for opcodes
and encodings, section 6.4 (resource data types) for descriptors.
"""

from __future__ import annotations

import struct

# 20.2.3 Data Objects Encoding
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E

# 20.2.2 Name Objects Encoding
NULL_NAME = 0x00
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'

# 20.2.5 Term Objects Encoding
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX

# 20.2.4 Package Length Encoding: at most 28 bits in 4 bytes.
MAX_PKG_LENGTH = (1 << 28) - 1

_LEAD_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | set("0123456789")


# ---------------------------------------------------------------- lengths


def encode_pkg_length(value: int) -> bytes:
    """Encode ``value`` (the full PkgLength value) in as few bytes as it fits.

    One byte holds 0..63 in bits 0-5.  Otherwise bits 6-7 of the lead byte
    count the bytes that follow (1-3), its bits 0-3 hold the low nibble and
    each following byte the next 8 bits.
    """
    if not 0 <= value <= MAX_PKG_LENGTH:
        raise ValueError(f"package length {value} out of range")
    if value < 0x40:
        return bytes([value])
    follow = 1 if value < 1 << 12 else 2 if value < 1 << 20 else 3
    lead = (follow << 6) | (value & 0x0F)
    rest = (value >> 4).to_bytes(follow, "little")
    return bytes([lead]) + rest


def pkg_length(body_length: int) -> bytes:
    """PkgLength for ``body_length`` bytes that follow it.

    The encoded value counts the PkgLength bytes themselves, so the size of
    the encoding is chosen so that ``body_length + size`` still fits.
    """
    for size, limit in ((1, 1 << 6), (2, 1 << 12), (3, 1 << 20), (4, 1 << 28)):
        if body_length + size < limit:
            return encode_pkg_length(body_length + size)
    raise ValueError(f"body of {body_length} bytes too long for a PkgLength")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


# ---------------------------------------------------------------- names


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_'."""
    if not 1 <= len(seg) <= 4:
        raise ValueError(f"bad name segment {seg!r}")
    seg = seg.ljust(4, "_")
    if seg[0] not in _LEAD_CHARS or not set(seg[1:]) <= _NAME_CHARS:
        raise ValueError(f"bad name segment {seg!r}")
    return seg.encode("ascii")


def name_path(path: str) -> bytes:
    """A NameString: optional root ('\\') or parent ('^'...) prefix, then
    dot-separated segments encoded as NameSeg, DualNamePath or
    MultiNamePath.  ``"\\"`` alone is the root (RootChar NullName)."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX_CHAR]), path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError("too many name segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ---------------------------------------------------------------- data


def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value``: ZeroOp, OneOp or a
    Byte/Word/DWord/QWord constant.  (OnesOp is avoided: its value depends
    on the table revision.)"""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 1 << 8),
        (WORD_PREFIX, "<H", 1 << 16),
        (DWORD_PREFIX, "<I", 1 << 32),
    ):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters (1-0x7F), NullChar."""
    data = text.encode("ascii")
    if 0 in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def eisa_id_value(eisa_id: str) -> int:
    """The 32-bit compressed EISA id, e.g. "PNP0A03" -> 0x030AD041.

    Three uppercase letters (5 bits each, 'A' = 1) and four hex digits,
    packed big-endian and stored as a little-endian DWord."""
    if len(eisa_id) != 7 or not eisa_id[:3].isalpha() or not eisa_id[:3].isupper():
        raise ValueError(f"bad EISA id {eisa_id!r}")
    c1, c2, c3 = (ord(c) - 0x40 for c in eisa_id[:3])
    digits = int(eisa_id[3:], 16)
    packed = bytes([(c1 << 2) | (c2 >> 3), ((c2 & 7) << 5) | c3]) + digits.to_bytes(2, "big")
    return int.from_bytes(packed, "little")


def eisa_id(eisa_id_str: str) -> bytes:
    """EisaId("PNP0A03") as AML: a DWord constant."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", eisa_id_value(eisa_id_str))


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList."""
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + bytes(data))


def package(*elements: bytes) -> bytes:
    """DefPackage with already-encoded elements (integers, strings, ...)."""
    if len(elements) > 255:
        body = integer(len(elements)) + b"".join(elements)
        return _with_pkg_length(bytes([VAR_PACKAGE_OP]), body)
    return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


# ---------------------------------------------------------------- namespace


def name(path: str, value: bytes) -> bytes:
    """DefName: Name(path, value)."""
    return bytes([NAME_OP]) + name_path(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: Scope(path) { terms }."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_path(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: Device(path) { terms }."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_path(path) + b"".join(terms))


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False) -> bytes:
    """DefMethod: Method(path, arg_count, NotSerialized|Serialized) { terms }."""
    if not 0 <= arg_count <= 7:
        raise ValueError("a method takes 0-7 arguments")
    flags = arg_count | (0x08 if serialized else 0)
    return _with_pkg_length(bytes([METHOD_OP]), name_path(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    """DefReturn: Return(value)."""
    return bytes([RETURN_OP]) + value


# ---------------------------------------------------------------- resources
# 6.4 Resource Data Types for ACPI.  Small items: one tag byte
# (item name << 3 | length); large items: 0x80 | item name, then a 16-bit
# length of the data that follows.

SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x06
LARGE_DWORD_ADDRESS = 0x07
LARGE_WORD_ADDRESS = 0x08
LARGE_EXTENDED_IRQ = 0x09
LARGE_QWORD_ADDRESS = 0x0A

# Address space descriptors: Resource Type
RESOURCE_TYPE_MEMORY = 0
RESOURCE_TYPE_IO = 1
RESOURCE_TYPE_BUS_NUMBER = 2

# General Flags
CONSUMER = 1 << 0  # ResourceConsumer; 0 is ResourceProducer
SUB_DECODE = 1 << 1  # _DEC: subtractive decode; 0 is PosDecode
MIN_FIXED = 1 << 2  # _MIF
MAX_FIXED = 1 << 3  # _MAF

# Type Specific Flags, memory ranges
MEM_READ_WRITE = 1 << 0  # _RW
MEM_NON_CACHEABLE = 0 << 1  # _MEM
MEM_CACHEABLE = 1 << 1
MEM_WRITE_COMBINING = 2 << 1
MEM_PREFETCHABLE = 3 << 1

# Type Specific Flags, I/O ranges
IO_ENTIRE_RANGE = 3  # _RNG

# Extended Interrupt flags
EXT_IRQ_CONSUMER = 1 << 0
EXT_IRQ_EDGE = 1 << 1  # _HE; 0 is level
EXT_IRQ_ACTIVE_LOW = 1 << 2  # _LL
EXT_IRQ_SHARED = 1 << 3  # _SHR

_PRODUCER_WINDOW = MIN_FIXED | MAX_FIXED  # ResourceProducer, PosDecode


def _small(item: int, data: bytes) -> bytes:
    return bytes([(item << 3) | len(data)]) + data


def _large(item: int, data: bytes) -> bytes:
    return bytes([0x80 | item]) + struct.pack("<H", len(data)) + data


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO (Decode16, min, max, alignment, length): I/O Port Descriptor."""
    data = struct.pack("<BHHBB", int(decode16), minimum, maximum, alignment, length)
    return _small(SMALL_IO, data)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: edge-triggered, active-high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ descriptor holds ISA IRQs 0-15, not {irq}")
        mask |= 1 << irq
    return _small(SMALL_IRQ, struct.pack("<H", mask))


def _address(fmt: str, item: int, rtype: int, general: int, specific: int,
             minimum: int, maximum: int) -> bytes:
    """An Address Space Descriptor for the fixed range [minimum, maximum]:
    granularity 0, translation offset 0, length max - min + 1."""
    if maximum < minimum:
        raise ValueError(f"empty range {minimum:#x}-{maximum:#x}")
    data = struct.pack("<BBB", rtype, general, specific)
    data += struct.pack("<" + fmt * 5, 0, minimum, maximum, 0, maximum - minimum + 1)
    return _large(item, data)


def word_bus_number(minimum: int, maximum: int, general: int = _PRODUCER_WINDOW) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, ...)."""
    return _address("H", LARGE_WORD_ADDRESS, RESOURCE_TYPE_BUS_NUMBER, general, 0, minimum, maximum)


def word_io(minimum: int, maximum: int, general: int = _PRODUCER_WINDOW,
            specific: int = IO_ENTIRE_RANGE) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address("H", LARGE_WORD_ADDRESS, RESOURCE_TYPE_IO, general, specific, minimum, maximum)


def dword_memory(minimum: int, maximum: int, general: int = _PRODUCER_WINDOW,
                 specific: int = MEM_NON_CACHEABLE | MEM_READ_WRITE) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)."""
    return _address("I", LARGE_DWORD_ADDRESS, RESOURCE_TYPE_MEMORY, general, specific,
                    minimum, maximum)


def qword_memory(minimum: int, maximum: int, general: int = _PRODUCER_WINDOW,
                 specific: int = MEM_CACHEABLE | MEM_READ_WRITE) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)."""
    return _address("Q", LARGE_QWORD_ADDRESS, RESOURCE_TYPE_MEMORY, general, specific,
                    minimum, maximum)


def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite, base, length)."""
    return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", int(read_write), base, length))


def extended_interrupt(*gsis: int, flags: int = EXT_IRQ_CONSUMER) -> bytes:
    """Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {gsis}
    with the default flags; pass EXT_IRQ_* bits to change them."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an Extended Interrupt descriptor holds 1-255 interrupts")
    data = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return _large(LARGE_EXTENDED_IRQ, data)


def end_tag(descriptors: bytes) -> bytes:
    """End Tag, with a checksum making ``descriptors + end_tag`` sum to 0."""
    head = _small(SMALL_END_TAG, b"\x00")[:1]
    return head + bytes([(-sum(descriptors + head)) & 0xFF])


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a Buffer ending in an End Tag."""
    data = b"".join(descriptors)
    return buffer(data + end_tag(data))
