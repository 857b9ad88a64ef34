"""The ways pyvmm starts a guest: two in 64-bit mode, and firmware.

* `finish_linux`: a Linux kernel (bzImage or vmlinux) through the 64-bit boot
  protocol, kernel mode, with ACPI tables describing the machine (its kernel and
  initrd placed and loading already: vmm/early.py).
* `boot_program`: a freestanding x86-64 ELF (our driver guest, test guests) in
  guest user mode (CPL 3, IOPL 3, interrupts off), which runs natively on every
  KVM, including the software KVM of hosts without VT-x/AMD-V.
* `boot_firmware`: a BIOS image (vmm/firmware/) from the reset vector, in
  real mode, with every vCPU in KVM's reset state.

Each returns a `BootPlan`: what the boot vCPU's registers must be, and whether
the other vCPUs start at once (programs) or wait for INIT/SIPI (Linux).
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel import acpi, layout
from kernel.elf import load_elf
from kernel.errors import KernelImageError
from kernel.linux import LinuxBoot, write_cmdline
from kernel.x86 import LongModeState, long_mode_state, page_table_bytes, write_gdt, write_identity_page_tables

# user-mode programs: page tables from PROGRAM_PAGE_TABLES up (before the 4 MiB
# where programs are linked), each vCPU's stack PROGRAM_STACK_SIZE below the last
PROGRAM_PAGE_TABLES = 0x10000
PROGRAM_LOWEST_LOAD = 0x400000
PROGRAM_STACK_TOP = 0x400000
PROGRAM_STACK_SIZE = 0x10000


@dataclass
class BootPlan:
    """How the vCPUs start: their registers, and what was loaded."""

    states: list[LongModeState]  # one per vCPU that starts running; the rest wait for SIPI
    linux: LinuxBoot | None = None
    user_mode: bool = False
    firmware: object | None = None  # a vmm.firmware.FirmwareImage: vCPUs keep KVM's reset state


def acpi_config(cpus: int, pci=None, pc_platform: bool = False) -> acpi.AcpiConfig:
    """The tables' view of the machine: hardware-reduced for direct boot; with `pc_platform` (a
    firmware boot) a full FADT with the PM1 blocks of vmm/devices/acpi_pm1.py.  Both have the
    power button of vmm/devices/ged.py."""
    from kernel.acpi_ged import GedConfig
    from .devices import acpi_pm, acpi_pm1, ged

    pm1 = acpi.Pm1Config(acpi_pm1.EVENT_PORT, acpi_pm1.CONTROL_PORT) if pc_platform else None
    return acpi.AcpiConfig(
        pm1=pm1,
        num_cpus=cpus,
        serial_ports=[(0x3F8, 4)],
        cmos_rtc=True,
        pci=pci,
        sleep_control_port=acpi_pm.SLEEP_CONTROL_PORT,
        sleep_status_port=acpi_pm.SLEEP_STATUS_PORT,
        reset_port=acpi_pm.RESET_PORT,
        reset_value=acpi_pm.RESET_VALUE,
        ged=GedConfig(gsi=ged.GSI, selector_port=ged.SELECTOR_PORT, power_button_bit=ged.POWER_BUTTON),
    )


def finish_linux(mem, linux: LinuxBoot, *, cpus: int, pci=None, cmdline: str | None = None) -> BootPlan:
    """The rest of a direct Linux boot whose kernel and initrd vmm/early.py placed: the ACPI tables
    (`pci`: the PciHostConfig the DSDT describes), the reset vector, the boot page tables and
    registers; `cmdline`, when given, replaces the command line written then."""
    config = acpi_config(cpus, pci)
    tables = acpi.build(config, rsdp_addr=layout.ACPI_START)
    for gpa, blob in tables.items():
        if gpa + len(blob) > layout.ACPI_END:
            raise KernelImageError(f"ACPI tables reach {gpa + len(blob):#x}, past {layout.ACPI_END:#x}")
        mem.write(gpa, blob)
    mem.write(layout.RESET_VECTOR, reset_vector_code(config.reset_port, config.reset_value))
    if cmdline is not None:
        write_cmdline(mem, cmdline, linux.cmdline_limit)
    gdt = write_gdt(mem, layout.BOOT_GDT)
    cr3 = write_identity_page_tables(mem, layout.PML4, 4 << 30)
    bsp = long_mode_state(cr3=cr3, gdt=gdt, rip=linux.entry, rsi=linux.zero_page, rsp=layout.BOOT_STACK_TOP)
    return BootPlan(states=[bsp], linux=linux)


def reset_vector_code(port: int, value: int) -> bytes:
    """Real-mode code for the reset vector of a machine with no BIOS: write `value` to I/O `port`
    (the FADT's RESET_REG), then halt for good.  Linux jumps there to reset "through the BIOS"
    (machine_real_restart): with reboot=bios, and by default where the FADT is hardware-reduced and
    there is no EFI (its reboot then tries EFI, which is absent, and the BIOS next), which is direct
    boot here; without this, `reboot` ran the zeros found there and never reached the VMM."""
    return bytes([
        0xB0, value,                    # mov al, value
        0xBA, port & 0xFF, port >> 8,   # mov dx, port
        0xEE,                           # out dx, al
        0xF4,                           # hlt
        0xEB, 0xFD,                     # jmp short back to the hlt
    ])


def boot_program(mem, *, program: str, cpus: int, map_size: int) -> BootPlan:
    """Load an ELF and start every vCPU at its entry in user mode, RDI = vCPU index,
    RSI = number of vCPUs, RSP = a stack of its own."""
    try:
        with open(program, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KernelImageError(f"cannot read program {program}: {e.strerror}") from None
    loaded = load_elf(mem, data)
    if loaded.low < PROGRAM_LOWEST_LOAD:
        raise KernelImageError(f"program loads at {loaded.low:#x}, below {PROGRAM_LOWEST_LOAD:#x}")
    tables_end = PROGRAM_PAGE_TABLES + page_table_bytes(map_size)
    if tables_end > PROGRAM_STACK_TOP - cpus * PROGRAM_STACK_SIZE:
        raise KernelImageError("too many vCPUs or too large a map for the program layout")
    gdt = write_gdt(mem, layout.BOOT_GDT)
    cr3 = write_identity_page_tables(mem, PROGRAM_PAGE_TABLES, map_size, user=True)
    states = []
    for i in range(cpus):
        states.append(long_mode_state(cr3=cr3, gdt=gdt, rip=loaded.entry, rdi=i, rsi=cpus,
                                      rsp=PROGRAM_STACK_TOP - i * PROGRAM_STACK_SIZE, user=True))
    return BootPlan(states=states, user_mode=True)


def boot_firmware(mem, image) -> BootPlan:
    """Start a BIOS: its top copied to RAM ending at 0xFFFFF (the shadow, vmm/firmware/image.py; the
    machine maps the whole image below 4 GiB); no register is set, the boot vCPU starts at the reset vector
    (CS base 0xFFFF0000, IP 0xFFF0) and the others wait for INIT/SIPI."""
    from vmm.firmware.image import copy_shadow

    copy_shadow(mem, image)
    return BootPlan(states=[], firmware=image)
