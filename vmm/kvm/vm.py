"""A VM fd: memory slots, the in-kernel irqchip and PIT, interrupt routes, eventfds."""

from __future__ import annotations

import ctypes
import os

from . import constants as c
from . import structs as s
from .ioctl import ioctl


class Vm:
    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    # -- memory ------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                               memory_size=size, userspace_addr=host_addr)
        ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region, name="KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr, name="KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr), name="KVM_SET_IDENTITY_MAP_ADDR")

    # -- interrupt controllers ------------------------------------------------------
    def create_irqchip(self) -> None:
        ioctl(self.fd, c.KVM_CREATE_IRQCHIP, name="KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, c.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags), name="KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(irq=irq, level=int(level)), name="KVM_IRQ_LINE")

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None:
        ioctl(self.fd, c.KVM_SET_GSI_ROUTING, s.irq_routing(entries), name="KVM_SET_GSI_ROUTING")

    def signal_msi(self, address: int, data: int) -> int:
        msi = s.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, c.KVM_SIGNAL_MSI, msi, name="KVM_SIGNAL_MSI")

    # -- eventfds ---------------------------------------------------------------------
    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False, resamplefd: int | None = None) -> None:
        flags = c_flags = 0
        if deassign:
            flags |= s.KVM_IRQFD_FLAG_DEASSIGN
        if resamplefd is not None:
            flags |= s.KVM_IRQFD_FLAG_RESAMPLE
            c_flags = resamplefd
        ioctl(self.fd, c.KVM_IRQFD, s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=c_flags), name="KVM_IRQFD")

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= s.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fd, c.KVM_IOEVENTFD, arg, name="KVM_IOEVENTFD")

    # -- the guest's clock -----------------------------------------------------------------
    def get_clock(self) -> int:
        """kvm-clock's current value for the VM, in ns (KVM_GET_CLOCK)."""
        data = s.kvm_clock_data()
        ioctl(self.fd, c.KVM_GET_CLOCK, data, name="KVM_GET_CLOCK")
        return data.clock

    def set_clock(self, clock: int) -> None:
        """Make kvm-clock read `clock` ns from now on (KVM_SET_CLOCK): a paused VM's clock goes on
        from where it stopped."""
        ioctl(self.fd, c.KVM_SET_CLOCK, s.kvm_clock_data(clock=clock), name="KVM_SET_CLOCK")

    # -- vCPUs ------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int):
        from .vcpu import Vcpu

        fd = ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
        return Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
