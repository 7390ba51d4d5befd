"""Matplotlib charts for the notebooks: backoff policies, outages, chat flows.

Each function draws on the ``ax`` it is given (or a new figure) and returns the axes,
so notebooks only assemble them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from ..core.backoff import JITTER_MODES, Backoff
from ..testing._experiments import OutageResult

__all__ = [
    "plot_attempt_rate",
    "plot_backoff_policies",
    "plot_recovery",
    "plot_response_times",
    "plot_timelines",
    "plot_work_vs_completion",
]

STATE_COLOURS = {
    "connected": "#2e7d4f",
    "waiting": "#f2c94c",
    "trying": "#d9822b",
    "offline": "#b42318",
    "closed": "#6b7280",
}
JITTER_COLOURS = {
    "none": "#b42318",
    "full": "#1d5fbf",
    "equal": "#2e7d4f",
    "decorrelated": "#7b3fa0",
}


def _axes(ax: Any | None) -> Any:
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    return ax


def plot_backoff_policies(
    attempts: int = 10, samples: int = 500, ax: Any | None = None, **backoff: Any
) -> Any:
    """Delay against attempt for every jitter mode: the median and the 5–95 % band."""
    ax = _axes(ax)
    xs = list(range(1, attempts + 1))
    for mode in JITTER_MODES:
        runs = [
            Backoff(jitter=mode, seed=seed, **backoff).delays(attempts) for seed in range(samples)
        ]
        columns = [sorted(run[i] for run in runs) for i in range(attempts)]
        median = [c[len(c) // 2] for c in columns]
        low = [c[int(0.05 * len(c))] for c in columns]
        high = [c[int(0.95 * len(c)) - 1] for c in columns]
        colour = JITTER_COLOURS[mode]
        ax.plot(xs, median, marker="o", color=colour, label=mode)
        ax.fill_between(xs, low, high, color=colour, alpha=0.15)
    ax.set_xlabel("attempt")
    ax.set_ylabel("delay before it (s)")
    ax.set_yscale("log")
    ax.set_title("Backoff policies: median and 5–95 % of delays")
    ax.legend(title="jitter")
    return ax


def plot_timelines(result: OutageResult, ax: Any | None = None, limit: int = 60) -> Any:
    """One Gantt strip per client: connected, trying, waiting, from the outage on."""
    ax = _axes(ax)
    for row, spans in enumerate(result.timelines[:limit]):
        for start, end, state in spans:
            ax.broken_barh(
                [(start, end - start)], (row - 0.4, 0.8), color=STATE_COLOURS.get(state, "#999")
            )
    ax.axvspan(0, result.outage_s, color="#b42318", alpha=0.08)
    ax.set_xlabel("seconds since the outage began")
    ax.set_ylabel("client")
    ax.set_title(f"jitter: {result.jitter}")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLOURS.values()][:3]
    ax.legend(handles, list(STATE_COLOURS)[:3], loc="upper right", fontsize=8)
    return ax


def plot_attempt_rate(results: Sequence[OutageResult], ax: Any | None = None) -> Any:
    """Connection attempts per 100 ms the server side saw, one line per jitter mode."""
    ax = _axes(ax)
    for result in results:
        xs, counts = result.attempt_rate()
        ax.step(
            xs,
            counts,
            where="post",
            color=JITTER_COLOURS.get(result.jitter),
            label=f"{result.jitter} (peak {result.peak_attempts_per_100ms})",
        )
    ax.set_xlabel("seconds since the outage began")
    ax.set_ylabel("attempts per 100 ms")
    ax.set_title("What the server sees")
    ax.legend()
    return ax


def plot_recovery(results: Sequence[OutageResult], ax: Any | None = None) -> Any:
    """The distribution of time to recover, one box per jitter mode."""
    ax = _axes(ax)
    data = [[r for r in result.recovery_s if math.isfinite(r)] for result in results]
    ax.boxplot(data, tick_labels=[r.jitter for r in results])
    ax.set_ylabel("seconds until connected again")
    ax.set_title("Time to recover")
    return ax


def plot_work_vs_completion(
    results: Sequence[OutageResult],
    ax: Any | None = None,
    title: str = "Work against completion time",
) -> Any:
    """The AWS comparison: total attempts (work) against time until all were back."""
    ax = _axes(ax)
    for result in results:
        ax.scatter(
            result.completion_s,
            result.work,
            s=80,
            color=JITTER_COLOURS.get(result.jitter),
            label=result.jitter,
        )
        ax.annotate(
            result.jitter,
            (result.completion_s, result.work),
            textcoords="offset points",
            xytext=(6, 4),
        )
    ax.set_xlabel("completion time (s)")
    ax.set_ylabel("work (connection attempts)")
    ax.set_title(title)
    return ax


def plot_response_times(summaries: Sequence[dict[str, Any]], ax: Any | None = None) -> Any:
    """Median response time by responder (concierge, staff) for each scenario."""
    ax = _axes(ax)
    names = [s["scenario"] for s in summaries]
    for offset, sender, colour in ((-0.2, "ai", "#2e7d4f"), (0.2, "staff", "#7b3fa0")):
        values = [s["response_s"][sender].get("median", 0.0) for s in summaries]
        ax.bar(
            [i + offset for i in range(len(names))],
            values,
            width=0.4,
            color=colour,
            label={"ai": "concierge", "staff": "staff"}[sender],
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("median response (s)")
    ax.set_title("How fast guests get an answer")
    ax.legend()
    return ax
