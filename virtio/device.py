"""VirtioDevice: what every virtio device has, whatever carries it (virtio 1.2, 2.1-2.6 and 3.1).

Feature bits, the device status state machine, the device-specific configuration
space with its generation counter, and the virtqueues.  A device knows nothing of
its transport: the transport (virtio/pci.py) writes what the driver wrote, and
gives the device two things once:

  * `queue_events[i]`: an eventfd per queue, created here; the transport makes the
    driver's notification of queue i signal it (an ioeventfd: no vCPU exit);
  * `set_interrupt(fn)`: fn(vector_kind) raises the used-buffer notification of a
    queue (`fn(i)`) or the configuration-change notification (`fn(CONFIG)`).

A subclass (virtio/blk.py...) provides `device_id`, its feature bits, its config
bytes, and `activate()` / `deactivate()` to start and stop its I/O threads.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from vmm.memory import GuestMemory
from .counters import QueueCounters, totals
from .queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, ChainError, Queue, QueueError
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# Device status field (2.1)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Reserved feature bits (6)
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# Device IDs (5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

CONFIG = -1  # interrupt kind: configuration change (not a queue)

COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)


class VirtioDevice:
    device_id: int = 0
    name: str = "virtio"
    request_name: str = "descriptor chain"  # what a chain is to this device, for its log lines

    def __init__(self, mem: GuestMemory, *, num_queues: int, queue_size: int, features: int):
        self.mem = mem
        self.device_features = features | COMMON_FEATURES
        self.driver_features = 0
        self._status = 0
        self.config_generation = 0
        self.queues = [Queue(mem, queue_size) for _ in range(num_queues)]
        self.queue_events = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(num_queues)]
        self._interrupt: Callable[[int], None] = lambda kind: None
        self._lock = threading.RLock()
        # set by I/O threads without the lock (reset() holds it while joining them)
        self._needs_reset = False
        self.active = False
        self._guest_error = RateLimitedLog(log)  # what a driver did wrong (a subclass may log elsewhere)
        self._queue_failed = [False] * num_queues  # queues not served until the reset (fail_queue)
        self.counters = [QueueCounters() for _ in range(num_queues)]  # virtio/counters.py
        self.config_interrupts = 0  # configuration-change notifications sent

    # -- what the transport calls -----------------------------------------------------
    def set_interrupt(self, fn: Callable[[int], None]) -> None:
        self._interrupt = fn

    @property
    def status(self) -> int:
        return self._status | (VIRTIO_CONFIG_S_NEEDS_RESET if self._needs_reset else 0)

    def set_status(self, value: int) -> None:
        """The driver wrote the device status field (2.1.1, 3.1.1)."""
        with self._lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            if value & VIRTIO_CONFIG_S_FEATURES_OK and not self._status & VIRTIO_CONFIG_S_FEATURES_OK:
                if not self._features_acceptable():
                    value &= ~VIRTIO_CONFIG_S_FEATURES_OK  # the driver reads it back and gives up
            if value & VIRTIO_CONFIG_S_DRIVER_OK and not self._status & VIRTIO_CONFIG_S_DRIVER_OK:
                if not value & VIRTIO_CONFIG_S_FEATURES_OK:
                    log.warning("%s: DRIVER_OK without FEATURES_OK; ignored", self.name)
                    value &= ~VIRTIO_CONFIG_S_DRIVER_OK
                else:
                    value = self._activate(value)
            # NEEDS_RESET is the device's to set (self._needs_reset), whatever the driver wrote
            self._status = value & ~VIRTIO_CONFIG_S_NEEDS_RESET

    def _features_acceptable(self) -> bool:
        extra = self.driver_features & ~self.device_features
        if extra:
            log.warning("%s: driver accepted features we did not offer (%#x)", self.name, extra)
            return False
        if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            log.warning("%s: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)", self.name)
            return False
        return True

    def _activate(self, status: int) -> int:
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)
        try:
            for q in self.queues:
                q.event_idx = event_idx
                q.indirect = indirect
                if q.ready:
                    q.activate()
        except QueueError as e:
            log.warning("%s: cannot start: %s", self.name, e)
            self._needs_reset = True
            return status
        self.active = True
        self._queue_failed = [False] * len(self.queues)
        self.activate()
        return status

    def reset(self) -> None:
        """Back to the initial state: workers stopped, queues forgotten (2.4)."""
        with self._lock:
            if self.active:
                self.active = False
                self.deactivate()
            for q in self.queues:
                q.reset()
            for fd in self.queue_events:  # forget kicks from before the reset
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            self.driver_features = 0
            self._status = 0
            self._needs_reset = False

    def needs_reset(self, reason: str) -> None:
        """The device cannot go on until the driver resets it (2.1.2)."""
        log.warning("%s: device needs reset: %s", self.name, reason)
        self._needs_reset = True
        self.config_interrupts += 1
        self._interrupt(CONFIG)

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # -- device-specific configuration space ------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific configuration structure as the driver sees it now."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        log.debug("%s: config write at %#x ignored", self.name, offset)

    def config_changed(self) -> None:
        """Call after the device changed its config: new generation, and tell the driver."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self._status & VIRTIO_CONFIG_S_DRIVER_OK:
            self.config_interrupts += 1
            self._interrupt(CONFIG)

    # -- for subclasses ----------------------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        if 0 <= queue_index < len(self.counters):
            self.counters[queue_index].interrupts += 1
        self._interrupt(queue_index)

    def watch_queue(self, thread, index: int, handler: Callable[[], None]) -> None:
        """Run handler() on I/O thread `thread` each time the driver notifies queue `index`,
        counting the notifications (the eventfd's count: every kick since the last wake-up)."""
        counters = self.counters[index]

        def kicked(n: int) -> None:
            counters.notifications += n

        thread.add_eventfd(self.queue_events[index], handler, on_count=kicked)

    def counter_totals(self) -> dict:
        """requests, bytes, errors, notifications and interrupts over the queues (config-change
        interrupts included), and the device's own figures (`detail`) where it has more."""
        out = totals(self.counters)
        out["interrupts"] += self.config_interrupts
        detail = self.counter_detail()
        if detail:
            out["detail"] = detail
        return out

    def counter_detail(self) -> dict:
        """A device's figures beyond the common five (virtio-net's, the balloon's...)."""
        return {}

    def notify(self, queue_index: int) -> None:
        """The used-buffer notification of queue `queue_index`, if the driver wants one now
        (EVENT_IDX lets it say how often; without it, unless it set VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        if self.queues[queue_index].needs_notification():
            self.signal_used(queue_index)

    def publish_and_notify(self, queue_index: int) -> None:
        """Hand the used elements added so far to the driver (used.idx), then notify() it."""
        self.queues[queue_index].publish_used()
        self.notify(queue_index)

    def fail_queue(self, index: int, err: Exception) -> None:
        """Queue `index` is broken (a QueueError): not served again until the driver resets the
        device, which it is told to do (NEEDS_RESET)."""
        self._queue_failed[index] = True
        self.needs_reset(f"queue {index}: {err}")

    def _on_chain_error(self, queue: Queue, err: ChainError) -> None:
        """A chain the queue could not walk: returned with length 0 (what it was meant for is
        unknown).  A head the used ring cannot name would leave the driver waiting forever: that
        is a QueueError, and the caller's queue needs a reset."""
        if not err.completable:
            raise QueueError(f"cannot return {self.request_name} {err.head} to the driver: {err}")
        self._guest_error("%s: %s", self.name, err)
        queue.add_used(err.head, 0)

    def activate(self) -> None:
        """DRIVER_OK: start processing the queues."""

    def deactivate(self) -> None:
        """Reset: stop processing, and be done with every request, before returning."""

    def close(self) -> None:
        self.reset()
        for fd in self.queue_events:
            os.close(fd)
        self.queue_events = []
