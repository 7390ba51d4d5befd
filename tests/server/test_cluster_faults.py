"""Scale-out faults: the database or Redis goes away under a running cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from trio_chat.testing._services import RedisInstance, postgres_instance, redis_instance

from ..helpers import connect, staff_token
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
