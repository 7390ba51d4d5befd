"""The soak run: many guests through scheduled faults, then an exact accounting.

A real server (a child process, so it can be restarted or killed) sits behind a
:class:`FaultProxy`; simulated guests write through the proxy while the faults of the
schedule hit them; at the end faults are lifted, every outbox drains, and what each
guest sent is checked against what the server stored and what the guest holds.

:func:`soak_cluster` does the same to a cluster: N node processes on one PostgreSQL
and one Redis, the guests spread over them (through HAProxy on one port, or straight
to each node), through the cluster's own faults: a node killed and started again,
Redis restarted, its pub/sub connections killed, PostgreSQL stopped as by a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..client._client import ChatClient, ClientEvent
from ..core.backoff import Backoff
from ..core.errors import TrioChatError
from ._front import haproxy_binary, haproxy_front
from ._processes import ServerProcess, free_port
from ._proxy import FaultProxy
from ._services import PostgresInstance, RedisInstance, postgres_instance, redis_instance
from ._stats import per_interval, percentile

__all__ = [
    "CLUSTER_FAULT_KINDS",
    "Fault",
    "SoakReport",
    "check_cluster_faults",
    "parse_faults",
    "soak",
    "soak_cluster",
]

FAULT_KINDS = ("drop", "blackhole", "latency", "restart", "kill")
DEFAULT_FAULTS = "drop@0.12,blackhole@0.3:2.5,latency@0.45:3,restart@0.6,kill@0.8"
# The cluster's own faults: ``kill`` a node (-9) and start it again ``seconds`` later,
# restart ``redis``, kill the nodes' ``pubsub`` connections (CLIENT KILL TYPE pubsub),
# stop ``postgres`` as by a crash (-m immediate) and start it ``seconds`` later.
CLUSTER_FAULT_KINDS = ("kill", "redis", "pubsub", "postgres")
DEFAULT_CLUSTER_FAULTS = "kill@0.1:1,pubsub@0.25,redis@0.4:1,postgres@0.55:1,kill@0.75:1"


@dataclass(frozen=True)
class Fault:
    """``kind`` at ``at`` (a fraction of the run, 0..1), lasting ``seconds`` where it
    applies (blackhole, latency)."""

    kind: str
    at: float
    seconds: float = 0.0


def parse_faults(spec: str, kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """Parse ``kind@fraction[:seconds],...`` (e.g. ``drop@0.2,blackhole@0.5:3``);
    ``none`` for no faults. ``kinds``: :data:`CLUSTER_FAULT_KINDS` for a cluster soak.
    Raises ``ValueError`` naming the bad part."""
    if spec.strip() in ("", "none"):
        return []
    faults = []
    for part in spec.split(","):
        kind, _, when = part.strip().partition("@")
        at, _, seconds = when.partition(":")
        if kind not in kinds:
            raise ValueError(f"unknown fault {kind!r} in {part!r}: use {', '.join(kinds)}")
        try:
            fault = Fault(kind, float(at), float(seconds) if seconds else 0.0)
        except ValueError:
            raise ValueError(f"bad time in {part!r}: use kind@fraction[:seconds]") from None
        if not 0 <= fault.at <= 1 or fault.seconds < 0:
            raise ValueError(f"{part!r}: the fraction must be within 0..1")
        faults.append(fault)
    return sorted(faults, key=lambda f: f.at)


@dataclass
class SoakReport:
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    reconnects: int = 0
    # Of the messages each guest holds: pushed to it live, or repaired from history
    # (missed while it was away, or lost on the way).
    arrived_live: int = 0
    repaired: int = 0
    # Acknowledged on their first send, yet never pushed live: the ack and the push
    # leave in one write, so each of these is a push the server failed to send.
    acked_but_not_pushed: int = 0
    recovery_s: dict[str, float] = field(default_factory=dict)
    peak_attempts_per_100ms: int = 0
    guests: int = 0
    duration_s: float = 0.0
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The cluster soak: how many nodes, how guests reached them ("haproxy": one port;
    # "direct": each guest to one node's port), and each fault as it was carried out.
    nodes: int = 1
    front: str = "proxy"
    faults_applied: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.out_of_order == 0
            and self.acked_but_not_pushed == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "reconnects": self.reconnects,
            "arrived_live": self.arrived_live,
            "repaired": self.repaired,
            "acked_but_not_pushed": self.acked_but_not_pushed,
            "recovery_s": self.recovery_s,
            "peak_attempts_per_100ms": self.peak_attempts_per_100ms,
            "guests": self.guests,
            "duration_s": self.duration_s,
            "faults": self.faults,
            "notes": self.notes,
            "nodes": self.nodes,
            "front": self.front,
            "faults_applied": self.faults_applied,
        }


@dataclass
class _Guest:
    client: ChatClient
    sent: list[str] = field(default_factory=list)  # texts, in the order written
    acked: dict[str, int] = field(default_factory=dict)  # text -> seq
    outages: list[float] = field(default_factory=list)  # recovery times, seconds
    pushed: set[int] = field(default_factory=set)  # seqs that arrived live
    acked_first_time: set[int] = field(default_factory=set)  # seqs acked on their first send
    _down_since: float | None = None

    def on_event(self, event: ClientEvent) -> None:
        if event.kind == "pushed":
            self.pushed.add(event.data["seq"])
            return
        if event.kind == "ack":
            if not event.data["resent"]:
                self.acked_first_time.add(event.data["seq"])
            return
        if event.kind != "state":
            return
        state = event.data["state"]
        if state == "connected" and self._down_since is not None:
            self.outages.append(event.at - self._down_since)
            self._down_since = None
        elif state in ("reconnecting", "offline") and self._down_since is None:
            self._down_since = event.at


async def soak(
    guests: int,
    duration: float,
    *,
    faults: list[Fault] | None = None,
    seed: int = 0,
    rate: float = 1.0,
    drain_timeout: float = 60.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    db: str | Path | None = None,
) -> SoakReport:
    """Run ``guests`` guests for ``duration`` seconds through ``faults`` (default: every
    kind, spread over the run), each writing about ``rate`` messages a second. ``db``:
    the server's SQLite file or ``postgresql://`` URL (default: a new temporary file)."""
    faults = parse_faults(DEFAULT_FAULTS) if faults is None else faults
    rng = random.Random(seed)
    report = SoakReport(
        guests=guests, duration_s=duration, faults=[f"{f.kind}@{f.at}" for f in faults]
    )
    with tempfile.TemporaryDirectory(prefix="trio-chat-soak-") as tmp:
        server = ServerProcess(
            db if db is not None else Path(tmp) / "soak.db",
            free_port(),
            *_SOAK_SERVER_FLAGS,
        )
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            proxy = FaultProxy(server.port, seed=seed)
            await nursery.start(proxy.run)
            population = _population([f"ws://127.0.0.1:{proxy.port}/ws"], guests, seed)

            async def apply_faults() -> None:
                await _apply_faults(faults, duration, proxy, server, nursery, report)

            await _drive(population, duration, rate, rng, drain_timeout, progress, apply_faults)
            report.peak_attempts_per_100ms = _peak(proxy.attempts)
            proxy.passthrough()
            await _account(report, population, server.url)
            await server.aclose()
            nursery.cancel_scope.cancel()
    return report


_SOAK_SERVER_FLAGS = (
    "--rate-limit",
    "0",
    "--rate-limit-per-ip",  # every soak guest comes from loopback
    "0",
    "--typing-delay",
    "0",
    "--heartbeat",
    "2",
    # every guest comes through one loopback proxy: no per-address limits
    "--max-connections-per-ip",
    "0",
    "--registrations-per-minute",
    "0",
)


def _population(urls: list[str], guests: int, seed: int) -> list[_Guest]:
    """``guests`` simulated guests, guest ``i`` on ``urls[i % len(urls)]``."""
    population = [
        _Guest(
            ChatClient(
                urls[i % len(urls)],
                name=f"soak {i}",
                heartbeat=1.0,
                connect_timeout=3,
                backoff=Backoff(initial=0.1, max=2.0, seed=seed * 1000 + i),
            )
        )
        for i in range(guests)
    ]
    for guest in population:
        guest.client.add_listener(guest.on_event)
    return population


async def _drive(
    population: list[_Guest],
    duration: float,
    rate: float,
    rng: random.Random,
    drain_timeout: float,
    progress: Callable[[dict[str, Any]], None] | None,
    apply_faults: Callable[[], Awaitable[None]],
) -> None:
    """Every guest's life beside the faults, until every guest is done."""
    started = trio.current_time()
    async with trio.open_nursery() as watch:
        if progress is not None:
            watch.start_soon(_report_progress, population, started, duration, progress)
        async with trio.open_nursery() as run:
            for index, guest in enumerate(population):
                run.start_soon(
                    _guest_life, guest, index, duration, rate, rng.random(), drain_timeout
                )
            run.start_soon(apply_faults)
        watch.cancel_scope.cancel()  # the guests are done: stop reporting


def check_cluster_faults(faults: list[Fault], *, own_database: bool, own_bus: bool) -> list[Fault]:
    """``faults`` if the cluster soak can carry them out: it restarts only a PostgreSQL
    or Redis it started itself. Raises ``ValueError`` naming the fault otherwise."""
    for fault in faults:
        if fault.kind == "postgres" and not own_database:
            raise ValueError("'postgres' restarts only a PostgreSQL the soak started (no --db)")
        if fault.kind == "redis" and not own_bus:
            raise ValueError("'redis' restarts only a Redis the soak started (no --bus)")
    return faults


async def soak_cluster(
    guests: int,
    duration: float,
    *,
    nodes: int = 2,
    faults: list[Fault] | None = None,
    seed: int = 0,
    rate: float = 1.0,
    db: str | None = None,
    bus: str | None = None,
    front: str | None = None,
    drain_timeout: float = 60.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> SoakReport:
    """The soak on ``nodes`` node processes sharing one PostgreSQL and one Redis.

    ``db``/``bus``: the servers to use (``postgresql://``, ``redis://`` URLs); without
    them throwaway ones are started (and then ``postgres`` and ``redis`` faults can
    restart them). ``front``: ``"haproxy"`` (every guest on HAProxy's one port, as in
    production: a guest whose node dies resumes on another) or ``"direct"`` (guest
    ``i`` on node ``i % nodes``: it waits for its node to come back); default
    ``"haproxy"`` when HAProxy is installed. ``faults``: of
    :data:`CLUSTER_FAULT_KINDS` (default: each kind, a ``kill`` twice). Raises
    ``ValueError`` for faults it cannot carry out (see :func:`check_cluster_faults`).
    """
    if nodes < 2:
        raise ValueError("a cluster has at least 2 nodes")
    front = front or ("haproxy" if haproxy_binary() else "direct")
    if front not in ("haproxy", "direct"):
        raise ValueError(f"front is 'haproxy' or 'direct', not {front!r}")
    if faults is None:
        faults = [
            f
            for f in parse_faults(DEFAULT_CLUSTER_FAULTS, CLUSTER_FAULT_KINDS)
            if (f.kind != "postgres" or db is None) and (f.kind != "redis" or bus is None)
        ]
    check_cluster_faults(faults, own_database=db is None, own_bus=bus is None)
    rng = random.Random(seed)
    report = SoakReport(
        guests=guests,
        duration_s=duration,
        faults=[f"{f.kind}@{f.at}" for f in faults],
        nodes=nodes,
        front=front,
    )
    with contextlib.ExitStack() as services:
        # Started in a thread: initdb and pg_ctl block for seconds.
        postgres: PostgresInstance | None = None
        redis_server: RedisInstance | None = None
        if db is None:
            postgres = await trio.to_thread.run_sync(services.enter_context, postgres_instance())
            db = await trio.to_thread.run_sync(postgres.create_database, "soak")
        if bus is None:
            redis_server = await trio.to_thread.run_sync(services.enter_context, redis_instance())
            bus = redis_server.url
        # Behind HAProxy the nodes learn each guest's address from its PROXY header.
        proxied = ("--proxy-protocol",) if front == "haproxy" else ()
        cluster = [
            ServerProcess(db, free_port(), "--bus", bus, *_SOAK_SERVER_FLAGS, *proxied)
            for _ in range(nodes)
        ]
        try:
            async with trio.open_nursery() as nursery:
                for each in cluster:
                    await each.start(nursery)
                async with contextlib.AsyncExitStack() as stack:
                    if front == "haproxy":
                        names = [(f"n{i + 1}", each.port) for i, each in enumerate(cluster)]
                        balancer = await stack.enter_async_context(haproxy_front(names))
                        urls = [balancer.url]
                    else:
                        urls = [each.url for each in cluster]
                    population = _population(urls, guests, seed)
                    faults_run = _ClusterFaults(
                        cluster, nursery, bus, postgres, redis_server, report
                    )

                    async def apply_faults() -> None:
                        await faults_run.apply(faults, duration)

                    await _drive(
                        population, duration, rate, rng, drain_timeout, progress, apply_faults
                    )
                    # Through the front when there is one: the nodes then take only
                    # connections that open with its PROXY header.
                    await _account(report, population, urls[0])
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for each in cluster:
                    await each.aclose()
            await trio.to_thread.run_sync(services.close)
    return report


@dataclass
class _ClusterFaults:
    cluster: list[ServerProcess]
    nursery: trio.Nursery
    bus: str
    postgres: PostgresInstance | None
    redis_server: RedisInstance | None
    report: SoakReport
    kills: int = 0

    async def apply(self, faults: list[Fault], duration: float) -> None:
        start = trio.current_time()
        for fault in faults:
            await trio.sleep_until(start + fault.at * duration)
            at = trio.current_time() - start
            down = fault.seconds or 1.0
            if fault.kind == "kill":
                victim = self.kills % len(self.cluster)
                self.kills += 1
                await self.cluster[victim].stop(signal.SIGKILL)
                await trio.sleep(down)
                await self.cluster[victim].start(self.nursery)
                detail = f"node n{victim + 1} (-9), started again after {down:g} s"
            elif fault.kind == "pubsub":
                killed = await trio.to_thread.run_sync(_kill_pubsub_clients, self.bus)
                detail = f"CLIENT KILL TYPE pubsub: {killed} subscriptions"
            elif fault.kind == "redis":
                assert self.redis_server is not None  # check_cluster_faults
                await trio.to_thread.run_sync(self.redis_server.stop)
                await trio.sleep(down)
                await trio.to_thread.run_sync(self.redis_server.start)
                detail = f"stopped, started again after {down:g} s"
            else:
                assert self.postgres is not None  # check_cluster_faults
                await trio.to_thread.run_sync(self.postgres.stop, "immediate")
                await trio.sleep(down)
                await trio.to_thread.run_sync(self.postgres.start)
                detail = f"stopped -m immediate, started again after {down:g} s"
            self.report.faults_applied.append(f"{fault.kind} at {at:.1f} s: {detail}")


def _kill_pubsub_clients(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        killed: int = client.client_kill_filter(_type="pubsub")
        return killed
    finally:
        client.close()


async def _guest_life(
    guest: _Guest, index: int, duration: float, rate: float, phase: float, drain_timeout: float
) -> None:
    client = guest.client
    rng = random.Random(index)
    async with client:
        async with trio.open_nursery() as sends:
            await trio.sleep(phase / max(rate, 0.01))  # guests do not start in step
            deadline = trio.current_time() + duration
            n = 0
            while trio.current_time() < deadline:
                text = f"soak guest {index} message {n}"
                guest.sent.append(text)
                sends.start_soon(_send, guest, text)
                n += 1
                await trio.sleep(rng.expovariate(rate))
            # Drain: everything written is either acknowledged or counted lost.
            sends.cancel_scope.deadline = trio.current_time() + drain_timeout
        with trio.move_on_after(drain_timeout):
            await client.wait_until(lambda: client.synced and not client.pending)
            await client.ping()


async def _send(guest: _Guest, text: str) -> None:
    try:
        stored = await guest.client.send(text)
    except TrioChatError:
        return
    guest.acked[text] = stored.seq


async def _apply_faults(
    faults: list[Fault],
    duration: float,
    proxy: FaultProxy,
    server: ServerProcess,
    nursery: trio.Nursery,
    report: SoakReport,
) -> None:
    start = trio.current_time()
    for fault in faults:
        await trio.sleep_until(start + fault.at * duration)
        report.faults_applied.append(f"{fault.kind} at {trio.current_time() - start:.1f} s")
        if fault.kind == "drop":
            proxy.reset_all()
        elif fault.kind == "blackhole":
            proxy.blackhole()
            await trio.sleep(fault.seconds or 2.0)
            proxy.blackhole(False)
        elif fault.kind == "latency":
            proxy.add_latency(0.2, jitter=0.1)
            await trio.sleep(fault.seconds or 3.0)
            proxy.add_latency(0.0)
        elif fault.kind in ("restart", "kill"):
            await server.stop(signal.SIGINT if fault.kind == "restart" else signal.SIGKILL)
            await server.start(nursery)


async def _report_progress(
    population: list[_Guest],
    started: float,
    duration: float,
    progress: Callable[[dict[str, Any]], None],
) -> None:
    while True:
        states: dict[str, int] = {}
        for guest in population:
            states[guest.client.state] = states.get(guest.client.state, 0) + 1
        progress(
            {
                "elapsed": trio.current_time() - started,
                "duration": duration,
                "sent": sum(len(g.sent) for g in population),
                "acknowledged": sum(len(g.acked) for g in population),
                "states": states,
            }
        )
        await trio.sleep(0.25)


def _peak(attempts: list[float]) -> int:
    if not attempts:
        return 0
    # Slots aligned on whole tenths of a second of Trio time.
    return max(per_interval(attempts, math.floor(min(attempts) * 10) / 10))


async def _account(report: SoakReport, population: list[_Guest], server_url: str) -> None:
    """Compare what every guest wrote with what the server stored and what the guest
    holds. The server is asked afresh, bypassing the proxy."""
    outages: list[float] = []
    for index, guest in enumerate(population):
        client = guest.client
        report.sent += len(guest.sent)
        report.acknowledged += len(guest.acked)
        report.reconnects += client.reconnects
        outages += guest.outages
        if client.token is None:
            report.lost += len(guest.sent)
            report.notes.append(f"guest {index} never connected")
            continue
        stored = await _stored(server_url, client.token)
        by_text: dict[str, list[int]] = {}
        for message in stored:
            if message.sender == "guest":
                by_text.setdefault(message.text, []).append(message.seq)
        for text in guest.sent:
            seqs = by_text.get(text, [])
            if not seqs:
                report.lost += 1
                report.notes.append(f"guest {index}: {text!r} was never stored")
            elif len(seqs) > 1:
                report.duplicated += len(seqs) - 1
                report.notes.append(f"guest {index}: {text!r} stored {len(seqs)} times")
            elif text in guest.acked and guest.acked[text] != seqs[0]:
                report.lost += 1
                report.notes.append(f"guest {index}: {text!r} acked as another seq")
        order = [by_text[t][0] for t in guest.sent if by_text.get(t)]
        inversions = sum(1 for a, b in itertools.pairwise(order) if b < a)
        if inversions:
            report.out_of_order += inversions
            report.notes.append(f"guest {index}: {inversions} messages out of order")
        report.arrived_live += sum(1 for m in client.transcript if m.seq in guest.pushed)
        report.repaired += sum(1 for m in client.transcript if m.seq not in guest.pushed)
        never_pushed = guest.acked_first_time - guest.pushed
        if never_pushed:
            report.acked_but_not_pushed += len(never_pushed)
            report.notes.append(f"guest {index}: seqs {sorted(never_pushed)} acked, never pushed")
        held = [(m.seq, m.text) for m in client.transcript]
        expected = [(m.seq, m.text) for m in stored]
        if held == expected[: len(held)]:
            report.delivered += len(held)
            if len(held) < len(expected):
                report.notes.append(f"guest {index}: holds {len(held)} of {len(expected)} messages")
        else:
            report.out_of_order += 1
            report.notes.append(f"guest {index}: transcript differs from the server")
    report.recovery_s = {
        "p50": round(percentile(sorted(outages), 0.5, empty=0.0), 3),
        "p99": round(percentile(sorted(outages), 0.99, empty=0.0), 3),
        "max": round(max(outages, default=0.0), 3),
    }


async def _stored(url: str, token: str) -> list[Any]:
    async with ChatClient(url, token=token, backoff=Backoff(initial=0.1, max=1)) as reader:
        with trio.fail_after(30):
            await reader.wait_until(lambda: reader.synced)
            await reader.ping()
            await reader.wait_until(lambda: reader.synced)
        return list(reader.transcript)
