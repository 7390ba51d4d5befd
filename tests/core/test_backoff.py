"""Backoff policies, as pure code."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import JITTER_MODES, Backoff
from trio_chat.core.backoff import HINT_JITTER, HINT_JITTER_MAX, retry_delay
from trio_chat.core.protocol import CloseCode


def test_no_jitter_grows_exponentially_to_the_cap() -> None:
    policy = Backoff(initial=0.5, factor=2, max=30, jitter="none")
    assert policy.delays(9) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


@pytest.mark.parametrize("mode", JITTER_MODES)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 60))
def test_every_mode_stays_within_its_bounds(mode: str, seed: int, count: int) -> None:
    policy = Backoff(initial=0.5, factor=2, max=30, jitter=mode, seed=seed)  # type: ignore[arg-type]
    for attempt, delay in enumerate(policy.delays(count)):
        ceiling = policy.ceiling(attempt)
        assert 0 <= delay <= 30
        if mode == "none":
            assert delay == ceiling
        elif mode == "full":
            assert 0 <= delay <= ceiling
        elif mode == "equal":
            assert ceiling / 2 <= delay <= ceiling
        else:
            assert 0.5 <= delay <= 30


def test_jitter_modes_spread_as_the_aws_analysis_describes() -> None:
    def sample(mode: str, attempt: int) -> list[float]:
        out = []
        for seed in range(2000):
            policy = Backoff(initial=1, factor=2, max=1000, jitter=mode, seed=seed)  # type: ignore[arg-type]
            out.append(policy.delays(attempt + 1)[-1])
        return out

    full, equal = sample("full", 4), sample("equal", 4)  # ceiling 16
    assert statistics.mean(full) == pytest.approx(8, rel=0.06)
    assert statistics.mean(equal) == pytest.approx(12, rel=0.04)
    assert statistics.pstdev(full) > statistics.pstdev(equal)
    decorrelated = sample("decorrelated", 4)
    assert min(decorrelated) >= 1 and statistics.mean(decorrelated) > 3


def test_same_seed_same_delays_and_delays_does_not_consume() -> None:
    a = Backoff(jitter="full", seed=42)
    b = Backoff(jitter="full", seed=42)
    preview = a.delays(10)
    assert preview == a.delays(10)  # looking does not advance
    assert [a.next_delay() for _ in range(10)] == preview == b.delays(10)
    assert Backoff(jitter="full", seed=43).delays(10) != preview


def test_reset_starts_from_the_first_delay_again() -> None:
    policy = Backoff(initial=0.5, jitter="none")
    for _ in range(6):
        policy.next_delay()
    assert policy.next_delay() == 30
    policy.reset()
    assert policy.next_delay() == 0.5
    decorrelated = Backoff(initial=1, max=100, jitter="decorrelated", seed=1)
    for _ in range(20):
        decorrelated.next_delay()
    decorrelated.reset()
    first = decorrelated.next_delay()
    assert first is not None and first <= 3  # uniform(initial, 3 * initial)


def test_attempt_limit_ends_with_none() -> None:
    policy = Backoff(jitter="none", max_attempts=3)
    assert policy.delays(10) == [0.5, 1, 2]
    assert list(policy) == [0.5, 1, 2]
    assert policy.next_delay() is None
    assert Backoff(max_attempts=0).next_delay() is None


def test_copy_is_a_fresh_policy_with_the_same_settings() -> None:
    policy = Backoff(initial=2, factor=3, max=50, jitter="equal", seed=5, max_attempts=4)
    policy.next_delay()
    fresh = policy.copy()
    assert fresh.attempt == 0 and repr(fresh) == repr(policy)
    assert fresh.delays(4) == Backoff(2, 3, 50, "equal", 5, 4).delays(4)


def test_huge_attempt_numbers_do_not_overflow() -> None:
    policy = Backoff(initial=0.5, factor=10, max=30, jitter="none")
    assert policy.ceiling(10_000) == 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": 5, "max": 1},
        {"factor": 0.5},
        {"jitter": "wild"},
        {"max_attempts": -1},
        {"spread": -1},
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["full", "equal", "decorrelated"])
@given(seed=st.integers(0, 2**32))
def test_a_spread_replaces_only_the_first_delay_after_a_start_or_reset(
    mode: str, seed: int
) -> None:
    plain = Backoff(initial=0.5, jitter=mode, seed=seed)  # type: ignore[arg-type]
    spread = Backoff(initial=0.5, jitter=mode, seed=seed, spread=5)  # type: ignore[arg-type]
    first, *rest = spread.delays(6)
    assert 0 <= first <= 5
    # The rest follow the mode from the second retry on, as without a spread.
    for attempt, delay in enumerate(rest, start=1):
        if mode == "full":
            assert 0 <= delay <= plain.ceiling(attempt)
        elif mode == "equal":
            assert plain.ceiling(attempt) / 2 <= delay <= plain.ceiling(attempt)
        else:
            assert 0.5 <= delay <= 30
    for _ in range(6):
        spread.next_delay()
    spread.reset()
    assert spread.copy().spread == 5 and 0 <= spread.delays(1)[0] <= 5


def test_a_spread_spreads_a_crowd_and_leaves_no_jitter_alone() -> None:
    firsts = [Backoff(spread=5, seed=seed).delays(1)[0] for seed in range(2000)]
    assert statistics.mean(firsts) == pytest.approx(2.5, rel=0.06)
    assert max(firsts) > 4.9
    # No jitter means the herd, on purpose: the spread does not apply.
    assert Backoff(jitter="none", spread=5).delays(2) == [0.5, 1.0]


# -- retry_delay: the client's whole reconnection rule -----------------------------------


class _NoJitter(random.Random):
    """Hint jitter drawn at its ceiling, so the rule's arithmetic shows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_restart_hint_replaces_the_backoff_and_counts_from_its_arrival() -> None:
    backoff = Backoff(initial=4, jitter="none")
    # A 9 s hint that arrived at t=100; the drain closed the connection at t=103.
    delay = retry_delay(backoff, CloseCode.RESTARTING, (9.0, 100.0), 103.0, _NoJitter())
    assert delay == pytest.approx(6.0 + HINT_JITTER_MAX)  # what is left, plus its jitter
    assert backoff.attempt == 1  # the attempt is still a retry
    small = retry_delay(backoff, CloseCode.GOING_AWAY, (1.0, 100.0), 100.5, _NoJitter())
    assert small == pytest.approx(0.5 + 1.0 * HINT_JITTER)
    # A close later than the hint's end: go at once (plus the jitter).
    late = retry_delay(backoff, CloseCode.RESTARTING, (1.0, 100.0), 130.0, _NoJitter())
    assert late == pytest.approx(HINT_JITTER)


def test_overload_and_rate_limit_hints_only_set_a_floor() -> None:
    for code in (CloseCode.TRY_LATER, CloseCode.RATE_LIMITED):
        longer = retry_delay(Backoff(initial=8, jitter="none"), code, (2.0, 0.0), 0.0, _NoJitter())
        assert longer == 8.0
        floor = retry_delay(Backoff(initial=1, jitter="none"), code, (2.0, 0.0), 0.0, _NoJitter())
        assert floor == pytest.approx(2.0 + 2.0 * HINT_JITTER)


def test_without_a_hint_or_after_other_closes_the_backoff_decides() -> None:
    for code, hint in (
        (CloseCode.RESTARTING, None),
        (CloseCode.ABNORMAL, (9.0, 0.0)),  # a stale hint, then a crash: not a restart
        (CloseCode.POLICY, (9.0, 0.0)),
    ):
        backoff = Backoff(initial=0.5, jitter="none")
        assert retry_delay(backoff, code, hint, 1.0, _NoJitter()) == 0.5


def test_a_policy_that_gave_up_gives_up_whatever_the_hint() -> None:
    backoff = Backoff(max_attempts=0)
    assert retry_delay(backoff, CloseCode.RESTARTING, (1.0, 0.0), 0.0, random.Random(1)) is None


def test_the_hint_jitter_is_drawn_from_the_given_generator() -> None:
    hint = (9.0, 0.0)
    draws = {
        retry_delay(Backoff(), CloseCode.RESTARTING, hint, 0.0, random.Random(seed))
        for seed in range(20)
    }
    assert all(9.0 <= d <= 9.0 + HINT_JITTER_MAX for d in draws if d is not None)
    assert len(draws) == 20  # parted, as a crowd given the same hint must be
    again = retry_delay(Backoff(), CloseCode.RESTARTING, hint, 0.0, random.Random(3))
    assert again == retry_delay(Backoff(), CloseCode.RESTARTING, hint, 0.0, random.Random(3))
