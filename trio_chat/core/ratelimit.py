"""Token-bucket rate limiting, as pure code that is told the time."""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["BucketTable", "TokenBucket"]

# Ten typing frames at 0.1 take one token, not one token less a rounding error.
_ROUNDING = 1e-9


class TokenBucket:
    """Allows ``rate`` tokens per second on average, with bursts of up to ``burst``.

    The caller passes the current time (any monotonic clock in seconds), so tests need
    no clock at all. ``rate <= 0`` means unlimited. An event may cost less or more than
    one token (``cost``): a typing indicator is cheap, a history page is not.
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

    def wait_ms(self, now: float, cost: float = 1.0) -> int:
        """0 when ``cost`` tokens are there now, else the wait in ms until they are.
        Takes nothing (see :meth:`take`)."""
        if self.rate <= 0:
            return 0
        self._refill(now)
        if self._tokens >= cost - _ROUNDING:
            return 0
        return max(1, math.ceil((cost - self._tokens) / self.rate * 1000 - _ROUNDING))

    def take(self, cost: float = 1.0) -> None:
        """Take ``cost`` tokens that :meth:`wait_ms` just said are there."""
        if self.rate > 0:
            self._tokens -= cost

    def try_take(self, now: float, cost: float = 1.0) -> int:
        """Take ``cost`` tokens. Returns 0 when allowed, else the wait in ms until they
        are free (and takes nothing)."""
        wait = self.wait_ms(now, cost)
        if not wait:
            self.take(cost)
        return wait

    def full(self, now: float) -> bool:
        """Whether the bucket is back to its whole burst (then forgetting it changes
        nothing: a new one starts full)."""
        if self.rate <= 0:
            return True
        self._refill(now)
        return self._tokens >= self.burst - _ROUNDING


class BucketTable:
    """Token buckets shared by key (a guest, a staff member, an address) among the
    sessions that hold them, and forgotten once nobody holds them and they are full
    again, so the table is as big as the crowd online plus those who left in the last
    ``burst / rate`` seconds.

    A bucket is not forgotten while it is still short of tokens: reconnecting must not
    be a way to refill it.
    """

    __slots__ = ("_buckets", "_holders", "_idle", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._holders: dict[str, int] = {}
        # Keys nobody holds, by when they were let go (oldest first). Every bucket
        # refills completely within burst / rate seconds, so the oldest go first.
        self._idle: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def hold(self, key: str, now: float) -> TokenBucket:
        """The bucket for ``key`` (a full one if it has none), held until
        :meth:`let_go`."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._idle.pop(key, None)
        self._holders[key] = self._holders.get(key, 0) + 1
        self.forget_idle(now)
        return bucket

    def let_go(self, key: str, now: float) -> None:
        holders = self._holders.get(key, 0) - 1
        if holders > 0:
            self._holders[key] = holders
            return
        self._holders.pop(key, None)
        bucket = self._buckets.get(key)
        if bucket is not None:
            if bucket.full(now):
                del self._buckets[key]
            else:
                self._idle[key] = now
        self.forget_idle(now)

    def forget_idle(self, now: float) -> None:
        """Forget every bucket nobody holds that has surely refilled by ``now``."""
        refill_s = self.burst / self.rate if self.rate > 0 else 0.0
        idle = self._idle
        while idle:
            key, since = next(iter(idle.items()))
            if now - since < refill_s:
                break
            del idle[key]
            del self._buckets[key]
