"""Exactly one concierge reply per guest message in a cluster, also when the node that
should answer dies (issue #16): two nodes on a real PostgreSQL and Redis. The node
that stores a guest message holds its reply lease while its (stalled) language model
thinks; killed with SIGKILL, its lease lapses and the surviving node's recovery scan
answers; two nodes scanning the same owed messages answer each once; a conversation
staff claimed before the lease lapsed is not answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio

from trio_chat import ChatServer
from trio_chat.server._store_postgres import PostgresBackend
from trio_chat.testing._services import RedisInstance

from ..helpers import connect, free_port, staff_token, wait_for_port
from .fake_llm import FakeLlm, Stream
from .test_cluster import new_guest, say, start_node

LEASE = 1.0  # seconds: short, so that the tests wait little for a lease to lapse


@contextmanager
def stalled_node(
    pg_url: str, bus_url: str, llm: FakeLlm, lease: float = LEASE
) -> Iterator[tuple[Any, int]]:
    """A node as a child process whose concierge is a language model that never answers
    in time (the fake holds every answer), so it keeps renewing its leases."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_chat", "serve", "--db", pg_url, "--bus", bus_url,
         "--port", str(port), "--rate-limit", "0", "--heartbeat", "0", "--typing-delay", "0",
         "--concierge", "llm", "--llm-url", llm.url, "--llm-model", "fake",
         "--llm-first-token-timeout", "300", "--llm-timeout", "300",
         "--reply-lease", str(lease)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def until(check: Any, within: float = 20.0) -> None:
    """Poll a condition on another process with a deadline."""
    with trio.fail_after(within):
        while True:
            if check():
                return
            await trio.sleep(0.05)


async def concierge_node(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> ChatServer:
    """An in-process node answering with the rules, on the test's short lease."""
    return await start_node(
        nursery,
        tmp_path,
        pg_url,
        bus=redis_server.url,
        concierge="rules",
        typing_delay=0,
        reply_lease=LEASE,
    )


def stored(pg_url: str, cid: str) -> list[tuple[int, str]]:
    db = PostgresBackend(pg_url, create=False)
    try:
        return [(m.seq, m.sender) for m in db.history(cid, 0, 100)]
    finally:
        db.close()


def lease_lapsed(pg_url: str, cid: str) -> bool:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT expires_ts < extract(epoch FROM clock_timestamp()) FROM reply_leases "
            "WHERE conversation_id = %s",
            (cid,),
        ).fetchone()
    assert row is not None
    return bool(row[0])


async def test_the_survivor_answers_once_after_the_answering_node_is_killed(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    llm = FakeLlm(default=Stream(["never in time"], first_after=600))
    async with trio.open_nursery() as nursery:
        await nursery.start(llm.run)
        survivor = await concierge_node(nursery, tmp_path, pg_url, redis_server)
        assert survivor.port
        with stalled_node(pg_url, redis_server.url, llm) as (doomed, port):
            async with connect(port) as guest:
                welcome = await new_guest(guest, "Ana")
                cid, token = welcome["conversation_id"], welcome["token"]
                await say(guest, "m1", "what time is breakfast?")
                await until(lambda: len(llm.requests) >= 1)  # the child is answering
                await trio.sleep(LEASE * 1.5)  # and renewing: nobody takes it over
                assert stored(pg_url, cid) == [(1, "guest")]
                doomed.send_signal(signal.SIGKILL)
                doomed.wait(timeout=10)
        async with connect(survivor.port) as guest:
            again = await guest.hello(token)
            assert again["type"] == "welcome" and again["conversation_id"] == cid
            got = await guest.fetch_history(again["last_seq"])
            if not any(m["sender"] == "ai" for m in got):
                got.append(await guest.expect("message", sender="ai"))
            # A scan or two more: nothing else comes.
            await trio.sleep(LEASE * 2)
            got += [f for f in guest.seen if f["type"] == "message" and f not in got]
        assert [(m["seq"], m["sender"]) for m in got] == [(1, "guest"), (2, "ai")]
        assert "breakfast" in got[1]["text"].lower()
        assert stored(pg_url, cid) == [(1, "guest"), (2, "ai")]
        assert survivor._reply_leases is not None and survivor._reply_leases.taken_over == 1
        nursery.cancel_scope.cancel()


async def test_a_conversation_claimed_before_the_lease_lapses_is_not_answered(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    staff = staff_token(pg_url, "Olga")
    llm = FakeLlm(default=Stream(["never in time"], first_after=600))
    async with trio.open_nursery() as nursery:
        await nursery.start(llm.run)
        survivor = await concierge_node(nursery, tmp_path, pg_url, redis_server)
        assert survivor.port
        # The dead node's lease lasts long enough for staff to claim before it lapses.
        with stalled_node(pg_url, redis_server.url, llm, lease=5.0) as (doomed, port):
            async with connect(port) as guest:
                welcome = await new_guest(guest, "Ana")
                cid = welcome["conversation_id"]
                await say(guest, "m1", "what time is breakfast?")
                await until(lambda: len(llm.requests) >= 1)
                doomed.send_signal(signal.SIGKILL)
                doomed.wait(timeout=10)
        async with connect(survivor.port) as console:
            await console.hello(staff)
            await console.send(type="claim", conversation_id=cid)
            await until(lambda: stored(pg_url, cid) == [(1, "guest"), (2, "system")])
        assert not lease_lapsed(pg_url, cid)  # claimed in time (else the test proves nothing)
        await until(lambda: lease_lapsed(pg_url, cid))
        await trio.sleep(LEASE * 2)  # the survivor scanned since (every half lease)
        assert stored(pg_url, cid) == [(1, "guest"), (2, "system")]
        assert survivor._reply_leases is not None and survivor._reply_leases.taken_over == 0
        nursery.cancel_scope.cancel()


async def test_two_nodes_recovering_the_same_owed_messages_answer_each_once(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    """Owed replies whose node died before it took their lease (none in the database),
    found by two nodes that start at the same moment and scan every half lease."""
    owed = 12
    setup = PostgresBackend(pg_url)
    cids = []
    for n in range(owed):
        cid = setup.add_guest(f"guest {n}").conversation_id
        setup.apply_batch(
            [
                _guest_message(cid, "Is there parking?"),
            ]
        )
        cids.append(cid)
    setup.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # stored ten seconds ago
        conn.execute("UPDATE conversations SET updated_ts = updated_ts - 10")
    async with trio.open_nursery() as nursery:
        nodes: list[ChatServer] = []

        async def start() -> None:
            nodes.append(await concierge_node(nursery, tmp_path, pg_url, redis_server))

        async with trio.open_nursery() as starting:
            starting.start_soon(start)
            starting.start_soon(start)
        await until(lambda: all(len(stored(pg_url, cid)) >= 2 for cid in cids))
        await trio.sleep(LEASE * 2)  # more scans on both: nothing more is taken
        for cid in cids:
            assert stored(pg_url, cid) == [(1, "guest"), (2, "ai")], cid
        taken = [node._reply_leases.taken_over for node in nodes if node._reply_leases]
        assert len(taken) == 2 and sum(taken) == owed, taken
        nursery.cancel_scope.cancel()


def _guest_message(cid: str, text: str) -> Any:
    from trio_chat.core.storage import AppendMessage

    return AppendMessage(
        conversation_id=cid, sender="guest", author="g", author_key="g:x", text=text
    )
