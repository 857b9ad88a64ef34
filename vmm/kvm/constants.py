"""ioctl request numbers and capabilities of the KVM API (Documentation/virt/kvm/api.rst)."""

from __future__ import annotations

import ctypes

from . import structs as s
from .ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE

# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, s.kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, s.kvm_msi)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.kvm_clock_data)

# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_XSAVE = 55
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136

# what pyvmm relies on, with a word on why (printed by `pyvmm check`)
REQUIRED_CAPS = {
    KVM_CAP_USER_MEMORY: "guest RAM from our memfd mapping",
    KVM_CAP_IRQCHIP: "in-kernel PIC, IOAPIC and local APICs",
    KVM_CAP_PIT2: "in-kernel PIT",
    KVM_CAP_IRQ_ROUTING: "MSI routes for virtio interrupts",
    KVM_CAP_IRQFD: "interrupts from I/O threads without a vCPU exit",
    KVM_CAP_IOEVENTFD: "queue notifications without a vCPU exit to Python",
    KVM_CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2",
    KVM_CAP_SET_TSS_ADDR: "Intel real-mode TSS",
    KVM_CAP_IMMEDIATE_EXIT: "stopping vCPUs without races",
}
OPTIONAL_CAPS = {
    KVM_CAP_SIGNAL_MSI: "injecting an MSI directly",
    KVM_CAP_SET_IDENTITY_MAP_ADDR: "placing the EPT identity map",
    KVM_CAP_READONLY_MEM: "read-only memory slots (firmware)",
    KVM_CAP_IRQFD_RESAMPLE: "level-triggered INTx through irqfd",
    KVM_CAP_TSC_CONTROL: "setting the guest TSC frequency",
    KVM_CAP_KVMCLOCK_CTRL: "kvm-clock pause notification",
}
CAP_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_CAP_")}
