"""The virtio-pci modern transport (OASIS virtio 1.2, 4.1 "Virtio Over PCI Bus").

A `VirtioPciDevice` carries any `VirtioDevice` as a PCI function that the host
bridge (vmm/pci/host.py) puts on bus 0.  It knows nothing of what the device does.

PCI identity (4.1.2): vendor 0x1AF4, device 0x1040 + virtio device ID, revision 1
(non-transitional: there is no legacy interface), subsystem vendor 0x1AF4 and
subsystem ID 0x1100 (QEMU's choice for its modern devices; the spec only asks
for 0x40 or more).  The class code follows the device type (block: mass storage
"other" 0x018000, net: Ethernet 0x020000, others: 0xFF0000, unclassified).

BAR 0, one 64-bit non-prefetchable memory BAR, each structure on its own page:

    0x0000  common configuration   struct virtio_pci_common_cfg (0x3C bytes)
    0x1000  ISR status             1 byte, read to clear
    0x2000  device configuration   VirtioDevice.read_config / write_config
    0x3000  notifications          queue i at 0x3000 + 4 * i (notify_off_multiplier 4,
                                   queue_notify_off i); an ioeventfd each
    next page   MSI-X table            (num_queues + 1) entries of 16 bytes
    next page   MSI-X PBA
    size: the next power of two (32 KiB up to 255 queues)

Capabilities, in this order from 0x40: COMMON, NOTIFY, ISR, DEVICE (omitted when
the device has no configuration), PCI_CFG (the configuration-space window into
the BARs, 4.1.4.9), then MSI-X with num_queues + 1 vectors.

Interrupts: with MSI-X enabled, a queue's interrupt fires the table entry the
driver put in its queue_msix_vector (config changes: config_msix_vector;
nothing for NO_VECTOR).  Otherwise INTx: the ISR bit is set (1 queue, 2 config)
and INTA is raised unless the Command register disables INTx; reading ISR clears
it and lowers the line.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass

from vmm.pci.config import CAP_ID_VENDOR, BarKind, Capability, PciConfigSpace
from vmm.pci.host import PciDevice
from vmm.pci.msix import MsixCapability, pba_bytes, table_bytes
from .device import (CONFIG, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET,
                     VIRTIO_ID_VSOCK, VirtioDevice)
from .queue import QueueError

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040  # + virtio device ID (4.1.2.1)
VIRTIO_PCI_REVISION = 1
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100

PCI_CLASS_STORAGE_OTHER = 0x018000
PCI_CLASS_NETWORK_ETHERNET = 0x020000
PCI_CLASS_COMMUNICATION_OTHER = 0x078000
PCI_CLASS_OTHER = 0xFF0000
# What lspci shows; drivers bind by vendor and device ID alone (rng and the balloon stay "other", as in QEMU).
CLASS_BY_DEVICE_ID = {VIRTIO_ID_BLOCK: PCI_CLASS_STORAGE_OTHER, VIRTIO_ID_NET: PCI_CLASS_NETWORK_ETHERNET,
                      VIRTIO_ID_CONSOLE: PCI_CLASS_COMMUNICATION_OTHER, VIRTIO_ID_VSOCK: PCI_CLASS_COMMUNICATION_OTHER}

# cfg_type of struct virtio_pci_cap (4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 1 << 0
VIRTIO_PCI_ISR_CONFIG = 1 << 1
NOTIFY_OFF_MULTIPLIER = 4

# struct virtio_pci_common_cfg (4.1.4.3): (name, offset, size)
COMMON_CFG_FIELDS = (
    ("device_feature_select", 0x00, 4),
    ("device_feature", 0x04, 4),
    ("driver_feature_select", 0x08, 4),
    ("driver_feature", 0x0C, 4),
    ("config_msix_vector", 0x10, 2),
    ("num_queues", 0x12, 2),
    ("device_status", 0x14, 1),
    ("config_generation", 0x15, 1),
    ("queue_select", 0x16, 2),
    ("queue_size", 0x18, 2),
    ("queue_msix_vector", 0x1A, 2),
    ("queue_enable", 0x1C, 2),
    ("queue_notify_off", 0x1E, 2),
    ("queue_desc", 0x20, 8),
    ("queue_driver", 0x28, 8),
    ("queue_device", 0x30, 8),
    ("queue_notify_data", 0x38, 2),  # virtio 1.2; meaningful with VIRTIO_F_NOTIF_CONFIG_DATA
    ("queue_reset", 0x3A, 2),  # virtio 1.2; meaningful with VIRTIO_F_RING_RESET (not offered)
)
COMMON_CFG_LENGTH = 0x3C
# byte offset -> (name, field offset, field size)
_FIELD_AT = {off + i: (name, off, size) for name, off, size in COMMON_CFG_FIELDS for i in range(size)}

PAGE = 0x1000

# struct virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length
_CAP_BODY = struct.Struct("<BBBBxxII")
VIRTIO_PCI_CAP_LENGTH = 16
VIRTIO_PCI_NOTIFY_CAP_LENGTH = 20
VIRTIO_PCI_CFG_CAP_LENGTH = 20
# offsets inside struct virtio_pci_cfg_cap
PCI_CFG_BAR = 4
PCI_CFG_OFFSET = 8
PCI_CFG_LENGTH = 12
PCI_CFG_DATA = 16


def _page_round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@dataclass(frozen=True)
class Bar0Layout:
    """Where each structure lies in BAR 0, for a device with `num_queues` queues."""

    num_queues: int
    common: int = 0x0000
    isr: int = 0x1000
    device: int = 0x2000
    notify: int = 0x3000

    @property
    def msix_vectors(self) -> int:
        return self.num_queues + 1

    @property
    def notify_length(self) -> int:
        return NOTIFY_OFF_MULTIPLIER * self.num_queues

    @property
    def msix_table(self) -> int:
        return self.notify + _page_round(self.notify_length)

    @property
    def msix_pba(self) -> int:
        return self.msix_table + _page_round(table_bytes(self.msix_vectors))

    @property
    def size(self) -> int:
        end = self.msix_pba + _page_round(pba_bytes(self.msix_vectors))
        return 1 << (end - 1).bit_length()

    def notify_address(self, bar_address: int, queue: int) -> int:
        return bar_address + self.notify + NOTIFY_OFF_MULTIPLIER * queue


class VirtioPciCap(Capability):
    """struct virtio_pci_cap (+ extra fields): where one structure lies in a BAR."""

    def __init__(self, cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b""):
        cap_len = VIRTIO_PCI_CAP_LENGTH + len(extra)
        super().__init__(CAP_ID_VENDOR, _CAP_BODY.pack(cap_len, cfg_type, bar, 0, offset, length) + extra)


class VirtioPciCfgCap(Capability):
    """VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9): the driver sets bar, offset and length, then
    reads or writes pci_cfg_data, and the device does that access in the BAR."""

    def __init__(self, transport: "VirtioPciDevice"):
        body = _CAP_BODY.pack(VIRTIO_PCI_CFG_CAP_LENGTH, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0) + bytes(4)
        writable = bytearray(len(body))
        for rel, size in ((PCI_CFG_BAR, 1), (PCI_CFG_OFFSET, 4), (PCI_CFG_LENGTH, 4), (PCI_CFG_DATA, 4)):
            writable[rel - 2 : rel - 2 + size] = b"\xff" * size
        super().__init__(CAP_ID_VENDOR, body, bytes(writable))
        self.transport = transport

    def _window(self) -> tuple[int, int] | None:
        """(offset, length) in BAR 0 if the driver's bar/offset/length make a valid access."""
        bar, offset, length = self.get(PCI_CFG_BAR, 1), self.get(PCI_CFG_OFFSET, 4), self.get(PCI_CFG_LENGTH, 4)
        if bar != 0 or length not in (1, 2, 4) or offset % length or offset + length > self.transport.layout.size:
            return None
        return offset, length

    def before_read(self, rel: int, size: int) -> None:
        if rel + size <= PCI_CFG_DATA:
            return
        window = self._window()
        if window is not None:
            offset, length = window
            self.put(PCI_CFG_DATA, length, self.transport.bar_read(0, offset, length))

    def after_write(self, rel: int, size: int) -> None:
        if rel + size <= PCI_CFG_DATA:
            return
        window = self._window()
        if window is not None:
            offset, length = window
            self.transport.bar_write(0, offset, length, self.get(PCI_CFG_DATA, length))


class VirtioPciDevice(PciDevice):
    """`device` behind the virtio-pci modern interface.

    `irq` is the machine's IrqRouter (MSI-X vectors are allocated from it, INTx
    goes through its set_line); `vm` gives `ioeventfd(...)`.  The transport owns
    the device from here on: `close()` closes it too.
    """

    def __init__(self, device: VirtioDevice, *, irq, vm):
        self.device, self.irq, self.vm = device, irq, vm
        self.name = device.name  # "virtio-blk": its BARs' name on the buses
        self.num_queues = len(device.queues)
        self.layout = layout = Bar0Layout(self.num_queues)
        self.device_cfg_length = len(device.config_bytes())
        if self.device_cfg_length > PAGE:
            raise ValueError(f"{device.name}: device configuration larger than {PAGE} bytes")
        self._lock = threading.RLock()  # common configuration, notifiers
        self._isr_lock = threading.Lock()  # ISR and the INTx line (taken from I/O threads)
        self._isr = 0
        self._intx_level = False
        self._ioeventfds: list[tuple[int, int]] = []  # (fd, address) registered with KVM
        self._reset_transport_state()

        self.config = PciConfigSpace(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
            class_code=CLASS_BY_DEVICE_ID.get(device.device_id, PCI_CLASS_OTHER),
            revision_id=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
        )
        self.config.add_bar(0, layout.size, BarKind.MEM64)
        add = self.config.add_capability
        add(VirtioPciCap(VIRTIO_PCI_CAP_COMMON_CFG, 0, layout.common, COMMON_CFG_LENGTH))
        add(VirtioPciCap(VIRTIO_PCI_CAP_NOTIFY_CFG, 0, layout.notify, layout.notify_length,
                         struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        add(VirtioPciCap(VIRTIO_PCI_CAP_ISR_CFG, 0, layout.isr, 1))
        if self.device_cfg_length:
            add(VirtioPciCap(VIRTIO_PCI_CAP_DEVICE_CFG, 0, layout.device, self.device_cfg_length))
        add(VirtioPciCfgCap(self))
        self.msix = MsixCapability(irq, layout.msix_vectors, table_bar=0, table_offset=layout.msix_table,
                                   pba_bar=0, pba_offset=layout.msix_pba)
        add(self.msix)
        self.msix.on_enable_change = lambda enabled: self._update_intx()
        self.config.on_command_change = lambda old, new: self._update_intx()
        device.set_interrupt(self._interrupt)

    def _reset_transport_state(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.num_queues

    # -- BAR 0 -----------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        layout = self.layout
        if index != 0 or offset < 0 or size not in (1, 2, 4, 8) or offset + size > layout.size:
            return 0
        if offset < layout.isr:
            return self._common_read(offset, size)
        if offset < layout.device:
            return self._read_isr() if offset == layout.isr else 0
        if offset < layout.notify:
            return self.device.read_config(offset - layout.device, size)
        if offset < layout.msix_table:
            return 0  # notifications are write-only
        if offset < layout.msix_pba:
            return self.msix.read_table(offset - layout.msix_table, size)
        return self.msix.read_pba(offset - layout.msix_pba, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        layout = self.layout
        if index != 0 or offset < 0 or size not in (1, 2, 4, 8) or offset + size > layout.size:
            return
        value &= _ones(size)
        if offset < layout.isr:
            self._common_write(offset, size, value)
        elif offset < layout.device:
            pass  # ISR status is read-only
        elif offset < layout.notify:
            self.device.write_config(offset - layout.device, size, value)
        elif offset < layout.msix_table:
            self._notify(offset - layout.notify)
        elif offset < layout.msix_pba:
            self.msix.write_table(offset - layout.msix_table, size, value)
        # the PBA is read-only

    # -- common configuration ------------------------------------------------------------
    def _common_read(self, offset: int, size: int) -> int:
        value = 0
        with self._lock:
            fields: dict[str, int] = {}
            for i in range(size):
                found = _FIELD_AT.get(offset + i)
                if found is None:
                    continue
                name, field_offset, _ = found
                if name not in fields:
                    fields[name] = self._get(name)
                value |= ((fields[name] >> (8 * (offset + i - field_offset))) & 0xFF) << (8 * i)
        return value

    def _common_write(self, offset: int, size: int, value: int) -> None:
        """A write within one field (whole, or part: 32-bit halves of the 64-bit fields)."""
        found = _FIELD_AT.get(offset)
        if found is None or offset + size > found[1] + found[2]:
            log.debug("%s: ignored %d-byte common configuration write at %#x", self.device.name, size, offset)
            return
        name, field_offset, _ = found
        shift = 8 * (offset - field_offset)
        mask = _ones(size) << shift
        with self._lock:
            merged = (self._get(name) & ~mask) | (value << shift)
            self._set(name, merged)

    def _selected_queue(self):
        if self.queue_select < self.num_queues:
            return self.device.queues[self.queue_select]
        return None

    def _get(self, name: str) -> int:
        dev, q, sel = self.device, self._selected_queue(), self.queue_select
        match name:
            case "device_feature_select":
                return self.device_feature_select
            case "device_feature":
                return self._feature_word(dev.device_features, self.device_feature_select)
            case "driver_feature_select":
                return self.driver_feature_select
            case "driver_feature":
                return self._feature_word(dev.driver_features, self.driver_feature_select)
            case "config_msix_vector":
                return self.config_vector
            case "num_queues":
                return self.num_queues
            case "device_status":
                return dev.status
            case "config_generation":
                return dev.config_generation
            case "queue_select":
                return sel
            case "queue_msix_vector":
                return self.queue_vectors[sel] if q is not None else VIRTIO_MSI_NO_VECTOR
        if q is None:
            return 0
        match name:
            case "queue_size":
                return q.size
            case "queue_enable":
                return int(q.ready)
            case "queue_notify_off" | "queue_notify_data":
                return sel
            case "queue_desc":
                return q.desc_table
            case "queue_driver":
                return q.avail_ring
            case "queue_device":
                return q.used_ring
        return 0  # queue_reset

    def _set(self, name: str, value: int) -> None:
        q = self._selected_queue()
        match name:
            case "device_feature_select":
                self.device_feature_select = value
            case "driver_feature_select":
                self.driver_feature_select = value
            case "driver_feature":
                self._write_driver_features(value)
            case "config_msix_vector":
                self.config_vector = self._valid_vector(value)
            case "device_status":
                self._write_status(value)
            case "queue_select":
                self.queue_select = value
            case "queue_msix_vector" if q is not None:
                self.queue_vectors[self.queue_select] = self._valid_vector(value)
            case "queue_enable" if q is not None:
                self._enable_queue(q, value)
            case "queue_size" if q is not None and not q.ready:
                q.size = value
            case "queue_desc" if q is not None and not q.ready:
                q.desc_table = value
            case "queue_driver" if q is not None and not q.ready:
                q.avail_ring = value
            case "queue_device" if q is not None and not q.ready:
                q.used_ring = value
            case _:
                pass  # read-only fields, queue_reset (VIRTIO_F_RING_RESET is not offered), or no queue

    @staticmethod
    def _feature_word(features: int, select: int) -> int:
        return (features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0

    def _write_driver_features(self, value: int) -> None:
        dev, select = self.device, self.driver_feature_select
        if select >= 2 or dev.status & VIRTIO_CONFIG_S_FEATURES_OK:
            return  # no such bits; or features already negotiated
        shift = 32 * select
        dev.driver_features = (dev.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _valid_vector(self, vector: int) -> int:
        """A vector the table has, else NO_VECTOR (which the driver reads back, 4.1.5.1.2)."""
        return vector if vector < self.msix.size else VIRTIO_MSI_NO_VECTOR

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
        else:
            self.device.set_status(value)

    def _enable_queue(self, queue, value: int) -> None:
        if value != 1 or queue.ready:
            return  # the driver must not write 0 (4.1.4.3.2); queue_reset is the way
        try:
            queue.ready = True
        except QueueError as e:
            self.device.needs_reset(f"queue {self.queue_select}: {e}")

    def reset(self) -> None:
        """Device reset (device_status = 0): the device's and this transport's per-queue state."""
        with self._lock:
            self.device.set_status(0)
            self._reset_transport_state()
        with self._isr_lock:
            self._isr = 0
            self._update_intx_locked()

    # -- notifications ---------------------------------------------------------------------
    def _notify(self, offset: int) -> None:
        """A notification that reached us rather than the ioeventfd: signal the queue's eventfd."""
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        events = self.device.queue_events
        if rest == 0 and index < len(events):
            os.eventfd_write(events[index], 1)

    def bar_mapped(self, index: int, address: int | None) -> None:
        """BAR 0 moved (or decode switched): the notify ioeventfds follow it."""
        if index != 0:
            return
        with self._lock:
            self._remove_ioeventfds()
            if address is not None:
                for queue, fd in enumerate(self.device.queue_events):
                    notify = self.layout.notify_address(address, queue)
                    try:
                        # Length 2, no datamatch: the driver's 16-bit store of the queue index.
                        self.vm.ioeventfd(fd, notify, 2)
                    except OSError as e:
                        log.warning("%s: no ioeventfd at %#x (notifications will exit): %s",
                                    self.device.name, notify, e)
                        continue
                    self._ioeventfds.append((fd, notify))

    def _remove_ioeventfds(self) -> None:
        for fd, address in self._ioeventfds:
            try:
                self.vm.ioeventfd(fd, address, 2, deassign=True)
            except OSError as e:
                log.warning("%s: cannot remove ioeventfd at %#x: %s", self.device.name, address, e)
        self._ioeventfds = []

    # -- interrupts ----------------------------------------------------------------------
    def _interrupt(self, kind: int) -> None:
        """The device's used-buffer (kind = queue index) or config-change (CONFIG) notification."""
        if self.msix.enabled:
            if kind == CONFIG:
                vector = self.config_vector
            elif 0 <= kind < self.num_queues:
                vector = self.queue_vectors[kind]
            else:
                return
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vector)
            return
        with self._isr_lock:
            self._isr |= VIRTIO_PCI_ISR_CONFIG if kind == CONFIG else VIRTIO_PCI_ISR_QUEUE
            self._update_intx_locked()

    def _read_isr(self) -> int:
        with self._isr_lock:
            value, self._isr = self._isr, 0
            self._update_intx_locked()
        return value

    def _update_intx(self) -> None:
        with self._isr_lock:
            self._update_intx_locked()

    def _update_intx_locked(self) -> None:
        """INTA follows ISR, unless MSI-X is on or the Command register disables INTx."""
        pending = self._isr != 0
        self.config.set_interrupt_status(pending)
        level = pending and not self.msix.enabled and not self.config.intx_disabled and self.intx_gsi is not None
        if level != self._intx_level:
            self._intx_level = level
            self.irq.set_line(self.intx_gsi, level)

    @property
    def isr(self) -> int:
        return self._isr

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the ioeventfds, lower INTx, close the device (its workers and eventfds)."""
        with self._lock:
            self._remove_ioeventfds()
        self.device.set_interrupt(lambda kind: None)
        with self._isr_lock:
            self._isr = 0
            self._update_intx_locked()
        self.device.close()
