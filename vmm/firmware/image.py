"""The firmware image: loading and checking it (and option ROMs), its memory slot at the top of
4 GiB, its shadow below 1 MiB, the VT-x pages under it (vmm/firmware/__init__.py says why)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from kernel.layout import KiB, MiB, GiB, PAGE_SIZE as PAGE
from ..pci.layout import PciLayout

DEFAULT_FIRMWARE = "/usr/share/seabios/bios-256k.bin"  # Debian's seabios package
DEFAULT_NET_ROM = "/usr/lib/ipxe/qemu/pxe-virtio.rom"  # Debian's ipxe-qemu package (BIOS-only iPXE)
FIRMWARE_PACKAGE_HINT = "install Debian's seabios package or give --firmware PATH"

SHADOW_START = 0xC0000  # the image's last (up to) 256 KiB are copied to [SHADOW_START, 1 MiB)
SHADOW_END = 0x100000
SHADOW_SIZE = SHADOW_END - SHADOW_START
MIN_FIRMWARE_SIZE = 64 * KiB
MAX_FIRMWARE_SIZE = 16 * MiB  # its base stays above the local APICs at 0xFEE00000
FIRMWARE_END = 4 * GiB

# The VT-x real-mode TSS (KVM_SET_TSS_ADDR: 3 pages) and the EPT identity map page (1 page)
# sit right under the image, as under SeaBIOS in QEMU (0xFFFBC000-0xFFFBFFFF for a 256 KiB image).
TSS_PAGES = 3

# The 32-bit window SeaBIOS allocates BARs from: top-down below the I/O APIC, above our ECAM.
FIRMWARE_PCI_LAYOUT = PciLayout(mmio32_window=(0xF000_0000, 0xFEBF_FFFF))


class FirmwareError(Exception):
    """A host-side problem with the firmware set-up (missing image, bad size, a boot order that names no device)."""


@dataclass(frozen=True)
class FirmwareImage:
    path: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def base(self) -> int:
        """Guest physical address of the image's first byte (its last is 0xFFFFFFFF)."""
        return FIRMWARE_END - self.size

    @property
    def shadow(self) -> bytes:
        """What goes below 1 MiB: the last 256 KiB (or the whole of a smaller image)."""
        return self.data[-SHADOW_SIZE:]

    @property
    def shadow_base(self) -> int:
        return SHADOW_END - len(self.shadow)

    @property
    def identity_map_addr(self) -> int:
        return self.base - (TSS_PAGES + 1) * PAGE

    @property
    def tss_addr(self) -> int:
        return self.base - TSS_PAGES * PAGE

    def e820_reserved(self) -> list[tuple[int, int]]:
        """(address, size) to mark reserved: the image and the TSS/identity-map pages below it."""
        return [(self.identity_map_addr, FIRMWARE_END - self.identity_map_addr)]


def load_firmware(path: str | None = None) -> FirmwareImage:
    """Read and check a BIOS image (default: Debian's SeaBIOS); FirmwareError says what is wrong."""
    explicit = path is not None
    path = path or DEFAULT_FIRMWARE
    if not os.path.exists(path):
        if explicit:
            raise FirmwareError(f"--firmware: {path} does not exist")
        raise FirmwareError(f"--firmware: no firmware image at {path} ({FIRMWARE_PACKAGE_HINT})")
    if not os.path.isfile(path):
        raise FirmwareError(f"--firmware: {path} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FIRMWARE_SIZE + 1)
    except OSError as e:
        raise FirmwareError(f"--firmware: cannot read {path}: {e.strerror}") from None
    if not MIN_FIRMWARE_SIZE <= len(data) <= MAX_FIRMWARE_SIZE or len(data) % PAGE:
        raise FirmwareError(f"--firmware: {path} is {len(data)} bytes; a BIOS image is a multiple of 4 KiB "
                            f"from {MIN_FIRMWARE_SIZE // KiB} KiB to {MAX_FIRMWARE_SIZE // MiB} MiB")
    return FirmwareImage(path=path, data=data)


def load_rom(path: str, what: str = "rom") -> bytes:
    """An option ROM image: it must exist and start with the 55 AA signature."""
    if not os.path.isfile(path):
        raise FirmwareError(f"{what} {path} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(16 * MiB + 1)
    except OSError as e:
        raise FirmwareError(f"{what} {path}: {e.strerror}") from None
    if len(data) < 512 or data[:2] != b"\x55\xaa" or len(data) > 16 * MiB:
        raise FirmwareError(f"{what} {path} is not a PCI option ROM (no 55 AA signature, or over 16 MiB)")
    return data


class FirmwareMapping:
    """The image in host memory of its own (an anonymous mapping), given to KVM as a memory slot,
    read-only where KVM can (guest writes then exit as MMIO writes, which nobody claims)."""

    def __init__(self, image: FirmwareImage):
        self.image = image
        self.buffer = mmap.mmap(-1, image.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer[:] = image.data
        self.readonly = False

    def host_address(self) -> int:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def map(self, vm, slot: int, *, readonly: bool) -> None:
        from ..kvm import structs as s

        self.readonly = readonly
        vm.set_user_memory_region(slot, self.image.base, self.image.size, self.host_address(),
                                  flags=s.KVM_MEM_READONLY if readonly else 0)

    def close(self) -> None:
        if self.buffer is not None:
            try:
                self.buffer.close()
            except BufferError:
                pass  # the ctypes view lives on until the process ends
            self.buffer = None


def copy_shadow(mem, image: FirmwareImage) -> None:
    """The image's last 256 KiB (at most) into RAM below 1 MiB, ending at 0xFFFFF."""
    mem.write(image.shadow_base, image.shadow)
