"""What the virtio-net fuzz targets share: a scripted backend, a path context, a tap.

`ScriptedIo` plays the backend of one queue: each readv / writev asks the input what happens
(a frame of some length, EAGAIN, an error), checks that every memoryview it is handed inside
guest RAM lies inside the buffers the target allows (views of the path's own host memory,
the scratch byte and spill rows, are not guest memory and pass), and counts.  Once the input
is spent (or `scripted` is cleared), reads find nothing (EAGAIN) and writes succeed, so every
path can finish.
`context()` is the PathContext a VirtioNet gives its paths, with VirtioDevice's chain-error
rule.  `NullTap` is a NetBackend with eventfds for fds, for the control-queue target.
"""

from __future__ import annotations

import errno
import os

import atheris

from tests.fuzz.harness import InvariantError
from virtio.net_common import PathContext
from virtio.queue import ChainError, Queue, QueueError


def _chain_error(queue: Queue, err: ChainError) -> None:
    if not err.completable:
        raise QueueError(f"cannot return chain {err.head}: {err}")
    queue.add_used(err.head, 0)


def context() -> PathContext:
    say = lambda *args: None  # noqa: E731  (rate-limited log lines: nothing to check)
    return PathContext("fuzz-net", "fuzz-tap", say, say, _chain_error)


class ScriptedIo:
    def __init__(self, mem, fdp: atheris.FuzzedDataProvider, allowed: list[tuple[int, int]]):
        self.mem, self.fdp, self.allowed = mem, fdp, allowed
        self.frames: list[int] = []  # lengths of the frames read or written
        self.calls = 0
        self.scripted = True  # False: the input is not asked any more (as when it is spent)

    def _views_ok(self, views) -> None:
        guest = [v for v in views if self.mem.in_mapping(v)]
        self.mem.check_views(guest, self.allowed, "a backend buffer")
        self.calls += 1
        if self.calls > 10_000:
            raise InvariantError("more than 10000 backend calls for one input: unbounded")

    def readv(self, views) -> int:
        self._views_ok(views)
        what = self.fdp.ConsumeIntInRange(0, 7) if self.scripted and self.fdp.remaining_bytes() else 7
        if what == 7:
            raise BlockingIOError(errno.EAGAIN, "empty")
        if what == 6:
            raise OSError(errno.EIO, "injected")
        length = self.fdp.ConsumeIntInRange(0, 0x1800) if what else self.fdp.ConsumeIntInRange(0, 64)
        room = sum(len(v) for v in views)
        n, pos = min(length, room), 0
        for v in views:  # a frame of bytes 0x42, as far as it goes
            take = min(len(v), n - pos)
            v[:take] = b"\x42" * take
            pos += take
        self.frames.append(n)
        return n

    def writev(self, views) -> int:
        self._views_ok(views)
        what = self.fdp.ConsumeIntInRange(0, 7) if self.scripted and self.fdp.remaining_bytes() else 0
        if what == 7:
            raise BlockingIOError(errno.EAGAIN, "full")
        if what == 6:
            raise OSError(errno.EINVAL, "bad header")
        n = sum(len(v) for v in views)
        self.frames.append(n)
        return n


class NullTap:
    """A NetBackend that moves no frame: eventfds stand in for its queues' fds."""

    name = "fuzz-tap"

    def __init__(self, queues: int):
        self.queues = queues
        self._fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(queues)]
        self.enabled = [False] * queues

    def fileno(self, index: int = 0) -> int:
        return self._fds[index]

    def reader(self, index: int):
        def read(views):
            raise BlockingIOError(errno.EAGAIN, "empty")
        return read

    def writer(self, index: int):
        return lambda views: sum(len(v) for v in views)

    def open_batch_io(self, index: int):
        return None

    def set_offload(self, flags: int) -> None:
        pass

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
