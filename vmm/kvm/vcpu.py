"""A vCPU fd and its mmap'ed kvm_run page; KVM_RUN returns a typed exit."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import constants as c
from . import exits
from . import structs as s
from .ioctl import IoctlError, ioctl


class Vcpu:
    def __init__(self, vm, vcpu_id: int, fd: int, mmap_size: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = s.kvm_run.from_buffer(self._page)
        self._io = self.run_page.exit.io
        self._mmio = self.run_page.exit.mmio

    # -- running ------------------------------------------------------------------------
    def run(self):
        """KVM_RUN once; returns an exit from vmm.kvm.exits."""
        try:
            ioctl(self.fd, c.KVM_RUN, name="KVM_RUN")
        except IoctlError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return exits.Interrupted()
            raise
        run = self.run_page
        reason = run.exit_reason
        if reason == s.KVM_EXIT_IO:
            io = self._io
            if io.direction == s.KVM_EXIT_IO_OUT:
                n = io.size * io.count
                return exits.IoOut(io.port, io.size, self._page[io.data_offset : io.data_offset + n])
            return exits.IoIn(io.port, io.size, io.count)
        if reason == s.KVM_EXIT_MMIO:
            m = self._mmio
            if m.is_write:
                return exits.MmioWrite(m.phys_addr, bytes(m.data[: m.len]))
            return exits.MmioRead(m.phys_addr, m.len)
        if reason == s.KVM_EXIT_HLT:
            return exits.Hlt()
        if reason == s.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown()
        if reason == s.KVM_EXIT_INTR:
            return exits.Interrupted()
        if reason == s.KVM_EXIT_SYSTEM_EVENT:
            ev = run.exit.system_event
            return exits.SystemEvent(ev.type, tuple(ev.data[: min(ev.ndata, 16)]))
        if reason == s.KVM_EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            return exits.InternalError(ie.suberror, tuple(ie.data[: min(ie.ndata, 16)]))
        if reason == s.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            return exits.FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == s.KVM_EXIT_UNKNOWN:
            return exits.Unknown(reason, run.exit.hw.hardware_exit_reason)
        return exits.Unknown(reason)

    def complete_io_in(self, data: bytes) -> None:
        """The bytes an IoIn reads (size * count of them), before the next run()."""
        off = self._io.data_offset
        self._page[off : off + len(data)] = data

    def complete_mmio_read(self, data: bytes) -> None:
        ctypes.memmove(self._mmio.data, data, len(data))

    def request_stop(self) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        self.run_page.immediate_exit = 1

    def clear_stop(self) -> None:
        """Let KVM_RUN run again (after a pause)."""
        self.run_page.immediate_exit = 0

    def kvmclock_ctrl(self) -> bool:
        """Tell the guest's kvm-clock this vCPU was paused by the host (KVM_KVMCLOCK_CTRL), so its
        soft-lockup watchdog does not take the pause for a hang; False where the guest has no
        kvm-clock on this vCPU (EINVAL) or KVM lacks the call."""
        try:
            ioctl(self.fd, c.KVM_KVMCLOCK_CTRL, name="KVM_KVMCLOCK_CTRL")
        except IoctlError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return False
            raise
        return True

    # -- state ----------------------------------------------------------------------------
    def _get(self, request: int, struct, name: str):
        value = struct()
        ioctl(self.fd, request, value, name=name)
        return value

    def get_regs(self) -> s.kvm_regs:
        return self._get(c.KVM_GET_REGS, s.kvm_regs, "KVM_GET_REGS")

    def set_regs(self, regs: s.kvm_regs) -> None:
        ioctl(self.fd, c.KVM_SET_REGS, regs, name="KVM_SET_REGS")

    def get_sregs(self) -> s.kvm_sregs:
        return self._get(c.KVM_GET_SREGS, s.kvm_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        ioctl(self.fd, c.KVM_SET_SREGS, sregs, name="KVM_SET_SREGS")

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        ioctl(self.fd, c.KVM_SET_FPU, fpu, name="KVM_SET_FPU")

    def get_lapic(self) -> bytes:
        return bytes(self._get(c.KVM_GET_LAPIC, s.kvm_lapic_state, "KVM_GET_LAPIC").regs)

    def set_lapic(self, regs: bytes) -> None:
        state = s.kvm_lapic_state()
        ctypes.memmove(state.regs, regs, min(len(regs), 1024))
        ioctl(self.fd, c.KVM_SET_LAPIC, state, name="KVM_SET_LAPIC")

    def set_cpuid(self, entries) -> None:
        """entries: (function, index, flags, eax, ebx, ecx, edx) tuples or objects with those fields."""
        buf = s.cpuid2(len(entries))
        for slot, e in zip(buf.entries, entries):
            if isinstance(e, tuple):
                (slot.function, slot.index, slot.flags, slot.eax, slot.ebx, slot.ecx, slot.edx) = e
            else:
                for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                    setattr(slot, f, getattr(e, f))
        ioctl(self.fd, c.KVM_SET_CPUID2, buf, name="KVM_SET_CPUID2")

    def get_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The CPUID table KVM holds for this vCPU (some KVMs merge in bits of their own)."""
        nent = 256
        while True:
            buf = s.cpuid2(nent)
            try:
                ioctl(self.fd, c.KVM_GET_CPUID2, buf, name="KVM_GET_CPUID2")
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf.entries[: buf.nent]]

    def set_msrs(self, values: dict[int, int]) -> None:
        m = s.msrs(values)
        done = ioctl(self.fd, c.KVM_SET_MSRS, m, name="KVM_SET_MSRS")
        if done != len(values):
            bad = list(values)[done]
            raise IoctlError(f"KVM_SET_MSRS (MSR {bad:#x} refused)", errno.EINVAL)

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state=state), name="KVM_SET_MP_STATE")

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.run_page, self._io, self._mmio
        self._page.close()
        os.close(self.fd)
        self.fd = -1
