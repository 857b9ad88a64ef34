"""Fixed guest physical addresses used to boot a kernel: the one place they are chosen.

Low memory (first MiB) as pyvmm lays it out::

    0x00000 - 0x00fff   real-mode IVT and BIOS data area: left alone
    0x01000 - 0x01fff   BOOT_GDT (and BOOT_IDT at +0x800)
    0x02000 - 0x02fff   PML4                      \\
    0x03000 - 0x03fff   PDPT                       > identity map of 4 GiB with
    0x04000 - 0x07fff   4 page directories (PD)   /  2 MiB pages (PAGE_TABLES_*)
    0x08000 - 0x08fff   ZERO_PAGE (struct boot_params)
    0x09000 - 0x0ffff   BOOT_STACK (grows down from BOOT_STACK_TOP)
    0x10000 - 0x1ffff   free
    0x20000 - 0x2ffff   CMDLINE (NUL-terminated kernel command line)
    0x30000 - 0x9fbff   free
    0x9fc00 - 0x9ffff   EBDA                      \\
    0xa0000 - 0xdffff   legacy VGA / option ROMs    > e820 reserved
    0xe0000 - 0xfffef   ACPI tables (ACPI_START)  /
    0xffff0 - 0xfffff   RESET_VECTOR: code that resets the machine
    0x100000            HIMEM_START: 1 MiB, start of "high" memory
    0x1000000           KERNEL_DEFAULT_LOAD: 16 MiB (LOAD_PHYSICAL_ADDR of x86-64 kernels)

The initrd goes as high as possible in low RAM (below 3 GiB and below the
kernel's initrd_addr_max).
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# Descriptor tables for the boot vCPU.
BOOT_GDT = 0x1000
BOOT_GDT_SIZE = 0x800
BOOT_IDT = 0x1800
BOOT_IDT_SIZE = 0x800

# Page tables identity-mapping [0, 4 GiB) with 2 MiB pages: PML4, PDPT, 4 PDs.
PML4 = 0x2000
PDPT = 0x3000
PD = 0x4000                     # 4 consecutive pages: PD for GiB 0, 1, 2, 3
PD_COUNT = 4
PAGE_TABLES_START = PML4
PAGE_TABLES_END = PD + PD_COUNT * PAGE_SIZE     # 0x8000, exclusive

# struct boot_params, the "zero page": RSI points here at the 64-bit entry.
ZERO_PAGE = 0x8000
ZERO_PAGE_SIZE = PAGE_SIZE

# A small stack for the boot vCPU (Linux sets up its own; test guests use it).
BOOT_STACK = 0x9000
BOOT_STACK_TOP = 0x10000

# Kernel command line.
CMDLINE = 0x20000
CMDLINE_MAX_SIZE = 0x10000      # bytes available here, terminating NUL included

# Legacy reserved area: EBDA, VGA hole, option ROMs, BIOS (e820 reserved).
EBDA_START = 0x9FC00
ACPI_START = 0xE0000            # ACPI tables (RSDP found by the kernel in 0xE0000-0xFFFFF)
# The real-mode reset vector, F000:FFF0: where a kernel that resets "through the BIOS" jumps.  Direct
# boot puts a few bytes there that press the ACPI reset register (vmm/boot.py, reset_vector_code).
RESET_VECTOR = 0xFFFF0
ACPI_END = RESET_VECTOR         # exclusive
HIMEM_START = 0x100000          # 1 MiB

# Where a relocatable kernel goes when nothing else is said.
KERNEL_DEFAULT_LOAD = 0x1000000

# Heap end for the real-mode setup code: heap_end_ptr = 0xfe00 (heap_end 0x10000 - 0x200).
# Nothing of setup runs with the 64-bit entry; the field is set as the spec asks.
SETUP_HEAP_END = 0x10000

# Intel VT-x needs three pages for a real-mode TSS (KVM_SET_TSS_ADDR) and one for the EPT identity
# map (KVM_SET_IDENTITY_MAP_ADDR); they sit in the MMIO hole just under the BIOS area, as in other
# VMMs.  (A firmware boot puts them under its image instead: vmm/firmware/image.py.)
VMX_TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
