"""Load a Linux kernel, initrd and command line into guest RAM for the 64-bit boot protocol.

Two ways in (boot.rst, "64-bit Boot Protocol"):

* ``entry="vmlinux"`` (default): the bzImage payload is decompressed on the
  host and the vmlinux ELF is loaded at its physical addresses; the vCPU starts
  at the ELF entry (startup_64).  A raw vmlinux ELF file is loaded the same way.
  This skips the in-guest decompressor, which is very slow where KVM emulates
  kernel-mode code.
* ``entry="bzimage"`` (classic): the protected-mode kernel is copied to its load
  address and the vCPU starts at load address + 0x200; it decompresses itself.

Either way RSI must hold `LinuxBoot.zero_page` at entry, with the CPU in 64-bit
mode and [0, 4 GiB) identity-mapped (see kernel/layout.py for the page tables).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, BinaryIO, Callable

from vmm.memory import GuestMemory, GuestMemoryError

from . import layout
from .bootparams import DEFAULT_CMDLINE_SIZE, BootParams
from .bzimage import STARTUP_64_OFFSET, BzImage, is_bzimage, parse_bzimage
from .decompress import decompress_payload, detect_format
from .e820 import E820Entry, build_e820, usable_ranges
from .elf import ElfImage, LoadedElf, check_fits, copy_segments, is_elf, load_elf, parse_elf
from .errors import KernelImageError
from .loads import BackgroundLoads

if TYPE_CHECKING:
    from .cache import KernelCache

ENTRY_MODES = ("vmlinux", "bzimage")

# initrd_addr_max when the kernel has no setup header (the value x86-64 kernels declare).
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF
# pyvmm keeps the initrd below 4 GiB (ext_ramdisk_* stay 0).
INITRD_LIMIT = 1 << 32


@dataclass(frozen=True)
class LinuxBoot:
    """Where things went, and where the boot vCPU must start."""

    entry: int                      # 64-bit entry point (RIP), a physical address
    zero_page: int                  # struct boot_params (RSI)
    cmdline: int                    # the NUL-terminated command line
    kernel_start: int               # kernel range [start, end) incl. its init_size room
    kernel_end: int
    initrd_start: int               # 0 and 0 without an initrd
    initrd_size: int
    mode: str                       # "vmlinux" or "bzimage"
    payload_format: str | None      # "lz4", "gzip", ... (None for a raw vmlinux file)
    boot_protocol: str | None       # "2.15" (None for a raw vmlinux file)
    pvh_entry: int | None           # XEN_ELFNOTE_PHYS32_ENTRY of the vmlinux, if known
    e820: tuple[E820Entry, ...] = field(repr=False)
    cmdline_limit: int = DEFAULT_CMDLINE_SIZE - 1  # the longest command line this kernel takes

    @property
    def initrd_end(self) -> int:
        return self.initrd_start + self.initrd_size


def load_linux(mem: GuestMemory, kernel_path: str, initrd_path: str | None = None,
               cmdline: str | bytes = "", *, entry: str = "vmlinux", reserved=(),
               acpi_rsdp_addr: int | None = None, kernel_cache: KernelCache | None = None,
               loads: BackgroundLoads | None = None) -> LinuxBoot:
    """Load kernel (bzImage or vmlinux ELF), initrd and command line; fill the zero page.

    `reserved` holds extra e820 ranges ((addr, size[, type]) or E820Entry) the
    machine declares; `acpi_rsdp_addr` goes to boot_params.acpi_rsdp_addr.  With a
    `kernel_cache`, a bzImage's decompressed kernel comes from there (and goes there).
    The initrd, and a cached kernel's segments, go from their files straight into guest
    memory in the background: with `loads` given they may still be moving on return (the
    caller waits: kernel/loads.py), without, load_linux waits for them.
    """
    kernel = _read(kernel_path, "kernel")
    decompress = _decompress if kernel_cache is None else partial(_from_cache, kernel_cache, kernel_path, kernel)
    initrd = None
    if initrd_path is not None:
        try:
            initrd = open(initrd_path, "rb")
        except OSError as e:
            raise KernelImageError(f"cannot read initrd {initrd_path}: {e.strerror}") from e

    def load(*, loads: BackgroundLoads) -> LinuxBoot:
        if initrd is not None:
            loads.close_when_done(initrd)
        return load_linux_image(mem, kernel, initrd, cmdline, entry=entry, reserved=reserved,
                                acpi_rsdp_addr=acpi_rsdp_addr, decompress=decompress, loads=loads)

    return _with_loads(loads, load)


def load_linux_image(mem: GuestMemory, kernel: bytes, initrd: bytes | BinaryIO | None = None,
                     cmdline: str | bytes = "", *, entry: str = "vmlinux", reserved=(),
                     acpi_rsdp_addr: int | None = None,
                     decompress: Callable[[BzImage], bytes | BinaryIO] | None = None,
                     loads: BackgroundLoads | None = None) -> LinuxBoot:
    """load_linux for a kernel already in memory; the initrd as bytes or an open file.
    `decompress(image)` gives a bzImage's vmlinux (default: decompress its payload); `loads` as
    for load_linux."""
    if entry not in ENTRY_MODES:
        raise ValueError(f"entry must be one of {ENTRY_MODES}, not {entry!r}")
    for what, gpa, size in (("zero page", layout.ZERO_PAGE, layout.ZERO_PAGE_SIZE),
                            ("command line", layout.CMDLINE, layout.CMDLINE_MAX_SIZE)):
        if not mem.contains(gpa, size):
            raise KernelImageError(f"guest RAM is too small to hold the {what} at {gpa:#x}")

    image = None
    if is_bzimage(kernel):
        image = parse_bzimage(kernel, require_64bit_entry=(entry == "bzimage"))
    elif not is_elf(kernel):
        raise KernelImageError("kernel file is neither a bzImage nor an ELF vmlinux")
    elif entry == "bzimage":
        raise KernelImageError("the bzimage entry needs a bzImage, but the kernel is an ELF file")

    return _with_loads(loads, partial(_place_and_load, mem, image, kernel, initrd, cmdline, entry=entry,
                                      reserved=reserved, acpi_rsdp_addr=acpi_rsdp_addr,
                                      decompress=decompress or _decompress))


def _with_loads(loads: BackgroundLoads | None, work: Callable[..., LinuxBoot]) -> LinuxBoot:
    """work(loads=...): with the caller's `loads` (it waits for them), or with loads of our own, waited
    for before returning, also on an error (nothing may write guest memory once we return)."""
    if loads is not None:
        return work(loads=loads)
    own = BackgroundLoads()
    try:
        boot = work(loads=own)
    except BaseException:
        own.wait(raise_errors=False)
        raise
    own.wait()
    return boot


def _place_and_load(mem: GuestMemory, image: BzImage | None, kernel: bytes, initrd, cmdline, *, entry: str,
                    reserved, acpi_rsdp_addr: int | None, decompress, loads: BackgroundLoads) -> LinuxBoot:
    if entry == "bzimage":
        placed = _load_protected_mode_kernel(mem, image)
    else:
        placed = _load_vmlinux(mem, image, kernel, decompress, loads)
    entry_point, kernel_start, kernel_end, payload_format, pvh_entry = placed

    params = BootParams(image.setup_header_bytes if image else None)
    params.set_loader(heap_end_ptr=layout.SETUP_HEAP_END - 0x200)
    if entry == "bzimage":
        params["code32_start"] = kernel_start

    cmdline_limit = _cmdline_limit(image.header.cmdline_size if image else DEFAULT_CMDLINE_SIZE)
    write_cmdline(mem, cmdline, cmdline_limit)
    params.set_cmdline(layout.CMDLINE)

    e820 = build_e820(mem.regions, reserved)
    params.set_e820(e820)

    initrd_start, initrd_size = 0, _initrd_size(initrd)
    if initrd_size:
        addr_max = image.header.initrd_addr_max if image else DEFAULT_INITRD_ADDR_MAX
        initrd_start = place_initrd(e820, initrd_size, limit=min(addr_max + 1, INITRD_LIMIT),
                                    avoid=[(kernel_start, kernel_end)])
        _put_initrd(mem, initrd_start, initrd_size, initrd, loads)
        params.set_initrd(initrd_start, initrd_size)

    if acpi_rsdp_addr is not None:
        params.set_acpi_rsdp(acpi_rsdp_addr)
    mem.write(layout.ZERO_PAGE, params.to_bytes())

    return LinuxBoot(
        entry=entry_point,
        zero_page=layout.ZERO_PAGE,
        cmdline=layout.CMDLINE,
        kernel_start=kernel_start,
        kernel_end=kernel_end,
        initrd_start=initrd_start,
        initrd_size=initrd_size,
        mode=entry,
        payload_format=payload_format,
        boot_protocol=image.header.protocol if image else None,
        pvh_entry=pvh_entry,
        e820=tuple(e820),
        cmdline_limit=cmdline_limit,
    )


def _read(path: str, what: str) -> bytes | memoryview:
    """The file's bytes, mapped rather than read where it can be: a boot whose kernel is in the cache
    looks at its setup header alone, and reading all of a 14 MiB bzImage cost ~7 ms of the start."""
    try:
        with open(path, "rb") as f:
            try:
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            except (ValueError, OSError):  # empty, or not a file that can be mapped
                return f.read()
    except OSError as e:
        raise KernelImageError(f"cannot read {what} {path}: {e.strerror}") from e


def _decompress(image: BzImage) -> bytes:
    return decompress_payload(image.payload)


def _from_cache(cache: KernelCache, path: str, kernel: bytes, image: BzImage) -> bytes | BinaryIO:
    return cache.vmlinux(path, kernel, lambda: _decompress(image))


def _initrd_size(initrd: bytes | BinaryIO | None) -> int:
    if initrd is None:
        return 0
    return len(initrd) if isinstance(initrd, (bytes, bytearray, memoryview)) else os.fstat(initrd.fileno()).st_size


def _put_initrd(mem: GuestMemory, gpa: int, size: int, initrd: bytes | BinaryIO, loads: BackgroundLoads) -> None:
    """The initrd into guest memory: bytes copied, a file sent straight in (no copy in Python)."""
    if isinstance(initrd, (bytes, bytearray, memoryview)):
        mem.write(gpa, initrd)
        return

    def load():
        try:
            mem.load_file(gpa, size, initrd.fileno())
        except (OSError, GuestMemoryError) as e:
            raise KernelImageError(f"cannot read initrd {initrd.name}: {getattr(e, 'strerror', None) or e}") from e

    loads.run(load)


def _load_vmlinux(mem: GuestMemory, image: BzImage | None, kernel: bytes, decompress, loads: BackgroundLoads):
    """Load the vmlinux ELF (from the bzImage payload through `decompress`, or the file itself)."""
    payload_format = None
    if image is not None:
        payload_format = detect_format(image.payload)
        kernel = decompress(image)
    if isinstance(kernel, (bytes, bytearray, memoryview)):
        loaded = load_elf(mem, parse_elf(kernel))
    else:  # a file (a cached kernel): headers read through a mapping, segments sent in the background
        try:
            elf = parse_elf(memoryview(mmap.mmap(kernel.fileno(), 0, access=mmap.ACCESS_READ)))
            check_fits(mem, elf)
        except BaseException:
            kernel.close()
            raise
        loaded = LoadedElf(elf.entry, elf.low, elf.high, elf.pvh_entry, None)
        loads.run(partial(_copy_and_close, mem, elf, kernel))
    if loaded.low < layout.HIMEM_START:
        raise KernelImageError(
            f"vmlinux loads at {loaded.low:#x}, below 1 MiB where pyvmm keeps boot data")
    end = loaded.high
    if image is not None:
        end = max(end, loaded.low + image.header.init_size)
    return loaded.entry, loaded.low, end, payload_format, loaded.pvh_entry


def _copy_and_close(mem: GuestMemory, elf: ElfImage, file: BinaryIO) -> None:
    with file:
        copy_segments(mem, elf, file.fileno())


def _load_protected_mode_kernel(mem: GuestMemory, image: BzImage):
    """Classic bzImage: copy the protected-mode kernel to its load address."""
    code = image.protected_mode_kernel
    need = max(len(code), image.header.init_size)
    addr = bzimage_load_address(image, mem, need)
    mem.write(addr, code)
    return addr + STARTUP_64_OFFSET, addr, addr + need, None, None


def bzimage_load_address(image: BzImage, mem: GuestMemory, need: int) -> int:
    """Where the protected-mode kernel goes: pref_address if relocatable and RAM allows,
    else the lowest kernel_alignment boundary from 1 MiB; a fixed kernel goes at 1 MiB."""
    hdr = image.header
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment or 1
        if align & (align - 1):
            raise KernelImageError(f"kernel_alignment {align:#x} is not a power of two")
        pref = hdr.pref_address or layout.KERNEL_DEFAULT_LOAD
        candidates = [_align_up(pref, align), _align_up(layout.HIMEM_START, align)]
    else:
        candidates = [layout.HIMEM_START]
    for addr in candidates:
        if mem.contains(addr, need):
            return addr
    raise KernelImageError(
        f"guest RAM is too small for the kernel: it needs {need:#x} bytes from {candidates[-1]:#x}")


def _cmdline_limit(cmdline_size: int) -> int:
    """The longest command line (without its NUL) for a kernel declaring `cmdline_size`."""
    return min(cmdline_size or DEFAULT_CMDLINE_SIZE, layout.CMDLINE_MAX_SIZE - 1)


def write_cmdline(mem: GuestMemory, cmdline: str | bytes, limit: int) -> None:
    """The command line, NUL-terminated, where the zero page points (layout.CMDLINE); it may be
    written again before the guest runs (LinuxBoot.cmdline_limit is the `limit`)."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise KernelImageError("kernel command line contains a NUL byte")
    if len(raw) > limit:
        raise KernelImageError(
            f"kernel command line is {len(raw)} bytes; this kernel accepts at most {limit}")
    mem.write(layout.CMDLINE, raw + b"\0")


def place_initrd(e820, size: int, *, limit: int, avoid=()) -> int:
    """Highest page-aligned start for `size` bytes in usable RAM at or above 1 MiB, ending
    at or below `limit`, overlapping none of the `avoid` ranges [(start, end), ...]."""
    if size <= 0:
        raise ValueError("initrd size must be positive")
    free = [(max(lo, layout.HIMEM_START), min(hi, limit)) for lo, hi in usable_ranges(e820)]
    for lo, hi in sorted(avoid):
        free = [piece for (a, b) in free for piece in ((a, min(b, lo)), (max(a, hi), b))]
    for lo, hi in sorted(free, key=lambda r: r[1], reverse=True):
        start = (hi - size) & ~(layout.PAGE_SIZE - 1)
        if hi - lo >= size and start >= lo:
            return start
    raise KernelImageError(
        f"initrd of {size} bytes does not fit in guest RAM below {limit:#x} "
        "beside the kernel; give the guest more memory")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
