"""Scale-out faults: the database or Redis goes away under a running cluster."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from trio_chat.testing._services import RedisInstance, postgres_instance, redis_instance

from ..helpers import connect, free_port, staff_token, wait_for_port
from .test_cluster import _get, new_guest, say, seqs, start_node


async def health(port: int) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await _get(port, "/healthz"))
    return result


async def wait_health(port: int, check: Any, within: float = 15) -> dict[str, Any]:
    """Until /healthz satisfies ``check`` (the node's own beat updates it)."""
    with trio.fail_after(within):
        while True:
            found = await health(port)
            if check(found):
                return found
            await trio.sleep(0.1)


async def test_a_node_without_its_database_refuses_writes_and_recovers_by_itself(
    tmp_path: Path, redis_server: RedisInstance
) -> None:
    with postgres_instance() as pg:
        url = pg.create_database("faults")
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, tmp_path, url, bus=redis_server.url)
            assert node.port
            async with connect(node.port) as guest:
                await new_guest(guest)
                assert (await say(guest, "m1", "before"))["seq"] == 1
                await trio.to_thread.run_sync(pg.stop, "immediate")
                await guest.send(type="message", client_msg_id="m2", text="while it is down")
                refused = await guest.next_of("ack", "error")
                assert refused["type"] == "error" and refused["code"] == "internal"
                assert refused["ref"] == "m2"
                down = await wait_health(node.port, lambda h: h["storage"]["state"] != "ok")
                assert down["status"] == "degraded"
                await trio.to_thread.run_sync(pg.start)
                await wait_health(node.port, lambda h: h["storage"]["state"] == "ok")
                # The client's retry is stored once, right after the gap.
                assert (await say(guest, "m2", "while it is down"))["seq"] == 2
                assert (await say(guest, "m2", "while it is down"))["seq"] == 2
                assert [m["seq"] for m in await guest.fetch_history(2)] == [1, 2]
            nursery.cancel_scope.cancel()


async def test_without_redis_nodes_serve_from_the_database_and_say_so(
    tmp_path: Path, pg_url: str
) -> None:
    token = staff_token(pg_url, "Anna")
    with redis_instance() as bus:
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, tmp_path, pg_url, bus=bus.url, poll_interval=0.2)
            b = await start_node(nursery, tmp_path, pg_url, bus=bus.url, poll_interval=0.2)
            assert a.port and b.port
            async with connect(a.port) as guest, connect(b.port) as staff:
                welcome = await new_guest(guest)
                cid = welcome["conversation_id"]
                await staff.hello(token)
                await staff.send(type="claim", conversation_id=cid)
                await staff.expect("subscribed", conversation_id=cid)
                await say(guest, "g0", "with redis")
                await staff.expect("message", seq=2)
                await trio.to_thread.run_sync(bus.stop)
                polling = await wait_health(b.port, lambda h: h["bus"]["state"] == "polling")
                assert polling["bus"]["connected"] is False
                assert polling["status"] == "ok"  # still serving: /healthz stays 200
                for i in range(1, 6):
                    await say(guest, f"g{i}", f"without redis {i}")
                    await staff.send(
                        type="message",
                        conversation_id=cid,
                        client_msg_id=f"s{i}",
                        text=f"reply {i}",
                    )
                await staff.expect("message", seq=12)
                await guest.expect("message", seq=12)
                await trio.to_thread.run_sync(bus.start)
                await wait_health(b.port, lambda h: h["bus"]["state"] == "ok")
                await say(guest, "g6", "redis is back")
                await staff.expect("message", seq=13)
                await guest.expect("message", seq=13)
                assert seqs(staff.seen, cid) == list(range(2, 14))
                assert seqs(guest.seen, cid) == list(range(1, 14))
            nursery.cancel_scope.cancel()


@contextmanager
def node_process(pg_url: str, bus_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``trio-chat serve --db postgresql://... --bus redis://...`` as a child process."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_chat",
            "serve",
            "--db",
            pg_url,
            "--bus",
            bus_url,
            "--port",
            str(port),
            "--concierge",
            "off",
            "--rate-limit",
            "0",
            "--heartbeat",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    try:
        wait_for_port(port, proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_kill_9_a_node_while_guests_talk_and_nothing_is_lost_doubled_or_reordered(
    pg_url: str, redis_server: RedisInstance
) -> None:
    token = staff_token(pg_url, "Anna")
    per_guest = 20
    with (
        node_process(pg_url, redis_server.url) as (doomed, a),
        node_process(pg_url, redis_server.url) as (_, b),
    ):
        async with connect(b) as staff:
            await staff.hello(token)
            await staff.expect("queue")
            acked = [0, 0, 0]
            killed = trio.Event()

            async def guest(index: int, task_status: trio.TaskStatus[str]) -> None:
                client_cm = connect(a)
                client = await client_cm.__aenter__()
                welcome = await new_guest(client, f"guest {index}")
                task_status.started(welcome["conversation_id"])
                i = 0
                while i < per_guest:
                    try:
                        await say(client, f"{index}.{i}", f"message {i} from guest {index}")
                    except (trio_websocket.ConnectionClosed, trio.TooSlowError):
                        # The node died (perhaps after storing it): go to the other
                        # node and send the same message again, as the client does.
                        with contextlib.suppress(Exception):
                            await client_cm.__aexit__(None, None, None)
                        client_cm = connect(b)
                        client = await client_cm.__aenter__()
                        assert (await client.hello(welcome["token"]))["type"] == "welcome"
                        continue
                    i += 1
                    acked[index] = i
                    if index == 0 and i == per_guest // 2 and not killed.is_set():
                        doomed.send_signal(signal.SIGKILL)
                        killed.set()
                await client_cm.__aexit__(None, None, None)

            async with trio.open_nursery() as guests:
                cids = [await guests.start(guest, index) for index in range(3)]
                for cid in cids:
                    await staff.send(type="watch", conversation_id=cid)
            assert acked == [per_guest] * 3 and doomed.poll() is not None
            for cid in cids:
                await staff.expect("message", conversation_id=cid, seq=per_guest)
            for index, cid in enumerate(cids):
                pushed = [
                    f for f in staff.seen if f["type"] == "message" and f["conversation_id"] == cid
                ]
                # From the watch's last_seq on: each message once, in order.
                subscribed = next(
                    f
                    for f in staff.seen
                    if f["type"] == "subscribed" and f["conversation_id"] == cid
                )
                got = [f["seq"] for f in pushed]
                assert got == list(range(subscribed["last_seq"] + 1, per_guest + 1)), (index, got)
                assert [f["client_msg_id"] for f in pushed] == [f"{index}.{seq - 1}" for seq in got]
