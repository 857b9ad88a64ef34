"""ctypes bindings to the KVM API: ioctl numbers, structures, and Kvm / Vm / Vcpu fd objects.

Never the fcntl module: ctypes releases the GIL around KVM_RUN."""

from .ioctl import IoctlError
from .kvm import Kvm

__all__ = ["Kvm", "IoctlError"]
