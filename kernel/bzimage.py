"""The real-mode setup header of an x86 bzImage (Documentation/arch/x86/boot.rst).

A bzImage is: a boot sector and `setup_sects` sectors of real-mode setup code,
then the protected-mode kernel.  The setup header sits at offset 0x1f1 of the
file; from protocol 2.08 it says where the compressed vmlinux ("payload") lies
inside the protected-mode part.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import KernelImageError

SECTOR_SIZE = 512
SETUP_HEADER_OFFSET = 0x1F1       # setup_sects, first field of the header
SETUP_HEADER_JUMP = 0x200         # jump: 0xEB, then the header length - 0x202 + 0x200
DEFAULT_SETUP_SECTS = 4           # setup_sects == 0 means 4

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448           # "HdrS"
MIN_BOOT_PROTOCOL = 0x0206        # oldest protocol pyvmm loads (cmdline_size exists)

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags (2.12+)
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4

# The 64-bit entry point is this far into the loaded protected-mode kernel.
STARTUP_64_OFFSET = 0x200

# (name, offset in the file / in boot_params, struct format), in header order.
SETUP_HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("setup_sects", 0x1F1, "B"),
    ("root_flags", 0x1F2, "H"),
    ("syssize", 0x1F4, "I"),
    ("ram_size", 0x1F8, "H"),
    ("vid_mode", 0x1FA, "H"),
    ("root_dev", 0x1FC, "H"),
    ("boot_flag", 0x1FE, "H"),
    ("jump", 0x200, "H"),
    ("header", 0x202, "I"),
    ("version", 0x206, "H"),
    ("realmode_swtch", 0x208, "I"),
    ("start_sys_seg", 0x20C, "H"),
    ("kernel_version", 0x20E, "H"),
    ("type_of_loader", 0x210, "B"),
    ("loadflags", 0x211, "B"),
    ("setup_move_size", 0x212, "H"),
    ("code32_start", 0x214, "I"),
    ("ramdisk_image", 0x218, "I"),
    ("ramdisk_size", 0x21C, "I"),
    ("bootsect_kludge", 0x220, "I"),
    ("heap_end_ptr", 0x224, "H"),
    ("ext_loader_ver", 0x226, "B"),
    ("ext_loader_type", 0x227, "B"),
    ("cmd_line_ptr", 0x228, "I"),
    ("initrd_addr_max", 0x22C, "I"),
    ("kernel_alignment", 0x230, "I"),
    ("relocatable_kernel", 0x234, "B"),
    ("min_alignment", 0x235, "B"),
    ("xloadflags", 0x236, "H"),
    ("cmdline_size", 0x238, "I"),
    ("hardware_subarch", 0x23C, "I"),
    ("hardware_subarch_data", 0x240, "Q"),
    ("payload_offset", 0x248, "I"),
    ("payload_length", 0x24C, "I"),
    ("setup_data", 0x250, "Q"),
    ("pref_address", 0x258, "Q"),
    ("init_size", 0x260, "I"),
    ("handover_offset", 0x264, "I"),
    ("kernel_info_offset", 0x268, "I"),
)
SETUP_HEADER_END = 0x26C          # end of the last field known here (protocol 2.15)
FIELD_OFFSETS = {name: (offset, fmt) for name, offset, fmt in SETUP_HEADER_FIELDS}


@dataclass(frozen=True)
class SetupHeader:
    """struct setup_header, field names as in boot.rst.

    Fields past the end of the header the image declares (older protocols)
    read as 0.
    """

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int

    @property
    def protocol(self) -> str:
        """The boot protocol as text, e.g. "2.15"."""
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def header_end(self) -> int:
        """File offset just past the setup header: 0x202 + the jump's displacement byte."""
        return 0x202 + (self.jump >> 8)

    @property
    def real_setup_sects(self) -> int:
        return self.setup_sects or DEFAULT_SETUP_SECTS

    @property
    def setup_size(self) -> int:
        """Size of the real-mode part; the protected-mode kernel starts here in the file."""
        return (self.real_setup_sects + 1) * SECTOR_SIZE


def _unpack_header(data: bytes) -> SetupHeader:
    """Read every known field; those at or past the declared header end become 0."""
    jump = int.from_bytes(data[SETUP_HEADER_JUMP : SETUP_HEADER_JUMP + 2], "little")
    header_end = 0x202 + (jump >> 8)
    values = {}
    for name, offset, fmt in SETUP_HEADER_FIELDS:
        size = struct.calcsize(fmt)
        if offset + size > header_end:
            values[name] = 0
        else:
            (values[name],) = struct.unpack_from("<" + fmt, data, offset)
    return SetupHeader(**values)


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: its header and the parts of the file a loader needs."""

    header: SetupHeader
    data: bytes | memoryview        # the whole file

    @property
    def setup_header_bytes(self) -> bytes:
        """Bytes 0x1f1 .. header_end of the file: what goes into boot_params at 0x1f1."""
        return self.data[SETUP_HEADER_OFFSET : self.header.header_end]

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel: (setup_sects + 1) * 512."""
        return self.header.setup_size

    @property
    def protected_mode_kernel(self) -> memoryview:
        """The protected-mode kernel (what the classic protocol loads at 1 MiB or above)."""
        return memoryview(self.data)[self.kernel_offset :]

    @property
    def payload(self) -> memoryview:
        """The compressed vmlinux inside the protected-mode kernel (protocol 2.08+)."""
        if self.header.payload_length == 0:
            raise KernelImageError(
                f"kernel image (boot protocol {self.header.protocol}) does not say where "
                "its compressed vmlinux is (payload_length is 0)")
        start = self.kernel_offset + self.header.payload_offset
        return memoryview(self.data)[start : start + self.header.payload_length]

    @property
    def supports_64bit_entry(self) -> bool:
        return bool(self.header.xloadflags & XLF_KERNEL_64)


def is_bzimage(data: bytes) -> bool:
    """True when `data` looks like an x86 boot image (0xAA55 and "HdrS" in place)."""
    if len(data) < 0x206:
        return False
    boot_flag, = struct.unpack_from("<H", data, 0x1FE)
    magic, = struct.unpack_from("<I", data, 0x202)
    return boot_flag == BOOT_FLAG_MAGIC and magic == HDRS_MAGIC


def parse_bzimage(data: bytes, *, require_64bit_entry: bool = False) -> BzImage:
    """Parse and check a bzImage held in `data`; raise KernelImageError if it is unusable.  A
    memoryview is kept as it is (a mapped file is not read into memory)."""
    if not isinstance(data, memoryview):
        data = bytes(data)
    if len(data) < SETUP_HEADER_END:
        raise KernelImageError(
            f"kernel image is too short ({len(data)} bytes) to hold a setup header")
    hdr = _unpack_header(data)
    if hdr.boot_flag != BOOT_FLAG_MAGIC:
        raise KernelImageError(
            f"not a bzImage: boot_flag at 0x1fe is {hdr.boot_flag:#06x}, not 0xaa55")
    if hdr.header != HDRS_MAGIC:
        raise KernelImageError('not a bzImage: no "HdrS" signature at 0x202')
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise KernelImageError(
            f"boot protocol {hdr.protocol} is older than 2.06; pyvmm cannot load this kernel")
    if not hdr.loadflags & LOADED_HIGH:
        raise KernelImageError("kernel image is a zImage (LOADED_HIGH not set), not a bzImage")
    if hdr.header_end > hdr.setup_size:
        raise KernelImageError(
            f"setup header ends at {hdr.header_end:#x}, past the setup code ({hdr.setup_size:#x})")
    if hdr.setup_size >= len(data):
        raise KernelImageError(
            f"kernel image is truncated: {len(data)} bytes, but the setup code alone "
            f"({hdr.real_setup_sects} sectors + boot sector) needs {hdr.setup_size}")
    kernel_size = len(data) - hdr.setup_size
    if hdr.payload_offset + hdr.payload_length > kernel_size:
        raise KernelImageError(
            f"kernel payload [{hdr.payload_offset:#x}, "
            f"{hdr.payload_offset + hdr.payload_length:#x}) lies past the end of the "
            f"protected-mode kernel ({kernel_size:#x} bytes): truncated image?")
    image = BzImage(hdr, data)
    if require_64bit_entry and not image.supports_64bit_entry:
        raise KernelImageError(
            "kernel has no 64-bit entry point (XLF_KERNEL_64 not set in xloadflags)")
    return image


def read_bzimage(path: str, **kwargs) -> BzImage:
    with open(path, "rb") as f:
        return parse_bzimage(f.read(), **kwargs)

