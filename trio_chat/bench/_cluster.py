"""``bench cluster``: trio-chat on PostgreSQL and Redis, beside the single node.

Everything runs on one machine: PostgreSQL and Redis (throwaway ones from
``testing._services`` unless URLs are given), the nodes (``trio-chat serve --db
postgresql://… --bus redis://…`` child processes) and the load generator of
``_loadgen``. Each figure stands beside its baseline from the same run:

* **storage**: one node on PostgreSQL beside one on SQLite, acked msg/s at two crowds;
* **scale-out**: two nodes beside one (both on PostgreSQL + Redis, the guests split
  evenly), acked msg/s and ack latency at the larger crowd;
* **cross-node delivery**: a guest sends on node A while a second session of the same
  guest watches on node A (same node) or on node B (cross node); latency from the
  send to the push reaching the watcher, and what the crossing adds;
* **recovery**: guests on two nodes, one node killed (``kill -9``); how long until
  every guest of the dead node is back on the survivor (resumed, one message acked),
  beside how long the same guests' first sign-in took;
* **headroom**: the null server's rate (the generator's ceiling), beside the fastest
  setup; figures within ``HEADROOM`` of it are marked bounded.

The throughput setups are measured in turn, ``rounds`` times over (medians); the
delivery placements alternate within each round. With the throwaway PostgreSQL each
server start gets a fresh database, as each SQLite run gets a fresh file; with
``--db URL`` every run shares that database.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import trio

from ..testing._processes import python_process
from ..testing._services import postgres_instance, redis_instance
from ..testing._stats import percentile
from ._peers import Storage, Target, serving
from ._scenarios import (
    HEADROOM,
    SATURATING,
    Figure,
    Steps,
    closed_loop,
    in_turn,
    quantiles,
    read_json_line,
    source_address,
)
from ._workers import worker_args

__all__ = ["ClusterSizes", "scenario_cluster"]

QUANTILES: Final = (0.5, 0.99, 0.999)


@dataclass(frozen=True)
class ClusterSizes:
    """How big each part of ``bench cluster`` is (``--quick`` makes them small)."""

    guests: int = 50  # throughput: this many and SATURATING times as many
    duration: float = 3.0  # seconds of load per throughput and delivery run
    rounds: int = 3
    workers: int = 1  # load processes per throughput run
    relay_guests: int = 20  # delivery: senders (each with a watching session)
    relay_rate: float = 200.0  # delivery: messages per second in total, open loop
    recovery_guests: int = 1_000  # recovery: guests on the two nodes together
    recovery_rounds: int = 1


QUICK: Final = ClusterSizes(
    guests=10,
    duration=1.0,
    rounds=1,
    relay_guests=4,
    relay_rate=40.0,
    recovery_guests=40,
)


# ------------------------------------------------------------------- the services


class Databases:
    """Where each server start's data goes: a fresh database on the throwaway
    PostgreSQL, or always the one given (``--db``)."""

    def __init__(self, given: str = "", create: Callable[[str], str] | None = None) -> None:
        self.given = given
        self._create = create
        self._numbers = itertools.count(1)

    async def fresh(self) -> str:
        if self.given or self._create is None:
            return self.given
        return await trio.to_thread.run_sync(self._create, f"bench{next(self._numbers)}")


@asynccontextmanager
async def cluster_services(db: str = "", bus: str = "") -> AsyncIterator[tuple[Databases, str]]:
    """PostgreSQL and Redis: the URLs given, or throwaway servers for the run (each
    started in a thread: ``initdb`` takes seconds). Yields (databases, bus URL)."""
    with ExitStack() as stack:
        try:
            databases = Databases(db)
            if not db:
                # With fsync, as SQLite's synchronous=FULL beside it: an ack is durable.
                postgres = await trio.to_thread.run_sync(
                    stack.enter_context, postgres_instance(durable=True)
                )
                databases = Databases(create=postgres.create_database)
            if not bus:
                redis = await trio.to_thread.run_sync(stack.enter_context, redis_instance())
                bus = redis.url
            yield databases, bus
        finally:
            # Stopping PostgreSQL waits for it: not on the event loop's thread.
            await trio.to_thread.run_sync(stack.close)


async def healthz(port: int) -> dict[str, Any]:
    """A node's ``/healthz``."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    result: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return result


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def _bus_snapshot(url: str) -> dict[str, Any]:
    bus: dict[str, Any] = (await healthz(_port(url))).get("bus", {})
    return {k: bus.get(k) for k in ("node", "published", "received", "peers")}


async def _wait_for_peers(urls: Sequence[str], within: float = 30) -> None:
    """Until every node hears every other one on the bus (a delivery or a failover
    measured before that would measure the nodes' start)."""
    with trio.fail_after(within):
        while True:
            snapshots = [await _bus_snapshot(url) for url in urls]
            names = {s["node"] for s in snapshots}
            if all(names - {s["node"]} <= set(s["peers"] or ()) for s in snapshots):
                return
            await trio.sleep(0.1)


@asynccontextmanager
async def running_nodes(
    storage: Storage, count: int, workdir: Path
) -> AsyncIterator[list[tuple[str, trio.Process]]]:
    """``count`` trio-chat servers on ``storage``, started one after another (each
    migrates the schema under PostgreSQL's advisory lock); yields (URL, process) each."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                serving(Target("chat", "chat", storage=storage), workdir)
            )
            for _ in range(count)
        ]
        yield nodes


# ------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Setup:
    name: str
    storage: str  # "sqlite", "postgres", "cluster" (PostgreSQL + Redis), "null"
    nodes: int = 1


NULL: Final = Setup("null server (chat)", "null")
SQLITE: Final = Setup("one node on SQLite", "sqlite")
POSTGRES: Final = Setup("one node on PostgreSQL", "postgres")
ONE_NODE: Final = Setup("one node on PostgreSQL + Redis", "cluster")
TWO_NODES: Final = Setup("two nodes on PostgreSQL + Redis", "cluster", 2)


@asynccontextmanager
async def _started(
    setup: Setup, databases: Databases, bus: str, workdir: Path
) -> AsyncIterator[str]:
    """``setup`` running; yields the URL to load (comma-separated for several nodes)."""
    if setup.storage == "null":
        async with serving(Target("null", "chat"), workdir) as (url, _):
            yield url
        return
    storage = Storage()
    if setup.storage != "sqlite":
        storage = Storage(await databases.fresh(), bus if setup.storage == "cluster" else "")
    async with running_nodes(storage, setup.nodes, workdir) as nodes:
        yield ",".join(url for url, _ in nodes)


async def _throughput(
    sizes: ClusterSizes, databases: Databases, bus: str, steps: Steps
) -> tuple[dict[tuple[Setup, int], list[float]], dict[tuple[Setup, int], list[float]]]:
    """Acked msg/s per round and pooled ack latencies, for every (setup, crowd). The
    storage comparison runs at both crowds; two nodes against one at the larger."""
    small, large = sizes.guests, sizes.guests * SATURATING
    runs = [(s, c) for c in (small, large) for s in (NULL, SQLITE, POSTGRES)]
    runs += [(ONE_NODE, large), (TWO_NODES, large)]
    rates: dict[tuple[Setup, int], list[float]] = {}
    latencies: dict[tuple[Setup, int], list[float]] = {}
    for round_ in range(sizes.rounds):
        for setup, crowd in in_turn(runs, round_, sizes.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                async with _started(setup, databases, bus, Path(tmp)) as url:
                    rate, lat = await closed_loop(url, "chat", crowd, sizes.duration, sizes.workers)
            rates.setdefault((setup, crowd), []).append(rate)
            latencies.setdefault((setup, crowd), []).extend(lat)
            steps.advance(f"{setup.name}, {crowd} guests")
    return rates, latencies


def throughput_figures(
    rates: dict[tuple[Setup, int], float],
    latencies: dict[tuple[Setup, int], list[float]],
    crowds: Sequence[int],
) -> list[Figure]:
    figures = []
    large = crowds[-1]
    for crowd in crowds:
        ceiling = rates[(NULL, crowd)]
        served = {s: r for (s, c), r in rates.items() if c == crowd and s is not NULL}
        fastest = max(served, key=lambda s: served[s])

        def bounded(*rates_: float, ceiling: float = ceiling) -> bool:
            return any(r * HEADROOM > ceiling for r in rates_)

        figures.append(
            Figure(
                f"load generator ceiling, chat dialect ({crowd} guests)",
                ceiling,
                served[fastest],
                "msg/s",
                "higher",
                f">= {HEADROOM:g} x",
                f"{fastest.name} (the fastest setup)",
            )
        )
        pg, lite = served[POSTGRES], served[SQLITE]
        figures.append(
            Figure(
                f"acked messages/s, {crowd} guests: {POSTGRES.name}",
                pg,
                lite,
                "msg/s",
                "higher",
                "",
                SQLITE.name,
                bounded(pg, lite),
            )
        )
        if crowd == large:
            two, one = served[TWO_NODES], served[ONE_NODE]
            figures.append(
                Figure(
                    f"acked messages/s, {crowd} guests split over the nodes: {TWO_NODES.name}",
                    two,
                    one,
                    "msg/s",
                    "higher",
                    "",
                    ONE_NODE.name,
                    bounded(two, one),
                )
            )
            for q in QUANTILES:
                figures.append(
                    Figure(
                        f"ack latency p{q * 100:g}, {crowd} guests, closed loop: {TWO_NODES.name}",
                        percentile(latencies[(TWO_NODES, crowd)], q) * 1000,
                        percentile(latencies[(ONE_NODE, crowd)], q) * 1000,
                        "ms",
                        "lower",
                        "",
                        ONE_NODE.name,
                        bounded(two, one),
                    )
                )
    return figures


# --------------------------------------------------------------------- delivery


async def _relay_once(
    send_url: str, watch_url: str, sizes: ClusterSizes
) -> tuple[list[float], dict[str, Any]]:
    """One delivery run: (latencies in seconds, the bus counters of the sender's and the
    watcher's node before and after, and how many sessions resumed the conversation)."""
    argv = worker_args(
        "relay",
        send_url=send_url,
        watch_url=watch_url,
        count=sizes.relay_guests,
        rate=sizes.relay_rate,
        duration=sizes.duration,
        source=source_address(0),
    )
    async with python_process(argv) as proc:
        ready = await read_json_line(proc)
        before = [await _bus_snapshot(send_url), await _bus_snapshot(watch_url)]
        assert proc.stdin is not None
        await proc.stdin.send_all(b"go\n")
        result = await read_json_line(proc)
        after = [await _bus_snapshot(send_url), await _bus_snapshot(watch_url)]
    if result["lost"]:
        raise RuntimeError(
            f"{result['lost']} of {result['sent']} messages never reached the watching session"
        )
    evidence = {
        "sent": result["sent"],
        "resumed": ready["resumed"],
        "sender_node": {"before": before[0], "after": after[0]},
        "watcher_node": {"before": before[1], "after": after[1]},
    }
    return [latency for _, latency in result["samples"]], evidence


async def _delivery(
    sizes: ClusterSizes, databases: Databases, bus: str, steps: Steps
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
    """Same-node and cross-node delivery, alternating, ``rounds`` times, on one pair of
    nodes: pooled latencies and each run's bus evidence, by placement."""
    latencies: dict[str, list[float]] = {"same node": [], "cross node": []}
    evidence: dict[str, list[dict[str, Any]]] = {"same node": [], "cross node": []}
    storage = Storage(await databases.fresh(), bus)
    with tempfile.TemporaryDirectory() as tmp:
        async with running_nodes(storage, 2, Path(tmp)) as nodes:
            (a, _), (b, _) = nodes
            await _wait_for_peers([a, b])
            for _ in range(sizes.rounds):
                for placement, watch in (("same node", a), ("cross node", b)):
                    lat, seen = await _relay_once(a, watch, sizes)
                    latencies[placement] += lat
                    evidence[placement].append(seen)
                    steps.advance(f"delivery, {placement}")
    return latencies, evidence


def delivery_figures(latencies: dict[str, list[float]]) -> list[Figure]:
    same, cross = sorted(latencies["same node"]), sorted(latencies["cross node"])
    figures = []
    for q in QUANTILES:
        p_same, p_cross = percentile(same, q) * 1000, percentile(cross, q) * 1000
        figures.append(
            Figure(
                f"delivery latency p{q * 100:g}, send to the other session's push: cross node",
                p_cross,
                p_same,
                "ms",
                "lower",
                "",
                "same node",
            )
        )
        figures.append(
            Figure(
                f"extra latency a cross-node delivery adds, p{q * 100:g}",
                p_cross - p_same,
                p_same,
                "ms",
                "lower",
                "",
                "same-node delivery (the ratio: extra / same node)",
            )
        )
    return figures


# --------------------------------------------------------------------- recovery


@dataclass
class RecoveryRun:
    guests: int  # on the node that was killed
    first_sign_in: float  # seconds for those guests' first sign-in (the baseline)
    gaps: list[float]  # per guest: seconds from its connection dropping to being back
    all_back: float  # seconds from the kill until the last of them was back


async def _recover_once(sizes: ClusterSizes, databases: Databases, bus: str) -> RecoveryRun:
    storage = Storage(await databases.fresh(), bus)
    with tempfile.TemporaryDirectory() as tmp:
        async with running_nodes(storage, 2, Path(tmp)) as nodes:
            (a, doomed), (b, _) = nodes
            await _wait_for_peers([a, b])
            argv = worker_args(
                "failover",
                url=f"{a},{b}",
                count=sizes.recovery_guests,
                source=source_address(1),
            )
            async with python_process(argv) as proc:
                ready = await read_json_line(proc)
                killed_at = time.monotonic()
                doomed.kill()  # SIGKILL: kill -9
                result = await read_json_line(proc)
    if result["missing"] or result["moved_elsewhere"]:
        raise RuntimeError(
            f"recovery: {result['missing']} guests not back, "
            f"{result['moved_elsewhere']} resumed into another conversation"
        )
    gaps = sorted(b - lost for lost, b in zip(result["lost"], result["back"], strict=True))
    return RecoveryRun(
        ready["on_doomed_node"],
        ready["first_sign_in_s"],
        gaps,
        max(result["back"]) - killed_at,
    )


def recovery_figures(runs: Sequence[RecoveryRun]) -> list[Figure]:
    guests = runs[0].guests
    baseline = statistics.median(r.first_sign_in for r in runs)
    base_name = "the same guests' first sign-in (register + one message), one node"
    what = f"recovery after kill -9 of a node ({guests:,} guests on it)"
    values = [
        ("per-guest gap p50", statistics.median(percentile(r.gaps, 0.5) for r in runs)),
        ("per-guest gap p100", statistics.median(r.gaps[-1] for r in runs)),
        ("every guest back after (from the kill)", statistics.median(r.all_back for r in runs)),
    ]
    return [
        Figure(f"{what}: {name}", value, baseline, "s", "lower", "", base_name)
        for name, value in values
    ]


# ------------------------------------------------------------------------ all


async def scenario_cluster(
    sizes: ClusterSizes, steps: Steps, db: str = "", bus: str = ""
) -> tuple[list[Figure], dict[str, Any]]:
    """Every part of ``bench cluster`` (see the module's docstring)."""
    crowds = (sizes.guests, sizes.guests * SATURATING)
    steps.start("cluster", sizes.rounds * (8 + 2) + sizes.recovery_rounds)
    async with cluster_services(db, bus) as (databases, bus_url):
        per_round, latencies = await _throughput(sizes, databases, bus_url, steps)
        relayed, evidence = await _delivery(sizes, databases, bus_url, steps)
        recoveries = []
        for _ in range(sizes.recovery_rounds):
            recoveries.append(await _recover_once(sizes, databases, bus_url))
            steps.advance("recovery")
    rates = {key: statistics.median(values) for key, values in per_round.items()}
    figures = [
        *throughput_figures(rates, latencies, crowds),
        *delivery_figures(relayed),
        *recovery_figures(recoveries),
    ]
    series = {
        "cluster_rounds": {f"{s.name}, {c} guests": v for (s, c), v in per_round.items()},
        "cluster_latency_ms": {
            f"{s.name}, {c} guests": quantiles(sorted(v))
            for (s, c), v in latencies.items()
            if s is not NULL
        },
        "cluster_delivery_ms": {name: quantiles(sorted(v)) for name, v in relayed.items()},
        "cluster_delivery_bus": evidence,
        "cluster_recovery": [
            {
                "guests": r.guests,
                "first_sign_in_s": r.first_sign_in,
                "all_back_s": r.all_back,
                "gap_quantiles_s": [(q, percentile(r.gaps, q)) for q in (0.5, 0.9, 0.99, 1.0)],
            }
            for r in recoveries
        ],
        "cluster_sizes": asdict(sizes),
    }
    return figures, series
