"""End-to-end tests of the server over real sockets, with a raw protocol client."""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events
import wsproto.extensions
import wsproto.frame_protocol

from trio_chat import ChatServer, CloseCode, Responder, ResponderReply, ResponderRequest
from trio_chat.server._connection import Connection
from trio_chat.server._http import PrefixStream
from trio_chat.server._wire import text_frame

from ..conftest import make_config
from ..helpers import RawClient, SilentPeer, connect, staff_token


async def start(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> ChatServer:
    srv = ChatServer(make_config(tmp_path, **overrides))
    await nursery.start(srv.run)
    return srv


async def new_guest(client: RawClient, name: str = "Maria") -> dict[str, Any]:
    welcome = await client.hello(None, name=name)
    assert welcome["type"] == "welcome" and welcome["role"] == "guest"
    return welcome


async def say(client: RawClient, cmid: str, text: str) -> dict[str, Any]:
    await client.send(type="message", client_msg_id=cmid, text=text)
    return await client.expect("ack", client_msg_id=cmid)


def messages(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "message"]


# ------------------------------------------------------------------------ sessions


async def test_new_guest_gets_token_and_welcome_first(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        welcome = await new_guest(guest)
    assert welcome["token"].startswith("g.")
    assert welcome["last_seq"] == 0 and welcome["read_seq"] == 0 and welcome["status"] == "ai"
    assert welcome["server"].startswith("trio-chat/")
    assert welcome["heartbeat_s"] == server.config.heartbeat


async def test_token_resumes_the_same_guest_and_conversation(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        first = await new_guest(guest)
        await say(guest, "m1", "What time is breakfast?")
        await guest.expect("message", sender="ai")
    async with connect(server.port) as again:
        second = await again.hello(first["token"])
    assert second["guest_id"] == first["guest_id"]
    assert second["conversation_id"] == first["conversation_id"]
    assert second["last_seq"] == 2


async def test_concierge_answers_with_typing_first(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        ack = await say(guest, "m1", "What is the wifi password?")
        assert ack["seq"] == 1
        await guest.expect("message", seq=1, sender="guest")
        typing = await guest.next_of("typing", "message")
        assert typing == {**typing, "type": "typing", "sender": "ai", "active": True}
        reply = await guest.expect("message", sender="ai")
        assert reply["seq"] == 2 and reply["author"] == "concierge"
        assert "Harbourview-Guest" in reply["text"]
        await guest.expect("typing", sender="ai", active=False)


async def test_ack_precedes_the_push_and_seq_has_no_gaps(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        for i in range(5):
            await guest.send(type="message", client_msg_id=f"m{i}", text=f"question {i}")
        seqs: list[int] = []
        acked: set[str] = set()
        while len(seqs) < 10:  # five guest messages and five concierge replies
            frame = await guest.recv()
            if frame["type"] == "ack":
                acked.add(frame["client_msg_id"])
            elif frame["type"] == "message":
                if frame["sender"] == "guest":
                    assert frame["client_msg_id"] in acked, "pushed before its ack"
                seqs.append(frame["seq"])
    assert seqs == list(range(1, 11))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the server makes straight to a socket, in order."""
    written: list[bytes] = []
    original = PrefixStream.send_without_blocking

    def recording(stream: PrefixStream, data: bytes) -> bool:
        written.append(data)
        return original(stream, data)

    monkeypatch.setattr(PrefixStream, "send_without_blocking", recording)
    return written


async def test_an_ack_and_its_push_leave_in_one_write(
    nursery: trio.Nursery, tmp_path: Path, writes: list[bytes]
) -> None:
    srv = await start(nursery, tmp_path, concierge="off")
    assert srv.port
    async with connect(srv.port) as guest:
        await new_guest(guest)
        writes.clear()
        await say(guest, "m1", "one write, please")
        await guest.expect("message", client_msg_id="m1")
    assert len(writes) == 1
    assert b'"type":"ack"' in writes[0] and b'"type":"message"' in writes[0]


async def test_a_write_that_fails_unexpectedly_costs_only_its_connection(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await start(nursery, tmp_path, concierge="off")
    assert srv.port
    async with connect(srv.port) as doomed, connect(srv.port) as other:
        welcome = await new_guest(doomed)
        await new_guest(other)
        doomed_conn = next(
            conn
            for sid, conn in srv.connections.items()
            if (session := srv.hub.sessions.get(sid)) is not None
            and session.conversation is not None
            and session.conversation.conversation_id == welcome["conversation_id"]
        )
        original = Connection.flush

        def failing(conn: Connection) -> None:
            if conn is doomed_conn:
                raise RuntimeError("a bug in the write path")
            original(conn)

        monkeypatch.setattr(Connection, "flush", failing)
        # Both messages can share a batch: the failure must not stop the other's ack.
        await doomed.send(type="message", client_msg_id="d1", text="I will not hear back")
        await say(other, "o1", "but I will")
        closed = await doomed.closed()
        await say(other, "o2", "and the server is still here")
    assert closed.code == CloseCode.SERVER_ERROR


async def test_the_concierges_answer_and_the_end_of_typing_leave_in_one_write(
    nursery: trio.Nursery, tmp_path: Path, writes: list[bytes]
) -> None:
    srv = await start(nursery, tmp_path, concierge="rules", typing_delay=0)
    assert srv.port
    async with connect(srv.port) as guest:
        await new_guest(guest)
        writes.clear()
        await say(guest, "m1", "What is the wifi password?")
        await guest.expect("typing", sender="ai", active=False)
    # (The typing indicator's start leaves with the guest's ack and push.)
    answer = [w for w in writes if b'"sender":"ai","author":"concierge"' in w]
    assert len(answer) == 1
    assert answer[0].index(b'"sender":"ai","author"') < answer[0].index(b'"active":false')


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65_535, 65_536, 70_000])
def test_our_text_frames_are_the_bytes_wsproto_would_send(length: int) -> None:
    reference = wsproto.frame_protocol.FrameProtocol(client=False, extensions=[])
    text = ("é" * length)[: length // 2] + "x" * (length - length // 2)
    assert text_frame(text) == bytes(reference.send_data(text))


async def test_the_server_negotiates_no_extension_even_when_offered(server: ChatServer) -> None:
    # Our frames are written without wsproto: right only while no extension is on.
    assert server.port
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    offer = wsproto.events.Request(
        host="x", target="/ws", extensions=[wsproto.extensions.PerMessageDeflate()]
    )
    await stream.send_all(client.send(offer))
    accepted: list[Any] = []
    with trio.fail_after(5):
        while not accepted:
            client.receive_data(await stream.receive_some())
            events = list(client.events())
            accepted = [e for e in events if isinstance(e, wsproto.events.AcceptConnection)]
    assert accepted[0].extensions == []
    await stream.aclose()


async def test_several_tabs_all_receive_live_messages(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as tab1:
        welcome = await new_guest(tab1)
        async with connect(server.port) as tab2:
            await tab2.hello(welcome["token"])
            await say(tab1, "m1", "hello from tab one")
            pushed = await tab2.expect("message", seq=1)
            assert pushed["client_msg_id"] == "m1"
            await tab1.send(type="typing", active=True)
            typing = await tab2.expect("typing", sender="guest")
            assert typing["active"] is True


# ------------------------------------------------------- idempotency, history, resume


async def test_repeated_client_msg_id_is_acked_again_and_not_stored(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        first = await say(guest, "same-id", "Is there parking?")
        await guest.expect("message", sender="ai")
        again = await say(guest, "same-id", "a different text, same id")
        assert again == first
        await guest.send(type="history", after_seq=0)
        history = await guest.expect("history")
    texts = [m["text"] for m in history["messages"]]
    assert texts.count("Is there parking?") == 1
    assert "a different text, same id" not in texts
    assert [m["seq"] for m in history["messages"]] == [1, 2]


async def test_racing_retries_get_one_seq(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as tab1:
        welcome = await new_guest(tab1)
        async with connect(server.port) as tab2:
            await tab2.hello(welcome["token"])
            await tab1.send(type="message", client_msg_id="race", text="hi there")
            await tab2.send(type="message", client_msg_id="race", text="hi there")
            ack1 = await tab1.expect("ack", client_msg_id="race")
            ack2 = await tab2.expect("ack", client_msg_id="race")
    assert ack1 == ack2


async def test_reconnect_and_resume_has_no_gap_and_no_duplicate(server: ChatServer) -> None:
    """A guest drops, others keep writing, the guest resumes from the seq it holds."""
    assert server.port
    staff = staff_token(server.config.db_path, "Anna")
    held: dict[int, dict[str, Any]] = {}
    async with connect(server.port) as guest:
        welcome = await new_guest(guest)
        for i in range(3):
            await say(guest, f"a{i}", f"before {i}")
        while len(messages(guest.seen)) < 6:  # three questions, three answers
            await guest.recv()
        held = {m["seq"]: m for m in messages(guest.seen)}
    async with connect(server.port) as desk:
        await desk.hello(staff)
        await desk.send(type="claim", conversation_id=welcome["conversation_id"])
        await desk.expect("subscribed")
        for i in range(3):
            await desk.send(
                type="message",
                conversation_id=welcome["conversation_id"],
                client_msg_id=f"s{i}",
                text=f"while you were away {i}",
            )
            await desk.expect("ack", client_msg_id=f"s{i}")
        async with connect(server.port) as guest:
            again = await guest.hello(welcome["token"])
            assert again["last_seq"] == 10
            await desk.send(
                type="message",
                conversation_id=welcome["conversation_id"],
                client_msg_id="live",
                text="live after resume",
            )
            await guest.send(type="history", after_seq=max(held))
            history = await guest.expect("history")
            await guest.expect("message", client_msg_id="live")
            await guest.send(type="ping", id="end")
            await guest.expect("pong")
    # The contract: seqs above welcome.last_seq arrive live, each exactly once...
    live = [m["seq"] for m in messages(guest.seen)]
    assert live == [11]
    # ...and history fills the gap from what the client held, with no hole.
    fetched = [m["seq"] for m in history["messages"]]
    assert fetched[: again["last_seq"] - max(held)] == list(range(max(held) + 1, 11))
    assert sorted(set(held) | set(fetched) | set(live)) == list(range(1, 12))
    assert history["has_more"] is False


async def test_history_is_cut_by_limit_with_has_more(server: ChatServer) -> None:
    assert server.port
    server.responder = None
    async with connect(server.port) as guest:
        await new_guest(guest)
        for i in range(5):
            await say(guest, f"m{i}", f"note {i}")
        await guest.send(type="history", after_seq=1, limit=2)
        page = await guest.expect("history")
        assert [m["seq"] for m in page["messages"]] == [2, 3]
        assert page["has_more"] is True and page["last_seq"] == 5
        await guest.send(type="history", after_seq=0, limit=10_000)  # clamped, not an error
        assert len((await guest.expect("history"))["messages"]) == 5


# ---------------------------------------------------------------------- hand-off


async def test_full_escalation_guest_and_staff(server: ChatServer) -> None:
    assert server.port
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as guest, connect(server.port) as desk:
        welcome = await new_guest(guest, "Maria")
        cid = welcome["conversation_id"]
        staff_welcome = await desk.hello(token)
        assert staff_welcome["role"] == "staff" and staff_welcome["name"] == "Anna"
        assert "guest_id" not in staff_welcome
        queue = await desk.recv()
        assert queue["type"] == "queue"
        assert any(
            c["conversation_id"] == cid and c["guest_online"] for c in queue["conversations"]
        )

        await say(guest, "m1", "The shower is broken, this is unacceptable!")
        reply = await guest.expect("message", sender="ai")
        assert "team" in reply["text"]
        system = await guest.expect("message", sender="system")
        status = await guest.expect("status")
        assert status == {**status, "status": "waiting", "assigned_to": None}
        assert system["seq"] == reply["seq"] + 1
        summary = await desk.expect("conversation", conversation_id=cid, status="waiting")
        assert summary["guest_name"] == "Maria" and summary["guest_online"] is True

        await desk.send(type="claim", conversation_id=cid)
        joined = await guest.expect("message", sender="system")
        assert joined["text"].startswith("Anna")
        assert (await guest.expect("status"))["assigned_to"] == "Anna"
        subscribed = await desk.expect("subscribed", conversation_id=cid)
        assert subscribed["last_seq"] == joined["seq"] and subscribed["assigned_to"] == "Anna"

        await desk.send(type="typing", conversation_id=cid, active=True)
        assert (await guest.expect("typing", sender="staff"))["active"] is True
        await desk.send(
            type="message",
            conversation_id=cid,
            client_msg_id="s1",
            text="So sorry, Maria. A technician is on the way.",
        )
        await desk.expect("ack", client_msg_id="s1")
        from_staff = await guest.expect("message", sender="staff")
        assert from_staff["author"] == "Anna"
        await say(guest, "m2", "Thank you!")
        await desk.expect("message", client_msg_id="m2")
        # The concierge stays silent while staff hold the conversation.
        await desk.send(type="read", conversation_id=cid, seq=from_staff["seq"] + 1)
        receipt = await guest.expect("read")
        assert receipt["reader"] == "staff"

        await desk.send(type="resolve", conversation_id=cid)
        resolved = await guest.expect("message", sender="system")
        assert "resolved" in resolved["text"]
        assert (await guest.expect("status"))["status"] == "resolved"
        mark = len(guest.seen)
        await say(guest, "m3", "One more thing: what time is checkout?")
        answer = await guest.expect("message", sender="ai")
        assert "11 am" in answer["text"]
        # In order: the guest message, the system message, the status, the reply.
        after = [f for f in guest.seen[mark:] if f["type"] in ("message", "status")]
        assert [(f["type"], f.get("sender"), f.get("status")) for f in after] == [
            ("message", "guest", None),
            ("message", "system", None),
            ("status", None, "ai"),
            ("message", "ai", None),
        ]
        assert "Welcome back" in after[1]["text"] and after[2]["assigned_to"] is None

    senders = [m["sender"] for m in messages(guest.seen)]
    assert senders.count("ai") == 2  # one reply before hand-off, one after reopening


async def test_claim_conflict_release_and_forbidden(server: ChatServer) -> None:
    assert server.port
    anna = staff_token(server.config.db_path, "Anna")
    ben = staff_token(server.config.db_path, "Ben")
    async with connect(server.port) as guest, connect(server.port) as a, connect(server.port) as b:
        cid = (await new_guest(guest))["conversation_id"]
        await a.hello(anna)
        await b.hello(ben)
        await a.send(type="claim", conversation_id=cid)
        await a.expect("subscribed")
        await b.send(type="claim", conversation_id=cid)
        assert (await b.expect("error"))["code"] == "conflict"
        await b.send(type="message", conversation_id=cid, client_msg_id="x", text="hi")
        error = await b.expect("error")
        assert error["code"] == "forbidden" and error["ref"] == "x"
        await b.send(type="release", conversation_id=cid)
        assert (await b.expect("error"))["code"] == "forbidden"
        await a.send(type="claim", conversation_id=cid)  # own again: nothing stored
        await a.expect("subscribed")
        await a.send(type="release", conversation_id=cid)
        await guest.expect("status", status="ai", assigned_to=None)
        await b.send(type="claim", conversation_id=cid)
        await b.expect("subscribed", assigned_to="Ben")
        await b.send(type="claim", conversation_id="c_nobody")
        assert (await b.expect("error"))["code"] == "not_found"
        await b.send(type="escalate")
        assert (await b.expect("error"))["code"] == "forbidden"
        await guest.send(type="history", after_seq=0)
        history = await guest.expect("history")
    system_texts = [m["text"] for m in history["messages"] if m["sender"] == "system"]
    assert len(system_texts) == 3  # Anna joined, Anna left, Ben joined


async def test_escalate_twice_stores_once(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        await guest.send(type="escalate", reason="I'd like a person")
        await guest.expect("status", status="waiting")
        await guest.send(type="escalate")
        again = await guest.expect("status")
        assert again["status"] == "waiting"
        await guest.send(type="history", after_seq=0)
        history = await guest.expect("history")
    assert [m["sender"] for m in history["messages"]] == ["system"]


async def test_staff_are_resubscribed_on_hello_and_see_watch(server: ChatServer) -> None:
    assert server.port
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as guest:
        cid = (await new_guest(guest))["conversation_id"]
        async with connect(server.port) as desk:
            await desk.hello(token)
            await desk.send(type="claim", conversation_id=cid)
            await desk.expect("subscribed")
        async with connect(server.port) as desk:
            await desk.hello(token)
            await desk.expect("queue")
            await desk.expect("subscribed", conversation_id=cid, status="staff")
            await say(guest, "m1", "are you there?")
            await desk.expect("message", client_msg_id="m1")
    other = staff_token(server.config.db_path, "Ben")
    async with connect(server.port) as guest2, connect(server.port) as watcher:
        cid2 = (await new_guest(guest2))["conversation_id"]
        await watcher.hello(other)
        await watcher.send(type="watch", conversation_id=cid2)
        await watcher.expect("subscribed", conversation_id=cid2, status="ai")
        await say(guest2, "m1", "Where can I park?")
        await watcher.expect("message", sender="ai", conversation_id=cid2)
        await watcher.send(type="read", conversation_id=cid2, seq=2)
        assert (await guest2.expect("read"))["seq"] == 2
        await watcher.send(type="typing", conversation_id=cid2, active=True)
        assert (await watcher.expect("error"))["code"] == "forbidden"


async def test_guest_online_is_pushed_to_staff(server: ChatServer) -> None:
    assert server.port
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as desk:
        await desk.hello(token)
        await desk.expect("queue")
        async with connect(server.port) as guest:
            cid = (await new_guest(guest))["conversation_id"]
            online = await desk.expect("conversation", conversation_id=cid)
            assert online["guest_online"] is True
        offline = await desk.expect("conversation", conversation_id=cid)
        assert offline["guest_online"] is False


# ---------------------------------------------------------- bad input and errors


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ('{"type": "ping", "id": NaN}', "bad_json"),
        ("[" * 30_000 + "]" * 30_000, "bad_json"),  # absurd nesting, under 64 KiB
        ('{"type": "ping", "id": ' + "9" * 5000 + "}", "bad_json"),
        (b'{"type": "ping"}', "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"no": "type"}', "bad_message"),
        ('{"type": "message", "client_msg_id": "a"}', "bad_message"),
        ('{"type": "message", "client_msg_id": "a b", "text": "x"}', "bad_message"),
        ('{"type": "message", "client_msg_id": "a", "text": "   "}', "bad_message"),
        ('{"type": "history", "after_seq": true}', "bad_message"),
        ('{"type": "history", "after_seq": -1}', "bad_message"),
        ('{"type": "typing", "active": 1}', "bad_message"),
        ('{"type": "hello", "token": null}', "bad_message"),
        ('{"type": "shout"}', "unknown_type"),
        ('{"type": "message", "client_msg_id": "a", "text": "' + "x" * 4001 + '"}', "too_large"),
        ('{"type": "message", "client_msg_id": "' + "a" * 65 + '", "text": "x"}', "too_large"),
        ('{"type": "claim", "conversation_id": "c_1"}', "forbidden"),
    ],
)
async def test_bad_frames_get_the_contract_code_and_the_connection_stays_usable(
    server: ChatServer, frame: str | bytes, code: str
) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        await guest.send_raw(frame)
        error = await guest.expect("error")
        assert error["code"] == code
        await guest.send(type="ping", id=7)
        assert (await guest.expect("pong"))["id"] == 7
        await guest.send(type="history", after_seq=0)
        assert (await guest.expect("history"))["messages"] == []


async def test_error_refs_name_the_message_or_the_request(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        await guest.send(type="message", client_msg_id="abc", text="x" * 4001)
        assert (await guest.expect("error"))["ref"] == "abc"
        await guest.send(type="history")
        assert (await guest.expect("error"))["ref"] == "history"
        await guest.send_raw("{")
        assert (await guest.expect("error"))["ref"] is None


async def test_text_is_trimmed_and_4000_characters_fit(server: ChatServer) -> None:
    assert server.port
    server.responder = None
    async with connect(server.port) as guest:
        await new_guest(guest)
        await say(guest, "m1", "  " + "é" * 4000 + "\n ")
        stored = await guest.expect("message", seq=1)
    assert stored["text"] == "é" * 4000


async def test_anything_before_hello_is_auth_required(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await guest.send(type="message", client_msg_id="a", text="hi")
        error = await guest.recv()
        assert error["code"] == "auth_required"
        await guest.send_raw("garbage")
        assert (await guest.recv())["code"] == "bad_json"
        welcome = await guest.hello(None)
        assert welcome["type"] == "welcome"


@pytest.mark.parametrize("token", ["g.g_x.forged", "nonsense", "s.s_x.AAAA"])
async def test_bad_token_is_auth_failed_and_4401(server: ChatServer, token: str) -> None:
    assert server.port
    async with connect(server.port) as client:
        await client.send(type="hello", token=token)
        error = await client.recv()
        assert error["code"] == "auth_failed"
        reason = await client.closed()
    assert reason.code == 4401


async def test_removed_staff_token_stops_working(server: ChatServer) -> None:
    from trio_chat.server._store import Database

    assert server.port
    token = staff_token(server.config.db_path, "Carl")
    db = Database(server.config.db_path)
    assert db.remove_staff("Carl")
    db.close()
    async with connect(server.port) as client:
        await client.send(type="hello", token=token)
        assert (await client.recv())["code"] == "auth_failed"
        assert (await client.closed()).code == 4401


async def test_closed_registration_needs_a_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    from trio_chat.core.tokens import TokenSigner
    from trio_chat.server._store import Database

    srv = await start(nursery, tmp_path, open_registration=False)
    assert srv.port
    async with connect(srv.port) as client:
        await client.send(type="hello", token=None)
        assert (await client.recv())["code"] == "auth_failed"
        assert (await client.closed()).code == 4401
    db = Database(srv.config.db_path)
    row = db.add_guest("Room 12")
    token = TokenSigner(db.secret()).issue("g", row.guest_id)
    db.close()
    async with connect(srv.port) as client:
        welcome = await client.hello(token)
        assert welcome["guest_id"] == row.guest_id


async def test_second_hello_is_bad_message(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        await guest.send(type="hello", token=None)
        error = await guest.expect("error")
        assert error["code"] == "bad_message" and error["ref"] == "hello"


async def test_frame_over_64_kib_closes_with_1009(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        # 30,000 characters but 90,000 bytes of UTF-8: over the byte limit, which
        # trio-websocket (counting characters) would not notice by itself.
        frame = {"type": "message", "client_msg_id": "big", "text": "€" * 30_000}
        await guest.send_raw(json.dumps(frame, ensure_ascii=False))
        assert (await guest.closed()).code == 1009
    async with connect(server.port) as guest:
        await new_guest(guest)
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            # The server may close while our frame is still being written.
            await guest.send_raw("x" * 70_000)
        assert (await guest.closed()).code == 1009


async def test_twenty_bad_frames_in_a_row_close_with_1008(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        for _ in range(19):
            await guest.send_raw("nope")
        await guest.send(type="ping")  # a good frame resets the count
        await guest.expect("pong")
        for _ in range(20):
            await guest.send_raw("nope")
        assert (await guest.closed()).code == 1008


async def test_no_hello_in_time_closes_with_4408(
    nursery: trio.Nursery, tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    srv = await start(nursery, tmp_path, hello_timeout=10.0)
    assert srv.port
    async with connect(srv.port) as client:
        start_time = trio.current_time()
        reason = await client.closed()
        assert reason.code == 4408
        assert 10.0 <= trio.current_time() - start_time < 11.0


async def test_rate_limit_then_4429_for_a_flood(
    nursery: trio.Nursery, tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    srv = await start(nursery, tmp_path, concierge="off", rate_limit=10.0, rate_burst=20)
    assert srv.port
    async with connect(srv.port) as guest:
        await new_guest(guest)
        for i in range(20):  # the burst
            await say(guest, f"m{i}", "hi")
        await guest.send(type="message", client_msg_id="over", text="hi")
        error = await guest.expect("error")
        assert error["code"] == "rate_limited" and error["ref"] == "over"
        assert 0 < error["retry_after_ms"] <= 100
        # A retry of a stored message is answered before the limit applies.
        await guest.send(type="message", client_msg_id="m3", text="hi")
        assert (await guest.expect("ack", client_msg_id="m3"))["seq"] == 4
        # Keep flooding at twice the limit: some messages get through at the refill
        # rate, and the connection is still closed 10 s after it was first told.
        # (The client may be mid-burst when the close arrives and see a reset, so the
        # close code is read on the server.)
        told_at = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed):
            for second in range(30):
                for i in range(20):
                    await guest.send(type="message", client_msg_id=f"f{second}-{i}", text="spam")
                await guest.expect("error", code="rate_limited")
                await trio.sleep(1)
        assert 10 <= trio.current_time() - told_at <= 12
    assert srv.closes[4429] == 1


async def test_missing_pong_closes_with_1011(
    nursery: trio.Nursery, tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    """A peer that stops answering WebSocket pings is closed after another heartbeat."""
    srv = await start(nursery, tmp_path, heartbeat=5.0)
    assert srv.port
    peer = await SilentPeer.connect(srv.port)
    await peer.send(type="hello", token=None)
    await peer.events_until(wsproto.events.TextMessage)
    started = trio.current_time()
    # The peer reads but never answers a ping (it sends nothing at all).
    events = await peer.events_until(wsproto.events.CloseConnection)
    elapsed = trio.current_time() - started
    assert any(isinstance(e, wsproto.events.Ping) for e in events), (events, elapsed)
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert events[-1].code == 1011
    assert 5.0 <= elapsed <= 2 * 5.0 + 1


async def test_answered_pings_keep_the_connection(
    nursery: trio.Nursery, tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    srv = await start(nursery, tmp_path, heartbeat=5.0)
    assert srv.port
    async with connect(srv.port) as guest:
        await new_guest(guest)
        await trio.sleep(60)
        await guest.send(type="ping", id="still here")
        assert (await guest.expect("pong"))["id"] == "still here"


# -------------------------------------------------------- isolation and shutdown


class ExplodingResponder:
    history_window = 0

    async def respond(self, request: ResponderRequest) -> ResponderReply:
        raise RuntimeError("the model is down")


async def test_a_failing_responder_hands_over_to_staff(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    responder: Responder = ExplodingResponder()
    srv = ChatServer(make_config(tmp_path), responder=responder)
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        await new_guest(guest)
        await say(guest, "m1", "hello?")
        apology = await guest.expect("message", sender="ai")
        assert "trouble" in apology["text"]
        assert (await guest.expect("status"))["status"] == "waiting"


async def test_an_exception_in_one_session_never_reaches_another(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.port
    original = server.hub._history

    def broken_for_one(session: Any, conv: Any, frame: Any) -> None:
        if frame.after_seq == 666:
            raise RuntimeError("boom")
        original(session, conv, frame)

    monkeypatch.setattr(server.hub, "_history", broken_for_one)
    async with connect(server.port) as victim, connect(server.port) as bystander:
        await new_guest(victim)
        await new_guest(bystander)
        await victim.send(type="history", after_seq=666)
        assert (await victim.expect("error"))["code"] == "internal"
        await victim.send(type="ping", id=1)
        await victim.expect("pong")
        await say(bystander, "m1", "still fine?")
    async with connect(server.port) as late:
        assert (await late.hello(None))["type"] == "welcome"


async def test_garbage_and_dropped_handshakes_do_not_hurt_the_server(server: ChatServer) -> None:
    assert server.port
    for payload in [b"\x00\x01\x02 not http\r\n\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\n"]:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(payload)
        await stream.aclose()
    # An upgrade request cut off in the middle of its headers.
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConn")
    await stream.aclose()
    async with connect(server.port) as guest:
        assert (await guest.hello(None))["type"] == "welcome"


async def test_slow_consumer_is_cut_off_and_others_are_unaffected(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start(nursery, tmp_path, concierge="off", rate_limit=0, outbox_limit=16)
    assert srv.port
    async with connect(srv.port) as writer, connect(srv.port) as other:
        welcome = await new_guest(writer)
        await new_guest(other)
        stuck = await SilentPeer.connect(srv.port, receive_buffer=4096)
        await stuck.send(type="hello", token=welcome["token"])
        await stuck.events_until(wsproto.events.TextMessage)
        # The stuck tab reads nothing more; its guest keeps writing big messages.
        sent = 0
        while not srv.closes[1013]:
            assert sent < 2000, "the stuck tab was never cut off"
            await say(writer, f"m{sent}", "x" * 3900)
            sent += 1
            # Another guest is served promptly all along.
            with trio.fail_after(2):
                await say(other, f"o{sent}", "am I slowed down?")
        await say(writer, "after", "the writer is still acknowledged")
        # The cut-off tab comes back and recovers everything from history.
        async with connect(srv.port) as back:
            again = await back.hello(welcome["token"])
            recovered = [m["seq"] for m in await back.fetch_history(again["last_seq"])]
    assert recovered == list(range(1, sent + 2))
    # What the stuck tab was sent, partly written and held back, parses frame by frame.
    with trio.fail_after(5):
        events = await stuck.events_until(wsproto.events.CloseConnection)
    texts: list[dict[str, Any]] = []
    part = ""
    for event in events:
        if isinstance(event, wsproto.events.TextMessage):
            part += event.data
            if event.message_finished:
                texts.append(json.loads(part))
                part = ""
    assert [t["seq"] for t in texts] == list(range(1, len(texts) + 1))
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert events[-1].code == CloseCode.TRY_LATER
    await stuck.stream.aclose()


async def test_graceful_shutdown_sends_spread_reconnects_and_1012(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start(nursery, tmp_path, shutdown_spread=3.0, drain_per_connection=0.0)
    assert srv.port
    hints: list[int] = []
    async with connect(srv.port) as g1, connect(srv.port) as g2, connect(srv.port) as g3:
        for g in (g1, g2, g3):
            await new_guest(g)
        srv.shutdown()
        for g in (g1, g2, g3):
            hints.append((await g.expect("reconnect"))["after_ms"])
            assert (await g.closed()).code == 1012
    with trio.fail_after(5):
        await srv.wait_stopped()
    assert all(250 <= h <= 3250 for h in hints)
    assert len(set(hints)) == 3


async def test_the_restart_window_grows_with_the_crowd(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The window opens later and lasts longer for a crowd than for a handful: the old
    process takes longer to drain, the new one to take everyone back."""
    srv = await start(
        nursery,
        tmp_path,
        restart_delay=0.25,
        drain_per_connection=0.1,
        shutdown_spread=0.1,
        shutdown_spread_per_connection=0.5,
    )
    assert srv.port
    async with connect(srv.port) as g1, connect(srv.port) as g2, connect(srv.port) as g3:
        for g in (g1, g2, g3):
            await new_guest(g)
        srv.shutdown()
        hints = [(await g.expect("reconnect"))["after_ms"] for g in (g1, g2, g3)]
    # Three connections: the window opens after 0.25 s + 3 x 0.1 s of draining, and lasts
    # 3 x 0.5 s, far wider than the 0.1 s minimum.
    assert all(550 <= h < 550 + 1500 for h in hints)
    assert max(hints) - min(hints) > 100


async def test_a_shutdown_refuses_new_connections_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """While the old process drains, a connection attempt is refused at once (clients
    back off), not parked in the kernel's backlog until the process exits."""
    srv = await start(nursery, tmp_path, shutdown_grace=30.0)
    assert srv.port
    # A connection that never sends its request keeps the drain going.
    lingering = await trio.open_tcp_stream("127.0.0.1", srv.port)
    stopped = trio.Event()

    async def watch() -> None:
        await srv.wait_stopped()
        stopped.set()

    nursery.start_soon(watch)
    srv.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", srv.port)
    assert not stopped.is_set()
    await lingering.aclose()
    with trio.fail_after(10):
        await stopped.wait()


async def test_a_shutdown_does_not_wait_for_close_replies(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Thousands of close handshakes would hold the old process (and its port) for
    seconds: in a shutdown the server sends its reconnect hint and close frame, then
    closes the TCP connection without waiting for the peer's close frame."""
    srv = await start(nursery, tmp_path, close_timeout=60.0, shutdown_grace=60.0)
    assert srv.port
    peer = await SilentPeer.connect(srv.port)
    await peer.send(type="hello", token=None)
    await peer.events_until(wsproto.events.TextMessage)  # welcome
    srv.shutdown()
    with trio.fail_after(10):  # not the 60 s it would wait for a reply
        await srv.wait_stopped()
    events = await peer.events_until(wsproto.events.CloseConnection)
    frames = [json.loads(e.data) for e in events if isinstance(e, wsproto.events.TextMessage)]
    assert frames[-1]["type"] == "reconnect"
    assert events[-1].code == 1012
    assert await peer.stream.receive_some() == b""  # then the end of the stream
    # The collector, frozen for the drain, works again.
    assert gc.get_freeze_count() == 0


async def test_healthz_reports_connections(server: ChatServer) -> None:
    assert server.port
    async with connect(server.port) as guest:
        await new_guest(guest)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
        await stream.aclose()
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    health = json.loads(body)
    assert health["connections"] == 1 and health["version"]
    assert health["uptime_s"] >= 0


async def test_websocket_close_reason_is_a_close_reason(server: ChatServer) -> None:
    """Sanity: our helper sees trio-websocket close reasons (used by many tests)."""
    assert server.port
    async with connect(server.port) as guest:
        await guest.send(type="hello", token="bad")
        await guest.recv()
        reason = await guest.closed()
    assert isinstance(reason, trio_websocket.CloseReason)
