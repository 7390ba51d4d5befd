"""Scale-out meets main's hardening: staff removal, who is on duty, and silent-guest
expiry across the nodes of a cluster (one PostgreSQL, one Redis; tests/services.py)."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_chat import CloseCode
from trio_chat.core.hub import STAFF_REMOVED
from trio_chat.server._store_postgres import PostgresBackend
from trio_chat.testing._services import RedisInstance

from ..helpers import RawClient, connect, staff_token
from .test_cluster import new_guest, say, settle, start_cluster, start_node

LEFT = "Anna has left; someone else from our team will be with you shortly."


async def signed_in(client: RawClient, token: str) -> None:
    welcome = await client.hello(token)
    assert welcome["role"] == "staff", welcome
    await client.expect("queue")


async def test_removing_staff_closes_their_consoles_on_every_node_and_hands_back_once(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    token = staff_token(pg_url, "Anna")
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        async with (
            connect(a.port) as guest,
            connect(a.port) as on_a,
            connect(b.port) as on_b,
        ):
            cid = (await new_guest(guest))["conversation_id"]
            await say(guest, "g1", "help")
            await signed_in(on_a, token)
            await signed_in(on_b, token)
            await on_b.send(type="claim", conversation_id=cid)
            await on_b.expect("subscribed", conversation_id=cid)
            await guest.expect("status", status="staff")
            # The command line, in effect: another process, the shared database.
            admin = PostgresBackend(pg_url)
            assert admin.remove_staff("Anna")
            admin.close()
            for console in (on_a, on_b):
                with trio.fail_after(5):
                    reason = await console.closed()
                assert reason.code == CloseCode.AUTH_FAILED
                errors = [f for f in console.seen if f["type"] == "error"]
                assert errors[-1]["message"] == STAFF_REMOVED
            with trio.fail_after(5):
                await guest.expect("status", status="waiting")
            await settle([a, b])
            # Both nodes' watchers acted on it; the database let one hand it back.
            db = PostgresBackend(pg_url)
            texts = [m.text for m in db.history(cid, 0, 100)]
            db.close()
            assert len(texts) == 3 and texts[2] == LEFT  # help, the claim, the hand-back
            assert [m["seq"] for m in guest.seen if m["type"] == "message"] == [1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_consoles_on_every_node_hear_who_is_on_duty_on_all_of_them(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    anna_token, ben_token = staff_token(pg_url, "Anna"), staff_token(pg_url, "Ben")
    async with trio.open_nursery() as nursery:
        a, b = await start_cluster(nursery, tmp_path, pg_url, redis_server.url)
        assert a.port and b.port
        async with connect(a.port) as anna:
            await signed_in(anna, anna_token)
            await anna.expect("staff_presence", staff=["Anna"])
            async with connect(b.port) as ben:
                await signed_in(ben, ben_token)
                with trio.fail_after(5):
                    await ben.expect("staff_presence", staff=["Anna", "Ben"])
                    await anna.expect("staff_presence", staff=["Anna", "Ben"])
            with trio.fail_after(5):
                await anna.expect("staff_presence", staff=["Anna"])  # Ben signed out
        nursery.cancel_scope.cancel()


async def test_a_node_does_not_forget_a_silent_guest_signed_in_on_another_node(
    tmp_path: Path, pg_url: str, redis_server: RedisInstance
) -> None:
    async with trio.open_nursery() as nursery:
        b = await start_node(
            nursery, tmp_path, pg_url, bus=redis_server.url, expire_silent_guests=0
        )
        a = await start_node(
            nursery, tmp_path, pg_url, bus=redis_server.url, expire_silent_guests=0.5
        )
        assert a.port and b.port
        expired = trio.Event()
        record = a._guests_expired

        def noticed(guest_ids: list[str]) -> None:
            record(guest_ids)
            if guest_ids:
                expired.set()

        a._guests_expired = noticed  # type: ignore[method-assign]
        async with connect(b.port) as online:
            staying = await new_guest(online, "Online on B")
            async with connect(a.port) as passer_by:
                gone = await new_guest(passer_by, "Left A")
            # Node A's expiry (each second) forgets the one who left...
            with trio.fail_after(10):
                await expired.wait()
            db = PostgresBackend(pg_url)
            assert db.conversation(gone["conversation_id"]) is None
            # ... in the same pass that kept the one signed in on node B.
            assert db.conversation(staying["conversation_id"]) is not None
            db.close()
            assert (await say(online, "m1", "still here"))["seq"] == 1
        nursery.cancel_scope.cancel()
