"""TokenBucket: at most `rate` units a second on average, with bursts of at most `capacity`.

The bucket holds up to `capacity` tokens and gains `rate` a second; taking n units spends n
tokens.  Over any interval of t seconds at most capacity + rate * t units pass.  The clock is
injectable, so tests check the limit without sleeping.
"""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"token bucket: rate {rate} and capacity {capacity} must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = float(capacity)  # starts full: a first burst passes at once
        self._last = clock()

    def available(self) -> int:
        """Whole tokens held now."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return int(self._tokens)

    def take(self, n: int) -> int:
        """Spend up to `n` tokens; return how many were spent (0 when the bucket holds none)."""
        granted = min(n, self.available())
        self._tokens -= granted
        return granted

    def wait_for(self, n: int) -> float:
        """Seconds until `n` tokens (at most `capacity`) will be held; 0 if they are now."""
        missing = min(n, self.capacity) - self.available()
        return max(0.0, missing / self.rate)
