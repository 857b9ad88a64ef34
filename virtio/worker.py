"""An I/O thread: epoll over eventfds, a callback for each; stoppable and joinable.

Devices run their queues on these, woken by the ioeventfds KVM signals when the
driver notifies a queue, so no vCPU thread ever runs device code.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

from vmm.threadname import set_os_thread_name

log = logging.getLogger(__name__)


class IoThread:
    def __init__(self, name: str):
        self.name = name
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._stop_fd, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self._timers: list = []
        self.revents = 0  # the epoll events of the fd whose handler runs now
        self.after_events: Callable[[], None] | None = None  # run once after each wake-up's handlers

    def add_eventfd(self, fd: int, handler: Callable[[], None],
                    on_count: Callable[[int], None] | None = None) -> None:
        """Call handler() (on this thread) each time fd is signalled; the count is consumed first
        (and given to on_count, if any)."""

        def on_event() -> None:
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                return
            if on_count is not None:
                on_count(n)
            handler()

        self.add_fd(fd, on_event)

    def add_fd(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, events)

    def modify_fd(self, fd: int, events: int) -> None:
        """Change what wakes fd's handler (0: only errors and hang-ups, which epoll always reports)."""
        self._ep.modify(fd, events)

    def remove_fd(self, fd: int) -> None:
        """Stop watching fd (before closing it); its handler is not called again."""
        if self._handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def add_timer(self, handler: Callable[[], None]):
        """A virtio/timer.py Timer, disarmed: handler() runs (on this thread) each time it fires.
        It is closed with the thread (stop())."""
        from .timer import Timer

        timer = Timer()
        self._timers.append(timer)

        def on_fire() -> None:
            if timer.consume():
                handler()

        self.add_fd(timer.fd, on_fire)
        return timer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        set_os_thread_name(self.name)
        handlers, stop_fd = self._handlers, self._stop_fd
        try:
            while True:
                for fd, events in self._ep.poll():
                    if fd == stop_fd:
                        return
                    handler = handlers.get(fd)
                    if handler is not None:  # None: removed by a handler run earlier in this batch
                        self.revents = events
                        handler()
                if self.after_events is not None:
                    self.after_events()
        except BaseException as e:  # a bug in device code: stop this device, keep the VM
            self.failure = e
            log.exception("%s: I/O thread failed", self.name)

    def stop(self) -> None:
        """Stop and wait: when this returns, no handler is running or will run."""
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._ep.close()
        os.close(self._stop_fd)
        for timer in self._timers:
            timer.close()
