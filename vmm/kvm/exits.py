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
    """`out` to `port`: `data` holds every item written."""

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
    """A store of `data` to `addr`."""

    addr: int
    data: bytes


@dataclass(slots=True)
class Hlt:
    """The vCPU executed HLT (KVM reports it only without an in-kernel irqchip)."""


@dataclass(slots=True)
class Shutdown:
    """A triple fault (or the like): the vCPU cannot go on."""


@dataclass(slots=True)
class SystemEvent:
    """KVM reports a system event of the guest: shutdown, reset or crash (`type`)."""

    type: int  # KVM_SYSTEM_EVENT_SHUTDOWN / RESET / CRASH
    data: tuple


@dataclass(slots=True)
class InternalError:
    """KVM could not go on with the guest (an instruction its emulator lacks...)."""

    suberror: int  # KVM_INTERNAL_ERROR_EMULATION = 1: the emulator met an instruction it lacks
    data: tuple


@dataclass(slots=True)
class FailEntry:
    """The CPU refused to enter the guest (invalid state)."""

    reason: int
    cpu: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned early because a signal arrived or immediate_exit was set."""


@dataclass(slots=True)
class Unknown:
    """An exit reason this layer does not decode."""

    reason: int
    detail: int = 0
