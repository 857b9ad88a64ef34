"""x86-64 start-up state: the boot GDT, identity page tables, and the registers a
vCPU needs to start in 64-bit mode (Linux 64-bit boot protocol, Intel SDM vol. 3).

Pure: writes into a GuestMemory and returns plain values; the machine copies them
into KVM's register structures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# CR0 / CR4 / EFER bits
X86_CR0_PE, X86_CR0_MP, X86_CR0_ET, X86_CR0_NE = 1 << 0, 1 << 1, 1 << 4, 1 << 5
X86_CR0_WP, X86_CR0_AM, X86_CR0_PG = 1 << 16, 1 << 18, 1 << 31
X86_CR4_PAE, X86_CR4_OSFXSR, X86_CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1 << 0, 1 << 8, 1 << 10, 1 << 11
X86_EFLAGS_FIXED = 1 << 1
X86_EFLAGS_IOPL3 = 3 << 12

# page-table entry bits
_PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_PSE = 1 << 0, 1 << 1, 1 << 2, 1 << 7

# GDT layout (selectors).  The Linux boot protocol wants __BOOT_CS = 0x10, __BOOT_DS = 0x18.
BOOT_CS, BOOT_DS = 0x10, 0x18
USER_DS, USER_CS = 0x20 | 3, 0x28 | 3


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from 12 bits of flags (access byte + G/DB/L/AVL nibble)."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


BOOT_GDT = [
    0,
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x10: 64-bit code, DPL 0
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18: data, DPL 0
    gdt_entry(0xC0F3, 0, 0xFFFFF),  # 0x20: data, DPL 3
    gdt_entry(0xA0FB, 0, 0xFFFFF),  # 0x28: 64-bit code, DPL 3
]


@dataclass
class Segment:
    """The fields of struct kvm_segment (a loaded descriptor)."""
    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 1
    avl: int = 0


def segment_from_gdt(selector: int) -> Segment:
    """Decode BOOT_GDT[selector] into what the CPU would load into the hidden part."""
    d = BOOT_GDT[selector >> 3]
    flags = (d >> 40) & 0xF0FF
    return Segment(selector=selector, type=flags & 0xF, s=(flags >> 4) & 1, dpl=(flags >> 5) & 3,
                   present=(flags >> 7) & 1, avl=(flags >> 12) & 1, l=(flags >> 13) & 1,
                   db=(flags >> 14) & 1, g=(flags >> 15) & 1)


def write_gdt(mem, gdt_addr: int) -> tuple[int, int]:
    """Write BOOT_GDT at gdt_addr; returns (base, limit) for the GDTR."""
    mem.write(gdt_addr, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    return gdt_addr, len(BOOT_GDT) * 8 - 1


def write_identity_page_tables(mem, pml4_addr: int, size: int, *, user: bool = False) -> int:
    """Identity-map [0, size) with 2 MiB pages; tables from pml4_addr up (PML4, PDPTs, PDs).

    size is rounded up to 1 GiB; up to 512 GiB.  `user` sets the U bit everywhere,
    for guests that run at CPL 3.  Returns CR3 and writes 2 + ceil(size/1GiB) pages."""
    gib = 1 << 30
    n_pd = max(1, -(-size // gib))
    if n_pd > 512:
        raise ValueError("identity map limited to 512 GiB")
    flags = _PAGE_PRESENT | _PAGE_RW | (_PAGE_USER if user else 0)
    pdpt_addr = pml4_addr + 0x1000
    pd_base = pml4_addr + 0x2000
    mem.write(pml4_addr, struct.pack("<Q", pdpt_addr | flags) + bytes(4096 - 8))
    mem.write(pdpt_addr, struct.pack(f"<{n_pd}Q", *(pd_base + i * 0x1000 | flags for i in range(n_pd)))
              + bytes(4096 - 8 * n_pd))
    entries = (i << 21 | flags | _PAGE_PSE for i in range(512 * n_pd))
    mem.write(pd_base, struct.pack(f"<{512 * n_pd}Q", *entries))
    return pml4_addr


def page_table_bytes(size: int) -> int:
    """How much memory write_identity_page_tables uses for `size`."""
    return (2 + max(1, -(-size // (1 << 30)))) * 0x1000


@dataclass
class LongModeState:
    """What a vCPU needs to start executing 64-bit code."""
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt: tuple[int, int]
    cs: Segment
    ds: Segment
    rip: int
    rsp: int
    rsi: int
    rflags: int
    rdi: int = 0


def long_mode_state(*, cr3: int, gdt: tuple[int, int], rip: int, rsi: int = 0, rsp: int = 0, rdi: int = 0,
                    user: bool = False) -> LongModeState:
    """Registers for 64-bit entry: kernel mode (Linux boot protocol) or user mode (CPL 3,
    IOPL 3 so `in`/`out` work on hardware KVM too, interrupts off)."""
    cs, ds = (USER_CS, USER_DS) if user else (BOOT_CS, BOOT_DS)
    return LongModeState(
        cr0=X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG,
        cr3=cr3,
        cr4=X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA | EFER_SCE,
        gdt=gdt,
        cs=segment_from_gdt(cs),
        ds=segment_from_gdt(ds),
        rip=rip, rsp=rsp, rsi=rsi, rdi=rdi,
        rflags=X86_EFLAGS_FIXED | (X86_EFLAGS_IOPL3 if user else 0),
    )


# MSRs set at start (as firmware leaves them)
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE = (
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102)
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRRdefType = 0x2FF
MTRR_DEF_TYPE_E = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
    MSR_MTRRdefType: MTRR_DEF_TYPE_E | MTRR_TYPE_WRBACK,
}

# local APIC register offsets and values (Intel SDM vol. 3, 11.4)
APIC_SPIV, APIC_LVT0, APIC_LVT1 = 0xF0, 0x350, 0x360
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_DM_EXTINT, APIC_DM_NMI = 0x700, 0x400


def lapic_for_boot(regs: bytes, *, enable: bool = False) -> bytes:
    """LINT0 = ExtINT (the PIC reaches the BSP), LINT1 = NMI, as a PC BIOS leaves them;
    `enable` also sets the software-enable bit in the spurious-vector register (for
    guests that never touch the APIC themselves)."""
    b = bytearray(regs)

    def put(off: int, fn) -> None:
        val = struct.unpack_from("<I", b, off)[0]
        struct.pack_into("<I", b, off, fn(val))

    put(APIC_LVT0, lambda v: (v & ~0x700) | APIC_DM_EXTINT)
    put(APIC_LVT1, lambda v: (v & ~0x700) | APIC_DM_NMI)
    if enable:
        put(APIC_SPIV, lambda v: v | APIC_SPIV_APIC_ENABLED | 0xFF)
    return bytes(b)


def translate(mem, cr0: int, cr3: int, cr4: int, efer: int, vaddr: int) -> int | None:
    """Guest virtual -> physical through the guest's own page tables (for crash reports).
    Handles real/flat mode (paging off), 4-level long mode, and 32-bit PAE/non-PAE paging."""
    if not cr0 & X86_CR0_PG:
        return vaddr & 0xFFFFFFFF
    try:
        if efer & EFER_LMA:
            table = cr3 & 0x000FFFFFFFFFF000
            for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
                entry = mem.read_int(table + ((vaddr >> shift) & 0x1FF) * 8, 8)
                if not entry & _PAGE_PRESENT:
                    return None
                if level in (3, 2) and entry & _PAGE_PSE:
                    mask = (1 << shift) - 1
                    return (entry & 0x000FFFFFFFFFF000 & ~mask) | (vaddr & mask)
                table = entry & 0x000FFFFFFFFFF000
            return table | (vaddr & 0xFFF)
        if cr4 & X86_CR4_PAE:
            pdpte = mem.read_int((cr3 & ~0x1F) + ((vaddr >> 30) & 3) * 8, 8)
            pde = mem.read_int((pdpte & 0x000FFFFFFFFFF000) + ((vaddr >> 21) & 0x1FF) * 8, 8)
            if not pde & _PAGE_PRESENT:
                return None
            if pde & _PAGE_PSE:
                return (pde & 0x000FFFFFFFE00000) | (vaddr & 0x1FFFFF)
            pte = mem.read_int((pde & 0x000FFFFFFFFFF000) + ((vaddr >> 12) & 0x1FF) * 8, 8)
            return (pte & 0x000FFFFFFFFFF000) | (vaddr & 0xFFF) if pte & _PAGE_PRESENT else None
        pde = mem.read_int((cr3 & ~0xFFF) + ((vaddr >> 22) & 0x3FF) * 4, 4)
        if not pde & _PAGE_PRESENT:
            return None
        if pde & _PAGE_PSE:
            return (pde & 0xFFC00000) | (vaddr & 0x3FFFFF)
        pte = mem.read_int((pde & ~0xFFF) + ((vaddr >> 12) & 0x3FF) * 4, 4)
        return (pte & ~0xFFF) | (vaddr & 0xFFF) if pte & _PAGE_PRESENT else None
    except Exception:
        return None
