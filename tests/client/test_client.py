"""The reconnecting client against the real server, through the fault proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_chat import (
    AuthenticationFailed,
    Backoff,
    ChatClient,
    ChatServer,
    ClientClosed,
    Message,
    MessageRejected,
    ProtocolError,
    StaffClient,
)
from trio_chat.testing import FaultProxy

from ..conftest import make_config
from ..helpers import connect, staff_token


async def start_server(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> ChatServer:
    srv = ChatServer(make_config(tmp_path, **overrides))
    await nursery.start(srv.run)
    return srv


async def start_proxy(nursery: trio.Nursery, port: int) -> FaultProxy:
    proxy = FaultProxy(port, seed=1)
    await nursery.start(proxy.run)
    return proxy


def state_of(client: ChatClient) -> str:
    """The state, read afresh (mypy would otherwise narrow it across awaits)."""
    return client.state


def url(port: int | None) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def server_history(port: int, token: str) -> list[dict[str, Any]]:
    """The conversation as the server stores it, read by a separate raw connection."""
    async with connect(port) as raw:
        welcome = await raw.hello(token)
        return await raw.fetch_history(welcome["last_seq"])


def assert_exact(client: ChatClient, history: list[dict[str, Any]]) -> None:
    """The client's transcript is the server's history: same seqs, texts, no gap."""
    assert [m.seq for m in client.transcript] == list(range(1, len(history) + 1))
    assert [(m.seq, m.sender, m.text) for m in client.transcript] == [
        (m["seq"], m["sender"], m["text"]) for m in history
    ]


async def settle(client: ChatClient, last_seq: int) -> None:
    with trio.fail_after(10):
        await client.wait_until(
            lambda: bool(client.transcript) and client.transcript[-1].seq >= last_seq
        )


# ------------------------------------------------------------------------ basics


async def test_send_returns_the_stored_message_and_the_concierge_answers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    async with ChatClient(url(srv.port), name="Maria") as client:
        assert state_of(client) == "connecting"
        stored = await client.send("  What time is breakfast?  ")
        assert state_of(client) == "connected"
        assert isinstance(stored, Message)
        assert stored.seq == 1 and stored.text == "What time is breakfast?"
        assert stored.sender == "guest" and stored.author == client.guest_id
        await settle(client, 2)
        assert client.transcript[1].sender == "ai"
        assert client.token and client.token.startswith("g.")
        kinds = [e.kind for e in client.event_log]
        assert "ack" in kinds and "message" in kinds
    assert state_of(client) == "closed"


async def test_token_brings_back_the_same_guest_and_history(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    async with ChatClient(url(srv.port)) as first:
        await first.send("Is there parking?")
        await settle(first, 2)
    async with ChatClient(url(srv.port), token=first.token) as again:
        await settle(again, 2)
        assert again.guest_id == first.guest_id
        assert [m.text for m in again.transcript] == [m.text for m in first.transcript]


async def test_bad_messages_are_refused_without_jamming_the_outbox(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    async with ChatClient(url(srv.port)) as client:
        with pytest.raises(MessageRejected) as too_long:
            await client.send("x" * 4001)
        assert too_long.value.code == "too_large"
        with pytest.raises(MessageRejected):
            await client.send("   ")
        assert (await client.send("still fine")).seq == 1
        assert client.pending == []


async def test_a_bad_token_stops_for_good(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    async with ChatClient(url(srv.port), token="g.g_nobody.forged") as client:
        with pytest.raises(AuthenticationFailed):
            await client.send("hello?")
        assert client.state == "closed"
        assert client.close_reason and "authentication" in client.close_reason
        attempts = [
            e
            for e in client.event_log
            if e.kind == "state"
            and e.data["state"] in ("connecting", "reconnecting")
            and "delay" not in e.data
        ]
        assert len(attempts) == 1  # never retried with the same token
        with pytest.raises(ClientClosed):
            await client.send("again")


# --------------------------------------------------------------- network faults


async def test_a_dropped_connection_loses_nothing_and_doubles_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, concierge="off")
    proxy = await start_proxy(nursery, srv.port or 0)
    backoff = Backoff(initial=0.05, max=0.2, seed=3)
    async with ChatClient(url(proxy.port), backoff=backoff) as client:
        acked: list[Message] = []

        milestones = {10: trio.Event(), 25: trio.Event(), 40: trio.Event()}

        async def writer() -> None:
            for i in range(60):
                acked.append(await client.send(f"message {i}"))
                if len(acked) in milestones:
                    milestones[len(acked)].set()

        async with trio.open_nursery() as inner:
            inner.start_soon(writer)
            for milestone in milestones.values():
                with trio.fail_after(10):
                    await milestone.wait()
                proxy.reset_all()  # mid-conversation, with sends in flight
        assert client.token is not None
        history = await server_history(srv.port or 0, client.token)
        await settle(client, len(history))
        assert_exact(client, history)
        assert [m.text for m in acked] == [f"message {i}" for i in range(60)]
        assert sorted(m.seq for m in acked) == [m.seq for m in acked]
        assert len({m["client_msg_id"] for m in history}) == 60 == len(history)
        assert client.reconnects >= 3


async def test_a_blackholed_link_is_noticed_by_heartbeat_and_recovered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, concierge="off")
    proxy = await start_proxy(nursery, srv.port or 0)
    heartbeat = 0.4
    backoff = Backoff(initial=0.05, max=0.1, seed=1)
    async with ChatClient(
        url(proxy.port), backoff=backoff, heartbeat=heartbeat, connect_timeout=0.5
    ) as client:
        await client.send("before the outage")
        proxy.blackhole()
        silenced = trio.current_time()
        sending = trio.Event()

        async def send_during_outage() -> None:
            await client.send("typed during the outage")
            sending.set()

        nursery.start_soon(send_during_outage)
        with trio.fail_after(5):
            await client.wait_for_state("reconnecting")
        noticed = trio.current_time() - silenced
        assert noticed <= 2 * heartbeat + 0.2
        proxy.blackhole(False)
        with trio.fail_after(10):
            await sending.wait()
        await client.send("after the outage")
        assert client.token is not None
        history = await server_history(srv.port or 0, client.token)
        await settle(client, len(history))
        assert_exact(client, history)
        assert [m["text"] for m in history] == [
            "before the outage",
            "typed during the outage",
            "after the outage",
        ]


async def test_a_server_restart_is_survived_with_the_server_hint(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = await start_server(nursery, tmp_path, shutdown_spread=0.3)
    port = first.port
    async with ChatClient(url(port), backoff=Backoff(initial=0.05, seed=2)) as client:
        await client.send("Where can I park?")
        await settle(client, 2)
        first.shutdown()
        await first.wait_stopped()
        with trio.fail_after(5):
            await client.wait_for_state("reconnecting")
        restarted_at = trio.current_time()
        second = await start_server(nursery, tmp_path, port=port)
        await client.send("And is there a gym?")
        with trio.fail_after(10):
            await client.wait_for_state("connected")
        assert client.last_close_code == 1012
        waits = [
            e.data["delay"] for e in client.event_log if e.kind == "state" and "delay" in e.data
        ]
        assert 0.25 <= waits[-1] <= 0.55 * 1.2 + 0.1  # the server's after_ms, plus jitter
        assert trio.current_time() - restarted_at < 5
        assert client.token is not None
        # Two questions, two answers: wait for the second answer before reading the
        # server's history, or the history can be read with the answer still in flight.
        await settle(client, 4)
        history = await server_history(second.port or 0, client.token)
        assert_exact(client, history)
        assert client.reconnects == 1


async def test_offline_waits_and_online_reconnects_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, concierge="off")
    async with ChatClient(url(srv.port), backoff=Backoff(initial=30, max=60)) as client:
        await client.send("first")
        client.set_online(False)
        await client.wait_for_state("offline")
        done = trio.Event()
        result: list[Message] = []

        async def send_offline() -> None:
            result.append(await client.send("written while offline"))
            done.set()

        nursery.start_soon(send_offline)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert [m.text for m in client.pending] == ["written while offline"]
        assert client.state == "offline"
        went_online = trio.current_time()
        client.set_online(True)
        with trio.fail_after(5):
            await done.wait()
        # No 30 s backoff wait: online means now.
        assert trio.current_time() - went_online < 2
        assert result[0].seq == 2


# ------------------------------------------------------------------------ staff


async def test_staff_client_claims_replies_and_resolves(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    token = staff_token(srv.config.db_path, "Anna")
    async with ChatClient(url(srv.port)) as guest, StaffClient(url(srv.port), token=token) as desk:
        await guest.send("I need a person please")
        with trio.fail_after(5):
            await guest.wait_until(lambda: guest.status == "waiting")
        cid = guest.conversation_id
        assert cid is not None
        await desk.wait_for_state("connected")
        with trio.fail_after(5):
            await desk.wait_until(lambda: cid in desk.queue and desk.queue[cid].status == "waiting")
        await desk.claim(cid)
        reply = await desk.reply(cid, "Hello, Anna here. How can I help?")
        assert reply.sender == "staff" and reply.author == "Anna"
        await settle(guest, reply.seq)
        assert guest.transcript[-1].text == "Hello, Anna here. How can I help?"
        assert guest.status == "staff" and guest.assigned_to == "Anna"
        with trio.fail_after(5):
            await desk.wait_until(lambda: len(desk.transcript_of(cid)) >= reply.seq)
        assert [m.seq for m in desk.transcript_of(cid)] == [m.seq for m in guest.transcript]
        await desk.resolve(cid)
        assert desk.queue[cid].status == "resolved"
        other = staff_token(srv.config.db_path, "Ben")
        async with StaffClient(url(srv.port), token=other) as ben:
            await ben.wait_for_state("connected")
            await ben.claim(cid)
            with pytest.raises(ProtocolError) as conflict:
                await desk.claim(cid)
            assert conflict.value.code == "conflict"


async def test_a_message_the_server_refuses_leaves_the_outbox(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    token = staff_token(srv.config.db_path, "Anna")
    async with ChatClient(url(srv.port)) as guest, StaffClient(url(srv.port), token=token) as desk:
        await guest.send("hello")
        assert guest.conversation_id is not None
        with pytest.raises(MessageRejected) as refused:
            await desk.reply(guest.conversation_id, "I have not claimed this one")
        assert refused.value.code == "forbidden"
        assert desk.pending == []  # nothing jams the outbox
        await desk.claim(guest.conversation_id)
        assert (await desk.reply(guest.conversation_id, "Now I may.")).sender == "staff"
