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

The parts: image.py (the image, its mapping and shadow, option ROMs), fw_cfg.py (what fw_cfg
carries), debugcon.py (port 0x402), iret.py (an instruction an emulating KVM leaves to us).  Each is
loaded when first used (`vmm.firmware.NAME` too), so a direct boot loads none of them.
"""

from importlib import import_module

_MODULE_OF = {
    "DEBUGCON_PORT": "debugcon", "DebugConsole": "debugcon", "debug_sink": "debugcon",
    "bootorder_paths": "fw_cfg", "firmware_e820": "fw_cfg", "setup_fw_cfg": "fw_cfg",
    "DEFAULT_FIRMWARE": "image", "DEFAULT_NET_ROM": "image", "FIRMWARE_PCI_LAYOUT": "image",
    "FirmwareError": "image", "FirmwareImage": "image", "FirmwareMapping": "image", "copy_shadow": "image",
    "load_firmware": "image", "load_rom": "image",
    "ProtectedModeIret": "iret",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
