"""Scale-out: the server on PostgreSQL, alone and as a cluster of nodes sharing one
database and one Redis (tests/services.py starts both)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from trio_chat import ChatServer

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
    node = ChatServer(make_config(tmp_path, db_path=db, concierge="off", **overrides))
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
    assert "schema version 1" in init.stderr and "postgres@" in init.stderr
    assert cli("db", "init").returncode == 0  # idempotent
    added = cli("staff", "add", "Anna")
    assert added.returncode == 0 and added.stdout.startswith("s.")
    listed = cli("staff", "list")
    assert "Anna" in listed.stdout
    token = cli("staff", "token", "Anna")
    assert token.stdout.strip() == added.stdout.strip()
    guest = cli("guest", "add", "Ana")
    assert guest.returncode == 0 and guest.stdout.startswith("g.")
    assert cli("staff", "remove", "Anna").returncode == 0
    assert "Anna" not in cli("staff", "list").stdout
