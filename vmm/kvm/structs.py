"""ctypes mirrors of the structures in <linux/kvm.h> and <asm/kvm.h> (x86-64).

Field names are the kernel's.  tests/unit/test_kvm_abi.py compiles a C probe
against the host's headers and checks every size and offset used here.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32


class Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_ if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


# -- memory ---------------------------------------------------------------------
class kvm_userspace_memory_region(Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64), ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


# -- registers ----------------------------------------------------------------------
class kvm_regs(Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Struct):
    _fields_ = [(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
               [("gdt", kvm_dtable), ("idt", kvm_dtable)] + \
               [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + \
               [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8), ("last_opcode", u16),
                ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]  # followed by kvm_msr_entry entries[nmsrs]


def msrs(values: dict[int, int]) -> ctypes.Structure:
    """A kvm_msrs with its flexible array, from {index: value}."""
    items = list(values.items())

    class _kvm_msrs(Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * len(items))]

    m = _kvm_msrs(nmsrs=len(items))
    for slot, (index, value) in zip(m.entries, items):
        slot.index, slot.data = index, value
    return m


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", u32)]  # followed by u32 indices[nmsrs]


class kvm_lapic_state(Struct):
    _fields_ = [("regs", u8 * 1024)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


# -- CPUID -----------------------------------------------------------------------------
class kvm_cpuid_entry2(Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32),
                ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(Struct):
    _fields_ = [("nent", u32), ("padding", u32)]  # followed by kvm_cpuid_entry2 entries[nent]


def cpuid2(nent: int) -> ctypes.Structure:
    class _kvm_cpuid2(Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    return _kvm_cpuid2(nent=nent)


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


# -- interrupts --------------------------------------------------------------------------
class kvm_irq_level(Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irqfd(Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


# -- the VM's clock (kvm-clock's base) ------------------------------------------------------
class kvm_clock_data(Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
                ("pad", u32 * 4)]


KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_msi(Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32), ("pad", u8 * 12)]


class kvm_irq_routing_irqchip(Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Struct):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _kvm_irq_routing_u)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irq_routing(Struct):
    _fields_ = [("nr", u32), ("flags", u32)]  # followed by kvm_irq_routing_entry entries[nr]


def irq_routing(entries: list[kvm_irq_routing_entry]) -> ctypes.Structure:
    class _kvm_irq_routing(Struct):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * len(entries))]

    r = _kvm_irq_routing(nr=len(entries))
    for i, e in enumerate(entries):
        r.entries[i] = e
    return r


# -- the shared kvm_run page ---------------------------------------------------------------
class kvm_run_io(Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hw(Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_ex(Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event), ("ex", kvm_run_ex),
                ("padding", ctypes.c_char * 256)]


class kvm_run(Struct):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64)]


# exit_reason values
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1
