"""The two summaries every measurement here shares: rates per interval and percentiles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["per_interval", "percentile"]


def per_interval(times: Iterable[float], origin: float, interval: float = 0.1) -> list[int]:
    """How many of ``times`` fall in each ``interval``-second slot from ``origin`` up to
    the last of them (times before ``origin`` are not counted): connection attempts per
    100 ms, say."""
    counts: list[int] = []
    for at in times:
        if at < origin:
            continue
        slot = int((at - origin) / interval)
        if slot >= len(counts):
            counts.extend([0] * (slot + 1 - len(counts)))
        counts[slot] += 1
    return counts


def percentile(sorted_values: Sequence[float], q: float, empty: float = math.nan) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ascending values; ``empty`` if
    there are none."""
    if not sorted_values:
        return empty
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]
