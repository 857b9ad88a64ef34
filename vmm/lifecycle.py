"""How a VM ends: one decision, seen by every thread.

Any thread may ask to stop (a vCPU on guest power-off or a fatal exit, the main
thread on a signal or the console escape).  The first request wins and sets the
exit status; the others are ignored.  `wake_fd` (an eventfd) becomes readable
so the main loop's epoll notices, and registered callbacks knock the vCPUs out of
KVM_RUN.
"""

from __future__ import annotations

import os
import threading
from typing import Callable


class Lifecycle:
    def __init__(self):
        # re-entrant: a signal handler (main thread) may call stop() while the main thread is inside it
        self._lock = threading.RLock()
        self.stopping = False
        self.exit_code: int | None = None
        self.message: str | None = None
        self.reset_requested = False
        self.restart = False  # a reset to boot again whatever --on-reboot says (a reboot asked from outside)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._on_stop: list[Callable[[], None]] = []

    def on_stop(self, callback: Callable[[], None]) -> None:
        self._on_stop.append(callback)

    def stop(self, exit_code: int, message: str | None = None) -> bool:
        """Ask the VM to stop; True if this call decided the outcome."""
        with self._lock:
            if self.stopping:
                return False
            self.stopping = True
            self.exit_code = exit_code
            self.message = message
        os.eventfd_write(self.wake_fd, 1)
        for callback in self._on_stop:
            callback()
        return True

    def power_off(self) -> None:
        self.stop(0, "guest powered off")

    def reset(self, *, restart: bool = False) -> None:
        with self._lock:
            if self.stopping:
                return
            self.reset_requested = True
            self.restart = restart
        self.stop(0, "guest reset")

    def close(self) -> None:
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
