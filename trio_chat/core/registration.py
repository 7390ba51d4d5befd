"""How many new guest identities one network address may ask for: pure code, told the time.

A hello with no token creates a guest that is stored for good (until it expires, if it
never writes): without a limit, one script fills the database. The limit is per
address and generous, because a hotel's guests usually share one NAT address: a
token bucket of ``per_minute`` registrations with bursts of ``burst``.
"""

from __future__ import annotations

from typing import Final

from .ratelimit import TokenBucket

__all__ = ["RegistrationLimiter"]

# Buckets are forgotten once full again (they would allow a whole burst anyway); the
# sweep runs when this many are held, so memory follows the addresses seen recently.
SWEEP_AT: Final = 1024


class RegistrationLimiter:
    """Per-address token buckets; ``per_minute <= 0`` means unlimited."""

    __slots__ = ("_buckets", "_last_seen", "burst", "per_minute")

    def __init__(self, per_minute: float, burst: int) -> None:
        self.per_minute = per_minute
        self.burst = max(1, burst)
        self._buckets: dict[str, TokenBucket] = {}
        self._last_seen: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def try_register(self, address: str, now: float) -> int:
        """Count one registration from ``address``: 0 when allowed, else the wait in
        ms until the next one would be."""
        if not self.enabled:
            return 0
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= SWEEP_AT:
                self._sweep(now)
            bucket = self._buckets[address] = TokenBucket(self.per_minute / 60, self.burst, now)
        self._last_seen[address] = now
        return bucket.try_take(now)

    def _sweep(self, now: float) -> None:
        refill_s = self.burst / (self.per_minute / 60)
        for address, seen in list(self._last_seen.items()):
            if now - seen >= refill_s:
                del self._last_seen[address], self._buckets[address]
