"""Reconnection backoff policies, as pure code.

The four jitter modes are those of the AWS Architecture Blog's "Exponential Backoff
and Jitter" (Marc Brooker, 2015). With ``base = min(max, initial * factor ** n)`` for
the n-th retry (n from 0):

* ``none``: ``base``: every client retries at the same moments (a thundering herd).
* ``full``: uniform in ``[0, base]``.
* ``equal``: ``base / 2`` plus uniform in ``[0, base / 2]``.
* ``decorrelated``: uniform in ``[initial, previous * 3]``, capped at ``max`` (it
  ignores ``factor``: each delay grows from the last one drawn).

``spread`` (seconds; 0, the default, turns it off) replaces the first delay, after a
start or a :meth:`~Backoff.reset`, with one uniform in ``[0, spread]`` in every mode but
``none``. A crash drops every client at once, and with ``initial`` = 0.5 s all their
first retries would land within half a second (the storm benchmark measured the same
peak as with no jitter at all). The ``websockets`` client spreads its first retry over
5 s for the same reason; :class:`~trio_chat.ChatClient`'s default policy does too.

A policy is deterministic given ``seed``, so experiments and tests reproduce.

:func:`retry_delay` is the whole reconnection rule of a client: the policy's next delay,
or what is left of the server's ``reconnect.after_ms`` (or ``retry_after_ms``) hint. The
client and the storm benchmark's guests both follow it, so the benchmark measures the
client's rule.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final, Literal, TypeAlias

from .protocol import CloseCode

__all__ = [
    "CRASH_SPREAD",
    "HINT_JITTER",
    "HINT_JITTER_MAX",
    "JITTER_MODES",
    "Backoff",
    "retry_delay",
]

Jitter: TypeAlias = Literal["none", "full", "equal", "decorrelated"]
JITTER_MODES: Final[tuple[Jitter, ...]] = ("none", "full", "equal", "decorrelated")
# The default policy's spread of the first retry: as the websockets client. Measured: a
# crash of a server with 4,000 guests, full jitter alone peaked at 1,010 attempts per
# 100 ms, no better than no jitter; with the spread, about 150.
CRASH_SPREAD: Final = 5.0
# A server's reconnect hint gets up to 20 % added, at most half a second: enough to
# part clients a server sent the same hint, little enough to keep a server's own spread
# (a hint of 9 s arriving at 9.5 s, not at 10.8 s).
HINT_JITTER: Final = 0.2
HINT_JITTER_MAX: Final = 0.5
# Closes after which a hint replaces the backoff (the server restarts: it spread its
# crowd itself), and those after which it only sets a floor (overload, rate limits).
_RESTART_CLOSES: Final = (CloseCode.GOING_AWAY, CloseCode.RESTARTING)
_LATER_CLOSES: Final = (CloseCode.TRY_LATER, CloseCode.RATE_LIMITED)


class Backoff:
    """How long to wait before each reconnection attempt.

    ``max_attempts`` (``None``: no limit) bounds how many delays :meth:`next_delay`
    gives before it returns ``None``, meaning "give up". Raises ``ValueError`` for
    nonsensical settings.
    """

    def __init__(
        self,
        initial: float = 0.5,
        factor: float = 2.0,
        max: float = 30.0,
        jitter: Jitter = "full",
        seed: int | None = None,
        max_attempts: int | None = None,
        spread: float = 0.0,
    ) -> None:
        if spread < 0:
            raise ValueError("spread must be 0 or more")
        if initial <= 0 or max < initial:
            raise ValueError("need 0 < initial <= max")
        if factor < 1:
            raise ValueError("factor must be at least 1")
        if jitter not in JITTER_MODES:
            raise ValueError(f"jitter must be one of {', '.join(JITTER_MODES)}")
        if max_attempts is not None and max_attempts < 0:
            raise ValueError("max_attempts must be 0 or more")
        self.initial = initial
        self.factor = factor
        self.max = max
        self.jitter: Jitter = jitter
        self.seed = seed
        self.max_attempts = max_attempts
        self.spread = spread
        self._random = random.Random(seed)
        self.attempt = 0  # delays handed out since the last reset
        self._previous = initial

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, factor={self.factor}, max={self.max}, "
            f"jitter={self.jitter!r}, seed={self.seed}, max_attempts={self.max_attempts}, "
            f"spread={self.spread})"
        )

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay for the ``attempt``-th retry (0-based)."""
        # Avoid float overflow for huge attempt numbers: the cap wins long before.
        exponent = min(attempt, 1024)
        try:
            value = self.initial * self.factor**exponent
        except OverflowError:
            return self.max
        return min(self.max, value)

    def next_delay(self) -> float | None:
        """The next delay in seconds, or ``None`` once ``max_attempts`` are used."""
        if self.max_attempts is not None and self.attempt >= self.max_attempts:
            return None
        base = self.ceiling(self.attempt)
        self.attempt += 1
        if self.attempt == 1 and self.spread and self.jitter != "none":
            delay = self._random.uniform(0, self.spread)
        elif self.jitter == "none":
            delay = base
        elif self.jitter == "full":
            delay = self._random.uniform(0, base)
        elif self.jitter == "equal":
            delay = base / 2 + self._random.uniform(0, base / 2)
        else:
            delay = min(self.max, self._random.uniform(self.initial, self._previous * 3))
        self._previous = max(delay, self.initial)
        return delay

    def reset(self) -> None:
        """Start again from the first delay (after a connection proved healthy).
        The random stream continues, so runs stay reproducible but not repetitive."""
        self.attempt = 0
        self._previous = self.initial

    def delays(self, count: int) -> list[float]:
        """The next ``count`` delays this policy would give, without consuming them
        (fewer if ``max_attempts`` ends sooner)."""
        clone = self.copy()
        clone._random.setstate(self._random.getstate())
        clone.attempt = self.attempt
        clone._previous = self._previous
        out: list[float] = []
        for _ in range(count):
            delay = clone.next_delay()
            if delay is None:
                break
            out.append(delay)
        return out

    def __iter__(self) -> Iterator[float]:
        while (delay := self.next_delay()) is not None:
            yield delay

    def copy(self) -> Backoff:
        """A fresh policy with the same settings (and seed), from the first delay."""
        return Backoff(
            self.initial,
            self.factor,
            self.max,
            self.jitter,
            self.seed,
            self.max_attempts,
            self.spread,
        )


def retry_delay(
    backoff: Backoff,
    close_code: int,
    hint: tuple[float, float] | None,
    now: float,
    rng: random.Random,
) -> float | None:
    """How long to wait before the next attempt, after a connection ended with
    ``close_code`` at time ``now``; ``None`` once ``backoff`` gives up.

    ``hint`` is the server's last wait hint, as (seconds, the time it arrived), or
    ``None``. It counts from its arrival, not from the close: a restart drains
    thousands of connections one after another, so the close can come seconds after the
    hint, and counted from the close the crowd would come back late and bunched (storm
    benchmark, 10,000 guests: closes 1-3 s after the hints). ``rng`` draws the hint's
    jitter; the backoff's delay is consumed either way, as a retry.
    """
    delay = backoff.next_delay()
    if delay is None or hint is None or close_code not in _RESTART_CLOSES + _LATER_CLOSES:
        return delay
    seconds, received_at = hint
    remaining = max(0.0, received_at + seconds - now)
    hinted = remaining + rng.uniform(0, min(seconds * HINT_JITTER, HINT_JITTER_MAX))
    return hinted if close_code in _RESTART_CLOSES else max(delay, hinted)
