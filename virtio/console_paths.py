"""virtio-console's ring paths: each owns one queue's state and turns chains into port calls.

  PortReceive      a port's receiveq: the guest's empty buffers, filled from the port's input
  PortTransmit     a port's transmitq: the guest's output, handed to the port (resumed where a
                   full socket stopped it)
  ControlReceive   the control receiveq: the device's control messages, waiting for buffers
  ControlTransmit  the control transmitq: the driver's control messages, parsed

Each takes a `Queue` and an `on_chain_error(queue, err)` for chains the queue cannot walk (the
device's, which returns them or raises QueueError); a chain going the wrong way (a receive buffer
the device may only read, output it may write) is returned with length 0 and logged here.
Publishing the used ring and interrupting the driver are the caller's (after each call).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Iterator, Sequence

from .console_control import ControlError, ControlMessage, parse_control
from .queue import ChainError, DescriptorChain, Queue
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

RX_BATCH = 256  # receive buffers filled per read (Linux gives 4 KiB each: 1 MiB a call)
MAX_IOV = 1024  # what one recvmsg / sendmsg takes (IOV_MAX)
MAX_PENDING_CONTROL = 1024  # device messages waiting for buffers (a driver that sends PORT_READY in a loop)

OnChainError = Callable[[Queue, ChainError], None]


def _skip(views: Sequence[memoryview], offset: int) -> list[memoryview]:
    """`views` less their first `offset` bytes."""
    out = []
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        out.append(view[offset:] if offset else view)
        offset = 0
    return out


class _Path:
    def __init__(self, queue: Queue, on_chain_error: OnChainError, what: str):
        self.queue = queue
        self.on_chain_error = on_chain_error
        self.what = what
        self.bad = RateLimitedLog(log)

    def _pop(self, wrong_way: Callable[[DescriptorChain], str | None]) -> DescriptorChain | None:
        """The next usable chain, or None when the ring is empty (notifications then enabled, so the
        driver's next buffer wakes the device).  Bad chains are returned to the driver on the way."""
        queue = self.queue
        while True:
            try:
                chain = queue.pop()
            except ChainError as err:
                self.on_chain_error(queue, err)
                continue
            if chain is None:
                if queue.enable_notification():
                    continue
                return None
            reason = wrong_way(chain)
            if reason is None:
                return chain
            self.bad("virtio-console: %s: chain %d %s; returned unused", self.what, chain.head, reason)
            queue.add_used(chain.head, 0)


def _input_buffer(chain: DescriptorChain) -> str | None:
    if chain.readable:
        return "has device-readable buffers"
    if len(chain.writable) > MAX_IOV:
        return f"has more than {MAX_IOV} buffers"
    return None if chain.writable_len else "has no buffer"


def _output_buffer(chain: DescriptorChain) -> str | None:
    return "has device-writable buffers" if chain.writable else None


class PortReceive(_Path):
    """Host to guest: the chains it has taken (up to RX_BATCH) wait in `held` for input."""

    def __init__(self, queue: Queue, on_chain_error: OnChainError, what: str):
        super().__init__(queue, on_chain_error, what)
        self.held: deque[DescriptorChain] = deque()

    def fill(self, read_into: Callable[[list[memoryview]], int]) -> tuple[int, bool]:
        """Fill the guest's buffers with what `read_into(views)` gives, until it gives nothing or the
        buffers run out.  Returns (chains used, starved: the guest has no buffer left)."""
        held = self.held
        used = 0
        while True:
            while len(held) < RX_BATCH:
                chain = self._pop(_input_buffer)
                if chain is None:
                    break
                held.append(chain)
            if not held:
                return used, True
            views: list[memoryview] = []
            for chain in held:
                if len(views) + len(chain.writable) > MAX_IOV:
                    break
                views += chain.writable_views()
            n = read_into(views)
            if n <= 0:
                return used, False
            while n > 0:
                chain = held.popleft()
                take = min(n, chain.writable_len)
                self.queue.add_used(chain.head, take)
                n -= take
                used += 1

    def forget(self) -> None:
        self.held.clear()


class PortTransmit(_Path):
    """Guest to host: the chain being sent and how much of it the port has taken."""

    def __init__(self, queue: Queue, on_chain_error: OnChainError, what: str):
        super().__init__(queue, on_chain_error, what)
        self.current: DescriptorChain | None = None
        self.offset = 0

    def drain(self, write: Callable[[list[memoryview]], int]) -> tuple[int, bool]:
        """Hand the guest's output to `write(views)` (which returns the bytes it took) until the
        ring is empty or the port takes no more.  Returns (chains used, blocked)."""
        used = 0
        while True:
            chain = self.current
            if chain is None:
                chain = self._pop(_output_buffer)
                if chain is None:
                    return used, False
                self.current, self.offset = chain, 0
            while self.offset < chain.readable_len:
                n = write(_skip(chain.readable_views(), self.offset)[:MAX_IOV])
                if n <= 0:
                    return used, True
                self.offset += n
            self.queue.add_used(chain.head, 0)
            self.current = None
            used += 1

    def forget(self) -> None:
        self.current, self.offset = None, 0


class ControlReceive(_Path):
    """The device's control messages, queued until the driver gives buffers for them."""

    def __init__(self, queue: Queue, on_chain_error: OnChainError):
        super().__init__(queue, on_chain_error, "control receiveq")
        self.pending: deque[bytes] = deque()

    def send(self, message: bytes) -> None:
        if len(self.pending) >= MAX_PENDING_CONTROL:
            self.bad("virtio-console: %d control messages wait for the driver's buffers; one dropped",
                     len(self.pending))
            return
        self.pending.append(message)

    def flush(self) -> int:
        """Put the waiting messages in the driver's buffers, one each; the chains used."""
        used = 0
        while self.pending:
            chain = self._pop(_input_buffer)
            if chain is None:
                break
            message = self.pending[0]
            if chain.writable_len < len(message):
                self.bad("virtio-console: control buffer of %d bytes for a %d-byte message; returned unused",
                         chain.writable_len, len(message))
                self.queue.add_used(chain.head, 0)
                used += 1
                continue
            pos = 0
            for view in chain.writable_views():
                n = min(len(view), len(message) - pos)
                view[:n] = message[pos:pos + n]
                pos += n
                if pos == len(message):
                    break
            self.queue.add_used(chain.head, len(message))
            self.pending.popleft()
            used += 1
        return used

    def forget(self) -> None:
        self.pending.clear()


class ControlTransmit(_Path):
    """The driver's control messages."""

    def __init__(self, queue: Queue, on_chain_error: OnChainError):
        super().__init__(queue, on_chain_error, "control transmitq")

    def messages(self) -> Iterator[ControlMessage]:
        """Each well-formed message; every chain is returned (length 0) before its message is acted on."""
        while True:
            chain = self._pop(_output_buffer)
            if chain is None:
                return
            self.queue.add_used(chain.head, 0)
            if chain.readable_len > 64:  # (not copied: a hostile length)
                self.bad("virtio-console: control message of %d bytes ignored", chain.readable_len)
                continue
            try:
                message = parse_control(b"".join(chain.readable_views()))
            except ControlError as err:
                self.bad("virtio-console: %s ignored", err)
                continue
            yield message
