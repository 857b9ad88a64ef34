"""The first step of a direct Linux boot, begun before the rest of pyvmm is even imported.

Guest RAM and the copying of the kernel's segments and the initrd into it (kernel/loads.py) need
nothing but the configuration: tens of MiB that take ~40 ms to move.  Started first, they move
on a second core while Python imports the devices and KVM makes the VM and its vCPUs; the rest of
the boot (ACPI tables, page tables, registers: vmm/boot.py finish_linux) comes once the VM is there.

    early = start_linux(cfg)          # guest RAM made, the loads running
    Machine(cfg, early=early)         # takes both over (and waits for the loads before the guest runs)

So this module imports only what placing a kernel needs.  A caller that gives up before handing
`early` to a Machine calls `early.abandon()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel import layout
from kernel.cache import KernelCache
from kernel.linux import LinuxBoot, load_linux
from kernel.loads import BackgroundLoads
from .kit import kernel_cache_dir
from .memory import GuestMemory
from .pci.layout import DEFAULT_LAYOUT, PciLayout


@dataclass
class EarlyLinux:
    """Guest RAM with a kernel on its way in, to be handed to a Machine."""

    mem: GuestMemory
    loads: BackgroundLoads   # waited for by whoever takes `mem` over, before the guest runs
    linux: LinuxBoot         # where everything goes; the command line may still be rewritten
    pci_layout: PciLayout    # the layout whose reserved ranges the e820 map holds

    def abandon(self) -> None:
        """Give up: wait for the loads (nothing may write `mem` afterwards), then free guest RAM."""
        self.loads.wait(raise_errors=False)
        self.mem.close()


def wants_early_linux(config) -> bool:
    """Whether the configuration boots Linux directly (no firmware, no program)."""
    return config.firmware is None and not config.program


def start_linux(config, *, pci_layout: PciLayout = DEFAULT_LAYOUT) -> EarlyLinux:
    """Guest RAM for `config`, with its kernel and initrd on their way in (KernelImageError for a
    kernel or initrd that cannot be read or placed; nothing is left behind then)."""
    mem = GuestMemory(config.mem_size)
    loads = BackgroundLoads()
    try:
        linux = load_linux(mem, config.kernel, config.initrd, config.cmdline, entry=config.entry,
                           reserved=pci_layout.e820_reserved(), acpi_rsdp_addr=layout.ACPI_START,
                           kernel_cache=KernelCache(kernel_cache_dir()), loads=loads)
    except BaseException:
        loads.wait(raise_errors=False)
        mem.close()
        raise
    return EarlyLinux(mem, loads, linux, pci_layout)
