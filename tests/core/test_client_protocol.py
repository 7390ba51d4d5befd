"""The client's half of the protocol: what the builders write, the server's parser reads
back unchanged; every frame the hub sends parses to its type; a broken frame is a
``ProtocolError``, an unknown type is ignored."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import ProtocolError
from trio_chat.core import client_protocol as wire
from trio_chat.core import protocol as proto

from .test_hub import Driver

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=64)
texts = st.text(min_size=1, max_size=200).filter(lambda t: t.strip() == t and t != "")
conversations = st.one_of(st.none(), ids.map(lambda i: "c_" + i))


@given(ids, texts, conversations)
def test_a_message_request_reads_back_as_sent(cmid: str, text: str, cid: str | None) -> None:
    parsed = proto.parse_client_frame(wire.message_request(cmid, text, cid))
    assert parsed == proto.SendMessage(client_msg_id=cmid, text=text, conversation_id=cid)


@given(st.integers(0, 2**53), st.integers(1, 500), conversations)
def test_a_history_request_reads_back_as_sent(after: int, limit: int, cid: str | None) -> None:
    parsed = proto.parse_client_frame(wire.history_request(after, limit, cid))
    assert parsed == proto.HistoryRequest(after_seq=after, limit=limit, conversation_id=cid)


def test_every_other_builder_reads_back_as_sent() -> None:
    parse = proto.parse_client_frame
    assert parse(wire.hello_frame(None)) == proto.Hello(token=None, name=None)
    assert parse(wire.hello_frame("g_1.x", "Maria")) == proto.Hello(token="g_1.x", name="Maria")
    assert parse(wire.escalate_frame()) == proto.Escalate(reason=None)
    assert parse(wire.escalate_frame("no towels")) == proto.Escalate(reason="no towels")
    assert parse(wire.typing_request(True, "c_1")) == proto.Typing(
        active=True, conversation_id="c_1"
    )
    assert parse(wire.read_request(7)) == proto.Read(seq=7, conversation_id=None)
    assert parse(wire.ping_frame("p1")) == proto.Ping(id="p1")
    for action in ("claim", "release", "resolve", "watch", "unwatch"):
        parsed = parse(wire.staff_action_frame(action, "c_1"))
        assert parsed == proto.StaffAction(action=action, conversation_id="c_1")


def test_every_frame_the_hub_sends_in_a_hand_off_parses_to_its_type() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    staff = d.staff()
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    d.reply(d.replies[0])
    d.send(guest, type="escalate")
    d.send(staff, type="claim", conversation_id=cid)
    d.send(staff, type="typing", conversation_id=cid, active=True)
    d.send(staff, type="message", conversation_id=cid, client_msg_id="s1", text="Anna here")
    d.send(guest, type="read", seq=4)
    d.send(guest, type="history", after_seq=0)
    d.send(guest, type="ping", id="p")
    d.send(guest, type="claim", conversation_id=cid)  # an error: guests do not claim
    frames = [json.dumps(f) for f in d.sent[guest] + d.sent[staff]]
    parsed = [wire.parse_server_frame(f) for f in frames]
    assert not [p for p in parsed if isinstance(p, wire.UnknownFrame)]
    kinds = {type(p) for p in parsed}  # (the staff sign-in's queue is read by Driver.staff)
    assert kinds >= {
        wire.Ack,
        wire.Pushed,
        wire.History,
        wire.StatusChanged,
        wire.TypingChanged,
        wire.ReadMark,
        wire.Pong,
        wire.ServerError,
        wire.ConversationChanged,
        wire.Subscribed,
    }
    [history] = [p for p in parsed if isinstance(p, wire.History)]
    assert [m.sender for m in history.messages][:2] == ["guest", "ai"]
    [error] = [p for p in parsed if isinstance(p, wire.ServerError)]
    assert (error.code, error.ref) == ("forbidden", "claim")


def test_a_welcome_parses_for_guests_and_for_staff() -> None:
    d = Driver()
    _, welcome = d.guest()
    guest = wire.parse_server_frame(json.dumps(welcome))
    assert isinstance(guest, wire.Welcome)
    assert (guest.role, guest.conversation_id, guest.status) == (
        "guest",
        welcome["conversation_id"],
        "ai",
    )
    staff = wire.parse_server_frame(
        '{"type":"welcome","role":"staff","token":"s_1.x","staff_id":"s_1","name":"Anna",'
        '"heartbeat_s":20,"server":"t"}'
    )
    assert isinstance(staff, wire.Welcome)
    assert (staff.staff_id, staff.name, staff.heartbeat_s) == ("s_1", "Anna", 20.0)


def test_a_queue_entry_labels_the_guest_by_name_else_by_id() -> None:
    entry: dict[str, Any] = {
        "conversation_id": "c_1",
        "guest_id": "g_1",
        "guest_name": None,
        "status": "waiting",
        "assigned_to": None,
        "last_seq": 3,
        "read_seq": 1,
        "updated_ts": "2026-12-01T00:00:00.000Z",
        "guest_online": True,
        "preview": "help",
    }
    changed = wire.parse_server_frame(json.dumps({"type": "conversation", **entry}))
    assert isinstance(changed, wire.ConversationChanged)
    assert changed.summary.guest_label == "g_1"
    named = wire.parse_server_frame(
        json.dumps({"type": "queue", "conversations": [{**entry, "guest_name": "Maria"}]})
    )
    assert isinstance(named, wire.Queue)
    assert named.conversations[0].guest_label == "Maria"


def test_an_unknown_type_is_kept_aside_not_refused() -> None:
    frame = wire.parse_server_frame('{"type":"poll","conversation_id":"c_1","options":[1]}')
    assert frame == wire.UnknownFrame("poll", {"conversation_id": "c_1", "options": [1]})


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1]",
        '{"no":"type"}',
        '{"type":"ack","client_msg_id":"m1","seq":"1","conversation_id":"c","ts":"t"}',
        '{"type":"ack","client_msg_id":"m1","seq":true,"conversation_id":"c","ts":"t"}',
        '{"type":"status","conversation_id":"c","status":"closed","assigned_to":null}',
        '{"type":"typing","conversation_id":"c","sender":"robot","active":true}',
        '{"type":"history","conversation_id":"c","messages":{},"last_seq":0}',
        '{"type":"queue","conversations":[1]}',
        '{"type":"message","seq":1}',
        '{"type":"welcome","role":"admin"}',
    ],
)
def test_a_broken_server_frame_is_a_protocol_error(raw: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.parse_server_frame(raw)
    assert info.value.code == "bad_message"


@given(st.text(max_size=300))
def test_any_server_text_parses_or_raises_protocol_error(raw: str) -> None:
    with contextlib.suppress(ProtocolError):
        wire.parse_server_frame(raw)
