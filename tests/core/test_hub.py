"""Protocol v1's rules where they live: the hub, frame in, frames out. No sockets, no
Trio, no clock but a number; storage is the memory backend, driven by hand so a test
can hold commits in flight."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict, deque
from typing import Any

import pytest

from trio_chat.core.errors import StorageError
from trio_chat.core.hub import (
    Action,
    Close,
    Hub,
    HubConfig,
    Read,
    ReportWritten,
    Send,
    StartReply,
    Write,
)
from trio_chat.core.protocol import CloseCode
from trio_chat.core.storage import AppendMessage, CreateGuest, SetRead
from trio_chat.core.tokens import TokenSigner
from trio_chat.server._store_memory import MemoryBackend

WALL = 1_800_000_000.0


class Driver:
    """Carries out the hub's actions at once, like a shell with an instant store; with
    ``hold`` set, writes wait in :attr:`held` until :meth:`commit`."""

    def __init__(
        self, *, concierge: bool = False, rate_limit: float = 0.0, open_registration: bool = True
    ) -> None:
        self.backend = MemoryBackend(secret=b"k" * 32)
        self.hub = Hub(
            TokenSigner(self.backend.secret()),
            HubConfig(
                heartbeat_s=0,
                server_name="test",
                rate_limit=rate_limit,
                rate_burst=2,
                open_registration=open_registration,
            ),
            concierge=concierge,
        )
        self.now = 0.0
        self.sent: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.closes: dict[int, tuple[int, str]] = {}
        self.replies: list[StartReply] = []
        self.held: deque[Write] = deque()
        self.hold = False
        self._ids = itertools.count(1)

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent[action.session].append(json.loads(action.frame))
            elif isinstance(action, Close):
                self.closes.setdefault(action.session, (action.code, action.reason))
            elif isinstance(action, StartReply):
                self.replies.append(action)
            elif isinstance(action, ReportWritten):  # an instant socket
                self.run(self.hub.written(action.session, self.now, WALL))
            elif isinstance(action, Read):
                result = getattr(self.backend, action.method)(*action.args)
                self.run(self.hub.loaded(action, result, self.now, WALL))
            elif not isinstance(action, Write):
                continue  # Fill, Relay: only a cluster's hub asks for them
            elif self.hold:
                self.held.append(action)
            else:
                self._commit(action)

    def _commit(self, write: Write) -> None:
        try:
            [result] = self.backend.apply_batch([write.operation])
        except StorageError as exc:
            self.run(self.hub.failed(write, exc, self.now, WALL))
        else:
            self.run(self.hub.stored(write, result, self.now, WALL))

    def commit(self) -> None:
        while self.held:
            self._commit(self.held.popleft())

    def connect(self) -> int:
        session = next(self._ids)
        self.hub.opened(session)
        return session

    def send(self, session: int, **frame: Any) -> None:
        self.run(self.hub.frame(session, json.dumps(frame), self.now, WALL))

    def take(self, session: int) -> list[dict[str, Any]]:
        return self.sent.pop(session, [])

    def guest(self, token: str | None = None) -> tuple[int, dict[str, Any]]:
        session = self.connect()
        self.send(session, type="hello", token=token)
        welcome = self.take(session)[0]
        assert welcome["type"] == "welcome", welcome
        return session, welcome

    def staff(self, name: str = "Anna") -> int:
        member = self.backend.add_staff(name)
        session = self.connect()
        token = self.hub.signer.issue("s", member.staff_id)
        self.send(session, type="hello", token=token)
        assert [f["type"] for f in self.take(session)][:2] == ["welcome", "queue"]
        return session

    def resolved(self, cid: str) -> int:
        """A staff member claims ``cid`` and resolves it; returns their session."""
        staff = self.staff()
        self.send(staff, type="claim", conversation_id=cid)
        self.send(staff, type="resolve", conversation_id=cid)
        return staff

    def reply(self, start: StartReply, text: str = "Breakfast is at seven.") -> None:
        self.run(self.hub.replied(start.conversation_id, text, False, self.now, WALL))


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


# ---------------------------------------------------------------------- idempotency


def test_a_retry_is_acknowledged_again_but_neither_pushed_nor_answered_again() -> None:
    d = Driver(concierge=True)
    guest, _ = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    assert types(d.take(guest)) == ["ack", "message", "typing"]
    [start] = d.replies
    d.reply(start)
    assert [f.get("sender") for f in d.take(guest)] == ["ai", "ai"]  # the answer, typing off
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    frames = d.take(guest)
    assert frames == [
        {
            "type": "ack",
            "client_msg_id": "m1",
            "seq": 1,
            "conversation_id": frames[0]["conversation_id"],
            "ts": frames[0]["ts"],
        }
    ]
    assert len(d.replies) == 1


def test_a_retry_racing_its_original_is_stored_pushed_and_answered_once() -> None:
    d = Driver(concierge=True)
    first, welcome = d.guest()
    second, _ = d.guest(welcome["token"])  # the same guest in another tab
    d.hold = True
    d.send(first, type="message", client_msg_id="m1", text="breakfast?")
    d.send(second, type="message", client_msg_id="m1", text="breakfast?")
    assert d.take(first) == d.take(second) == []  # nothing before the commit
    d.commit()
    one, two = d.take(first), d.take(second)
    assert types(one) == ["ack", "message", "typing"]
    assert types(two) == ["message", "typing", "ack"]  # its own ack: the original's
    assert one[0]["seq"] == two[2]["seq"] == 1
    assert len(d.replies) == 1
    assert [m.seq for m in d.backend.history(welcome["conversation_id"], 0, 10)] == [1]


# --------------------------------------------------------------------- subscriptions


def test_a_watch_while_a_commit_is_in_flight_gets_it_exactly_once() -> None:
    d = Driver()
    guest, welcome = d.guest()
    staff = d.staff()
    d.take(staff)
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="one")
    d.send(staff, type="watch", conversation_id=welcome["conversation_id"])
    [subscribed] = [f for f in d.take(staff) if f["type"] == "subscribed"]
    assert subscribed["last_seq"] == 0
    d.commit()
    pushed = [f for f in d.take(staff) if f["type"] == "message"]
    assert [m["seq"] for m in pushed] == [1]  # above last_seq: pushed, once
    d.send(staff, type="unwatch", conversation_id=welcome["conversation_id"])
    d.send(staff, type="watch", conversation_id=welcome["conversation_id"])
    [again] = [f for f in d.take(staff) if f["type"] == "subscribed"]
    assert again["last_seq"] == 1  # at or below: from history, never pushed
    d.hold = False
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert [f["seq"] for f in d.take(staff) if f["type"] == "message"] == [2]


def test_watch_and_unwatch_are_for_staff_and_unwatch_stops_the_pushes() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="watch", conversation_id=cid)
    [error] = d.take(guest)
    assert (error["code"], error["ref"]) == ("forbidden", "watch")
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=cid)
    d.send(staff, type="unwatch", conversation_id=cid)
    d.take(staff)
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    assert [f for f in d.take(staff) if f["type"] == "message"] == []
    d.send(staff, type="read", conversation_id=cid, seq=1)
    assert [(f["code"], f["ref"]) for f in d.take(staff) if f["type"] == "error"] == [
        ("forbidden", "read")
    ]
    d.send(staff, type="watch", conversation_id="c_nope")
    [missing] = d.take(staff)
    assert (missing["code"], missing["ref"]) == ("not_found", "c_nope")


def test_a_guest_back_outside_ai_is_told_the_status_after_welcome() -> None:
    d = Driver()
    guest, welcome = d.guest()
    d.send(guest, type="escalate")
    d.take(guest)
    again = d.connect()
    d.send(again, type="hello", token=welcome["token"])
    frames = d.take(again)
    assert types(frames) == ["welcome", "status"]
    assert frames[1]["status"] == "waiting" and frames[1]["assigned_to"] is None


# ------------------------------------------------------------------------ read marks


def test_read_marks_need_a_hold_or_a_watch_and_stop_at_the_last_message() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    d.take(guest)
    staff = d.staff()
    d.send(staff, type="read", conversation_id=cid, seq=1)
    assert [(f["code"], f["ref"]) for f in d.take(staff)] == [("forbidden", "read")]
    d.send(staff, type="claim", conversation_id=cid)
    d.take(staff)
    d.take(guest)
    d.send(staff, type="read", conversation_id=cid, seq=999)  # past the last seq (2)
    assert [f["seq"] for f in d.take(guest) if f["type"] == "read"] == [2]
    d.send(guest, type="read", seq=999)
    assert [f["seq"] for f in d.take(staff) if f["type"] == "read"] == [2]
    assert d.backend.conversation(cid) is not None
    assert d.backend.conversation(cid).read_seq == 2  # type: ignore[union-attr]


# ------------------------------------------------------------------------- staff


def test_two_staff_racing_to_claim_are_decided_by_the_first_write() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna, ben = d.staff("Anna"), d.staff("Ben")
    d.hold = True
    d.send(anna, type="claim", conversation_id=cid)
    d.send(ben, type="claim", conversation_id=cid)
    # Ben's claim is refused before Anna's is even committed.
    conflict = [f for f in d.take(ben) if f["type"] == "error"]
    assert [(f["code"], f["ref"]) for f in conflict] == [("conflict", "claim")]
    d.commit()
    assert [f["status"] for f in d.take(guest) if f["type"] == "status"] == ["staff"]
    assert [f["type"] for f in d.take(anna) if f["type"] == "subscribed"] == ["subscribed"]


def test_a_write_that_fails_is_neither_acknowledged_nor_pushed() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=welcome["conversation_id"])
    d.take(staff)
    d.backend.fail_writes = True
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    assert d.take(guest) == [
        {
            "type": "error",
            "code": "internal",
            "message": "the server could not store that; please retry",
            "ref": "m1",
        }
    ]
    assert d.take(staff) == [] and d.replies == []
    d.send(guest, type="escalate")
    assert [(f["code"], f["ref"]) for f in d.take(guest)] == [("internal", "escalate")]
    d.backend.fail_writes = False
    d.send(guest, type="escalate")  # the failed transition left nothing behind
    assert [f["status"] for f in d.take(guest) if f["type"] == "status"] == ["waiting"]


# ---------------------------------------------------------------------- concierge


def test_staff_taking_over_while_the_concierge_thinks_silences_it() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [start] = d.replies
    staff = d.staff()
    d.send(staff, type="claim", conversation_id=welcome["conversation_id"])
    d.take(guest)
    d.reply(start)
    frames = d.take(guest)
    assert frames == [
        {
            "type": "typing",
            "conversation_id": welcome["conversation_id"],
            "sender": "ai",
            "active": False,
        }
    ]
    history = d.backend.history(welcome["conversation_id"], 0, 10)
    assert [m.sender for m in history] == ["guest", "system"]


def test_answers_come_one_at_a_time_in_the_order_asked() -> None:
    d = Driver(concierge=True)
    guest, _ = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="one")
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert [s.message.text for s in d.replies] == ["one"]
    d.reply(d.replies[0], "answer one")
    assert [s.message.text for s in d.replies] == ["one", "two"]
    d.reply(d.replies[1], "answer two")
    d.take(guest)
    texts = [m.text for m in d.backend.history(d.replies[0].conversation_id, 0, 10)]
    assert texts == ["one", "two", "answer one", "answer two"]


def test_a_message_in_resolved_reopens_then_the_concierge_answers() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    d.resolved(welcome["conversation_id"])
    d.take(guest)
    d.send(guest, type="message", client_msg_id="m1", text="one more thing")
    frames = d.take(guest)
    assert types(frames) == ["ack", "message", "message", "status", "typing"]
    assert frames[3]["status"] == "ai" and frames[3]["assigned_to"] is None
    assert len(d.replies) == 1


# ------------------------------------------------------------------ limits and hello


def test_rate_limits_refuse_new_messages_but_answer_retries() -> None:
    d = Driver(rate_limit=1.0)
    guest, _ = d.guest()
    for n in (1, 2):
        d.send(guest, type="message", client_msg_id=f"m{n}", text="hi")
    d.send(guest, type="message", client_msg_id="m3", text="hi")
    d.send(guest, type="message", client_msg_id="m1", text="hi")
    frames = d.take(guest)
    refused = [f for f in frames if f["type"] == "error"]
    assert [(f["code"], f["ref"]) for f in refused] == [("rate_limited", "m3")]
    assert refused[0]["retry_after_ms"] > 0
    assert [f["client_msg_id"] for f in frames if f["type"] == "ack"] == ["m1", "m2", "m1"]
    # Flooding on for ten seconds after being told closes with 4429.
    for step in range(12):
        d.now = step * 1.0 + 0.01
        d.send(guest, type="message", client_msg_id=f"f{step}", text="hi")
        d.send(guest, type="message", client_msg_id=f"g{step}", text="hi")
    assert d.closes[guest][0] == CloseCode.RATE_LIMITED


def test_twenty_bad_frames_in_a_row_close_and_a_good_one_resets_the_count() -> None:
    d = Driver()
    guest, _ = d.guest()
    for _ in range(19):
        d.send(guest, type="nonsense")
    d.send(guest, type="ping", id=1)
    for _ in range(19):
        d.send(guest, type="nonsense")
    assert guest not in d.closes
    d.send(guest, type="nonsense")
    assert d.closes[guest][0] == CloseCode.POLICY


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "ping"}, "auth_required"),
        ({"type": "hello", "token": "g.nobody.forged"}, "auth_failed"),
        ({"type": "hello", "token": 7}, "bad_message"),
    ],
)
def test_hello_comes_first_and_a_bad_token_closes_with_4401(
    frame: dict[str, Any], code: str
) -> None:
    d = Driver()
    session = d.connect()
    d.send(session, **frame)
    [error] = d.take(session)
    assert error["code"] == code
    assert (session in d.closes) == (code == "auth_failed")
    if code == "auth_failed":
        assert d.closes[session][0] == CloseCode.AUTH_FAILED


def test_a_removed_staff_member_cannot_sign_in() -> None:
    d = Driver()
    member = d.backend.add_staff("Carl")
    token = d.hub.signer.issue("s", member.staff_id)
    d.backend.remove_staff("Carl")
    session = d.connect()
    d.send(session, type="hello", token=token)
    [error] = d.take(session)
    assert (error["code"], error["message"]) == ("auth_failed", "this staff member was removed")


def test_closed_registration_refuses_a_new_guest() -> None:
    d = Driver(open_registration=False)
    session = d.connect()
    d.send(session, type="hello", token=None)
    assert d.take(session)[0]["code"] == "auth_failed"
    assert d.closes[session][0] == CloseCode.AUTH_FAILED


def test_a_closed_session_lets_go_of_its_conversation() -> None:
    d = Driver()
    guest, welcome = d.guest()
    assert welcome["conversation_id"] in d.hub.conversations
    d.run(d.hub.closed(guest, d.now, WALL))
    assert d.hub.conversations == {} and d.hub.sessions == {}


# ------------------------------------------------------- what the shell is told to do


def test_the_shell_is_told_which_storage_a_session_waits_for() -> None:
    d = Driver()
    session = d.connect()
    [create] = d.hub.frame(session, json.dumps({"type": "hello", "name": "Maria"}), 0.0, WALL)
    assert isinstance(create, Write) and isinstance(create.operation, CreateGuest)
    assert (create.session, create.wait, create.ref) == (session, True, "hello")
    assert create.operation.name == "Maria"
    d.run([create])
    welcome = d.take(session)[0]
    cid = welcome["conversation_id"]

    def only(frame: dict[str, Any]) -> Action:
        [action] = d.hub.frame(session, json.dumps(frame), 0.0, WALL)
        return action

    message = only({"type": "message", "client_msg_id": "m1", "text": " hi "})
    assert isinstance(message, Write) and isinstance(message.operation, AppendMessage)
    assert (message.session, message.wait, message.ref) == (session, False, "m1")
    assert (message.operation.sender, message.operation.text) == ("guest", "hi")
    assert message.operation.author_key == "g:" + welcome["guest_id"]
    d.run([message])
    d.take(session)
    history = only({"type": "history", "after_seq": 0, "limit": 7})
    assert isinstance(history, Read)
    assert (history.method, history.args, history.session, history.ref) == (
        "history",
        (cid, 0, 7),
        session,
        "history",
    )
    escalate = only({"type": "escalate"})
    assert isinstance(escalate, Write) and (escalate.wait, escalate.ref) == (True, "escalate")
    assert escalate.operation.status == ("waiting", None, None)  # type: ignore[attr-defined]
    read = only({"type": "read", "seq": 1})
    assert isinstance(read, Write) and isinstance(read.operation, SetRead)
    assert (read.wait, read.ref, read.operation.reader, read.operation.seq) == (
        True,
        "read",
        "guest",
        1,
    )


def test_a_staff_console_signs_in_to_the_whole_queue_and_what_it_holds() -> None:
    d = Driver()
    maria = d.connect()
    d.send(maria, type="hello", token=None, name="Maria Lopez")
    welcome = d.take(maria)[0]
    cid = welcome["conversation_id"]
    d.send(maria, type="message", client_msg_id="m1", text="The shower is cold")
    d.send(maria, type="escalate")
    d.take(maria)
    member = d.backend.add_staff("Anna")
    token = d.hub.signer.issue("s", member.staff_id)
    anna = d.connect()
    d.send(anna, type="hello", token=token)
    signed_in, queue, _presence = d.take(anna)
    assert signed_in == {
        "type": "welcome",
        "role": "staff",
        "token": token,
        "staff_id": member.staff_id,
        "name": "Anna",
        "heartbeat_s": 0,
        "server": "test",
    }
    [summary] = queue["conversations"]
    assert {k: v for k, v in summary.items() if k != "updated_ts"} == {
        "conversation_id": cid,
        "guest_id": welcome["guest_id"],
        "guest_name": "Maria Lopez",
        "status": "waiting",
        "assigned_to": None,
        "last_seq": 2,
        "read_seq": 0,
        "guest_online": True,
        "preview": "You asked to talk to a person. A member of our team will be with you shortly.",
        "guest_room": None,
    }
    d.send(anna, type="claim", conversation_id=cid)
    d.take(anna)
    # A second console of the same person is subscribed at once to what she holds.
    again = d.connect()
    d.send(again, type="hello", token=token)
    frames = d.take(again)
    assert types(frames) == ["welcome", "queue", "staff_presence", "subscribed"]
    assert frames[3] == {
        "type": "subscribed",
        "conversation_id": cid,
        "last_seq": 3,
        "status": "staff",
        "assigned_to": "Anna",
        "guest_read_seq": 0,
    }
    # ... and gets every summary change from then on, with the guest's presence.
    d.run(d.hub.closed(maria, d.now, WALL))
    [left] = [f for f in d.take(again) if f["type"] == "conversation"]
    assert (left["guest_online"], left["assigned_to"]) == (False, "Anna")


def test_history_pages_carry_the_conversations_last_seq_and_whether_more_remain() -> None:
    d = Driver()
    guest, welcome = d.guest()
    for n in range(1, 4):
        d.send(guest, type="message", client_msg_id=f"m{n}", text=f"note {n}")
    d.take(guest)
    d.send(guest, type="history", after_seq=1, limit=1)
    [page] = d.take(guest)
    assert page["type"] == "history" and page["conversation_id"] == welcome["conversation_id"]
    assert [m["text"] for m in page["messages"]] == ["note 2"]
    assert (page["last_seq"], page["has_more"]) == (3, True)


@pytest.mark.parametrize(
    ("setup", "frame", "code", "message"),
    [
        ("none", {"type": "claim", "conversation_id": "c_x"}, "forbidden",
         "claim is for staff only"),
        ("none", {"type": "hello", "token": None}, "bad_message", "hello was already received"),
        ("staff", {"type": "escalate"}, "forbidden", "escalate is for guests"),
        ("staff", {"type": "read", "seq": 1}, "bad_message",
         "staff must name the conversation_id in read"),
        ("staff-watch", {"type": "message", "client_msg_id": "s1", "text": "hi"}, "forbidden",
         "claim the conversation before writing"),
        ("staff-watch", {"type": "typing", "active": True}, "forbidden",
         "only the holder may type"),
    ],
)  # fmt: skip
def test_refusals_name_the_rule_in_words(
    setup: str, frame: dict[str, Any], code: str, message: str
) -> None:
    d = Driver()
    guest, welcome = d.guest()
    session = guest
    if setup.startswith("staff"):
        session = d.staff()
        if setup == "staff-watch":
            d.send(session, type="watch", conversation_id=welcome["conversation_id"])
            d.take(session)
            if frame["type"] in ("message", "typing"):
                frame = {**frame, "conversation_id": welcome["conversation_id"]}
    d.send(session, **frame)
    [error] = d.take(session)
    assert (error["code"], error["message"]) == (code, message)


def test_closed_registration_says_where_tokens_come_from() -> None:
    d = Driver(open_registration=False)
    session = d.connect()
    d.send(session, type="hello", token=None)
    [error] = d.take(session)
    assert error == {
        "type": "error",
        "code": "auth_failed",
        "message": "this server issues guest tokens at the desk; registration is closed",
        "ref": "hello",
    }


# ------------------------------------------------------------------------- history


def test_a_message_committed_after_a_history_read_is_news_not_more_history() -> None:
    # The race a resuming client meets: its history read finishes, then a live message
    # commits before the reply is built. The page is complete as of its read; the new
    # message is pushed live, and a client that looped on has_more would fetch it twice.
    d = Driver()
    guest, _ = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="one")
    d.take(guest)
    [read] = d.hub.frame(guest, json.dumps({"type": "history", "after_seq": 0}), 0.0, WALL)
    assert isinstance(read, Read)
    page = d.backend.history(*read.args)
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert [f["seq"] for f in d.take(guest) if f["type"] == "message"] == [2]
    d.run(d.hub.loaded(read, page, 0.0, WALL))
    [history] = d.take(guest)
    assert [m["seq"] for m in history["messages"]] == [1]
    assert (history["last_seq"], history["has_more"]) == (2, False)


def test_a_full_page_says_there_is_more() -> None:
    d = Driver()
    guest, _ = d.guest()
    for i in range(3):
        d.send(guest, type="message", client_msg_id=f"m{i}", text=f"message {i}")
    d.take(guest)
    d.send(guest, type="history", after_seq=0, limit=2)
    [history] = d.take(guest)
    assert [m["seq"] for m in history["messages"]] == [1, 2]
    assert (history["last_seq"], history["has_more"]) == (3, True)
    d.send(guest, type="history", after_seq=2, limit=2)
    [rest] = d.take(guest)
    assert ([m["seq"] for m in rest["messages"]], rest["has_more"]) == ([3], False)
