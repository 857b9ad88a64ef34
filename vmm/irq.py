"""Interrupt routes: the in-kernel irqchip pins, and MSI routes reached through irqfds.

KVM_SET_GSI_ROUTING replaces the whole table, so this object owns it: the PC's
irqchip routes (as the MADT describes them: ISA IRQ 0 is IOAPIC pin 2) and one MSI
route per allocated `MsiVector`.  A vector's irqfd stays bound to its GSI; the
device signals it with one eventfd write from its I/O thread, and KVM injects the
MSI the guest programmed, with no exit.  Masking (MSI-X) is honoured here: a
masked vector records the interrupt as pending and fires it on unmask.
"""

from __future__ import annotations

import os
import threading

from .kvm import structs as s

IOAPIC_PINS = 24
PIC_PINS = 16
FIRST_MSI_GSI = IOAPIC_PINS


def irqchip_routes() -> list[s.kvm_irq_routing_entry]:
    """GSI 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC; ISA IRQ 0 (the PIT) arrives
    at IOAPIC pin 2, as the MADT's interrupt source override says; GSI 2 is the PIC cascade."""
    entries = []

    def add(gsi: int, chip: int, pin: int) -> None:
        e = s.kvm_irq_routing_entry(gsi=gsi, type=s.KVM_IRQ_ROUTING_IRQCHIP)
        e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        entries.append(e)

    for gsi in range(PIC_PINS):
        if gsi != 2:
            add(gsi, s.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else s.KVM_IRQCHIP_PIC_SLAVE, gsi % 8)
    for gsi in range(IOAPIC_PINS):
        if gsi != 2:
            add(gsi, s.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi)
    return entries


class MsiVector:
    """One MSI (or MSI-X table entry): a GSI with an MSI route and an irqfd."""

    def __init__(self, router: "IrqRouter", gsi: int):
        self.router = router
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.address = 0
        self.data = 0
        self.masked = True
        self.pending = False
        self._lock = threading.Lock()

    def trigger(self) -> None:
        """Raise the interrupt (from any thread)."""
        with self._lock:
            if self.masked or self.address == 0:
                self.pending = True
                return
        os.eventfd_write(self.fd, 1)

    def program(self, address: int, data: int, masked: bool) -> None:
        """The guest (re)programmed the message or its mask bit."""
        with self._lock:
            changed = (address, data) != (self.address, self.data)
            self.address, self.data = address, data
            fire = self.pending and not masked and address != 0
            self.masked = masked
            if fire:
                self.pending = False
        if changed:
            self.router.commit()
        if fire:
            os.eventfd_write(self.fd, 1)


class IrqRouter:
    def __init__(self, vm):
        self.vm = vm
        self.vectors: list[MsiVector] = []
        self._lock = threading.Lock()
        self.commit()

    def allocate(self) -> MsiVector:
        with self._lock:
            vector = MsiVector(self, FIRST_MSI_GSI + len(self.vectors))
            self.vectors.append(vector)
        self.commit()
        self.vm.irqfd(vector.fd, vector.gsi)
        return vector

    def commit(self) -> None:
        """Hand KVM the whole table."""
        with self._lock:
            entries = irqchip_routes()
            for v in self.vectors:
                e = s.kvm_irq_routing_entry(gsi=v.gsi, type=s.KVM_IRQ_ROUTING_MSI)
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = v.address & 0xFFFFFFFF, v.address >> 32, v.data
                entries.append(e)
            self.vm.set_gsi_routing(entries)

    def set_line(self, gsi: int, level: bool) -> None:
        """An irqchip input (ISA IRQs, PCI INTx) to a level."""
        self.vm.irq_line(gsi, level)

    def close(self) -> None:
        for v in self.vectors:
            try:
                self.vm.irqfd(v.fd, v.gsi, deassign=True)
            except OSError:
                pass
            os.close(v.fd)
        self.vectors = []
