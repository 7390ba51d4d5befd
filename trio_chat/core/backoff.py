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
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final, Literal, TypeAlias

__all__ = ["JITTER_MODES", "Backoff"]

Jitter: TypeAlias = Literal["none", "full", "equal", "decorrelated"]
JITTER_MODES: Final[tuple[Jitter, ...]] = ("none", "full", "equal", "decorrelated")


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
