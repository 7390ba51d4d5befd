"""``trio-chat bench``: the command line, the run, the table, the JSON and the plots."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Final

import trio

from ._cluster import QUICK, ClusterSizes, scenario_cluster
from ._cost import scenario_cost
from ._peers import Storage, Target, missing_flags, on_storage, peer_python, tree_problem
from ._profile import STAGES, WRITER, scenario_profile
from ._scenarios import (
    ENGINE_TARGETS,
    THROUGHPUT_TARGETS,
    Figure,
    Steps,
    engine_figures,
    scenario_idle,
    scenario_steady,
    scenario_storm,
    scenario_throughput,
)

__all__ = ["bench_command", "build_parser", "report", "write_plots"]

SCENARIOS: Final = ("throughput", "profile", "cost", "idle", "steady", "storm", "engines")
DEFAULT_GUESTS: Final = {
    "throughput": 50,
    "engines": 50,
    "profile": 200,
    "cost": 20,
    "idle": 18_000,
    "steady": 10_000,
    "storm": 10_000,
}
DEFAULT_DURATION: Final = 5.0
DEFAULT_ROUNDS: Final = 3


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trio-chat bench")
    # ``cluster`` needs PostgreSQL and Redis: asked for by name, never part of ``all``.
    parser.add_argument(
        "scenario", nargs="?", default="all", choices=["all", *SCENARIOS, "cluster"]
    )
    parser.add_argument(
        "--guests",
        type=int,
        default=None,
        help="connections (throughput: 50 and 4 times as many, profile: 200, cost: 20, "
        "idle: 18000, steady: 10000, storm: 10000)",
    )
    parser.add_argument(
        "--messages", type=int, default=50, help="cost: messages per guest in each round"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds of load (cluster: 3)",
    )
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="steady: messages per second in total"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="load-generator processes for throughput and profile (idle, steady and "
        "storm use at least 4, each from its own source address)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="throughput and cost: measure each setup this many times",
    )
    parser.add_argument(
        "--no-socketio",
        dest="socketio",
        action="store_false",
        help="throughput: leave out python-socketio (otherwise installed on first use "
        "into a virtual environment of its own under ~/.cache/trio-chat)",
    )
    parser.add_argument(
        "--compare-with",
        metavar="SOURCE_TREE",
        default="",
        help="also run the trio-chat server from this source tree (a checkout of an "
        "earlier commit, say), beside this one in the same run",
    )
    # -- the cluster (PostgreSQL + Redis) -------------------------------------------------
    parser.add_argument(
        "--db",
        default="",
        metavar="URL",
        help="run every trio-chat server on this database (postgresql://...; default: a "
        "fresh SQLite file per server); cluster: this PostgreSQL instead of a throwaway one",
    )
    parser.add_argument(
        "--bus",
        default="",
        metavar="URL",
        help="redis://host:port/0: the servers run as cluster nodes (needs a postgresql:// "
        "--db); cluster: this Redis instead of a throwaway one",
    )
    parser.add_argument(
        "--recovery-guests",
        type=int,
        default=None,
        help="cluster: guests on the two nodes when one is killed (default 1000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="cluster: every part small and one round (for tests; the figures mean little)",
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="cost: each guest waits for the concierge's answer before its next message "
        "(commits then batch the same way whatever the code costs)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--out", metavar="PATH", help="also write the JSON results here")
    parser.add_argument("--plots", metavar="DIR", help="also draw the results as PNGs here")
    parser.add_argument(
        "--from",
        dest="from_json",
        metavar="PATH",
        help="run nothing: report (and draw) the results saved by an earlier --out",
    )
    return parser


async def run_benchmarks(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    """Run the chosen scenarios; returns their figures and the series for plots."""
    figures: list[Figure] = []
    series: dict[str, Any] = {}
    wanted = SCENARIOS if args.scenario == "all" else (args.scenario,)
    many = max(args.workers, 4)
    old = args.compare_with
    storage = Storage(args.db, args.bus)
    with Steps(show=not args.json) as steps:
        for name in wanted:
            if name == "cluster":
                result = await scenario_cluster(cluster_sizes(args), steps, args.db, args.bus)
                figures += result[0]
                series.update(result[1])
                continue
            guests = args.guests or DEFAULT_GUESTS[name]
            if name == "throughput":
                peer = await peer_python() if args.socketio else None
                targets = list(THROUGHPUT_TARGETS)
                if old:
                    targets += [Target("chat", "chat", c, code=old) for c in ("off", "rules")]
                result = await scenario_throughput(
                    guests,
                    args.duration,
                    args.workers,
                    args.rounds,
                    steps,
                    peer,
                    on_storage(targets, storage),
                )
            elif name == "engines":
                result = await scenario_throughput(
                    guests,
                    args.duration,
                    args.workers,
                    args.rounds,
                    steps,
                    None,
                    on_storage(ENGINE_TARGETS, storage),
                    name="engines",
                    figures_of=engine_figures,
                )
            elif name == "cost":
                result = await scenario_cost(
                    guests, args.messages, args.rounds, steps, old, storage, args.paced
                )
            elif name == "profile":
                result = await scenario_profile(
                    guests, args.duration, args.workers, steps, old, storage
                )
            elif name == "idle":
                result = await scenario_idle(guests, many, steps, old, storage)
            elif name == "steady":
                result = await scenario_steady(
                    guests, args.rate, args.duration, many, steps, old, storage
                )
            else:
                result = await scenario_storm(guests, many, steps, old, storage)
            figures += result[0]
            series.update(result[1])
    return figures, series


def cluster_sizes(args: argparse.Namespace) -> ClusterSizes:
    """The sizes of ``bench cluster``: its defaults (or ``--quick``'s), with whatever
    was given on the command line instead."""
    base = QUICK if args.quick else ClusterSizes()
    given = {
        "guests": args.guests,
        "duration": args.duration if args.duration != DEFAULT_DURATION else None,
        "rounds": args.rounds if args.rounds != DEFAULT_ROUNDS else None,
        "workers": args.workers,
        "recovery_guests": args.recovery_guests,
    }
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def check_storage(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--db``/``--bus``, if anything."""
    postgres = args.db.startswith(("postgresql://", "postgres://"))
    throwaway = args.scenario == "cluster" and not args.db  # bench cluster starts one
    if args.bus and not (postgres or throwaway):
        return "--bus needs a postgresql:// --db (a cluster shares one database)"
    if args.scenario == "cluster" and args.db and not postgres:
        return "bench cluster: --db must be a postgresql:// URL"
    return None


def _results(figures: list[Figure], series: dict[str, Any]) -> dict[str, Any]:
    return {
        "figures": [{**asdict(f), "ratio": f.ratio, "verdict": f.verdict} for f in figures],
        "series": series,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _figure_from(saved: dict[str, Any]) -> Figure:
    known = {f.name for f in fields(Figure)}
    return Figure(**{k: v for k, v in saved.items() if k in known})


def report(
    figures: list[Figure],
    series: dict[str, Any],
    as_json: bool,
    out: str | None = None,
    plots: str | None = None,
) -> None:
    """Print the figures (a table, or JSON), and write the JSON and the plots if asked."""
    results = _results(figures, series)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if plots:
        write_plots(results, Path(plots))
    if as_json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title="trio-chat benchmarks (each beside its baseline, same run)")
    for column in ("figure", "value", "baseline", "ratio", "target", "verdict"):
        table.add_column(column)
    for f in figures:
        verdict = f.verdict or ("bounded by the generator" if f.bounded else "")
        table.add_row(
            Text(f.name),
            f"{f.value:,.1f} {f.unit}",
            Text(f"{f.baseline:,.1f} {f.unit} ({f.baseline_name})"),
            f"{f.ratio:.2f} x",
            f.target,
            verdict,
        )
    console.print(table)
    profile = series.get("profile")
    if profile:
        stages = [*STAGES, WRITER, "other threads"]
        costs = Table(title=f"microseconds per message by stage ({profile['guests']} guests)")
        names = [n for n in profile if n != "guests"]
        for column in ("stage", *names):
            costs.add_column(column)
        for stage in stages:
            costs.add_row(
                stage, *(f"{profile[n]['us_per_message'].get(stage, 0):.1f}" for n in names)
            )
        console.print(costs)


def write_plots(results: dict[str, Any], directory: Path) -> list[Path]:
    """Draw each series of ``results`` (as written by ``--out``) as a PNG in
    ``directory``; returns the files written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    series = results.get("series", {})
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "idle_rss" in series:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, points in series["idle_rss"].items():
            ax.plot([n for n, _ in points], [b / 2**20 for _, b in points], "o-", label=name)
        ax.set_xlabel("idle guests connected")
        ax.set_ylabel("server RSS growth (MiB)")
        ax.set_title("Idle capacity: memory held per connection")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "bench-idle.png")
    for key, title, name in (
        ("throughput_latency_ms", "Closed loop, as fast as answers allow", "bench-throughput.png"),
        ("steady_latency_ms", "Steady open-loop load", "bench-steady.png"),
    ):
        if key not in series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for label, points in series[key].items():
            # x: how many messages were slower, on a log scale: the tail is the story.
            tail = [(1 - q, ms) for q, ms in points if q < 1 and ms > 0]
            if not tail:
                continue
            ax.plot([ms for _, ms in tail], [t for t, _ in tail], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of messages slower")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        save(fig, name)
    if "storm" in series:
        runs = series["storm"]
        fig, axes = plt.subplots(len(runs), 1, figsize=(6.4, 1.6 + 1.4 * len(runs)), sharex=True)
        for ax, (label, run) in zip(list(axes), runs.items(), strict=True):
            histogram = run["attempts"]
            ax.bar([i / 10 for i in range(len(histogram))], histogram, width=0.1, align="edge")
            ax.axvspan(run["old_gone"], run["new_listening"], color="red", alpha=0.12)
            ax.axvline(run["all_back"], color="green", linestyle="--", linewidth=1)
            ax.set_title(
                f"{label}: all back after {run['all_back']:.1f} s, peak {run['peak']}", fontsize=9
            )
            ax.set_ylabel("attempts\n/100 ms", fontsize=8)
        axes[-1].set_xlabel("seconds since the signal (red: no server listening)")
        fig.suptitle("Reconnect storm: connection attempts", fontsize=10)
        save(fig, "bench-storm.png")
    if "profile" in series:
        profile = series["profile"]
        stages = [*STAGES, WRITER]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        names = [n for n in profile if n != "guests"]
        left = [0.0] * len(names)
        for stage in stages:
            widths = [profile[n]["us_per_message"].get(stage, 0.0) for n in names]
            ax.barh(names, widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("microseconds per message (server CPU, sampled)")
        ax.set_title(f"Where a message's time goes ({profile['guests']} guests, closed loop)")
        ax.legend(fontsize=7, ncol=3, loc="lower right")
        save(fig, "bench-profile.png")
    return written


def bench_command(args: argparse.Namespace) -> int:
    if getattr(args, "from_json", None):
        saved = json.loads(Path(args.from_json).read_text())
        figures = [_figure_from(f) for f in saved["figures"]]
        report(figures, saved.get("series", {}), args.json, None, args.plots)
        return 0
    problem = check_storage(args)
    if problem is None and getattr(args, "compare_with", None):
        problem = tree_problem(args.compare_with)
    if problem is not None:
        print(f"trio-chat bench: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "compare_with", None):
        lacking = missing_flags(args.compare_with)
        if lacking:
            print(
                f"trio-chat bench: the server of {args.compare_with} runs without "
                f"{', '.join(lacking)} (it predates them)"
                + (
                    "; its concierge pauses before every reply, so its concierge-on "
                    "figures do not compare"
                    if "--typing-delay" in lacking
                    else ""
                ),
                file=sys.stderr,
            )
    figures, series = trio.run(run_benchmarks, args)
    report(figures, series, args.json, getattr(args, "out", None), getattr(args, "plots", None))
    return 0
