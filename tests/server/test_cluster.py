"""Scale-out: the server on PostgreSQL, alone and as a cluster of nodes sharing one
database and one Redis (tests/services.py starts both)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
import trio

from trio_chat import ChatServer
from trio_chat.server._store_postgres import PostgresBackend
from trio_chat.testing._services import RedisInstance

from ..conftest import make_config
from ..helpers import RawClient, connect, staff_token


async def new_guest(client: RawClient, name: str = "Maria") -> dict[str, Any]:
    welcome = await client.hello(None, name=name)
    assert welcome["type"] == "welcome" and welcome["role"] == "guest"
    return welcome


async def say(client: RawClient, cmid: str, text: str) -> dict[str, Any]:
    await client.send(type="message", client_msg_id=cmid, text=text)
    return await client.expect("ack", client_msg_id=cmid)


async def start_node(
    nursery: trio.Nursery, tmp_path: Path, db: str, **overrides: Any
) -> ChatServer:
    settings: dict[str, Any] = {"concierge": "off", "rate_limit": 0, **overrides}
    node = ChatServer(make_config(tmp_path, db_path=db, **settings))
    await nursery.start(node.run)
    return node


# ---------------------------------------------------------------- one node on PostgreSQL


async def test_one_node_on_postgres_chats_and_survives_a_restart(
    tmp_path: Path, pg_url: str
) -> None:
    token = staff_token(pg_url, "Anna")
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, pg_url)
        assert node.port
        async with connect(node.port) as guest, connect(node.port) as staff:
            welcome = await new_guest(guest)
            assert (await say(guest, "m1", "hello"))["seq"] == 1
            assert (await staff.hello(token))["role"] == "staff"
            await staff.send(type="claim", conversation_id=welcome["conversation_id"])
            await staff.expect("subscribed", conversation_id=welcome["conversation_id"])
            await staff.send(
                type="message",
                conversation_id=welcome["conversation_id"],
                client_msg_id="s1",
                text="Hi, Anna here",
            )
            ack = await staff.expect("ack", client_msg_id="s1")
            pushed = await guest.expect("message", seq=ack["seq"])
            assert pushed["text"] == "Hi, Anna here" and ack["seq"] == 3
        nursery.cancel_scope.cancel()
    # Another process on the same database sees everything and goes on from there.
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, pg_url)
        assert node.port
        async with connect(node.port) as guest:
            again = await guest.hello(welcome["token"])
            assert again["last_seq"] == 3 and again["status"] == "staff"
            history = await guest.fetch_history(3)
            assert [m["seq"] for m in history] == [1, 2, 3]
            assert (await say(guest, "m1", "hello"))["seq"] == 1  # a retry: the original
            assert (await say(guest, "m2", "again"))["seq"] == 4
        nursery.cancel_scope.cancel()


def test_the_admin_commands_take_a_postgres_url(pg_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trio_chat", *args, "--db", pg_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    init = cli("db", "init")
    assert init.returncode == 0, init.stderr
    assert "schema version 3" in init.stderr and "postgres@" in init.stderr
    assert cli("db", "init").returncode == 0  # idempotent
    added = cli("staff", "add", "Anna")
    anna = added.stdout.strip().splitlines()[-1]  # the token is alone on the last line
    assert added.returncode == 0 and anna.startswith("s.")
    listed = cli("staff", "list")
    assert "Anna" in listed.stdout
    token = cli("staff", "token", "Anna")
    assert token.stdout.strip() == anna
    guest = cli("guest", "add", "Ana")
    assert guest.returncode == 0 and guest.stdout.startswith("g.")
    link = cli("staff", "link", "Anna")
    assert link.returncode == 0 and link.stdout.strip().endswith(f"#token={anna}")
    # The hardening's commands write the revocations every node's watcher reads.
    revoked = cli("staff", "revoke", "Anna")
    assert revoked.returncode == 0 and revoked.stdout.strip() != anna
    assert cli("staff", "token", "Anna").stdout.strip() == revoked.stdout.strip()
    rotated = cli("secret", "rotate", "--yes")
    assert rotated.returncode == 0, rotated.stderr
    assert cli("staff", "token", "Anna").stdout.strip() != revoked.stdout.strip()
    assert cli("staff", "remove", "Anna").returncode == 0
    assert "Anna" not in cli("staff", "list").stdout
    backend = PostgresBackend(pg_url)
    assert [r.kind for r in backend.revocations_since(0)] == ["revoked", "secret", "removed"]
    backend.close()


# ------------------------------------------------------------------- a two-node cluster


async def start_cluster(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, bus: str, nodes: int = 2, **overrides: Any
) -> list[ChatServer]:
    return [await start_node(nursery, tmp_path, pg_url, bus=bus, **overrides) for _ in range(nodes)]


def seqs(frames: list[dict[str, Any]], cid: str) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "message" and f["conversation_id"] == cid]


async def settle(nodes: list[ChatServer]) -> None:
    """Until no write is pending anywhere and the bus had a moment to deliver."""
    for node in nodes:
        await node.wait_idle()
    await trio.sleep(0.3)


async def test_a_guest_and_staff_on_different_nodes_chat_in_seq_order(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    token = staff_token(pg_url, "Anna")
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        async with connect(a.port) as guest, connect(b.port) as staff:
            welcome = await new_guest(guest)
            cid = welcome["conversation_id"]
            assert (await staff.hello(token))["role"] == "staff"
            await staff.expect("queue")
            await say(guest, "g1", "hello from node A")
            # The staff room on node B hears of the conversation through the bus.
            await staff.expect("conversation", conversation_id=cid, last_seq=1)
            await staff.send(type="claim", conversation_id=cid)
            subscribed = await staff.expect("subscribed", conversation_id=cid)
            assert subscribed["last_seq"] == 2 and subscribed["status"] == "staff"
            await guest.expect("status", status="staff")
            await guest.expect("message", seq=2)  # the claim's system message, via B
            for i in range(10):
                # Both sides write at once; each sees every message once, in order.
                await guest.send(type="message", client_msg_id=f"g{i + 2}", text=f"guest {i}")
                await staff.send(
                    type="message", conversation_id=cid, client_msg_id=f"s{i}", text=f"staff {i}"
                )
            await guest.expect("message", seq=22)
            await staff.expect("message", seq=22)
            assert seqs(guest.seen, cid) == list(range(1, 23))
            assert seqs(staff.seen, cid) == list(range(3, 23))
            # Typing travels through Redis only.
            await staff.send(type="typing", conversation_id=cid, active=True)
            typing = await guest.expect("typing")
            assert typing["sender"] == "staff" and typing["active"] is True
            # The guest's history on node B matches what was pushed on node A.
            async with connect(b.port) as again:
                rejoined = await again.hello(welcome["token"])
                assert rejoined["last_seq"] == 22
                history = await again.fetch_history(22)
                pushed = [f for f in guest.seen if f["type"] == "message"]
                assert [m["text"] for m in history] == [m["text"] for m in pushed]
        nursery.cancel_scope.cancel()


async def test_a_retry_on_the_other_node_gets_the_original_ack(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        async with connect(a.port) as first:
            welcome = await new_guest(first)
            original = await say(first, "once", "only once please")
        async with connect(b.port) as second:
            await second.hello(welcome["token"])
            retried = await say(second, "once", "only once please")
            assert retried == original
            assert (await say(second, "next", "and then"))["seq"] == original["seq"] + 1
            history = await second.fetch_history(original["seq"] + 1)
            assert [m["client_msg_id"] for m in history] == ["once", "next"]
        nursery.cancel_scope.cancel()


async def test_two_staff_on_two_nodes_race_to_claim_and_exactly_one_wins(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    tokens = [staff_token(pg_url, "Anna"), staff_token(pg_url, "Ben")]
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        for round_ in range(5):
            async with (
                connect(a.port) as guest,
                connect(a.port) as anna,
                connect(b.port) as ben,
            ):
                welcome = await new_guest(guest)
                cid = welcome["conversation_id"]
                await say(guest, "g", "help")
                for desk, token in ((anna, tokens[0]), (ben, tokens[1])):
                    await desk.hello(token)
                    await desk.expect("queue")
                    # Both load the conversation before racing (both think it is free).
                    await desk.send(type="watch", conversation_id=cid)
                    await desk.expect("subscribed", conversation_id=cid)
                async with trio.open_nursery() as race:
                    race.start_soon(_claim, anna, cid)
                    race.start_soon(_claim, ben, cid)
                outcomes = [
                    await _claim_outcome(desk, name)
                    for desk, name in ((anna, "Anna"), (ben, "Ben"))
                ]
                won = [o for o in outcomes if o["type"] == "status"]
                lost = [o for o in outcomes if o["type"] == "error"]
                assert len(won) == 1 and len(lost) == 1, (round_, outcomes)
                assert lost[0]["code"] == "conflict"
                await settle([a, b])
                history = await guest.fetch_history(2)
                claims = [m for m in history if m["sender"] == "system"]
                assert len(claims) == 1
                # Both consoles end up agreeing on the holder.
                holder = won[0]["assigned_to"]
                loser = ben if holder == "Anna" else anna
                await loser.expect("status", status="staff", assigned_to=holder)
                await loser.expect("message", seq=2, sender="system")
        nursery.cancel_scope.cancel()


async def _claim(desk: RawClient, cid: str) -> None:
    await desk.send(type="claim", conversation_id=cid)


async def _claim_outcome(desk: RawClient, name: str) -> dict[str, Any]:
    """The claim's answer to this desk: its own status change, or an error."""
    return await desk._take(
        lambda f: f["type"] == "error" or (f["type"] == "status" and f["assigned_to"] == name)
    )


async def test_a_node_that_misses_the_bus_fills_the_gap_from_the_database(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    token = staff_token(pg_url, "Anna")
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        async with connect(a.port) as guest, connect(b.port) as staff:
            welcome = await new_guest(guest)
            cid = welcome["conversation_id"]
            await staff.hello(token)
            await staff.send(type="claim", conversation_id=cid)
            await staff.expect("subscribed", conversation_id=cid)
            await guest.expect("message", seq=1)
            r = redis.Redis(port=redis_server.port)
            for round_ in range(4):
                before = [node._cluster.bus.subscriptions for node in (a, b)]  # type: ignore[union-attr]
                # Redis drops every subscriber: what it publishes meanwhile is lost.
                assert r.client_kill_filter(_type="pubsub") == 2
                for i in range(5):
                    await say(guest, f"g{round_}.{i}", f"m{round_}.{i}")
                with trio.fail_after(10):
                    # The bus threads count subscriptions; nothing to wait on but time.
                    while True:
                        now = [node._cluster.bus.subscriptions for node in (a, b)]  # type: ignore[union-attr]
                        if all(n > was for n, was in zip(now, before, strict=True)):
                            break
                        await trio.sleep(0.02)
            for i in range(3):
                await say(guest, f"after{i}", "after the last reconnection")
            await staff.expect("message", seq=24)
            assert seqs(staff.seen, cid) == list(range(2, 25))
            health = json.loads(await _get(b.port, "/healthz"))
            assert health["bus"]["subscriptions"] >= 2
        nursery.cancel_scope.cancel()


async def _get(port: int, path: str) -> str:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()
