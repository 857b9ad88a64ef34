"""/dev/kvm: the system fd."""

from __future__ import annotations

import os

from . import constants as c
from . import structs as s
from .ioctl import ioctl


class Kvm:
    def __init__(self, path: str = "/dev/kvm"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.path = path

    def api_version(self) -> int:
        return ioctl(self.fd, c.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else NR_VCPUS, else 4)."""
        return self.check_extension(c.KVM_CAP_MAX_VCPUS) or self.check_extension(c.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        nent = 256
        while True:
            buf = s.cpuid2(nent)
            try:
                ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf, name="KVM_GET_SUPPORTED_CPUID")
            except OSError as e:
                if e.errno == 7 and nent < 4096:  # E2BIG: a bigger buffer
                    nent *= 2
                    continue
                raise
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf.entries[: buf.nent]]

    def create_vm(self):
        from .vm import Vm

        return Vm(self, ioctl(self.fd, c.KVM_CREATE_VM, 0, name="KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
