"""The cluster behind HAProxy on one port: the front docs/deployment.md describes
(rendered by ``trio_chat.testing._front``), with two node processes on a real
PostgreSQL and Redis, reconnecting clients, a ``kill -9`` and a node whose
``/healthz`` answers 503."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_chat import ChatClient, StaffClient
from trio_chat.core.backoff import Backoff
from trio_chat.testing._front import haproxy_config, haproxy_front
from trio_chat.testing._processes import ServerProcess, free_port
from trio_chat.testing._proxy import FaultProxy
from trio_chat.testing._services import PostgresInstance, RedisInstance

from ..helpers import staff_token

pytestmark = pytest.mark.slow

DOCS = Path(__file__).parents[2] / "docs" / "deployment.md"
# Behind a front every connection comes from its address: no per-address limits.
NODE_FLAGS = (
    "--concierge",
    "off",
    "--rate-limit",
    "0",
    "--rate-limit-per-ip",
    "0",
    "--max-connections-per-ip",
    "0",
    "--registrations-per-minute",
    "0",
    "--typing-delay",
    "0",
    "--heartbeat",
    "2",
    "--proxy-protocol",  # HAProxy names each client in a PROXY v2 header
)


def node(db: str, bus: str) -> ServerProcess:
    return ServerProcess(db, free_port(), "--bus", bus, *NODE_FLAGS)


async def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """A node's ``/healthz``, asked directly (not through the front). The nodes take
    the PROXY protocol, so the request opens with a header naming no client, as
    HAProxy's own health checks do."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"PROXY UNKNOWN\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def connections(port: int) -> int:
    count: int = (await healthz(port))[1]["connections"]
    return count


async def poll(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    """Until ``check()`` holds (another process's state: polled, with a deadline)."""
    with trio.fail_after(within):
        while True:
            if await check():
                return
            await trio.sleep(0.05)


async def wait_connections(port: int, wanted: int) -> None:
    async def reached() -> bool:
        return await connections(port) == wanted

    await poll(reached)


async def wait_status(port: int, wanted: int) -> None:
    async def answers() -> bool:
        return (await healthz(port))[0] == wanted

    await poll(answers)


def guest_client(url: str, index: int) -> ChatClient:
    return ChatClient(
        url,
        name=f"guest {index}",
        heartbeat=1.0,
        connect_timeout=3,
        backoff=Backoff(initial=0.1, max=1.0, seed=index),
    )


@asynccontextmanager
async def running(nursery: trio.Nursery, *nodes: ServerProcess) -> AsyncIterator[None]:
    try:
        for each in nodes:
            await each.start(nursery)
        yield
    finally:
        with trio.CancelScope(shield=True):
            for each in nodes:
                await each.aclose()


def holds(client: ChatClient, seq: int) -> bool:
    return len(client.transcript) >= seq


def staff_holds(staff: StaffClient, conversation_id: str, seq: int) -> bool:
    return len(staff.transcript_of(conversation_id)) >= seq


async def synced(client: ChatClient) -> None:
    with trio.fail_after(20):
        await client.wait_until(lambda: client.synced and not client.pending)


def test_the_documented_haproxy_config_is_the_one_the_tests_run() -> None:
    rendered = haproxy_config([("a", "10.0.0.11:8765"), ("b", "10.0.0.12:8765")])
    text = DOCS.read_text()
    assert rendered in text
    # ...and it is WebSocket-aware and health-checked, as the docs say.
    for line in (
        "timeout tunnel 1h",
        "option httpchk GET /healthz",
        "http-check expect status 200",
        "balance leastconn",
        "default-server check inter 2s fall 2 rise 2 on-marked-down shutdown-sessions",
    ):
        assert re.search(rf"^\s+{re.escape(line)}", rendered, re.M), line


async def test_guests_and_staff_chat_through_haproxy_and_a_kill_9_loses_nothing(
    pg_url: str, redis_server: RedisInstance
) -> None:
    token = staff_token(pg_url, "Anna")
    a, b = node(pg_url, redis_server.url), node(pg_url, redis_server.url)
    per_guest = 16
    async with trio.open_nursery() as nursery, running(nursery, a, b):
        async with (
            haproxy_front([("a", a.port), ("b", b.port)]) as front,
            AsyncExitStack() as stack,
        ):
            guests = [await stack.enter_async_context(guest_client(front.url, i)) for i in range(6)]
            staff = await stack.enter_async_context(
                StaffClient(
                    front.url,
                    token=token,
                    heartbeat=1.0,
                    connect_timeout=3,
                    backoff=Backoff(initial=0.1, max=1.0, seed=99),
                )
            )
            for client in [*guests, staff]:
                await synced(client)
            # One port, both nodes: leastconn spreads the seven connections.
            spread = [await connections(a.port), await connections(b.port)]
            assert sum(spread) == 7 and min(spread) >= 2, spread
            cids = [g.conversation_id for g in guests]
            assert None not in cids
            for cid in cids:
                assert cid is not None
                await staff.watch(cid)
            held = cids[0]
            assert held is not None
            await staff.claim(held)

            acked: dict[ChatClient, list[tuple[int, str]]] = {c: [] for c in [*guests, staff]}
            killed = trio.Event()

            async def talk(index: int) -> None:
                for n in range(per_guest):
                    text = f"guest {index} message {n}"
                    stored = await guests[index].send(text)
                    acked[guests[index]].append((stored.seq, text))
                    if index == 0 and n == per_guest // 3:
                        await a.stop(signal.SIGKILL)  # mid-traffic, acks in flight
                        killed.set()
                    await trio.sleep(0.02)

            async def reply() -> None:
                for n in range(per_guest // 2):
                    text = f"staff reply {n}"
                    stored = await staff.reply(held, text)
                    acked[staff].append((stored.seq, text))
                    await trio.sleep(0.04)

            with trio.fail_after(40):
                async with trio.open_nursery() as talking:
                    for index in range(len(guests)):
                        talking.start_soon(talk, index)
                    talking.start_soon(reply)
            assert killed.is_set()

            # HAProxy's health check took the dead node out; everyone came back
            # through the same port, to the survivor, and so do newcomers.
            await front.wait_states({"a": "DOWN", "b": "UP"})
            await wait_connections(b.port, 7)
            newcomer = await stack.enter_async_context(guest_client(front.url, 7))
            await synced(newcomer)
            await wait_connections(b.port, 8)
            assert sum(c.reconnects for c in guests) >= 1

            # Every client holds each acknowledged message once, in seq order, with
            # no gap, exactly as the database has it.
            for client in [*guests, staff]:
                await synced(client)
            for index, guest in enumerate(guests):
                cid = cids[index]
                assert cid is not None
                transcript = [(m.seq, m.text) for m in guest.transcript]
                assert [seq for seq, _ in transcript] == list(range(1, len(transcript) + 1))
                mine = [(seq, text) for seq, text in transcript if text.startswith("guest ")]
                assert mine == acked[guest], index
                if cid == held:
                    theirs = [(s, t) for s, t in transcript if t.startswith("staff reply")]
                    assert theirs == acked[staff]
                # The staff console got the same conversation, seq for seq.
                with trio.fail_after(10):
                    await staff.wait_until(partial(staff_holds, staff, cid, len(transcript)))
                assert [(m.seq, m.text) for m in staff.transcript_of(cid)] == transcript
                async with ChatClient(front.url, token=guest.token) as reader:  # only b is up
                    await synced(reader)
                    assert [(m.seq, m.text) for m in reader.transcript] == transcript
        nursery.cancel_scope.cancel()


async def test_a_node_whose_healthz_answers_503_gets_no_new_connections(
    postgres: PostgresInstance, pg_url: str, redis_server: RedisInstance
) -> None:
    # Node c reaches PostgreSQL through a proxy that then refuses: a real database
    # outage for that node alone (its /healthz answers 503), while a keeps storing.
    database = pg_url.rsplit("/", 1)[1]
    async with trio.open_nursery() as nursery:
        link = FaultProxy(postgres.port)
        await nursery.start(link.run)
        a = node(pg_url, redis_server.url)
        c = node(f"postgresql://postgres@127.0.0.1:{link.port}/{database}", redis_server.url)
        async with (
            running(nursery, a, c),
            haproxy_front([("a", a.port), ("c", c.port)]) as front,
            AsyncExitStack() as stack,
        ):
            guests = []
            for i in range(4):  # one at a time: leastconn alternates
                guests.append(await stack.enter_async_context(guest_client(front.url, i)))
                await synced(guests[-1])
            assert [await connections(a.port), await connections(c.port)] == [2, 2]

            link.refuse()
            link.reset_all()
            await wait_status(c.port, 503)
            await front.wait_states({"a": "UP", "c": "DOWN"})
            # Its guests were moved (shutdown-sessions) and newcomers skip it.
            for i in range(4, 7):
                guests.append(await stack.enter_async_context(guest_client(front.url, i)))
            for guest in guests:
                await synced(guest)
            await wait_connections(a.port, 7)
            assert await connections(c.port) == 0
            for index, guest in enumerate(guests):
                stored = await guest.send(f"written while c is down {index}")
                with trio.fail_after(10):  # in a cluster the push may follow the ack
                    await guest.wait_until(partial(holds, guest, stored.seq))
                assert [(m.seq, m.text) for m in guest.transcript][-1:] == [
                    (stored.seq, stored.text)
                ]

            # The database comes back for c: HAProxy sends it new connections again.
            link.refuse(False)
            await wait_status(c.port, 200)
            await front.wait_states({"a": "UP", "c": "UP"})
            late = await stack.enter_async_context(guest_client(front.url, 9))
            await synced(late)
            await wait_connections(c.port, 1)
        nursery.cancel_scope.cancel()


async def test_a_client_waits_out_haproxys_503_while_no_node_is_up(tmp_path: Path) -> None:
    # With every node down HAProxy refuses the WebSocket handshake with an HTTP 503
    # (as during a PostgreSQL restart, when every node's /healthz answers 503): the
    # client must keep trying with its backoff, not crash.
    port = free_port()
    server = ServerProcess(tmp_path / "chat.db", port, *NODE_FLAGS)
    async with trio.open_nursery() as nursery, running(nursery):
        async with haproxy_front([("only", port)]) as front:
            await front.wait_states({"only": "DOWN"})
            async with guest_client(front.url, 0) as guest:
                with trio.fail_after(20):
                    await guest.wait_until(lambda: guest.attempt >= 3)
                assert guest.state == "connecting"
                closes = [e.data["reason"] for e in guest.event_log if e.kind == "closed"]
                assert "503" in closes[-1], closes
                await server.start(nursery)
                await front.wait_states({"only": "UP"})
                await synced(guest)
                assert (await guest.send("through at last")).seq == 1
            await server.aclose()
        nursery.cancel_scope.cancel()
