"""virtio-rng: an entropy device (OASIS virtio 1.2, section 5.4).

One queue, requestq.  Each request is a chain of device-writable buffers; the device fills them
with random bytes from its `EntropySource` (virtio/backends/entropy.py: the host's getrandom,
straight into guest memory) and returns the chain with the number of bytes written.  No feature
bits, no configuration space.

Rate limit (`rate`, bytes a second): a TokenBucket (virtio/tokenbucket.py) holding at most a
quarter of a second's bytes.  A request is served once the bucket holds what it asks for (up to
the bucket's size) and gets what the bucket holds; until then it stays in the ring and a timerfd
wakes the I/O thread when enough has accrued.  So over t seconds at most rate * (t + 1/4) bytes
reach the guest.

A hostile driver's requests fail alone, returned with length 0 and a rate-limited log line: a
chain with device-readable buffers (the wrong direction), with no writable bytes, or one the
queue cannot walk.  A request is served at most MAX_REQUEST_BYTES (the rest of a huge chain is
left as it was: the used length says how much is random).  A broken ring sets NEEDS_RESET.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable

from vmm.memory import GuestMemory
from .backends.entropy import EntropySource
from .device import VIRTIO_ID_RNG, VirtioDevice
from .queue import DescriptorChain, QueueError
from .ratelimit import RateLimitedLog
from .timer import Timer
from .tokenbucket import TokenBucket
from .worker import IoThread

log = logging.getLogger(__name__)

REQUESTQ = 0
MAX_REQUEST_BYTES = 64 << 10  # per request: Linux asks for 64 bytes at a time, a hostile chain for 4 GiB
BURST_SECONDS = 0.25  # the bucket's size, in seconds of `rate`


def first_bytes(views: list[memoryview], n: int) -> list[memoryview]:
    """The views cut to their first `n` bytes in all."""
    out = []
    for view in views:
        if n <= 0:
            break
        out.append(view[:n])
        n -= len(out[-1])
    return out


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"
    request_name = "request"

    def __init__(self, mem: GuestMemory, source: EntropySource, *, rate: int | None = None, queue_size: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(mem, num_queues=1, queue_size=queue_size, features=0)
        self.source = source
        self.bucket = TokenBucket(rate, max(1, int(rate * BURST_SECONDS)), clock) if rate else None
        self.delivered = 0  # random bytes handed to the guest
        self._thread: IoThread | None = None
        self._timer: Timer | None = None
        self._guest_error = RateLimitedLog(log)
        self._io_error = RateLimitedLog(log)

    # -- threads ----------------------------------------------------------------------------
    def activate(self) -> None:
        self._thread = IoThread(self.name)
        self.watch_queue(self._thread, REQUESTQ, self.process_queue)
        if self.bucket is not None:
            self._timer = self._thread.add_timer(self.process_queue)
        self._thread.start()

    def deactivate(self) -> None:
        if self._thread is not None:
            self._thread.stop()  # (and closes the timer)
            self._thread = self._timer = None

    # -- the request path ----------------------------------------------------------------------
    def process_queue(self) -> None:
        """Serve every available request the rate limit allows (on the I/O thread); if it holds
        one back, arm the timer for when the bucket will have enough."""
        if self._queue_failed[REQUESTQ]:
            return
        queue = self.queues[REQUESTQ]
        wait = 0.0
        try:
            chains = queue.drain(partial(self._on_chain_error, queue))
            for chain in chains:
                wait = self._wait_needed(chain)
                if wait:
                    chains.close()
                    queue.undo_pop()  # it stays first in the ring until the bucket has enough
                    break
                used = self.complete_request(chain)
                counters = self.counters[REQUESTQ]
                counters.requests += 1
                counters.bytes += used
                counters.errors += not used
                queue.add_used(chain.head, used)
            self.publish_and_notify(REQUESTQ)
        except QueueError as err:
            self.fail_queue(REQUESTQ, err)
            return
        if wait and self._timer is not None:
            self._timer.arm(wait)

    def _wait_needed(self, chain: DescriptorChain) -> float:
        """Seconds until the bucket holds what `chain` asks for (0: serve it now)."""
        if self.bucket is None or chain.readable or not chain.writable_len:
            return 0.0
        return self.bucket.wait_for(min(chain.writable_len, MAX_REQUEST_BYTES))

    def complete_request(self, chain: DescriptorChain) -> int:
        """Fill the request's buffers; return the used length (0 for a request the driver got wrong)."""
        if chain.readable:
            self._guest_error("%s: request %d has device-readable buffers", self.name, chain.head)
            return 0
        want = min(chain.writable_len, MAX_REQUEST_BYTES)
        if self.bucket is not None:
            want = self.bucket.take(want)
        if not want:
            self._guest_error("%s: request %d has no device-writable bytes", self.name, chain.head)
            return 0
        try:
            written = self.source.fill(first_bytes(chain.writable_views(), want))
        except OSError as err:
            self._io_error("%s: no entropy from the host: %s", self.name, err)
            return 0
        self.delivered += written
        return written
