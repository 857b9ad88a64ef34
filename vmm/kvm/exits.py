"""What KVM_RUN came back with, as typed values.  The KVM layer returns these; the
vCPU loop (vmm/vcpu.py) decides what each means."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class IoIn:
    """`in` from `port`: `count` items of `size` bytes; answer with Vcpu.complete_io_in."""
    port: int
    size: int
    count: int


@dataclass(slots=True)
class IoOut:
    port: int
    size: int
    data: bytes  # size * count bytes (count > 1 for rep outs)


@dataclass(slots=True)
class MmioRead:
    """A load from `addr`; answer with Vcpu.complete_mmio_read."""
    addr: int
    size: int


@dataclass(slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """A triple fault (or the like): the vCPU cannot go on."""


@dataclass(slots=True)
class SystemEvent:
    type: int  # KVM_SYSTEM_EVENT_SHUTDOWN / RESET / CRASH
    data: tuple


@dataclass(slots=True)
class InternalError:
    suberror: int  # KVM_INTERNAL_ERROR_EMULATION = 1: the emulator met an instruction it lacks
    data: tuple


@dataclass(slots=True)
class FailEntry:
    reason: int
    cpu: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned early because a signal arrived or immediate_exit was set."""


@dataclass(slots=True)
class Unknown:
    reason: int
    detail: int = 0
