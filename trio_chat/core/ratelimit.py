"""Token-bucket rate limiting, as pure code that is told the time."""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allows ``rate`` events per second on average, with bursts of up to ``burst``.

    The caller passes the current time (any monotonic clock in seconds), so tests need
    no clock at all. ``rate <= 0`` means unlimited.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def try_take(self, now: float) -> int:
        """Take one token. Returns 0 when allowed, else the wait in ms until one is free."""
        if self.rate <= 0:
            return 0
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0
        return max(1, math.ceil((1 - self._tokens) / self.rate * 1000))
