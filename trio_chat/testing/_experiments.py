"""Reconnection experiments: an outage, many clients, every attempt on record.

:func:`outage_experiment` runs in the caller's Trio run: in real time against a real
server, or under ``MockClock`` against :class:`MockServer`, where hours of backoff
take seconds (:func:`simulate_outage`). The same clients, the same proxy, the same
measurements either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.testing

from ..client._client import ChatClient
from ..core.backoff import Backoff, Jitter
from ._mock import MockServer
from ._proxy import FaultProxy
from ._stats import per_interval

__all__ = ["OutageResult", "outage_experiment", "simulate_outage"]


@dataclass
class OutageResult:
    """What happened to every client, with times in seconds from the outage's start.

    ``timelines[i]`` is client i's list of ``(start, end, state)`` spans; ``attempts``
    the connection attempts the server side saw; ``recovery_s[i]`` when client i was
    connected again; ``work`` the attempts from the outage until everyone was back;
    ``completion_s`` when the last one was back (``inf`` if someone never was).
    """

    jitter: str
    clients: int
    outage_s: float
    timelines: list[list[tuple[float, float, str]]] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    work: int = 0
    completion_s: float = math.inf
    peak_attempts_per_100ms: int = 0

    def attempt_rate(self, bucket: float = 0.1) -> tuple[list[float], list[int]]:
        """Connection attempts per ``bucket`` seconds: (bucket starts, counts)."""
        counts = per_interval(self.attempts, 0.0, bucket)
        return [i * bucket for i in range(len(counts))], counts


async def outage_experiment(
    upstream_port: int,
    *,
    clients: int = 100,
    jitter: Jitter = "full",
    outage: float = 5.0,
    capacity_per_100ms: int | None = None,
    seed: int = 0,
    initial: float = 0.5,
    maximum: float = 30.0,
    connect_timeout: float = 1.0,
    give_up_after: float = 600.0,
) -> OutageResult:
    """Connect ``clients`` through a fault proxy to the server on ``upstream_port``,
    cut every connection and refuse new ones for ``outage`` seconds, then let them
    back (at most ``capacity_per_100ms`` new connections per 100 ms, if set) and
    record how each one recovers."""
    result = OutageResult(jitter, clients, outage)
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy(upstream_port, seed=seed)
        await nursery.start(proxy.run)
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        population = [
            # The proxy refuses by resetting mid-handshake, where trio-websocket's
            # connect waits for the timeout: keep it short, as a loopback refusal is.
            ChatClient(
                url,
                heartbeat=0,
                connect_timeout=connect_timeout,
                backoff=Backoff(
                    initial=initial, max=maximum, jitter=jitter, seed=seed * 100_003 + i
                ),
            )
            for i in range(clients)
        ]
        async with trio.open_nursery() as running:
            for client in population:
                await running.start(_keep, client)
            for client in population:
                await client.wait_for_state("connected")
            start = trio.current_time()
            proxy.attempts.clear()
            proxy.refuse()
            proxy.reset_all()
            proxy.limit_accepts(capacity_per_100ms)
            await trio.sleep(outage)
            proxy.refuse(False)
            with trio.move_on_after(give_up_after):
                for client in population:
                    await client.wait_until(_back(client))
            end = trio.current_time()
            running.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    result.attempts = [at - start for at in proxy.attempts]
    for client in population:
        result.timelines.append(_timeline(client, start, end))
        back = [
            e.at - start
            for e in client.event_log
            if e.kind == "state" and e.data["state"] == "connected" and e.at > start
        ]
        result.recovery_s.append(back[0] if back else math.inf)
    result.completion_s = max(result.recovery_s, default=math.inf)
    result.work = sum(1 for at in result.attempts if at <= result.completion_s)
    _, counts = result.attempt_rate()
    result.peak_attempts_per_100ms = max(counts, default=0)
    return result


def _back(client: ChatClient) -> Callable[[], bool]:
    """True once ``client`` is connected again after the outage."""
    return lambda: client.state == "connected" and client.reconnects >= 1


async def _keep(
    client: ChatClient, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        task_status.started()
        await trio.sleep_forever()


def _timeline(client: ChatClient, start: float, end: float) -> list[tuple[float, float, str]]:
    spans: list[tuple[float, float, str]] = []
    state, since = "connected", 0.0
    for event in client.event_log:
        if event.kind != "state" or event.at < start:
            continue
        at = event.at - start
        new = event.data["state"]
        if "delay" in event.data:
            new = "waiting"
        elif new in ("connecting", "reconnecting"):
            new = "trying"
        if new != state:
            spans.append((since, at, state))
            state, since = new, at
    spans.append((since, end - start, state))
    return [s for s in spans if s[1] > s[0]]


def simulate_outage(**kwargs: object) -> OutageResult:
    """:func:`outage_experiment` in virtual time against :class:`MockServer`: the same
    clients, with Trio's ``MockClock`` jumping over every wait. Call it outside Trio
    (in a notebook, from a worker thread)."""

    async def main() -> OutageResult:
        async with trio.open_nursery() as nursery:
            mock = MockServer()
            port = await nursery.start(mock.run)
            result = await outage_experiment(port, **kwargs)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
