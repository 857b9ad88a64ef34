"""SIGTERM's graceful stop: ask the guest to power off, stop hard if it has not within a timeout.

    stop = GracefulStop(timeout, request=machine.request_shutdown, stop=lifecycle.stop_message)
    stop.on_sigterm()        # the signal handler: press the power button, arm the deadline
    stop.poll_timeout()      # the main loop's epoll timeout: seconds left, or None
    stop.check()             # after each wake-up: past the deadline, stop hard

With a timeout of 0 (`--shutdown-timeout 0`, the default), SIGTERM stops at once, as it always
did.  Otherwise the first SIGTERM presses the guest's power button and the VM goes on until the guest
powers itself off or the timeout passes; a second SIGTERM, or a guest with no power button (a
`--program` guest has no ACPI), stops at once.
"""

from __future__ import annotations

import time
from typing import Callable

STOPPED = "stopped by SIGTERM"


class GracefulStop:
    def __init__(self, timeout: float, *, request: Callable[[], bool], stop: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`request()` asks the guest to power off and says whether it could; `stop(message)` ends
        the VM at once (exit status 0)."""
        self.timeout = timeout
        self._request = request
        self._stop = stop
        self._clock = clock
        self.deadline: float | None = None  # when a graceful stop turns hard
        self.timed_out = False  # the guest did not power off in time and was stopped

    def on_sigterm(self) -> None:
        if self.timeout <= 0:
            self._stop(STOPPED)
        elif self.deadline is not None:
            self._stop(f"{STOPPED} again while the guest was shutting down")
        elif not self._request():
            self._stop(f"{STOPPED} (the guest has no power button)")
        else:
            self.deadline = self._clock() + self.timeout

    def poll_timeout(self) -> float | None:
        """Seconds until the deadline (at least 0), or None while none is armed."""
        if self.deadline is None:
            return None
        return max(self.deadline - self._clock(), 0.0)

    def check(self) -> None:
        """Stop the VM if the deadline has passed."""
        if self.deadline is not None and not self.timed_out and self._clock() >= self.deadline:
            self.timed_out = True
            self._stop(f"the guest did not power off within {self.timeout:g} s of SIGTERM: stopped")
