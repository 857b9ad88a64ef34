"""AML for method bodies and the registers they reach: OperationRegion, Field, Store, And, If,
Notify, the locals and the arguments.

Just what a Generic Event Device's _EVT needs (read an event register, notify a device for each
bit set).  Encodings from ACPI 6.x chapter 20 (AML grammar); kernel/aml.py has the data, names and
namespace objects these build on.
"""

from __future__ import annotations

from kernel.aml import EXT_OP_PREFIX, encode_pkg_length, name_path, name_seg, pkg_length

# 20.2.5.2 Named Objects Encoding (after EXT_OP_PREFIX)
OP_REGION_OP = 0x80
FIELD_OP = 0x81

# 20.2.5.3 Statement Opcodes Encoding
IF_OP = 0xA0
NOTIFY_OP = 0x86

# 20.2.5.4 Expression Opcodes Encoding
STORE_OP = 0x70
AND_OP = 0x7B

# 20.2.6.1 / 20.2.6.2 Local and Arg Objects Encoding
LOCAL0_OP = 0x60
ARG0_OP = 0x68
NULL_TARGET = b"\x00"  # Target := SuperName | NullName: the result is not stored

# 19.6.100 OperationRegion: RegionSpace
REGION_SYSTEM_MEMORY = 0x00
REGION_SYSTEM_IO = 0x01

# 19.6.48 Field: FieldFlags bits 0-3 AccessType, 4 LockRule, 5-6 UpdateRule
ACCESS_ANY, ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 0, 1, 2, 3
LOCK_RULE_LOCK = 1 << 4
UPDATE_PRESERVE, UPDATE_WRITE_AS_ONES, UPDATE_WRITE_AS_ZEROS = 0 << 5, 1 << 5, 2 << 5

# 5.6.6 Device Object Notifications
NOTIFY_DEVICE_CHECK = 0x01
NOTIFY_BUTTON_PRESSED = 0x80  # to a power or sleep button device: "the button was pressed"


def local(n: int) -> bytes:
    """LocalN (0-7)."""
    if not 0 <= n <= 7:
        raise ValueError(f"Local{n}: there are Local0-Local7")
    return bytes([LOCAL0_OP + n])


def arg(n: int) -> bytes:
    """ArgN (0-6)."""
    if not 0 <= n <= 6:
        raise ValueError(f"Arg{n}: there are Arg0-Arg6")
    return bytes([ARG0_OP + n])


def operation_region(path: str, space: int, offset: bytes, length: bytes) -> bytes:
    """DefOpRegion: OperationRegion(path, space, offset, length); offset and length are encoded
    integers (kernel.aml.integer)."""
    return bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_path(path) + bytes([space]) + offset + length


def field(region: str, flags: int, *units: tuple[str, int]) -> bytes:
    """DefField: Field(region, flags) { NAME, bits, ... }: named fields of `bits` bits each, laid
    out from bit 0 of the region.  A NamedField's length is a PkgLength holding the bit count
    itself (not counting its own bytes)."""
    if not units:
        raise ValueError("a Field needs at least one field unit")
    body = name_path(region) + bytes([flags])
    for unit_name, bits in units:
        if bits < 1:
            raise ValueError(f"field {unit_name}: {bits} bits")
        body += name_seg(unit_name) + encode_pkg_length(bits)
    return bytes([EXT_OP_PREFIX, FIELD_OP]) + pkg_length(len(body)) + body


def store(source: bytes, target: bytes) -> bytes:
    """DefStore: Store(source, target), i.e. target = source."""
    return bytes([STORE_OP]) + source + target


def and_(left: bytes, right: bytes, target: bytes = NULL_TARGET) -> bytes:
    """DefAnd: And(left, right, target): the bitwise and (its value, and stored in target)."""
    return bytes([AND_OP]) + left + right + target


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """DefIfElse without Else: If (predicate) { terms }; any nonzero integer is true."""
    body = predicate + b"".join(terms)
    return bytes([IF_OP]) + pkg_length(len(body)) + body


def notify(path: str, value: bytes) -> bytes:
    """DefNotify: Notify(path, value): the OS's handler of the object at `path` gets `value`."""
    return bytes([NOTIFY_OP]) + name_path(path) + value
