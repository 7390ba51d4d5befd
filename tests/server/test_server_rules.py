"""Rules of protocol v1 that small mutations of the server used to survive: each test
here fails on one of them (see docs/architecture.md, "Tests that can fail")."""

from __future__ import annotations

from trio_chat import ChatServer

from ..helpers import connect, staff_token


async def test_a_retry_is_acknowledged_again_but_neither_pushed_nor_answered_again(
    server: ChatServer,
) -> None:
    """What a retry sets off happens after its ack: the test waits past it, for the
    concierge's answer to a later message (replies in a conversation come in order)."""
    assert server.port is not None
    async with connect(server.port) as guest:
        await guest.hello()
        await guest.send(type="message", client_msg_id="m1", text="What time is breakfast?")
        first = await guest.expect("ack", client_msg_id="m1")
        await guest.expect("message", sender="ai")
        await guest.send(type="message", client_msg_id="m1", text="What time is breakfast?")
        again = await guest.expect("ack", client_msg_id="m1")
        assert again["seq"] == first["seq"]
        await guest.send(type="message", client_msg_id="m2", text="Is there parking?")
        second = await guest.expect("ack", client_msg_id="m2")
        answer = await guest.expect("message", sender="ai", seq=second["seq"] + 1)
        history = await guest.fetch_history(answer["seq"])
        # m1, its answer, m2, its answer: the retry added nothing.
        assert [m["sender"] for m in history] == ["guest", "ai", "guest", "ai"]
        pushed_m1 = [f for f in guest.seen if f["type"] == "message" and f["client_msg_id"] == "m1"]
        assert len(pushed_m1) == 1


async def test_staff_may_mark_read_only_a_conversation_they_hold_or_watch(
    server: ChatServer,
) -> None:
    assert server.port is not None
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as guest, connect(server.port) as staff:
        welcome = await guest.hello()
        conversation_id = welcome["conversation_id"]
        await guest.send(type="message", client_msg_id="m1", text="hello")
        await guest.expect("ack", client_msg_id="m1")
        await staff.hello(token)
        await staff.send(type="read", conversation_id=conversation_id, seq=1)
        error = await staff.expect("error")
        assert (error["code"], error["ref"]) == ("forbidden", "read")
        await staff.send(type="watch", conversation_id=conversation_id)
        await staff.expect("subscribed", conversation_id=conversation_id)
        await staff.send(type="read", conversation_id=conversation_id, seq=1)
        receipt = await guest.expect("read", reader="staff")
        assert receipt["seq"] == 1


async def test_a_read_mark_past_the_last_message_is_cut_to_it(server: ChatServer) -> None:
    assert server.port is not None
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as guest, connect(server.port) as staff:
        welcome = await guest.hello()
        conversation_id = welcome["conversation_id"]
        await guest.send(type="message", client_msg_id="m1", text="hello")
        ack = await guest.expect("ack", client_msg_id="m1")
        await guest.expect("message", sender="ai")  # nothing in flight from here on
        await staff.hello(token)
        await staff.send(type="watch", conversation_id=conversation_id)
        subscribed = await staff.expect("subscribed", conversation_id=conversation_id)
        last_seq = subscribed["last_seq"]
        assert last_seq >= ack["seq"]
        await guest.send(type="read", seq=10_000)
        receipt = await staff.expect("read", reader="guest")
        assert receipt["seq"] == last_seq
        await staff.send(type="read", conversation_id=conversation_id, seq=10_000)
        mine = await guest.expect("read", reader="staff")
        assert mine["seq"] == last_seq
    # The stored mark is cut too: a new session reads it in its welcome.
    async with connect(server.port) as again:
        assert (await again.hello(welcome["token"]))["read_seq"] == last_seq


async def test_a_guest_back_in_a_conversation_not_with_the_concierge_is_told_its_status(
    server: ChatServer,
) -> None:
    assert server.port is not None
    async with connect(server.port) as guest:
        welcome = await guest.hello()
        assert not [f for f in guest.seen if f["type"] == "status"]
        await guest.send(type="escalate")
        await guest.expect("status", status="waiting")
    async with connect(server.port) as guest:
        again = await guest.hello(welcome["token"])
        assert again["type"] == "welcome" and again["status"] == "waiting"
        status = await guest.recv()
        assert status == {
            "type": "status",
            "conversation_id": welcome["conversation_id"],
            "status": "waiting",
            "assigned_to": None,
        }
