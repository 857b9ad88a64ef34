"""virtio-balloon: a traditional memory balloon (OASIS virtio 1.2, section 5.5).

The host sets a target, `num_pages` (4 KiB pages the guest should give up), and raises a
configuration-change interrupt (`set_target`); the guest's driver allocates that many pages and
sends their frame numbers on inflateq, or frees some and sends them on deflateq, then writes how
many it holds to `actual`.  Inflated pages are given back to the host for real: holes are punched
in the guest RAM memfd (virtio/backends/ramdiscard.py), so the memfd's blocks, the process's RSS
and KVM's mappings of them go; a page the guest uses again (after a deflate) faults in zeroed.
Deflate asks nothing of the host.

Optional, by feature bit:
  * VIRTIO_BALLOON_F_STATS_VQ (`stats_interval`): the driver puts one buffer of statistics on
    statsq; the device keeps it and returns it every `stats_interval` seconds (a timerfd), which
    makes the driver send fresh ones.  `stats()` has the last and when they came.
  * VIRTIO_BALLOON_F_PAGE_REPORTING (`free_page_reporting`): the driver reports runs of free
    pages (order >= 9 in Linux: 2 MiB) on reporting_vq; their holes are punched before the
    report is returned, after which the guest may use them again.
  * VIRTIO_BALLOON_F_DEFLATE_ON_OOM (`deflate_on_oom`): the guest may deflate by itself when it
    runs out of memory (then `actual` < `num_pages`); nothing more for the device to do.

Queues are numbered as Linux finds them (5.5.2): inflateq 0, deflateq 1, then statsq and
reporting_vq in that order, each only if its feature was negotiated (so reporting_vq is 2
without statistics).  One I/O thread serves them all and the statistics timer.

A request the driver got wrong (a pfn outside guest RAM, a length not whole entries, a buffer
of the wrong direction) fails alone: returned with length 0, nothing freed, a rate-limited log
line.  A broken ring sets NEEDS_RESET.
"""

from __future__ import annotations

import collections
import logging
import struct
import time
from functools import partial
from typing import Callable, Iterable, Protocol

from vmm.memory import GuestMemory
from .balloon_requests import (VIRTIO_BALLOON_PFN_SHIFT, BadRequest, pfn_ranges, read_pfns,
                               read_stats, reported_ranges, stat_name)
from .device import VIRTIO_ID_BALLOON, VirtioDevice
from .queue import DescriptorChain, QueueError
from .ratelimit import RateLimitedLog
from .timer import Timer
from .worker import IoThread

log = logging.getLogger(__name__)

# Feature bits (5.5.3)
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

# Queue roles (5.5.2)
INFLATEQ, DEFLATEQ, STATSQ, REPORTING_VQ = "inflateq", "deflateq", "statsq", "reporting_vq"

# struct virtio_balloon_config: le32 num_pages, le32 actual (the fields after them belong to
# FREE_PAGE_HINT and PAGE_POISON, not offered)
BALLOON_CONFIG = struct.Struct("<II")
ACTUAL_OFFSET = 4
STATS_TIMES_KEPT = 64


class RamDiscarder(Protocol):
    def discard(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Free the (memfd offset, length) ranges; return the bytes (raises OSError)."""


class VirtioBalloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"
    request_name = "request"

    def __init__(self, mem: GuestMemory, ram: RamDiscarder, *, target: int = 0, stats_interval: float | None = None,
                 free_page_reporting: bool = False, deflate_on_oom: bool = False, queue_size: int = 128,
                 clock: Callable[[], float] = time.monotonic):
        features = ((bool(stats_interval) << VIRTIO_BALLOON_F_STATS_VQ)
                    | (free_page_reporting << VIRTIO_BALLOON_F_PAGE_REPORTING)
                    | (deflate_on_oom << VIRTIO_BALLOON_F_DEFLATE_ON_OOM))
        num_queues = 2 + bool(stats_interval) + free_page_reporting
        super().__init__(mem, num_queues=num_queues, queue_size=queue_size, features=features)
        self.ram = ram
        self.stats_interval = stats_interval
        self.num_pages = self._pages(target)
        self.actual = 0  # pages, as the driver last wrote it
        self.inflated = self.deflated = self.reported = 0  # bytes, since the VM started
        self._clock = clock
        self._stats: dict[int, int] = {}
        self._stats_times: collections.deque[float] = collections.deque(maxlen=STATS_TIMES_KEPT)
        self._stats_chain: int | None = None  # the head of the statistics buffer held
        self._roles: list[str] = []
        self._thread: IoThread | None = None
        self._timer: Timer | None = None
        self._guest_error = RateLimitedLog(log)
        self._io_error = RateLimitedLog(log)
        self._handlers = {INFLATEQ: self._inflate, DEFLATEQ: self._deflate, REPORTING_VQ: self._report}

    def _pages(self, size: int) -> int:
        if not 0 <= size <= self.mem.size:
            raise ValueError(f"balloon target {size} bytes is not from 0 to the guest's RAM ({self.mem.size})")
        return size >> VIRTIO_BALLOON_PFN_SHIFT

    # -- what the host asks and sees ------------------------------------------------------------
    def set_target(self, size: int) -> None:
        """Ask the guest to give up `size` bytes of RAM (rounded down to 4 KiB pages), now."""
        with self._lock:
            self.num_pages = self._pages(size)
            self.config_changed()

    def stats(self) -> dict:
        """The last statistics by name, with `updates` (the monotonic times they came, oldest first)."""
        with self._lock:
            out: dict = {stat_name(tag): value for tag, value in self._stats.items()}
            out["updates"] = list(self._stats_times)
            return out

    # -- configuration space ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return BALLOON_CONFIG.pack(self.num_pages, self.actual)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only `actual` is the driver's to write (4 bytes; parts of it are taken too)."""
        if offset < ACTUAL_OFFSET or offset + size > BALLOON_CONFIG.size:
            self._guest_error("%s: config write at %#x+%d is outside `actual`; ignored", self.name, offset, size)
            return
        with self._lock:
            data = bytearray(BALLOON_CONFIG.pack(self.num_pages, self.actual))
            data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.actual = BALLOON_CONFIG.unpack(data)[1]

    # -- threads -------------------------------------------------------------------------------------
    def activate(self) -> None:
        self._roles = [INFLATEQ, DEFLATEQ]
        if self.has_feature(VIRTIO_BALLOON_F_STATS_VQ):
            self._roles.append(STATSQ)
        if self.has_feature(VIRTIO_BALLOON_F_PAGE_REPORTING):
            self._roles.append(REPORTING_VQ)
        self._stats_chain = None
        thread = self._thread = IoThread(self.name)
        for index, role in enumerate(self._roles):
            self.watch_queue(thread, index, partial(self.process_queue, index))
        if STATSQ in self._roles:
            self._timer = thread.add_timer(self._on_stats_timer)
            self._timer.arm(self.stats_interval, self.stats_interval)
        thread.start()

    def deactivate(self) -> None:
        if self._thread is not None:
            self._thread.stop()  # (and closes the timer)
            self._thread = self._timer = None
        self._stats_chain = None

    # -- the queues ------------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Serve queue `index` as its role says (on the I/O thread)."""
        if self._queue_failed[index] or index >= len(self._roles):
            return
        role = self._roles[index]
        queue = self.queues[index]
        counters = self.counters[index]
        try:
            for chain in queue.drain(partial(self._on_chain_error, queue)):
                counters.requests += 1
                counters.bytes += chain.readable_len
                if role == STATSQ:
                    counters.errors += not self._hold_stats(index, chain)
                else:
                    counters.errors += not self._serve(role, chain)
                    queue.add_used(chain.head, 0)
            self.publish_and_notify(index)
        except QueueError as err:
            self.fail_queue(index, err)

    def _serve(self, role: str, chain: DescriptorChain) -> bool:
        """Carry out one request; False if it failed."""
        try:
            self._handlers[role](chain)
        except BadRequest as err:
            self._guest_error("%s: %s request %d: %s", self.name, role, chain.head, err)
        except OSError as err:
            self._io_error("%s: cannot give guest RAM back to the host: %s", self.name, err)
        else:
            return True
        return False

    def _inflate(self, chain: DescriptorChain) -> None:
        self.inflated += self.ram.discard(pfn_ranges(self.mem, read_pfns(self.mem, chain)))

    def _deflate(self, chain: DescriptorChain) -> None:
        """The pages are the guest's again: checked, counted; they fault in when it touches them."""
        self.deflated += sum(n for _, n in pfn_ranges(self.mem, read_pfns(self.mem, chain)))

    def _report(self, chain: DescriptorChain) -> None:
        self.reported += self.ram.discard(reported_ranges(self.mem, chain))

    def _hold_stats(self, index: int, chain: DescriptorChain) -> bool:
        """Keep the statistics buffer until the timer asks for the next; an older one held is
        returned now (a driver keeps one at a time).  False if the statistics were unreadable."""
        try:
            stats = read_stats(self.mem, chain)
        except BadRequest as err:
            self._guest_error("%s: statsq request %d: %s", self.name, chain.head, err)
            ok = False
        else:
            with self._lock:
                self._stats = stats
                self._stats_times.append(self._clock())
            ok = True
        if self._stats_chain is not None:
            self.queues[index].add_used(self._stats_chain, 0)
        self._stats_chain = chain.head
        return ok

    def counter_detail(self) -> dict:
        page = 1 << 12
        return {"target": self.num_pages * page, "actual": self.actual * page, "inflated": self.inflated,
                "deflated": self.deflated, "reported": self.reported}

    def _on_stats_timer(self) -> None:
        """Return the statistics buffer held: the driver answers with fresh statistics."""
        index = self._roles.index(STATSQ)
        if self._stats_chain is None or self._queue_failed[index]:
            return
        head, self._stats_chain = self._stats_chain, None
        try:
            self.queues[index].add_used(head, 0)
            self.publish_and_notify(index)
        except QueueError as err:
            self.fail_queue(index, err)
