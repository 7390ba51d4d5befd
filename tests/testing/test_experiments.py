"""Outage experiments in virtual time, and the charts drawn from them."""

from __future__ import annotations

import math

import matplotlib
import pytest

from trio_chat.testing import simulate_outage

matplotlib.use("Agg")

pytestmark = pytest.mark.slow


def test_the_simulation_is_deterministic_and_shows_the_herd() -> None:
    runs = {
        mode: simulate_outage(clients=30, jitter=mode, outage=20.0, capacity_per_100ms=3, seed=2)
        for mode in ("none", "full")
    }
    again = simulate_outage(clients=30, jitter="full", outage=20.0, capacity_per_100ms=3, seed=2)
    assert (again.work, again.completion_s) == (runs["full"].work, runs["full"].completion_s)
    herd, spread = runs["none"], runs["full"]
    assert all(math.isfinite(r) for r in spread.recovery_s)
    assert herd.work > spread.work and herd.completion_s > spread.completion_s
    assert herd.peak_attempts_per_100ms >= 2 * spread.peak_attempts_per_100ms
    assert len(spread.timelines) == 30 and spread.timelines[0][-1][2] == "connected"
    assert all(r >= 20.0 for r in spread.recovery_s)  # nobody is back during the outage


def test_the_charts_draw() -> None:
    import matplotlib.pyplot as plt

    from trio_chat.ui import plots

    results = [
        simulate_outage(clients=10, jitter=mode, outage=5.0, seed=1) for mode in ("none", "full")
    ]
    fig, axes = plt.subplots(2, 3)
    plots.plot_backoff_policies(attempts=5, samples=20, ax=axes[0][0])
    plots.plot_timelines(results[0], ax=axes[0][1])
    plots.plot_attempt_rate(results, ax=axes[0][2])
    plots.plot_recovery(results, ax=axes[1][0])
    plots.plot_work_vs_completion(results, ax=axes[1][1])
    summary = {"scenario": "x", "response_s": {"ai": {"median": 1.0}, "staff": {}}}
    plots.plot_response_times([summary], ax=axes[1][2])
    assert all(ax.has_data() for ax in axes.flat)
    plt.close(fig)
