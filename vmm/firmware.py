"""Firmware boot: a PC BIOS image (SeaBIOS by default) started at the reset vector.

What the machine gives the firmware, as QEMU does for SeaBIOS:

* The image itself, read-only, with its last byte at 0xFFFFFFFF (a KVM memory
  slot of its own): the reset vector 0xFFFFFFF0 is 16 bytes below the top,
  which is where KVM's reset state (CS base 0xFFFF0000, IP 0xFFF0) fetches
  the first instruction.
* A copy of its top at 0xE0000-0xFFFFF, the "shadow": plain guest RAM, so the
  BIOS can write its own data there at once.  Not only the last 128 KiB that
  QEMU aliases there (its isa-bios): the image's last 256 KiB (at most) go to
  0xC0000-0xFFFFF.  SeaBIOS's 256 KiB build links 32-bit code below 0xE0000
  (from 0xD2720 in Debian's 1.16.2) and, on QEMU, copies it there itself from
  the high copy once it has opened the chipset's PAM shadow registers
  (make_bios_writable_intel).  Our host bridge has no PAM registers: SeaBIOS
  says "Unable to unlock ram - bridge not found" and copies nothing, so the
  machine must have put that code in place.  The rest of 0xC0000-0xDFFFF is
  the image's zero padding there, which SeaBIOS then fills with option ROMs.
* The VT-x real-mode TSS (3 pages) and the EPT identity-map page just below
  the image, reserved in the e820 map with the image.
* fw_cfg (vmm/devices/fw_cfg.py) at ports 0x510-0x51B: RAM size, the e820 map,
  the CPU count, the boot order, "no graphics" (SeaBIOS then mirrors its
  screen output on COM1) and pyvmm's ACPI tables through the table loader, so
  that an OS started by the firmware sees the same ACPI as with direct boot.
* The debug console at port 0x402 (QEMU's isa-debugcon): SeaBIOS writes its
  log there byte by byte once a read of the port returns 0xE9.  Without a
  reader (no --firmware-log, no -v) the port is left unclaimed, reads 0xFF,
  and SeaBIOS skips its logging altogether.
* PCI: the host bridge is one SeaBIOS tolerates (vmm/pci/host.py); devices
  start with decoding off, as after a reset, and the firmware places their
  BARs top-down from 0xFEC00000.  The machine's 32-bit MMIO window (what the
  DSDT's _CRS says) is therefore FIRMWARE_PCI_LAYOUT's, 0xF0000000-0xFEBFFFFF.
* Expansion ROMs: virtio-net devices carry iPXE's ROM (Debian's pxe-virtio.rom
  unless --net ...,rom= says otherwise) behind their ROM BAR.

The vCPUs keep KVM's reset state: the boot vCPU runs from the reset vector in
real mode, the others wait in the in-kernel local APIC for INIT/SIPI.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass

from .pci.layout import PciLayout

log = logging.getLogger(__name__)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

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
PAGE = 4096

DEBUGCON_PORT = 0x402
DEBUGCON_READBACK = 0xE9  # what SeaBIOS's qemu_debug_preinit expects to read back

# The 32-bit window SeaBIOS allocates BARs from: top-down below the I/O APIC, above our ECAM.
FIRMWARE_PCI_LAYOUT = PciLayout(mmio32_window=(0xF000_0000, 0xFEBF_FFFF))

BOOT_KINDS = ("disk", "net")


class FirmwareError(Exception):
    """A host-side problem with the firmware set-up (missing image, bad size, bad --boot)."""


# -- the image --------------------------------------------------------------------------------


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
        from .kvm import structs as s

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


# -- the debug console ------------------------------------------------------------------------


class DebugConsole:
    """QEMU's isa-debugcon at port 0x402: bytes written go to `sink`, a read returns 0xE9.

    `sink(bytes)` gets whole lines (and what is left at close)."""

    def __init__(self, sink):
        self._sink = sink
        self._line = bytearray()
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK if size == 1 else (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:1] if offset == 0 else b""
        if not data:
            return
        with self._lock:
            self._line += data
            if data != b"\n" and len(self._line) < 4096:
                return
            line, self._line = bytes(self._line), bytearray()
        self._sink(line)

    def flush(self) -> None:
        with self._lock:
            line, self._line = bytes(self._line), bytearray()
        if line:
            self._sink(line)


def debug_sink(path: str | None):
    """Where firmware debug output goes: a file (--firmware-log), else the log at INFO (-v) with a
    'firmware:' prefix, else nowhere (None: leave the port unclaimed so the firmware skips it).
    Returns (sink, close) or None."""
    if path is not None:
        try:
            f = open(path, "ab", buffering=0)
        except OSError as e:
            raise FirmwareError(f"--firmware-log: cannot open {path}: {e.strerror}") from None
        return f.write, f.close
    if log.isEnabledFor(logging.INFO):
        return (lambda line: log.info("firmware: %s", line.decode("latin-1").rstrip("\r\n"))), (lambda: None)
    return None


# -- boot order --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootItem:
    kind: str  # "disk" or "net"
    index: int | None = None  # which --disk / --net (from 0); None: all of that kind, in order


BOOT_SYNTAX = "a comma-separated list of disk, net, diskN, netN (N counts --disk/--net options from 0)"


def parse_boot_order(text: str) -> tuple[BootItem, ...]:
    """'disk', 'net,disk', 'disk1,disk0,net' -> BootItems; ValueError says what is wrong."""
    items = []
    for word in text.split(","):
        word = word.strip().lower()
        m = re.fullmatch(r"(disk|net)(\d*)", word)
        if not m:
            raise ValueError(f"--boot {text!r}: {word!r} is not disk, net, diskN or netN ({BOOT_SYNTAX})")
        items.append(BootItem(m.group(1), int(m.group(2)) if m.group(2) else None))
    return tuple(items)


DEFAULT_BOOT_ORDER = (BootItem("disk"), BootItem("net"))


def boot_slots(order, disk_slots: list[int], net_slots: list[int]) -> list[tuple[str, int]]:
    """The (kind, PCI slot) sequence a boot order names, each device once, in order; ValueError
    for an index past the devices given."""
    by_kind = {"disk": disk_slots, "net": net_slots}
    out: list[tuple[str, int]] = []
    for item in order:
        slots = by_kind[item.kind]
        if item.index is None:
            chosen = slots
        elif item.index < len(slots):
            chosen = [slots[item.index]]
        else:
            raise ValueError(f"--boot: {item.kind}{item.index} names a {item.kind} that was not given "
                             f"(there {'is' if len(slots) == 1 else 'are'} {len(slots)})")
        for slot in chosen:
            if (item.kind, slot) not in out:
                out.append((item.kind, slot))
    return out


def bootorder_paths(entries: list[tuple[str, int]]) -> list[str]:
    """The lines of fw_cfg's "bootorder" file: OpenFirmware device paths as QEMU writes them
    (SeaBIOS matches /pci@i0cf8/*@SLOT against each line's start)."""
    from kernel.fw_cfg_tables import pci_device_path

    return [pci_device_path(slot, kind=kind) for kind, slot in entries]


# -- fw_cfg ------------------------------------------------------------------------------------


def firmware_e820(regions, reserved) -> list:
    """The e820 map the firmware gets (etc/e820), QEMU's kind: each RAM region whole, plus
    `reserved` (ECAM, the image with the TSS pages below it).  SeaBIOS lays out the first MiB
    itself: its final map (what it hands the OS) has the EBDA at 0x9FC00 and its own
    0xF0000-0xFFFFF reserved and nothing at 0xA0000-0xEFFFF, like pyvmm's map for Linux."""
    from kernel.fw_cfg_tables import firmware_e820 as qemu_style_e820

    return qemu_style_e820(regions, reserved)


RESERVED_MEMORY_END_FILE = "etc/reserved-memory-end"


def setup_fw_cfg(fw, *, mem, cpus: int, e820, acpi_tables, bootorder: list[str] | None,
                 serial_port: int | None = None, mmio64_start: int | None = None) -> None:
    """Fill fw_cfg with what the firmware reads (kernel.fw_cfg_tables.platform_items);
    `serial_port`: where SeaBIOS also writes its screen output (etc/sercon-port);
    `mmio64_start`: where SeaBIOS may put 64-bit BARs that do not fit below 4 GiB
    (etc/reserved-memory-end, as QEMU gives it): the start of the DSDT's 64-bit window."""
    from kernel.fw_cfg_tables import platform_items

    low = mem.regions[0].size
    high = sum(r.size for r in mem.regions[1:])
    platform_items(fw, ram_below_4g=low, ram_above_4g=high, cpus=cpus, e820=e820,
                   acpi_tables=acpi_tables, bootorder=bootorder, sercon_port=serial_port)
    if mmio64_start is not None:
        fw.add_file(RESERVED_MEMORY_END_FILE, mmio64_start.to_bytes(8, "little"))


# -- what an emulating KVM cannot run ------------------------------------------------------------

IRET = 0xCF
OPERAND_SIZE_PREFIX = 0x66
EFLAGS_FIXED = 1 << 1
EFLAGS_NT = 1 << 14
EFLAGS_VM = 1 << 17
# What IRET at CPL 0 loads from the stack (Intel SDM, IRET: "RETURN-TO-SAME-PRIVILEGE-LEVEL"):
# CF PF AF ZF SF TF IF DF OF IOPL NT, and with a 32-bit operand RF AC VIF VIP ID.
IRET_FLAGS_32 = 0x3F7FD5
IRET_FLAGS_16 = 0x7FD5
X86_CR0_PE, X86_CR0_PG = 1 << 0, 1 << 31


class ProtectedModeIret:
    """Completes the one instruction firmware needs that KVM's instruction emulator lacks.

    Where KVM emulates guest kernel mode (a software KVM, as on hosts without VT-x/AMD-V),
    every CPL 0 instruction goes through KVM's x86 emulator, whose IRET handles real mode
    only ("iret from protected mode unimplemented yet"): KVM_RUN fails with an emulation
    error.  iPXE takes the timer interrupt in 32-bit protected mode and returns with IRET.
    As an `on_exit` hook of the firmware's vCPU threads this does such an IRET itself when
    it is the simple kind: protected mode, CPL 0, to the same privilege level, no task return
    (NT), no return to virtual-8086 mode, a GDT code segment.  Anything else is left to the
    usual crash report.  On KVM with VT-x/AMD-V the exit never happens.

    Where the frame is: at SS:ESP, as the architecture has it.  The software KVM measured
    here (kvm_pvm) delivers interrupts in protected mode by writing the frame at the *flat*
    address ESP, ignoring the base of SS (iPXE runs with segment bases of 0x1FF5C000 and so
    on); so when SS has a base and the bytes at SS:ESP are no valid frame (a present GDT
    code segment with RPL 0, EFLAGS with bit 1 set and the reserved bits clear), the frame at
    the flat address is taken if it is a valid one.
    """

    def __init__(self, mem):
        self.mem = mem
        self.count = 0

    def __call__(self, thread, ex) -> bool:
        from .kvm import exits

        if type(ex) is not exits.InternalError or ex.suberror != 1:
            return False
        try:
            done = self._iret(thread.vcpu)
        except Exception as e:  # guest memory that is not RAM, a malformed descriptor...
            log.debug("vcpu%d: cannot complete IRET: %s", thread.vcpu.id, e)
            return False
        if done:
            self.count += 1
            if self.count == 1:
                log.info("vcpu%d: completing protected-mode IRETs that this KVM's emulator cannot run",
                         thread.vcpu.id)
        return done

    def _valid_frame(self, sregs, new_ip: int, selector: int, flags: int, *, operand32: bool):
        """(ip, selector, flags, descriptor bytes, limit) if the three popped values make an IRET
        this class completes, else None."""
        selector &= 0xFFFF
        if not flags & EFLAGS_FIXED or flags & (0xFFC0_8028 if operand32 else 0x8028):
            return None  # not an EFLAGS image: bit 1 clear or reserved bits set
        if operand32 and flags & EFLAGS_VM:
            return None  # return to virtual-8086 mode
        if selector & 3 != 0 or selector & 4 or selector < 8 or (selector | 7) > sregs.gdt.limit:
            return None  # to an outer privilege level, through the LDT, null, or past the GDT
        raw = self.mem.read(self._linear(sregs, sregs.gdt.base + (selector & ~7)), 8)
        access, flags_limit = raw[5], raw[6]
        if not access & 0x80 or not access & 0x10 or not access & 0x08 or (access >> 5) & 3:
            return None  # not present, not a code segment, or not DPL 0
        limit = int.from_bytes(raw[0:2], "little") | (flags_limit & 0x0F) << 16
        if flags_limit & 0x80:
            limit = limit << 12 | 0xFFF
        if new_ip > limit:
            return None
        return new_ip, selector, flags, raw, limit

    def _linear(self, sregs, address: int) -> int:
        if sregs.cr0 & X86_CR0_PG:
            from kernel.x86 import translate

            phys = translate(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, address)
            if phys is None:
                raise ValueError(f"{address:#x} is not mapped")
            return phys
        return address & 0xFFFF_FFFF

    def _read(self, sregs, address: int, size: int) -> int:
        return self.mem.read_int(self._linear(sregs, address), size)

    def _iret(self, vcpu) -> bool:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if not sregs.cr0 & X86_CR0_PE or sregs.efer & (1 << 10) or sregs.cs.dpl != 0:
            return False  # real mode is emulated by KVM; long mode and CPL > 0 are not ours
        if regs.rflags & (EFLAGS_NT | EFLAGS_VM):
            return False
        rip = sregs.cs.base + regs.rip
        opcode = self._read(sregs, rip, 1)
        operand32 = bool(sregs.cs.db)
        if opcode == OPERAND_SIZE_PREFIX:
            operand32 = not operand32
            opcode = self._read(sregs, rip + 1, 1)
        if opcode != IRET:
            return False
        size = 4 if operand32 else 2
        sp_mask = 0xFFFF_FFFF if sregs.ss.db else 0xFFFF
        sp = regs.rsp & sp_mask
        frame = None
        for base in (sregs.ss.base, 0) if sregs.ss.base else (0,):
            values = [self._read(sregs, base + ((sp + i * size) & sp_mask), size) for i in range(3)]
            frame = self._valid_frame(sregs, *values, operand32=operand32)
            if frame is not None:
                break
        if frame is None:
            return False
        new_ip, selector, flags, raw, limit = frame
        access, flags_limit = raw[5], raw[6]
        cs = sregs.cs
        cs.selector, cs.base = selector, int.from_bytes(raw[2:5], "little") | raw[7] << 24
        cs.limit, cs.type, cs.s, cs.dpl, cs.present = limit, (access & 0x0F) | 1, 1, (access >> 5) & 3, 1
        cs.avl, cs.l, cs.db, cs.g, cs.unusable = (flags_limit >> 4) & 1, (flags_limit >> 5) & 1, \
            (flags_limit >> 6) & 1, flags_limit >> 7, 0
        mask = IRET_FLAGS_32 if operand32 else IRET_FLAGS_16
        regs.rflags = (regs.rflags & ~mask) | (flags & mask) | EFLAGS_FIXED
        regs.rip = new_ip
        regs.rsp = (regs.rsp & ~sp_mask) | ((sp + 3 * size) & sp_mask)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return True
