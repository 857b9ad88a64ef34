"""RateLimitedLog: a warning a guest (or a host device) can trigger at will, at most once per interval.

A hostile or broken driver can make a device complain about every request; the log must not
become the way it slows the host down.  The messages left out are counted and the count is
reported with the next one that goes out.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one warning per `interval` seconds; the others are counted and reported with the next."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0):
        self.logger = logger
        self.interval = interval
        self.next_time = 0.0
        self.suppressed = 0

    def __call__(self, fmt: str, *args) -> None:
        now = time.monotonic()
        if now < self.next_time:
            self.suppressed += 1
            return
        self.next_time = now + self.interval
        if self.suppressed:
            fmt += " (and %d more such messages)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(fmt, *args)
