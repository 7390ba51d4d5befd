"""What the bench measures: every figure beside a baseline measured in the same run.

The orchestrator (Trio) starts each server under test as a child process and drives it
from load-generator processes (``_workers``, loopback only), then reports each figure
beside its baseline as a ratio (``_report``).

* ``throughput``: guests sending as fast as answers allow, against trio-chat (concierge
  off and on), the peers, and the null server, whose rate is the load generator's own
  ceiling; every figure within a factor of two of that ceiling is marked as bounded by
  the generator.
* ``idle``: N authenticated guests held open; server memory per guest beside a bare
  trio-websocket server holding as many.
* ``steady``: an open loop of guests with two staff consoles watching; ack and
  delivery-to-staff latency beside an echo server under the same load.
* ``storm``: a crash and a graceful restart with N reconnecting ``ChatClient``s.
* ``profile``: where the server's time goes per message (``_profile``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from ..core.backoff import CRASH_SPREAD
from ..server._admin import create_staff_token
from ..testing._processes import ServerProcess, python_process, wait_for_marker
from ..testing._stats import per_interval, percentile
from ._peers import FRESH_SQLITE, Storage, Target, chat_server_process, on_storage, serving
from ._workers import worker_args

__all__ = ["Figure", "Steps", "scenario_idle", "scenario_steady", "scenario_storm",
           "scenario_throughput"]  # fmt: skip

HEADROOM: Final = 2.0  # a figure within this factor of the generator's ceiling is bounded


@dataclass
class Figure:
    """One figure beside its baseline from the same run. ``target`` reads like
    ``>= 0.5 x`` (on the ratio) or ``< 20 ms`` (on the value); ``bounded`` says the
    figure or its baseline came within ``HEADROOM`` of the load generator's ceiling, so
    the ratio may measure the generator and no target counts as met on it."""

    name: str
    value: float
    baseline: float
    unit: str
    better: str  # "lower" or "higher"
    target: str = ""
    baseline_name: str = ""
    bounded: bool = False

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else math.inf

    @property
    def verdict(self) -> str:
        """``met``, ``missed``, ``bounded by the generator``, or ``""`` (no target)."""
        match = re.fullmatch(r"(<=|>=|<|>)\s*([0-9.]+)\s*(\S+)", self.target.strip())
        if match is None:
            return ""
        if self.bounded:
            return "bounded by the generator"
        op, limit, unit = match.group(1), float(match.group(2)), match.group(3)
        seen = self.ratio if unit == "x" else self.value
        ok = {"<=": seen <= limit, ">=": seen >= limit, "<": seen < limit, ">": seen > limit}[op]
        return "met" if ok else "missed"


class Steps:
    """Progress of a long run: ``start`` a scenario with its number of steps, then
    ``advance`` after each. Silent unless ``show`` is set (the rich bar on stderr)."""

    def __init__(self, show: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> Steps:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, scenario: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(scenario, total=total)

    def advance(self, what: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1)
            if what:
                description = self._progress.tasks[-1].description.split(":")[0]
                self._progress.update(self._task, description=f"{description}: {what}")


async def read_json_line(proc: trio.Process) -> dict[str, Any]:
    """The next line of ``proc``'s stdout, as JSON."""
    import json

    assert proc.stdout is not None
    buffer = b""
    # Skip blank lines: a marker's newline can trail behind it in the pipe.
    while b"\n" not in buffer.lstrip(b"\n"):
        chunk = await proc.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"a worker exited: {buffer.decode(errors='replace')}")
        buffer += chunk
    line = buffer.lstrip(b"\n").split(b"\n", 1)[0]
    try:
        result: dict[str, Any] = json.loads(line)
    except ValueError:
        raise RuntimeError(f"expected JSON from a worker, got {line[:300]!r}") from None
    return result


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` nearly equal whole shares (none empty)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def source_address(index: int) -> str:
    """The loopback source address of load process ``index``: 127.0.0.2, .3, ... (one
    address has only about 28,000 ephemeral ports towards one server port)."""
    return f"127.0.0.{2 + index % 250}"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def quantiles(sorted_values: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """A latency distribution in milliseconds, compressed for the JSON and the plots:
    (quantile, latency) at ``points`` quantiles, denser in the tail."""
    if not sorted_values:
        return []
    qs = [1 - 10 ** (-4 * i / points) for i in range(points)]
    return [(q, percentile(sorted_values, q) * 1000) for q in qs] + [
        (1.0, sorted_values[-1] * 1000)
    ]


# -------------------------------------------------------------------- throughput


async def closed_loop(
    url: str, dialect: str, guests: int, duration: float, workers: int
) -> tuple[float, list[float]]:
    """``guests`` connections from ``workers`` load processes, each keeping one message
    in flight: (answers per second, latencies in seconds)."""
    results: list[dict[str, Any]] = []

    async def run(index: int, count: int) -> None:
        argv = worker_args(
            "load",
            url=url,
            dialect=dialect,
            count=count,
            duration=duration,
            source=source_address(index),
        )
        async with python_process(argv) as proc:
            results.append(await read_json_line(proc))

    async with trio.open_nursery() as nursery:
        for index, count in enumerate(shares(guests, workers)):
            nursery.start_soon(run, index, count)
    rate = sum(r["done"] / r["elapsed"] for r in results)
    return rate, sorted(x for r in results for x in r["latencies"])


T = TypeVar("T")

SATURATING: Final = 4  # the second crowd, in multiples of ``guests``


def in_turn(targets: Sequence[T], round_: int, rounds: int) -> list[T]:
    """The order of the targets in round ``round_`` of ``rounds``: each round starts at
    another target, spread evenly, and every other round runs backwards, so no target
    always runs first, last or right after the same one. This machine runs slower
    under minutes of load than after a pause, and by up to a quarter from one minute to
    the next: in one fixed order, concierge on always ran right after concierge off."""
    start = round_ * len(targets) // max(1, rounds)
    order = [*targets[start:], *targets[:start]]
    return order[::-1] if round_ % 2 else order


THROUGHPUT_TARGETS: Final = (
    Target("null", "chat"),
    Target("null", "echo"),
    Target("null", "socketio"),
    Target("chat", "chat", "off"),
    Target("chat", "chat", "rules"),
    Target("trio-websocket", "echo"),
    Target("websockets", "echo"),
    Target("socketio", "socketio"),
)


def _bounded(ceilings: dict[str, float], *measured: tuple[Target, float]) -> bool:
    """Whether any of the ``(target, rate)`` came within ``HEADROOM`` of the load
    generator's ceiling for its dialect (a dialect with no ceiling measured counts as
    bounded: nothing shows the generator was faster)."""
    return any(rate * HEADROOM > ceilings.get(t.dialect, 0.0) for t, rate in measured)


def measured_for(
    values: dict[tuple[Target, int], float],
    kind: str,
    crowd: int,
    concierge: str = "off",
    *,
    old: bool = False,
) -> tuple[Target, float] | None:
    """The server of ``kind`` (this tree's, or with ``old`` the ``--compare-with``
    tree's; not a frame-engine variant) and its value at ``crowd``, if measured."""
    for (target, at), value in values.items():
        same = (target.kind, target.concierge, bool(target.code)) == (kind, concierge, old)
        if same and at == crowd and not target.engine:
            return target, value
    return None


def throughput_figures(
    rates: dict[tuple[Target, int], float],
    latencies: dict[tuple[Target, int], list[float]],
    crowds: Sequence[int],
) -> list[Figure]:
    """The throughput figures from each (target, crowd)'s median rate and latencies.
    The null servers' rates are the generator's ceilings: each is reported beside the
    fastest real server of its dialect (headroom), and every comparison in which
    either side came within ``HEADROOM`` of its dialect's ceiling is marked bounded."""
    targets = list(dict.fromkeys(t for t, _ in rates))
    figures: list[Figure] = []
    rate_of = functools.partial(measured_for, rates)

    for crowd in crowds:
        measured = [t for t in targets if (t, crowd) in rates]
        ceilings = {t.dialect: rates[(t, crowd)] for t in measured if t.kind == "null"}
        bounded = functools.partial(_bounded, ceilings)

        # The generator's headroom over the fastest real server of each dialect.
        for dialect, ceiling in ceilings.items():
            served = [
                (t, rates[(t, crowd)])
                for t in measured
                if t.kind != "null" and t.dialect == dialect
            ]
            if served:
                fastest, fastest_rate = max(served, key=lambda item: item[1])
                figures.append(
                    Figure(
                        f"load generator ceiling, {dialect} dialect ({crowd} guests)",
                        ceiling,
                        fastest_rate,
                        "msg/s",
                        "higher",
                        f">= {HEADROOM:g} x",
                        f"{fastest.label} (the fastest {dialect} server)",
                    )
                )
        chat_off = rate_of("chat", crowd)
        if chat_off is None:
            continue
        comparisons: list[tuple[tuple[Target, float] | None, tuple[Target, float] | None, str]] = [
            (chat_off, rate_of("trio-websocket", crowd), ">= 0.5 x"),
            (chat_off, rate_of("websockets", crowd), ""),
            (chat_off, rate_of("socketio", crowd), ">= 1.0 x"),
            (rate_of("chat", crowd, "rules"), chat_off, ">= 0.6 x"),
            (rate_of("socketio", crowd), rate_of("trio-websocket", crowd), ""),
            # The same server before this change, in the same rounds.
            (chat_off, rate_of("chat", crowd, old=True), ""),
            (rate_of("chat", crowd, "rules"), rate_of("chat", crowd, "rules", old=True), ""),
        ]
        for ours, theirs, target_text in comparisons:
            if ours is None or theirs is None:
                continue
            figures.append(
                Figure(
                    f"answered messages/s, {crowd} guests: {ours[0].label}",
                    ours[1],
                    theirs[1],
                    "msg/s",
                    "higher",
                    target_text,
                    theirs[0].label,
                    bounded(ours, theirs),
                )
            )
        echo = rate_of("trio-websocket", crowd)
        if echo is not None and crowd == crowds[0]:
            for q in (0.5, 0.99, 0.999):
                figures.append(
                    Figure(
                        f"ack latency p{q * 100:g}, {crowd} guests, closed loop",
                        percentile(latencies[(chat_off[0], crowd)], q) * 1000,
                        percentile(latencies[(echo[0], crowd)], q) * 1000,
                        "ms",
                        "lower",
                        "",
                        echo[0].label,
                        bounded(chat_off, echo),
                    )
                )
    return figures


def process_cpu(pid: int) -> float | None:
    """CPU seconds the process has used, all its threads (None off Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_figures(cpu: dict[tuple[Target, int], float], crowds: Sequence[int]) -> list[Figure]:
    """The server's CPU per answered message (all its threads, the connections'
    opening included), beside the same baselines as the rates. Other work on the
    machine slows a server without adding to its CPU time, so these ratios move far
    less from one round to the next than the rates do (a figure, not a target)."""
    figures: list[Figure] = []
    spent = functools.partial(measured_for, cpu)
    for crowd in crowds:
        pairs = [
            (spent("chat", crowd), spent("trio-websocket", crowd)),
            (spent("chat", crowd), spent("socketio", crowd)),
            (spent("chat", crowd, "rules"), spent("chat", crowd)),
            (spent("chat", crowd), spent("chat", crowd, old=True)),
            (spent("chat", crowd, "rules"), spent("chat", crowd, "rules", old=True)),
        ]
        for ours, theirs in pairs:
            if ours is None or theirs is None:
                continue
            figures.append(
                Figure(
                    f"server CPU per answered message, {crowd} guests: {ours[0].label}",
                    ours[1],
                    theirs[1],
                    "µs",
                    "lower",
                    "",
                    theirs[0].label,
                )
            )
    return figures


ENGINE_TARGETS: Final = (
    Target("null", "chat"),
    Target("chat", "chat", "off", "wsproto"),
    Target("chat", "chat", "off", "websockets"),
)


def engine_figures(
    rates: dict[tuple[Target, int], float],
    latencies: dict[tuple[Target, int], list[float]],
    crowds: Sequence[int],
) -> list[Figure]:
    """The server with each frame engine, websockets' beside wsproto's (A/B)."""
    # The targets as measured (``bench --db`` moves the servers onto PostgreSQL).
    measured = {(t.kind, t.engine): t for t, _ in rates}
    null, wsproto, websockets = (measured[(t.kind, t.engine)] for t in ENGINE_TARGETS)
    figures = []
    for crowd in crowds:
        a, b = rates[(wsproto, crowd)], rates[(websockets, crowd)]
        figures.append(
            Figure(
                f"answered messages/s, {crowd} guests: {websockets.label}",
                b,
                a,
                "msg/s",
                "higher",
                "",
                wsproto.label,
                _bounded({"chat": rates[(null, crowd)]}, (wsproto, a), (websockets, b)),
            )
        )
    return figures


async def scenario_throughput(
    guests: int,
    duration: float,
    workers: int,
    rounds: int,
    steps: Steps,
    peer: Path | None,
    targets: Sequence[Target] = THROUGHPUT_TARGETS,
    *,
    name: str = "throughput",
    figures_of: Callable[
        [dict[tuple[Target, int], float], dict[tuple[Target, int], list[float]], Sequence[int]],
        list[Figure],
    ] = throughput_figures,
) -> tuple[list[Figure], dict[str, Any]]:
    """Answers per second with ``guests`` and ``SATURATING`` times as many connections,
    each keeping one message in flight, for every target; the targets are measured in
    turn, ``rounds`` times over, and each figure is the median of its rounds (this
    machine drifts by more than the effects worth measuring from one minute to the
    next; interleaving puts the drift on both sides of each ratio).

    The null servers' rates are the load generator's ceilings, one per dialect; a rate
    within ``HEADROOM`` of its dialect's ceiling is marked as bounded by the generator.
    ``peer`` is the interpreter with python-socketio (skipped when ``None``)."""
    targets = [t for t in targets if t.kind != "socketio" or peer is not None]
    crowds = (guests, guests * SATURATING)
    per_round: dict[tuple[Target, int], list[float]] = {}
    latencies: dict[tuple[Target, int], list[float]] = {}
    cpu_rounds: dict[tuple[Target, int], list[float]] = {}
    steps.start(name, rounds * len(crowds) * len(targets))
    for round_ in range(rounds):
        for crowd in crowds:
            for target in in_turn(targets, round_, rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    async with serving(target, Path(tmp), peer) as (url, proc):
                        before = process_cpu(proc.pid)
                        rate, lat = await closed_loop(url, target.dialect, crowd, duration, workers)
                        after = process_cpu(proc.pid)
                per_round.setdefault((target, crowd), []).append(rate)
                latencies.setdefault((target, crowd), []).extend(lat)
                if before is not None and after is not None and rate > 0:
                    spent = (after - before) / (rate * duration) * 1e6
                    cpu_rounds.setdefault((target, crowd), []).append(spent)
                steps.advance(f"{target.label}, {crowd} guests")
    rates = {key: statistics.median(values) for key, values in per_round.items()}
    figures = figures_of(rates, latencies, crowds)
    cpu = {key: statistics.median(values) for key, values in cpu_rounds.items()}
    figures += cpu_figures(cpu, crowds)
    series = {
        f"{name}_cpu_us_per_message": {
            f"{t.label}, {crowd} guests": v for (t, crowd), v in cpu_rounds.items()
        },
        f"{name}_latency_ms": {
            f"{t.label}, {crowd} guests": quantiles(sorted(v))
            for (t, crowd), v in latencies.items()
            if crowd == guests and t.kind != "null"
        },
        f"{name}_rounds": {f"{t.label}, {crowd} guests": v for (t, crowd), v in per_round.items()},
    }
    return figures, series


# -------------------------------------------------------------------------- idle


class _HoldWorker:
    """A ``hold`` load process, told to add connections step by step."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.connected = 0

    async def add(self, count: int) -> None:
        """Open ``count`` more connections. Raises ``RuntimeError`` if any failed."""
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(f"add {count}\n".encode())
        report = await read_json_line(self.proc)
        self.connected += count
        if report["connected"] != self.connected:
            raise RuntimeError(
                f"only {report['connected']} of {self.connected} connections: {report}"
            )

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(b"stop\n")
        await self.proc.wait()


async def _held_rss(
    server: trio.Process,
    url: str,
    steps: Sequence[int],
    dialect: str,
    workers: int,
    advance: Callable[[], None],
) -> list[tuple[int, int]]:
    """Server RSS growth, in bytes, with each number of connections in ``steps`` held
    open (ascending), from ``workers`` processes on distinct source addresses."""
    async with AsyncExitStack() as stack:
        holders = [
            _HoldWorker(
                await stack.enter_async_context(
                    python_process(
                        worker_args("hold", url=url, dialect=dialect, source=source_address(i))
                    )
                )
            )
            for i in range(workers)
        ]
        # One warm-up connection first, so one-off allocations are not counted per guest.
        await holders[0].add(1)
        await trio.sleep(0.5)
        before = rss_bytes(server.pid)
        points: list[tuple[int, int]] = []
        held = 1
        for step in steps:
            async with trio.open_nursery() as nursery:
                for holder, n in zip(holders, shares(step - held, workers), strict=False):
                    nursery.start_soon(holder.add, n)
            held = step
            await trio.sleep(1.0)  # let the server settle before reading its memory
            points.append((step - 1, rss_bytes(server.pid) - before))
            advance()
        for holder in holders:
            await holder.stop()
    return points


IDLE_STEPS: Final = 4  # memory is read at 1/4, 2/4, 3/4 and all of the guests


async def scenario_idle(
    guests: int, workers: int, steps: Steps, old_code: str = "", storage: Storage = FRESH_SQLITE
) -> tuple[list[Figure], dict[str, Any]]:
    """``guests`` idle authenticated guests; server RSS per guest above its own
    baseline, beside a bare trio-websocket server holding as many connections (and
    beside the server from ``old_code``, a source tree, when given)."""
    points = [max(1, guests * (i + 1) // IDLE_STEPS) + 1 for i in range(IDLE_STEPS)]
    targets = [Target("chat", "chat"), Target("trio-websocket", "echo")]
    if old_code:
        targets.append(Target("chat", "chat", code=old_code))
    targets = on_storage(targets, storage)
    steps.start("idle", len(targets) * IDLE_STEPS)
    held: dict[Target, list[tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            async with serving(target, Path(tmp)) as (url, server):
                held[target] = await _held_rss(
                    server, url, points, target.dialect, workers, steps.advance
                )
    ours, base = held[targets[0]], held[targets[1]]
    figures = [
        Figure(
            f"idle RSS per connected guest ({guests:,} guests)",
            ours[-1][1] / guests,
            base[-1][1] / guests,
            "bytes",
            "lower",
            "<= 1.15 x",
            "bare trio-websocket",
        )
    ]
    series = {"trio-chat": ours, "bare trio-websocket": base}
    if old_code:
        old = held[targets[2]]
        series["trio-chat (old code)"] = old
        figures.append(
            Figure(
                f"idle RSS per connected guest ({guests:,} guests): new code",
                ours[-1][1] / guests,
                old[-1][1] / guests,
                "bytes",
                "lower",
                "",
                "old code, same run",
            )
        )
    return figures, {"idle_rss": series}


# ------------------------------------------------------------------------ steady


async def _steady_run(
    url: str,
    dialect: str,
    guests: int,
    rate: float,
    duration: float,
    workers: int,
    staff_token: str | None = None,
) -> tuple[list[float], list[float], int]:
    """One steady-load run: (ack or echo latencies, delivery-to-staff latencies, lost).
    The first second of sending (a fifth of a short run) is left out as warm-up."""
    async with AsyncExitStack() as stack:
        guest_procs = []
        for i, n in enumerate(shares(guests, workers)):
            argv = worker_args(
                "steady",
                url=url,
                dialect=dialect,
                count=n,
                rate=rate * n / guests,
                duration=duration,
                source=source_address(i),
            )
            guest_procs.append(await stack.enter_async_context(python_process(argv)))
        conversations = [c for p in guest_procs for c in (await read_json_line(p))["conversations"]]
        staff_procs = []
        if staff_token is not None:
            # Two staff members on the night shift, each watching half the hotel.
            listing_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for i, half in enumerate((conversations[0::2], conversations[1::2])):
                listing = listing_dir / f"c{i}"
                listing.write_text("\n".join(half))
                argv = worker_args("staff", url=url, token=staff_token, conversations=listing)
                proc = await stack.enter_async_context(python_process(argv, b"ready"))
                staff_procs.append(proc)
        for proc in guest_procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b"go\n")
        reports = [await read_json_line(proc) for proc in guest_procs]
        staff_reports = []
        for proc in staff_procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b"stop\n")
            staff_reports.append(await read_json_line(proc))
    warm = min(r["started"] for r in reports) + min(1.0, duration / 5)
    acks = sorted(lat for r in reports for sent, lat in r["samples"] if sent >= warm)
    delivered = sorted(lat for r in staff_reports for sent, lat in r["samples"] if sent >= warm)
    return acks, delivered, sum(r["lost"] for r in reports)


async def _steady_chat(
    tmp: Path,
    guests: int,
    rate: float,
    duration: float,
    workers: int,
    code: str = "",
    storage: Storage = FRESH_SQLITE,
) -> tuple[list[float], list[float], int]:
    db_path = tmp / f"steady{'-old' if code else ''}.db"
    # A name of its own: on a shared database (``bench --db``) an earlier run's
    # night shift is still there.
    token = create_staff_token(storage.db or db_path, f"night shift {time.time_ns()}")
    server = chat_server_process(db_path, code, storage)
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            return await _steady_run(server.url, "chat", guests, rate, duration, workers, token)
        finally:
            await server.stop()


async def scenario_steady(
    guests: int,
    rate: float,
    duration: float,
    workers: int,
    steps: Steps,
    old_code: str = "",
    storage: Storage = FRESH_SQLITE,
) -> tuple[list[Figure], dict[str, Any]]:
    """``guests`` connected guests sending ``rate`` messages per second in total (open
    loop) while two staff consoles watch every conversation: ack latency and
    delivery-to-staff latency, beside the round-trip latency of a bare trio-websocket
    echo server under the same load (and beside the server from ``old_code``)."""
    steps.start("steady", 3 if old_code else 2)
    old: tuple[list[float], list[float], int] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        acks, delivered, lost = await _steady_chat(
            Path(tmp), guests, rate, duration, workers, storage=storage
        )
        if old_code:
            steps.advance("old code")
            old = await _steady_chat(Path(tmp), guests, rate, duration, workers, old_code, storage)
        steps.advance("bare trio-websocket echo")
        async with serving(Target("trio-websocket", "echo"), Path(tmp)) as (url, _):
            echo, _, _ = await _steady_run(url, "echo", guests, rate, duration, workers)
        steps.advance()
    if lost:
        raise RuntimeError(f"{lost} messages were never acknowledged under steady load")
    figures = []
    load = f"{guests:,} guests, {rate:,g} msg/s"
    for q in (0.5, 0.99, 0.999):
        target = "< 20 ms" if q == 0.99 else ""
        for what, values in (("ack", acks), ("delivery to staff", delivered)):
            figures.append(
                Figure(
                    f"{what} latency p{q * 100:g} ({load})",
                    percentile(values, q) * 1000,
                    percentile(echo, q) * 1000,
                    "ms",
                    "lower",
                    target,
                    "bare trio-websocket echo, same load",
                )
            )
    curves = [
        ("trio-chat ack", acks),
        ("trio-chat delivery to staff", delivered),
        ("bare trio-websocket echo", echo),
    ]
    if old is not None:
        curves.append(("trio-chat ack (old code)", old[0]))
        for q in (0.5, 0.99, 0.999):
            for what, new, before in (
                ("ack", acks, old[0]),
                ("delivery to staff", delivered, old[1]),
            ):
                figures.append(
                    Figure(
                        f"{what} latency p{q * 100:g} ({load}): new code",
                        percentile(new, q) * 1000,
                        percentile(before, q) * 1000,
                        "ms",
                        "lower",
                        "",
                        "old code, same run",
                    )
                )
    return figures, {"steady_latency_ms": {name: quantiles(v) for name, v in curves}}


# ------------------------------------------------------------------------- storm


@dataclass
class StormRun:
    all_back: float  # seconds from the signal until every guest was back and resynced
    peak: int  # the most connection attempts in any 100 ms
    attempts: list[int] = field(default_factory=list)  # attempts in each 100 ms
    old_gone: float = 0.0  # seconds until the old process had exited
    new_listening: float = 0.0  # seconds until the new one listened
    # How late the load processes made their clients' first attempts, at p99 (seconds):
    # the generator's own bunching or smoothing of the crowd, for judging the peak.
    late_p99: float = 0.0


async def _storm_once(
    server: ServerProcess,
    nursery: trio.Nursery,
    guests: int,
    workers: int,
    jitter: str,
    spread: float,
    how: signal.Signals,
) -> StormRun:
    """One restart with ``guests`` connected, measured by the clients."""
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                python_process(
                    worker_args(
                        "storm",
                        url=server.url,
                        count=n,
                        jitter=jitter,
                        spread=spread,
                        source=source_address(i),
                    ),
                    b"ready",
                )
            )
            for i, n in enumerate(shares(guests, workers))
        ]
        restart = time.time()
        await server.stop(how)
        down = time.time() - restart
        await server.start(nursery)
        up = time.time() - restart
        for proc in procs:
            await wait_for_marker(proc, b"back", within=180)
        results = []
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(f"report {restart}\n".encode())
            results.append(await read_json_line(proc))
    attempts = [a for r in results for a in r["attempts"]]
    back = [b for r in results for b in r["back"]]
    late = sorted(x for r in results for x in r["late"])
    # Attempts per 100 ms since the restart began, for the peak and the plots.
    histogram = per_interval(attempts, restart)
    return StormRun(
        max(back) - restart,
        max(histogram, default=0),
        histogram,
        down,
        up,
        percentile(late, 0.99, empty=0.0),
    )


# (name, jitter, first-retry spread, signal, judged against the targets)
STORMS: Final = (
    ("no jitter, kill -9", "none", 0.0, signal.SIGKILL, False),
    ("full jitter, kill -9", "full", 0.0, signal.SIGKILL, False),
    # ChatClient's default policy.
    ("full jitter, spread, kill -9", "full", CRASH_SPREAD, signal.SIGKILL, True),
    ("server-spread hints, SIGINT", "full", CRASH_SPREAD, signal.SIGINT, True),
)


async def _storms(
    guests: int,
    workers: int,
    steps: Steps,
    storms: Sequence[Any],
    code: str = "",
    storage: Storage = FRESH_SQLITE,
) -> dict[str, StormRun]:
    runs: dict[str, StormRun] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = chat_server_process(Path(tmp) / "storm.db", code, storage)
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            for name, jitter, spread, how, _ in storms:
                runs[name] = await _storm_once(
                    server, nursery, guests, workers, jitter, spread, how
                )
                steps.advance(name + (" (old code)" if code else ""))
            await server.aclose()
            nursery.cancel_scope.cancel()
    return runs


async def scenario_storm(
    guests: int, workers: int, steps: Steps, old_code: str = "", storage: Storage = FRESH_SQLITE
) -> tuple[list[Figure], dict[str, Any]]:
    """A reconnect storm: ``guests`` connected, the server killed (SIGKILL) or restarted
    gracefully (SIGINT: it spreads its ``reconnect.after_ms`` hints); how long until
    all are back and resynced, and the peak attempts per 100 ms the clients made,
    beside the same storm with no jitter (and the judged storms beside the server
    from ``old_code``)."""
    judged_storms = [s for s in STORMS if s[-1]]
    steps.start("storm", len(STORMS) + (len(judged_storms) if old_code else 0))
    runs = await _storms(guests, workers, steps, STORMS, storage=storage)
    old = (
        await _storms(guests, workers, steps, judged_storms, old_code, storage) if old_code else {}
    )
    herd = runs["no jitter, kill -9"]
    figures = []
    for name, *_, judged in STORMS:
        run = runs[name]
        figures.append(
            Figure(
                f"storm ({guests:,} guests), {name}: all back after",
                run.all_back,
                herd.all_back,
                "s",
                "lower",
                "<= 15 s" if judged else "",
                "no jitter, kill -9",
            )
        )
        figures.append(
            Figure(
                f"storm ({guests:,} guests), {name}: peak attempts per 100 ms",
                run.peak,
                herd.peak,
                "attempts",
                "lower",
                "<= 0.2 x" if judged else "",
                "no jitter, kill -9",
            )
        )
    for name, before in old.items():
        for what, unit, value, baseline in (
            ("all back after", "s", runs[name].all_back, before.all_back),
            ("peak attempts per 100 ms", "attempts", runs[name].peak, before.peak),
        ):
            figures.append(
                Figure(
                    f"storm ({guests:,} guests), {name}: {what}: new code",
                    value,
                    baseline,
                    unit,
                    "lower",
                    "",
                    "old code, same run",
                )
            )
    series = {name: asdict(run) for name, run in runs.items()}
    series.update({f"{name} (old code)": asdict(run) for name, run in old.items()})
    return figures, {"storm": series}
