"""The hub's rules that mutation testing found unread: exact frames, refusals in words,
what the shell is told, and the live state kept right while storage is in flight.

Built on the synchronous :class:`~tests.core.test_hub.Driver`. Where a rule is about
timing (a read that runs beside the writer, a commit reported later), the test steps
the hub by hand: that is the freedom the hub's ordering guarantees leave a shell.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from trio_chat.core import protocol as proto
from trio_chat.core.errors import StorageError
from trio_chat.core.hub import Action, Read, Send, Write
from trio_chat.core.protocol import CloseCode
from trio_chat.core.storage import AppendMessage
from trio_chat.server import _store_memory

from .test_hub import WALL, Driver, types

# ------------------------------------------------------------------------ helpers


class StoreClock:
    """Stands in for the ``time`` module inside the memory store, so commit times (and
    with them ``updated_ts`` and the queue's order) are chosen by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def store_clock(monkeypatch: pytest.MonkeyPatch) -> StoreClock:
    clock = StoreClock(1_000.0)
    monkeypatch.setattr(_store_memory, "time", clock)
    return clock


def frame(d: Driver, session: int, **fields: Any) -> list[Action]:
    """The hub's actions for one frame, not carried out."""
    return d.hub.frame(session, json.dumps(fields), d.now, WALL)


def close(d: Driver, session: int) -> None:
    d.run(d.hub.closed(session, d.now, WALL))


def staff_member(d: Driver, name: str) -> tuple[str, str]:
    """A staff member in the store: (staff_id, token)."""
    member = d.backend.add_staff(name)
    return member.staff_id, d.hub.signer.issue("s", member.staff_id)


def commit_oldest(d: Driver) -> None:
    """Commit only the oldest held write (the rest stay in flight)."""
    write = d.held.popleft()
    [result] = d.backend.apply_batch([write.operation])
    d.run(d.hub.stored(write, result, d.now, WALL))


def fail_read(d: Driver, read: Read) -> None:
    d.run(d.hub.read_failed(read, StorageError("disk gone"), d.now, WALL))


def hello_answered_later(d: Driver, session: int, token: str) -> Callable[[], None]:
    """Send hello and read storage for it now; hand the hub the answer when called.
    Reads run beside the writer, so what commits in between is not in the answer."""
    [read] = frame(d, session, type="hello", token=token)
    assert isinstance(read, Read)
    result = getattr(d.backend, read.method)(*read.args)
    return lambda: d.run(d.hub.loaded(read, result, d.now, WALL))


def error(code: str, message: str, ref: str | None) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "ref": ref}


def status(cid: str, value: str, assigned_to: str | None) -> dict[str, Any]:
    return {"type": "status", "conversation_id": cid, "status": value, "assigned_to": assigned_to}


def typing(cid: str, sender: str, active: bool) -> dict[str, Any]:
    return {"type": "typing", "conversation_id": cid, "sender": sender, "active": active}


def without_ts(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != "ts"}


def summaries(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "conversation"]


INTERNAL = "the server could not store that; please retry"


# ------------------------------------------------------------------- before hello


@pytest.mark.parametrize(
    ("sent", "ref"),
    [
        ({"type": "ping", "id": 1}, "ping"),
        ({"type": "history", "after_seq": 0}, "history"),
        ({"type": "escalate"}, "escalate"),
        ({"type": "typing", "active": True}, "typing"),
        ({"type": "read", "seq": 1}, "read"),
        ({"type": "message", "client_msg_id": "m1", "text": "hi"}, "m1"),
        ({"type": "claim", "conversation_id": "c_x"}, "claim"),
        # Frames that do not even parse are still "not yet", named by their type.
        ({"type": "nonsense"}, "nonsense"),
        ({"type": "typing"}, "typing"),
    ],
)
def test_anything_before_hello_is_refused_as_auth_required_naming_the_frame(
    sent: dict[str, Any], ref: str
) -> None:
    d = Driver()
    session = d.connect()
    d.send(session, **sent)
    assert d.take(session) == [error("auth_required", "send hello first", ref)]
    assert session not in d.closes


def test_text_that_is_not_json_before_hello_is_bad_json_not_auth_required() -> None:
    d = Driver()
    session = d.connect()
    d.run(d.hub.frame(session, "{not json", d.now, WALL))
    [refused] = d.take(session)
    assert (refused["code"], refused["ref"]) == ("bad_json", None)


def test_a_forged_token_is_refused_in_words_and_closed_with_a_reason() -> None:
    d = Driver()
    session = d.connect()
    d.send(session, type="hello", token="g.nobody.forged")
    assert d.take(session) == [error("auth_failed", "unknown or invalid token", "hello")]
    assert d.closes[session] == (CloseCode.AUTH_FAILED, "authentication failed")


def test_a_genuine_token_of_a_guest_the_store_does_not_know_is_refused() -> None:
    d = Driver()
    session = d.connect()
    d.send(session, type="hello", token=d.hub.signer.issue("g", "g_nobody"))
    assert d.take(session) == [error("auth_failed", "unknown guest", "hello")]
    assert d.closes[session] == (CloseCode.AUTH_FAILED, "authentication failed")


def test_the_shell_is_told_which_read_a_hello_with_a_token_waits_for() -> None:
    d = Driver()
    _, welcome = d.guest()
    guest = d.connect()
    [lookup] = frame(d, guest, type="hello", token=welcome["token"])
    assert isinstance(lookup, Read)
    assert (lookup.method, lookup.args, lookup.session, lookup.ref) == (
        "conversation_of_guest",
        (welcome["guest_id"],),
        guest,
        "hello",
    )
    staff_id, token = staff_member(d, "Anna")
    staff = d.connect()
    [sign_in] = frame(d, staff, type="hello", token=token)
    assert isinstance(sign_in, Read)
    assert (sign_in.method, sign_in.args, sign_in.session, sign_in.ref) == (
        "staff_sign_in",
        (staff_id,),
        staff,
        "hello",
    )


def test_a_hello_whose_lookup_fails_is_an_internal_error_and_may_be_sent_again() -> None:
    d = Driver()
    _, welcome = d.guest()
    session = d.connect()
    [lookup] = frame(d, session, type="hello", token=welcome["token"])
    assert isinstance(lookup, Read)
    fail_read(d, lookup)
    assert d.take(session) == [error("internal", INTERNAL, "hello")]
    assert not d.hub.signed_in(session)
    d.send(session, type="hello", token=welcome["token"])
    assert types(d.take(session)) == ["welcome"]


def test_the_hub_tells_the_shell_who_is_signed_in_and_as_what() -> None:
    d = Driver()
    guest = d.connect()
    assert (d.hub.signed_in(guest), d.hub.role(guest)) == (False, None)
    d.send(guest, type="ping", id=1)  # refused: still not signed in
    assert (d.hub.signed_in(guest), d.hub.role(guest)) == (False, None)
    d.send(guest, type="hello", token=None)
    assert (d.hub.signed_in(guest), d.hub.role(guest)) == (True, "guest")
    staff = d.staff()
    assert (d.hub.signed_in(staff), d.hub.role(staff)) == (True, "staff")
    close(d, guest)
    assert (d.hub.signed_in(guest), d.hub.role(guest)) == (False, None)
    assert (d.hub.signed_in(999), d.hub.role(999)) == (False, None)


# ----------------------------------------------------------------------- welcome


def test_a_returning_guest_in_ai_gets_only_a_welcome_with_their_own_token() -> None:
    d = Driver()
    first, welcome = d.guest()
    d.send(first, type="message", client_msg_id="m1", text="hello")
    d.send(first, type="read", seq=1)
    close(d, first)
    back = d.connect()
    d.send(back, type="hello", token=welcome["token"])
    assert d.take(back) == [
        {
            "type": "welcome",
            "role": "guest",
            "token": welcome["token"],
            "guest_id": welcome["guest_id"],
            "conversation_id": welcome["conversation_id"],
            "status": "ai",
            "last_seq": 1,
            "read_seq": 0,  # the staff side's read mark: nobody on staff has read it
            "heartbeat_s": 0,
            "server": "test",
        }
    ]


def test_a_conversation_reloaded_from_storage_still_knows_who_holds_it() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    _, token = staff_member(d, "Anna")
    anna = d.connect()
    d.send(anna, type="hello", token=token)
    d.send(anna, type="claim", conversation_id=cid)
    close(d, guest)
    close(d, anna)
    assert d.hub.conversations == {}  # nobody left: the next hello reads storage
    back = d.connect()
    d.send(back, type="hello", token=welcome["token"])
    frames = d.take(back)
    assert types(frames) == ["welcome", "status"]
    assert frames[0]["status"] == "staff"
    assert frames[1] == status(cid, "staff", "Anna")
    # Anna's console is subscribed again and may write: she still holds it.
    again = d.connect()
    d.send(again, type="hello", token=token)
    assert types(d.take(again)) == ["welcome", "queue", "staff_presence", "subscribed"]
    d.send(again, type="message", conversation_id=cid, client_msg_id="s1", text="Back.")
    assert types(d.take(again)) == ["ack", "message", "conversation"]


def test_the_guest_stays_online_for_staff_until_their_last_tab_leaves() -> None:
    d = Driver()
    staff = d.staff()
    first, welcome = d.guest()
    [online] = summaries(d.take(staff))
    assert (online["conversation_id"], online["guest_online"]) == (
        welcome["conversation_id"],
        True,
    )
    second, _ = d.guest(welcome["token"])
    assert summaries(d.take(staff)) == []
    close(d, first)
    assert summaries(d.take(staff)) == []
    close(d, second)
    [offline] = summaries(d.take(staff))
    assert offline["guest_online"] is False


# ---------------------------------------------------------------- limits and closes


def test_twenty_bad_frames_close_with_1008_and_say_why() -> None:
    d = Driver()
    guest, _ = d.guest()
    for _ in range(20):
        d.send(guest, type="nonsense")
    assert d.closes[guest] == (CloseCode.POLICY, "20 bad frames in a row")


def test_a_guest_back_with_a_token_gets_a_full_burst_then_a_refusal_in_words() -> None:
    d = Driver(rate_limit=1.0)
    d.now = 500.0
    _, welcome = d.guest()
    back = d.connect()
    d.send(back, type="hello", token=welcome["token"])
    d.take(back)
    for n in (1, 2, 3):
        d.send(back, type="message", client_msg_id=f"m{n}", text="hi")
    refused = [f for f in d.take(back) if f["type"] == "error"]
    assert refused == [
        {**error("rate_limited", "slow down: too many messages", "m3"), "retry_after_ms": 1000}
    ]


def test_a_flood_is_closed_ten_seconds_after_the_first_refusal_and_not_before() -> None:
    d = Driver(rate_limit=1.0)
    d.now = 1_000.0  # a monotonic clock rarely starts at zero
    guest, _ = d.guest()
    for n in (1, 2, 3):
        d.send(guest, type="message", client_msg_id=f"m{n}", text="hi")
    assert [f["code"] for f in d.take(guest) if f["type"] == "error"] == ["rate_limited"]
    for step in range(1, 21):  # two messages every half second: each step is refused
        d.now = 1_000.0 + step * 0.5
        assert guest not in d.closes, d.now
        for n in (1, 2):
            d.send(guest, type="message", client_msg_id=f"s{step}x{n}", text="hi")
    assert d.now == 1_010.0
    assert d.closes[guest] == (CloseCode.RATE_LIMITED, "still flooding after being told")


def test_a_refused_message_is_looked_up_for_its_session_and_a_failed_lookup_is_named() -> None:
    d = Driver(rate_limit=1.0)
    guest, welcome = d.guest()
    for n in (1, 2):
        d.send(guest, type="message", client_msg_id=f"m{n}", text="hi")
    d.take(guest)
    [lookup] = frame(d, guest, type="message", client_msg_id="m3", text="hi")
    assert isinstance(lookup, Read)
    assert (lookup.method, lookup.args, lookup.session, lookup.ref) == (
        "message_by_client_id",
        (welcome["conversation_id"], "g:" + welcome["guest_id"], "m3"),
        guest,
        "m3",
    )
    fail_read(d, lookup)
    assert d.take(guest) == [error("internal", INTERNAL, "m3")]


# --------------------------------------------------------------- frames for anyone


@pytest.mark.parametrize("role", ["guest", "staff"])
def test_ping_is_answered_with_the_same_id_and_the_servers_wall_clock(role: str) -> None:
    d = Driver()
    session = d.guest()[0] if role == "guest" else d.staff()
    d.take(session)
    d.send(session, type="ping", id="p-7")
    assert d.take(session) == [{"type": "pong", "id": "p-7", "ts": proto.format_ts(WALL)}]


@pytest.mark.parametrize("role", ["guest", "staff"])
def test_a_second_hello_is_a_bad_message_about_hello(role: str) -> None:
    d = Driver()
    session = d.guest()[0] if role == "guest" else d.staff()
    d.take(session)
    d.send(session, type="hello", token=None)
    assert d.take(session) == [error("bad_message", "hello was already received", "hello")]


# -------------------------------------------------------------------------- guests


def test_escalating_again_sends_back_the_current_status_and_stores_nothing() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="escalate")
    d.take(guest)
    d.send(guest, type="escalate")
    assert d.take(guest) == [status(cid, "waiting", None)]
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    d.take(guest)
    d.send(guest, type="escalate")
    assert d.take(guest) == [status(cid, "staff", "Anna")]
    assert [m.sender for m in d.backend.history(cid, 0, 10)] == ["system", "system"]


def test_guest_typing_reaches_everyone_else_in_the_conversation_only() -> None:
    d = Driver()
    first, welcome = d.guest()
    cid = welcome["conversation_id"]
    second, _ = d.guest(welcome["token"])
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=cid)
    actions = frame(d, first, type="typing", active=True)
    relayed = proto.typing_frame(cid, "guest", True)
    assert {(a.session, a.frame) for a in actions if isinstance(a, Send)} == {
        (second, relayed),
        (staff, relayed),
    }
    assert len(actions) == 2


def test_a_guest_message_is_pushed_with_the_guest_as_its_author() -> None:
    d = Driver()
    guest, welcome = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    pushed = [without_ts(f) for f in d.take(guest) if f["type"] == "message"]
    assert pushed == [
        {
            "type": "message",
            "seq": 1,
            "conversation_id": welcome["conversation_id"],
            "sender": "guest",
            "author": welcome["guest_id"],
            "text": "hello",
            "client_msg_id": "m1",
        }
    ]


# --------------------------------------------------------------------------- staff


def test_the_holder_writes_and_the_guest_reads_it_under_the_staff_members_name() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    staff_id, token = staff_member(d, "Anna")
    anna = d.connect()
    d.send(anna, type="hello", token=token)
    d.send(anna, type="claim", conversation_id=cid)
    d.take(anna)
    d.take(guest)
    [write] = frame(d, anna, type="message", conversation_id=cid, client_msg_id="s1", text="Hi!")
    assert isinstance(write, Write) and isinstance(write.operation, AppendMessage)
    op = write.operation
    assert (op.conversation_id, op.sender, op.author, op.author_key, op.text) == (
        cid,
        "staff",
        "Anna",
        "s:" + staff_id,  # stored: a retry after a restart must find the same key
        "Hi!",
    )
    assert (op.client_msg_id, write.session, write.wait, write.ref) == ("s1", anna, False, "s1")
    d.run([write])
    [ack] = [f for f in d.take(anna) if f["type"] == "ack"]
    assert (ack["client_msg_id"], ack["seq"]) == ("s1", 2)
    assert [without_ts(f) for f in d.take(guest)] == [
        {
            "type": "message",
            "seq": 2,
            "conversation_id": cid,
            "sender": "staff",
            "author": "Anna",
            "text": "Hi!",
            "client_msg_id": "s1",
        }
    ]
    d.send(anna, type="message", conversation_id=cid, client_msg_id="s1", text="Hi!")
    assert [(f["type"], f["seq"]) for f in d.take(anna)] == [("ack", 2)]
    assert d.take(guest) == []


def test_a_watcher_of_someone_elses_conversation_may_not_write_or_type() -> None:
    d = Driver()
    _, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna, ben = d.staff("Anna"), d.staff("Ben")
    d.send(anna, type="claim", conversation_id=cid)
    d.send(ben, type="watch", conversation_id=cid)
    d.take(ben)
    d.send(ben, type="message", conversation_id=cid, client_msg_id="b1", text="Me too")
    d.send(ben, type="typing", conversation_id=cid, active=True)
    assert d.take(ben) == [
        error("forbidden", "claim the conversation before writing", "b1"),
        error("forbidden", "only the holder may type", "typing"),
    ]


def test_the_holders_typing_reaches_the_guest_without_a_storage_read() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    actions = frame(d, anna, type="typing", conversation_id=cid, active=True)
    assert actions == [Send(guest, proto.typing_frame(cid, "staff", True))]


def test_read_receipts_cross_sides_and_only_the_staff_mark_moves_the_queue() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    d.take(guest)
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=cid)  # a watcher, not the holder
    d.take(staff)
    d.send(guest, type="read", seq=1)
    assert d.take(staff) == [{"type": "read", "conversation_id": cid, "reader": "guest", "seq": 1}]
    assert d.take(guest) == []
    d.send(staff, type="read", conversation_id=cid, seq=1)
    assert d.take(guest) == [{"type": "read", "conversation_id": cid, "reader": "staff", "seq": 1}]
    [moved] = d.take(staff)
    assert (moved["type"], moved["read_seq"]) == ("conversation", 1)
    d.send(staff, type="read", conversation_id=cid, seq=1)  # nothing new for the queue
    assert d.take(staff) == []


def test_any_staff_member_reads_any_conversations_history() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    for n in (1, 2):
        d.send(guest, type="message", client_msg_id=f"m{n}", text=f"note {n}")
    staff = d.staff()
    d.send(staff, type="history", conversation_id=cid, after_seq=0)
    [page] = d.take(staff)
    assert {k: v for k, v in page.items() if k != "messages"} == {
        "type": "history",
        "conversation_id": cid,
        "last_seq": 2,
        "has_more": False,
    }
    assert [m["text"] for m in page["messages"]] == ["note 1", "note 2"]


def test_claiming_a_conversation_whose_guest_is_away_loads_it_from_storage() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    close(d, guest)
    anna = d.staff("Anna")
    [lookup] = frame(d, anna, type="claim", conversation_id=cid)
    assert isinstance(lookup, Read)
    assert (lookup.method, lookup.args, lookup.session, lookup.ref) == (
        "conversation",
        (cid,),
        anna,
        "claim",
    )
    fail_read(d, lookup)
    assert d.take(anna) == [error("internal", INTERNAL, "claim")]
    d.send(anna, type="claim", conversation_id=cid)
    frames = d.take(anna)
    assert types(frames) == ["subscribed", "conversation"]
    assert frames[0] == {
        "type": "subscribed",
        "conversation_id": cid,
        "last_seq": 1,
        "status": "staff",
        "assigned_to": "Anna",
        "guest_read_seq": 0,
    }


def test_claiming_ones_own_conversation_again_subscribes_again_and_stores_nothing() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    d.take(anna)
    d.take(guest)
    d.send(anna, type="claim", conversation_id=cid)
    assert d.take(anna) == [
        {
            "type": "subscribed",
            "conversation_id": cid,
            "last_seq": 1,
            "status": "staff",
            "assigned_to": "Anna",
            "guest_read_seq": 0,
        }
    ]
    assert d.take(guest) == []
    assert len(d.backend.history(cid, 0, 10)) == 1


def test_a_claim_reaches_the_guest_as_words_then_a_status_naming_the_holder() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    frames = d.take(guest)
    assert [without_ts(f) for f in frames] == [
        {
            "type": "message",
            "seq": 1,
            "conversation_id": cid,
            "sender": "system",
            "author": None,
            "text": "Anna from our team has joined the conversation.",
            "client_msg_id": None,
        },
        status(cid, "staff", "Anna"),
    ]


def test_the_status_table_refusals_name_the_holder_and_the_action() -> None:
    d = Driver()
    _, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna, ben = d.staff("Anna"), d.staff("Ben")
    d.send(anna, type="claim", conversation_id=cid)
    d.take(ben)
    for action in ("claim", "release", "resolve"):
        d.send(ben, type=action, conversation_id=cid)
    assert d.take(ben) == [
        error("conflict", "Anna already holds this conversation", "claim"),
        error("forbidden", "only the staff member holding it may release it", "release"),
        error("forbidden", "only the staff member holding it may resolve it", "resolve"),
    ]


@pytest.mark.parametrize(
    ("sent", "ref"),
    [
        ({"type": "read", "seq": 1}, "read"),
        ({"type": "history", "after_seq": 0}, "history"),
        ({"type": "typing", "active": True}, "typing"),
        ({"type": "message", "client_msg_id": "s1", "text": "hi"}, "s1"),
    ],
)
def test_staff_frames_without_a_conversation_are_refused_naming_the_frame(
    sent: dict[str, Any], ref: str
) -> None:
    d = Driver()
    staff = d.staff()
    d.send(staff, **sent)
    assert d.take(staff) == [
        error("bad_message", f"staff must name the conversation_id in {ref}", ref)
    ]


def test_staff_refusals_for_escalate_unknown_conversations_and_unwatched_reads() -> None:
    d = Driver()
    _, welcome = d.guest()
    staff = d.staff()
    d.send(staff, type="escalate")
    d.send(staff, type="watch", conversation_id="c_nope")
    d.send(staff, type="read", conversation_id=welcome["conversation_id"], seq=1)
    assert d.take(staff) == [
        error("forbidden", "escalate is for guests", "escalate"),
        error("not_found", "no conversation c_nope", "c_nope"),
        error("forbidden", "claim or watch the conversation first", "read"),
    ]


def test_writes_that_fail_are_internal_errors_named_after_what_was_asked() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.backend.fail_writes = True
    d.send(anna, type="claim", conversation_id=cid)
    assert d.take(anna) == [error("internal", INTERNAL, "claim")]
    d.backend.fail_writes = False
    d.send(anna, type="claim", conversation_id=cid)
    d.take(anna)
    d.backend.fail_writes = True
    for action in ("release", "resolve"):
        d.send(anna, type=action, conversation_id=cid)
    assert d.take(anna) == [
        error("internal", INTERNAL, "release"),
        error("internal", INTERNAL, "resolve"),
    ]
    d.take(guest)
    d.send(guest, type="read", seq=1)
    assert d.take(guest) == [error("internal", INTERNAL, "read")]


def test_a_claim_after_a_resolve_in_flight_is_decided_by_that_resolve() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    _, token = staff_member(d, "Anna")
    desk, phone = d.connect(), d.connect()  # Anna on two consoles
    for console in (desk, phone):
        d.send(console, type="hello", token=token)
    ben = d.staff("Ben")
    d.hold = True
    d.send(desk, type="claim", conversation_id=cid)
    d.send(phone, type="resolve", conversation_id=cid)
    commit_oldest(d)  # the claim; the resolve is still in flight
    d.send(ben, type="claim", conversation_id=cid)
    assert [f for f in d.take(ben) if f["type"] == "error"] == []
    d.commit()
    assert [f["status"] for f in d.take(guest) if f["type"] == "status"] == [
        "staff",
        "resolved",
        "staff",
    ]


# ------------------------------------------------------------------ staff sign-in


def test_the_queue_is_newest_first_with_stored_times_and_previews(store_clock: StoreClock) -> None:
    d = Driver()
    written = []
    for at, text in ((1_000.0, "first"), (3_000.0, "third"), (2_000.0, "second")):
        store_clock.now = at
        guest, welcome = d.guest()
        d.send(guest, type="message", client_msg_id="m1", text=text)
        close(d, guest)  # the queue shows it from storage
        written.append((welcome["conversation_id"], proto.format_ts(at), text))
    store_clock.now = 4_000.0
    _, token = staff_member(d, "Anna")
    anna = d.connect()
    d.send(anna, type="hello", token=token)
    _, queue, _presence = d.take(anna)
    newest_first = sorted(written, key=lambda entry: entry[1], reverse=True)
    assert [
        (c["conversation_id"], c["updated_ts"], c["preview"]) for c in queue["conversations"]
    ] == newest_first


def test_a_live_summary_carries_the_time_the_message_was_committed(
    store_clock: StoreClock,
) -> None:
    d = Driver()
    anna = d.staff("Anna")
    guest, _ = d.guest()
    d.take(anna)
    store_clock.now = 5_000.0
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    [changed] = summaries(d.take(anna))
    assert (changed["updated_ts"], changed["preview"]) == (proto.format_ts(5_000.0), "hello")


def test_a_guest_online_now_is_queued_even_before_writing() -> None:
    d = Driver()
    _, welcome = d.guest()
    _, token = staff_member(d, "Anna")
    anna = d.connect()
    d.send(anna, type="hello", token=token)
    _, queue, _presence = d.take(anna)
    assert [(c["conversation_id"], c["guest_online"]) for c in queue["conversations"]] == [
        (welcome["conversation_id"], True)
    ]


def test_a_watched_conversation_nobody_wrote_in_is_not_queued_once_its_guest_left() -> None:
    d = Driver()
    guest, welcome = d.guest()
    anna = d.staff("Anna")
    d.send(anna, type="watch", conversation_id=welcome["conversation_id"])
    close(d, guest)
    _, token = staff_member(d, "Ben")
    ben = d.connect()
    d.send(ben, type="hello", token=token)
    _, queue, _presence = d.take(ben)
    assert queue["conversations"] == []


@pytest.mark.parametrize("change", ["escalate", "claim"])
def test_a_sign_in_read_that_missed_a_commit_still_queues_the_live_state(change: str) -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    ben = d.staff("Ben")
    d.hold = True
    if change == "escalate":
        d.send(ben, type="watch", conversation_id=cid)  # keeps it in memory
        d.send(guest, type="escalate")
        close(d, guest)
        expected: tuple[str, str | None] = ("waiting", None)
    else:
        close(d, guest)
        d.send(ben, type="claim", conversation_id=cid)
        expected = ("staff", "Ben")
    _, token = staff_member(d, "Anna")
    anna = d.connect()
    answer = hello_answered_later(d, anna, token)  # storage: a silent conversation in ai
    d.commit()  # nobody tells Anna: she is not in the staff room yet
    answer()
    _, queue, _presence = d.take(anna)
    queued = [(c["conversation_id"], c["status"], c["assigned_to"]) for c in queue["conversations"]]
    assert queued == [(cid, *expected)]


def test_a_sign_in_read_that_missed_an_escalation_nobody_watches_still_queues_it() -> None:
    d = Driver()
    guest, welcome = d.guest()
    d.hold = True
    d.send(guest, type="escalate")
    close(d, guest)
    _, token = staff_member(d, "Anna")
    anna = d.connect()
    answer = hello_answered_later(d, anna, token)  # storage: a silent conversation in ai
    d.commit()  # waiting now, and out of memory: nobody is in it
    answer()
    _, queue, _presence = d.take(anna)
    assert [(c["conversation_id"], c["status"]) for c in queue["conversations"]] == [
        (welcome["conversation_id"], "waiting")
    ]


def test_a_sign_in_read_that_missed_a_takeover_does_not_resubscribe_the_console() -> None:
    d = Driver()
    _, welcome = d.guest()
    cid = welcome["conversation_id"]
    _, token = staff_member(d, "Anna")
    desk = d.connect()
    d.send(desk, type="hello", token=token)
    d.send(desk, type="claim", conversation_id=cid)
    ben = d.staff("Ben")
    phone = d.connect()
    answer = hello_answered_later(d, phone, token)  # storage: Anna holds it
    d.send(desk, type="release", conversation_id=cid)
    d.send(ben, type="claim", conversation_id=cid)
    answer()
    frames = d.take(phone)
    assert types(frames) == ["welcome", "queue", "staff_presence"]
    [entry] = frames[1]["conversations"]
    assert (entry["status"], entry["assigned_to"]) == ("staff", "Ben")


# ------------------------------------------------------------------------ history


def test_the_history_of_an_empty_conversation_is_empty_at_seq_zero() -> None:
    d = Driver()
    guest, welcome = d.guest()
    d.send(guest, type="history", after_seq=0)
    assert d.take(guest) == [
        {
            "type": "history",
            "conversation_id": welcome["conversation_id"],
            "messages": [],
            "last_seq": 0,
            "has_more": False,
        }
    ]


def test_a_history_page_that_sees_a_commit_before_its_push_counts_it_in_last_seq() -> None:
    d = Driver()
    guest, _ = d.guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    write = d.held.popleft()
    [stored] = d.backend.apply_batch([write.operation])  # committed, not yet reported
    d.send(guest, type="history", after_seq=0)
    [page] = d.take(guest)
    assert ([m["seq"] for m in page["messages"]], page["last_seq"]) == ([1], 1)
    d.run(d.hub.stored(write, stored, d.now, WALL))
    assert types(d.take(guest)) == ["ack", "message"]


def test_a_history_page_carries_last_seq_as_of_its_reply_not_its_request() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    for n in (1, 2, 3):
        d.send(guest, type="message", client_msg_id=f"m{n}", text=f"note {n}")
    close(d, guest)
    staff = d.staff()
    [lookup] = frame(d, staff, type="history", conversation_id=cid, after_seq=0, limit=2)
    assert isinstance(lookup, Read)
    [page_read] = d.hub.loaded(lookup, d.backend.conversation(cid), d.now, WALL)
    assert isinstance(page_read, Read)
    page = d.backend.history(*page_read.args)  # read now, answered after a new message
    back, _ = d.guest(welcome["token"])
    d.send(back, type="message", client_msg_id="m4", text="note 4")
    d.run(d.hub.loaded(page_read, page, d.now, WALL))
    [reply] = [f for f in d.take(staff) if f["type"] == "history"]
    assert ([m["seq"] for m in reply["messages"]], reply["last_seq"], reply["has_more"]) == (
        [1, 2],
        4,
        True,
    )


# ----------------------------------------------------------------------- concierge


def test_the_concierge_is_asked_with_the_guests_identity_and_typing_frames_it() -> None:
    d = Driver(concierge=True)
    maria = d.connect()
    d.send(maria, type="hello", token=None, name="Maria")
    welcome = d.take(maria)[0]
    cid = welcome["conversation_id"]
    d.send(maria, type="message", client_msg_id="m1", text="breakfast?")
    assert d.take(maria)[2] == typing(cid, "ai", True)
    [start] = d.replies
    assert (start.conversation_id, start.guest_id, start.guest_name) == (
        cid,
        welcome["guest_id"],
        "Maria",
    )
    assert (start.message.seq, start.message.text) == (1, "breakfast?")
    d.reply(start, "At seven.")
    answer, typing_off = d.take(maria)
    assert (answer["sender"], answer["author"], answer["text"]) == ("ai", "concierge", "At seven.")
    assert typing_off == typing(cid, "ai", False)


def test_the_concierge_handing_over_moves_the_conversation_to_waiting() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="I want a person")
    d.take(guest)
    d.run(d.hub.replied(cid, "Of course.", True, d.now, WALL))
    frames = d.take(guest)
    assert types(frames) == ["message", "typing", "message", "status"]
    assert (frames[2]["sender"], frames[2]["text"]) == (
        "system",
        "Our concierge has asked a member of our team to help. Someone will be with you shortly.",
    )
    assert frames[3] == status(cid, "waiting", None)


def test_an_answer_that_cannot_be_stored_ends_typing_and_frees_the_concierge() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    d.take(guest)
    d.backend.fail_writes = True
    d.reply(d.replies[0])
    assert d.take(guest) == [typing(welcome["conversation_id"], "ai", False)]
    d.backend.fail_writes = False
    d.send(guest, type="message", client_msg_id="m2", text="lunch?")
    assert [s.message.text for s in d.replies] == ["breakfast?", "lunch?"]


def test_a_guest_who_leaves_while_the_concierge_thinks_still_gets_the_answer() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    close(d, guest)
    d.reply(d.replies[0], "At seven.")
    assert [m.text for m in d.backend.history(cid, 0, 10)] == ["breakfast?", "At seven."]
    assert d.hub.conversations == {}


def test_a_reopening_message_is_the_one_the_concierge_answers() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    d.send(anna, type="resolve", conversation_id=cid)
    d.send(guest, type="message", client_msg_id="m1", text="one more thing")
    [start] = d.replies
    assert (start.message.text, start.message.sender) == ("one more thing", "guest")


def test_a_question_left_unanswered_by_a_stopped_server_is_answered_after_the_restart() -> None:
    before = Driver()
    guest, welcome = before.guest()
    cid = welcome["conversation_id"]
    before.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    after = Driver(concierge=True)
    after.backend = before.backend  # the same database, a new server
    [(row, question)] = after.backend.unanswered(0.0)
    after.run(after.hub.owed(row, question, after.now, WALL))
    [start] = after.replies
    assert (start.conversation_id, start.message) == (cid, question)
    after.reply(start, "At seven.")
    assert [m.text for m in after.backend.history(cid, 0, 10)] == ["breakfast?", "At seven."]
    assert after.hub.conversations == {}


# ------------------------------------------------- live state while storage is in flight


def test_a_guest_who_leaves_while_their_message_is_stored_gets_it_pushed_on_return() -> None:
    d = Driver()
    guest, welcome = d.guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    close(d, guest)
    back = d.connect()
    d.send(back, type="hello", token=welcome["token"])
    [again] = d.take(back)
    assert again["last_seq"] == 0  # so everything above 0 must be pushed
    d.commit()
    assert [f["seq"] for f in d.take(back) if f["type"] == "message"] == [1]


def test_a_lookup_answered_after_its_console_left_acts_on_nothing() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    close(d, guest)
    anna = d.staff("Anna")
    [lookup] = frame(d, anna, type="claim", conversation_id=cid)
    assert isinstance(lookup, Read)
    row = d.backend.conversation(cid)
    close(d, anna)
    d.run(d.hub.loaded(lookup, row, d.now, WALL))
    assert d.backend.history(cid, 0, 10) == []  # nobody claimed it for a console gone
    assert d.hub.conversations == {}


def test_a_write_that_fails_after_its_session_left_is_reported_to_nobody() -> None:
    d = Driver()
    guest, _ = d.guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    close(d, guest)
    [write] = d.held
    actions = d.hub.failed(write, StorageError("disk gone"), d.now, WALL)
    assert actions == []


def test_a_closed_staff_console_is_addressed_no_more() -> None:
    d = Driver()
    guest, welcome = d.guest()
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=welcome["conversation_id"])
    close(d, staff)
    d.take(staff)
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    d.send(guest, type="escalate")
    assert d.take(staff) == []


def _two_messages_in_flight(d: Driver) -> None:
    guest, _ = d.guest()
    d.hold = True
    for n in (1, 2):
        d.send(guest, type="message", client_msg_id=f"m{n}", text="hi")
    d.commit()
    d.hold = False


def _a_history_page(d: Driver) -> None:
    guest, _ = d.guest()
    d.send(guest, type="history", after_seq=0)


def _a_history_page_that_fails(d: Driver) -> None:
    guest, _ = d.guest()
    [read] = frame(d, guest, type="history", after_seq=0)
    assert isinstance(read, Read)
    fail_read(d, read)
    assert d.take(guest) == [error("internal", INTERNAL, "history")]


def _a_write_that_fails(d: Driver) -> None:
    guest, _ = d.guest()
    d.backend.fail_writes = True
    d.send(guest, type="message", client_msg_id="m1", text="hi")


def _staff_watching_typing_and_leaving(d: Driver) -> None:
    _, welcome = d.guest()
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=welcome["conversation_id"])
    d.send(anna, type="typing", conversation_id=welcome["conversation_id"], active=True)
    ben = d.staff("Ben")
    d.send(ben, type="watch", conversation_id=welcome["conversation_id"])
    d.send(ben, type="unwatch", conversation_id=welcome["conversation_id"])


def _staff_claiming_while_the_guest_is_away(d: Driver) -> None:
    guest, welcome = d.guest()
    close(d, guest)
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=welcome["conversation_id"])


@pytest.mark.parametrize(
    "activity",
    [
        _two_messages_in_flight,
        _a_history_page,
        _a_history_page_that_fails,
        _a_write_that_fails,
        _staff_watching_typing_and_leaving,
        _staff_claiming_while_the_guest_is_away,
    ],
)
def test_conversations_leave_memory_once_nobody_is_in_them_or_waiting_on_them(
    activity: Callable[[Driver], None],
) -> None:
    # A long-running server holds only the conversations someone is in: the rest are
    # storage's. The same bookkeeping keeps a conversation loaded while a write, a read
    # or an answer is in flight (see the "leaves while" tests above).
    d = Driver()
    activity(d)
    for session in list(d.hub.sessions):
        close(d, session)
    assert d.hub.conversations == {}
