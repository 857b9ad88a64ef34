"""One thread per vCPU: KVM_RUN, then hand the exit to the port-I/O or MMIO bus.

Fast paths never come here: queue notifications are ioeventfds and interrupts are
irqfds, both inside KVM.  What reaches Python is configuration and slow paths
(the UART, PCI config space, power management).
"""

from __future__ import annotations

import logging
import signal
import threading

from kernel.x86 import translate
from .kvm import exits
from .kvm import structs as s
from .threadname import set_os_thread_name

log = logging.getLogger(__name__)

# signal used to knock a vCPU thread out of KVM_RUN (with immediate_exit set first)
KICK_SIGNAL = signal.SIGUSR1


class VcpuThread(threading.Thread):
    def __init__(self, vcpu, *, pio, mmio, mem, lifecycle, gate=None, on_exit=None, stats=None):
        super().__init__(name=f"vcpu{vcpu.id}", daemon=True)
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.mem = mem
        self.lifecycle = lifecycle
        self.gate = gate  # a vmm/pause.py PauseGate: parked there while the VM is paused
        self.on_exit = on_exit  # optional hook(vcpu_thread, exit) -> bool (handled), for tests and tools
        self.exits = 0
        self.exit_counts: dict[type, int] = {}  # exits by kind (a vmm.kvm.exits class), for the API's counters
        self._timed_run = None  # --stats: a TimedRun in place of vcpu.run, recording each exit into `stats`
        if stats is not None:
            from .exit_stats import TimedRun

            self._timed_run = TimedRun(vcpu.run, stats, pio=pio, mmio=mmio)

    def run(self) -> None:
        set_os_thread_name(self.name)
        try:
            self._loop()
        except Exception as e:  # our own bug: say what and where, stop the VM with status 1
            log.exception("vcpu%d: unexpected error", self.vcpu.id)
            self.lifecycle.stop(1, f"vcpu{self.vcpu.id}: internal error in pyvmm: {e}")
        finally:
            if self._timed_run is not None:
                self._timed_run.finish()

    def kick(self) -> None:
        """Make KVM_RUN return (now if it is running, at once if it is about to)."""
        self.vcpu.request_stop()
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def _loop(self) -> None:
        vcpu, pio, mmio, lifecycle = self.vcpu, self.pio, self.mmio, self.lifecycle
        IoOut, IoIn, MmioRead, MmioWrite = exits.IoOut, exits.IoIn, exits.MmioRead, exits.MmioWrite
        run = vcpu.run if self._timed_run is None else self._timed_run
        gate = self.gate
        counts = self.exit_counts
        while not lifecycle.stopping:
            if gate is not None and gate.closed:
                gate.park(vcpu, lifecycle)
                continue
            ex = run()
            self.exits += 1
            kind = type(ex)
            counts[kind] = counts.get(kind, 0) + 1
            if self.on_exit is not None and self.on_exit(self, ex):
                continue
            if kind is IoOut:
                size, data = ex.size, ex.data
                for i in range(0, len(data), size):
                    pio.write(ex.port, size, int.from_bytes(data[i : i + size], "little"))
            elif kind is IoIn:
                size = ex.size
                vcpu.complete_io_in(b"".join(pio.read(ex.port, size).to_bytes(size, "little")
                                             for _ in range(ex.count)))
            elif kind is MmioWrite:
                mmio.write(ex.addr, len(ex.data), int.from_bytes(ex.data, "little"))
            elif kind is MmioRead:
                vcpu.complete_mmio_read(mmio.read(ex.addr, ex.size).to_bytes(ex.size, "little"))
            elif kind is exits.Interrupted or kind is exits.Hlt:
                continue
            elif kind is exits.SystemEvent:
                self._system_event(ex)
            else:
                self._fatal(ex)
                return

    def _system_event(self, ex) -> None:
        if ex.type == s.KVM_SYSTEM_EVENT_SHUTDOWN:
            self.lifecycle.power_off()
        elif ex.type == s.KVM_SYSTEM_EVENT_RESET:
            self.lifecycle.reset()
        else:
            self._fatal(ex)

    def _fatal(self, ex) -> None:
        what = {
            exits.InternalError: "KVM internal error",
            exits.Shutdown: "triple fault (KVM_EXIT_SHUTDOWN)",
            exits.FailEntry: "VM entry failed",
            exits.SystemEvent: "guest crash event",
        }.get(type(ex), "unexpected exit")
        report = f"vcpu{self.vcpu.id}: {what}: {ex}\n{self.describe_state()}"
        self.lifecycle.stop(1, report)

    def describe_state(self) -> str:
        """Registers and the instruction bytes at RIP, for crash reports."""
        try:
            r = self.vcpu.get_regs()
            sr = self.vcpu.get_sregs()
        except OSError as e:
            return f"  (registers unavailable: {e})"
        names = [n for n, _ in s.kvm_regs._fields_]
        lines = []
        for i in range(0, len(names), 4):
            lines.append("  " + "  ".join(f"{n.upper():>6}={getattr(r, n):016x}" for n in names[i : i + 4]))
        lines.append(f"  CR0={sr.cr0:#x} CR3={sr.cr3:#x} CR4={sr.cr4:#x} EFER={sr.efer:#x} "
                     f"CS={sr.cs.selector:#x}(dpl {sr.cs.dpl}, l {sr.cs.l}) SS={sr.ss.selector:#x}")
        code = "unreadable"
        try:
            phys = translate(self.mem, sr.cr0, sr.cr3, sr.cr4, sr.efer, sr.cs.base + r.rip)
            if phys is not None:
                n = min(16, 4096 - (phys & 0xFFF))
                code = self.mem.read(phys, n).hex(" ")
                code = f"{code} (gpa {phys:#x})"
        except Exception:
            pass
        lines.append(f"  code at RIP: {code}")
        return "\n".join(lines)
