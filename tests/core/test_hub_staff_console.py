"""The hub's side of the staff console: who the guest is (name and room), who is on duty
(``staff_presence``), and where the guest's read mark stands when a console subscribes.
Frame in, frames out, on the memory backend (the ``Driver`` of ``test_hub``)."""

from __future__ import annotations

import json
from typing import Any

from trio_chat.core.client_protocol import (
    ConversationChanged,
    ConversationSummary,
    StaffPresence,
    hello_frame,
    parse_server_frame,
)

from .test_hub import Driver, types


def staff_hello(d: Driver, name: str) -> tuple[int, str]:
    """A staff member signs in (added first unless they exist); their session and token."""
    member = next((m for m in d.backend._staff.values() if m.name == name), None)
    if member is None:
        member = d.backend.add_staff(name)
    token = d.hub.signer.issue("s", member.staff_id)
    session = d.connect()
    d.send(session, type="hello", token=token)
    return session, token


def presence(frames: list[dict[str, Any]]) -> list[list[str]]:
    return [f["staff"] for f in frames if f["type"] == "staff_presence"]


# ---------------------------------------------------------------------- name and room


def test_a_guest_s_name_and_room_reach_the_queue_and_every_summary() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    maria = d.connect()
    d.send(maria, type="hello", token=None, name=" Maria Lopez ", room=" 412 ")
    welcome = d.take(maria)[0]
    # The summary of her coming online already carries both.
    [online] = [f for f in d.take(anna) if f["type"] == "conversation"]
    assert (online["guest_name"], online["guest_room"]) == ("Maria Lopez", "412")
    d.send(maria, type="escalate")
    [waiting] = [f for f in d.take(anna) if f["type"] == "conversation"]
    assert waiting["status"] == "waiting" and waiting["guest_room"] == "412"
    # Stored with the guest: a console signing in later reads it from storage.
    d.run(d.hub.closed(maria, d.now, 0.0))
    ben, _ = staff_hello(d, "Ben")
    [queue] = [f for f in d.take(ben) if f["type"] == "queue"]
    [entry] = queue["conversations"]
    assert entry["conversation_id"] == welcome["conversation_id"]
    assert (entry["guest_name"], entry["guest_room"]) == ("Maria Lopez", "412")
    # What a Python console shows for her.
    changed = parse_server_frame(json.dumps({"type": "conversation", **entry}))
    assert isinstance(changed, ConversationChanged)
    assert changed.summary.guest_label == "Maria Lopez · 412"


def test_a_room_is_optional_trimmed_and_cut_to_twenty_characters() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    for room, stored in [
        (None, None),
        ("   ", None),
        (None, None),
        (" Garden Suite 3 ", "Garden Suite 3"),
        ("Garden Suite " + "9" * 30, "Garden Suite 9999999"),
    ]:
        guest = d.connect()
        frame: dict[str, Any] = {"type": "hello", "token": None}
        if room is not None:
            frame["room"] = room
        d.send(guest, **frame)
        assert d.take(guest)[0]["type"] == "welcome"
        [entry] = [f for f in d.take(anna) if f["type"] == "conversation"]
        assert entry["guest_room"] == stored


def test_a_python_client_sends_the_room_only_when_given_and_labels_old_servers_entries() -> None:
    assert json.loads(hello_frame(None, "Maria", "412")) == {
        "type": "hello",
        "token": None,
        "name": "Maria",
        "room": "412",
    }
    assert "room" not in json.loads(hello_frame(None, "Maria"))
    # An entry from a server without the extension: no room, and the label is the name.
    old = {
        "conversation_id": "c_1",
        "guest_id": "g_1",
        "guest_name": "Maria",
        "status": "waiting",
        "assigned_to": None,
        "updated_ts": "2026-01-01T00:00:00.000Z",
    }
    changed = parse_server_frame(json.dumps({"type": "conversation", **old}))
    assert isinstance(changed, ConversationChanged)
    assert changed.summary.guest_room is None and changed.summary.guest_label == "Maria"
    nameless = ConversationSummary("c_2", "g_2", None, "ai", None, 0, 0, "", False, None, "7")
    assert nameless.guest_label == "g_2 · 7"


def test_a_room_that_is_not_a_string_is_a_bad_hello_and_creates_nobody() -> None:
    d = Driver()
    guest = d.connect()
    d.send(guest, type="hello", token=None, room=412)
    [error] = d.take(guest)
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_message", "hello")
    assert d.backend._rows == {}


def test_a_returning_guest_s_room_is_the_stored_one_not_the_new_hello_s() -> None:
    # The room is given once, when the guest is created; a token's hello cannot move
    # someone to another room in the inbox.
    d = Driver()
    first = d.connect()
    d.send(first, type="hello", token=None, name="Maria", room="412")
    token = d.take(first)[0]["token"]
    again = d.connect()
    d.send(again, type="hello", token=token, room="999")
    assert d.take(again)[0]["type"] == "welcome"
    anna, _ = staff_hello(d, "Anna")
    [queue] = [f for f in d.take(anna) if f["type"] == "queue"]
    assert [e["guest_room"] for e in queue["conversations"]] == ["412"]


# ---------------------------------------------------------------------- presence


def test_a_console_hears_who_is_on_duty_right_after_its_queue() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    frames = d.take(anna)
    assert types(frames) == ["welcome", "queue", "staff_presence"]
    assert frames[2] == {"type": "staff_presence", "staff": ["Anna"]}
    parsed = parse_server_frame('{"type": "staff_presence", "staff": ["Anna", "Ben"], "later": 1}')
    assert parsed == StaffPresence(("Anna", "Ben"))


def test_presence_changes_reach_the_others_when_someone_signs_in_or_leaves() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    ben, _ = staff_hello(d, "Ben")
    assert presence(d.take(ben)) == [["Anna", "Ben"]]
    assert presence(d.take(anna)) == [["Anna", "Ben"]]
    d.run(d.hub.closed(ben, d.now, 0.0))
    assert presence(d.take(anna)) == [["Anna"]]
    assert d.take(ben) == []  # nothing to a session that is gone


def test_a_second_console_of_someone_on_duty_changes_nobody_s_presence() -> None:
    d = Driver()
    anna, token = staff_hello(d, "Anna")
    d.take(anna)
    ben, _ = staff_hello(d, "Ben")
    d.take(ben), d.take(anna)
    tablet = d.connect()
    d.send(tablet, type="hello", token=token)
    assert presence(d.take(tablet)) == [["Anna", "Ben"]]
    assert presence(d.take(anna)) == presence(d.take(ben)) == []
    # Closing one of Anna's two consoles: she is still on duty.
    d.run(d.hub.closed(tablet, d.now, 0.0))
    assert presence(d.take(anna)) == presence(d.take(ben)) == []
    d.run(d.hub.closed(anna, d.now, 0.0))
    assert presence(d.take(ben)) == [["Ben"]]


def test_guests_and_unfinished_hellos_are_never_on_duty() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    guest, _ = d.guest()
    stranger = d.connect()  # connected, no hello yet
    d.run(d.hub.closed(stranger, d.now, 0.0))
    d.run(d.hub.closed(guest, d.now, 0.0))
    assert presence(d.take(anna)) == []
    ben, _ = staff_hello(d, "Ben")
    assert presence(d.take(ben)) == [["Anna", "Ben"]]


def test_a_removed_staff_member_s_failed_hello_announces_nothing() -> None:
    d = Driver()
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    member = d.backend.add_staff("Ben")
    token = d.hub.signer.issue("s", member.staff_id)
    d.backend.remove_staff("Ben")
    ben = d.connect()
    d.send(ben, type="hello", token=token)
    assert [f["code"] for f in d.take(ben)] == ["auth_failed"]
    d.run(d.hub.closed(ben, d.now, 0.0))
    assert presence(d.take(anna)) == []


# ---------------------------------------------------------------- the guest's read mark


def test_subscribing_tells_where_the_guest_has_read_up_to() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    for n in range(3):
        d.send(guest, type="message", client_msg_id=f"m{n}", text=f"hello {n}")
    d.send(guest, type="read", seq=2)
    d.take(guest)
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    d.send(anna, type="watch", conversation_id=cid)
    [subscribed] = [f for f in d.take(anna) if f["type"] == "subscribed"]
    assert subscribed["guest_read_seq"] == 2
    # A later mark arrives as a read frame, and the next subscription knows it too.
    d.send(guest, type="read", seq=3)
    assert [(f["reader"], f["seq"]) for f in d.take(anna) if f["type"] == "read"] == [("guest", 3)]
    d.send(guest, type="read", seq=1)  # never lowered
    d.send(anna, type="unwatch", conversation_id=cid)
    d.send(anna, type="watch", conversation_id=cid)
    [again] = [f for f in d.take(anna) if f["type"] == "subscribed"]
    assert again["guest_read_seq"] == 3


def test_the_guest_s_read_mark_is_stored_and_read_back_after_the_conversation_left_memory() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="hello")
    d.send(guest, type="read", seq=1)
    d.run(d.hub.closed(guest, d.now, 0.0))
    assert cid not in d.hub.conversations  # gone from memory: read back from storage
    anna, _ = staff_hello(d, "Anna")
    d.take(anna)
    d.send(anna, type="watch", conversation_id=cid)
    [subscribed] = [f for f in d.take(anna) if f["type"] == "subscribed"]
    assert subscribed["guest_read_seq"] == 1
