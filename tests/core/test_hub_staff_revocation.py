"""Revocation in the hub (staff hardening): a removed or revoked staff member's consoles
close with 4401, what they held goes back to the queue, a new secret closes every
session whose token no longer verifies, and an idle guest token expires. Pure: the
``Driver`` of test_hub, frame in, frames out."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from trio_chat.core.conversation import ConversationState, apply_event
from trio_chat.core.hub import (
    SECRET_ROTATED,
    STAFF_REMOVED,
    STAFF_TOKEN_REVOKED,
    Read,
    Write,
)
from trio_chat.core.protocol import CloseCode
from trio_chat.core.storage import TouchGuest
from trio_chat.core.tokens import TokenSigner

from .test_hub import WALL, Driver, types

LEFT = "Anna has left; someone else from our team will be with you shortly."


def staff_id(d: Driver, session: int) -> str:
    found = d.hub.sessions[session].staff_id
    assert found is not None
    return found


def held_by_anna(d: Driver) -> tuple[int, int, str]:
    """A guest whose escalated conversation Anna holds: (guest, anna, conversation)."""
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="escalate")
    anna = d.staff("Anna")
    d.send(anna, type="claim", conversation_id=cid)
    d.take(guest)
    d.take(anna)
    return guest, anna, cid


def closed_for(d: Driver, session: int, why: str) -> None:
    frames = d.take(session)
    assert frames[-1] == {"type": "error", "code": "auth_failed", "message": why, "ref": None}
    assert d.closes[session] == (CloseCode.AUTH_FAILED, why)


# -------------------------------------------------------------------------- removal


def test_a_removed_staff_members_console_is_told_why_and_closed_with_4401() -> None:
    d = Driver()
    anna = d.staff("Anna")
    ben = d.staff("Ben")
    d.backend.remove_staff("Anna")
    d.run(d.hub.staff_removed(staff_id(d, anna), 1.0, WALL))
    closed_for(d, anna, STAFF_REMOVED)
    assert ben not in d.closes


def test_their_conversation_goes_back_to_waiting_and_the_guest_is_told() -> None:
    d = Driver()
    guest, anna, cid = held_by_anna(d)
    ben = d.staff("Ben")
    d.backend.remove_staff("Anna")
    d.run(d.hub.staff_removed(staff_id(d, anna), 1.0, WALL))
    frames = d.take(guest)
    assert next((f["type"], f.get("sender"), f.get("text")) for f in frames) == (
        "message",
        "system",
        LEFT,
    )
    assert {"type": "status", "conversation_id": cid, "status": "waiting", "assigned_to": None} in (
        frames
    )
    summaries = [f for f in d.take(ben) if f["type"] == "conversation"]
    assert (summaries[-1]["status"], summaries[-1]["assigned_to"]) == ("waiting", None)
    stored = d.backend.conversation(cid)
    assert stored is not None and (stored.status, stored.assigned_staff_id) == ("waiting", None)
    # A colleague may claim it now: no conflict.
    d.send(ben, type="claim", conversation_id=cid)
    assert "error" not in types(d.take(ben))
    assert d.backend.conversation(cid).status == "staff"  # type: ignore[union-attr]


def test_a_held_conversation_no_longer_in_memory_is_found_in_storage() -> None:
    d = Driver()
    guest, anna, cid = held_by_anna(d)
    anna_id = staff_id(d, anna)
    d.run(d.hub.closed(guest, 0.0, WALL))
    d.run(d.hub.closed(anna, 0.0, WALL))
    assert cid not in d.hub.conversations
    d.backend.remove_staff("Anna")
    actions = d.hub.staff_removed(anna_id, 1.0, WALL)
    assert [(a.method, a.args) for a in actions if isinstance(a, Read)] == [
        ("held_conversations", (anna_id,))
    ]
    d.run(actions)
    stored = d.backend.conversation(cid)
    assert stored is not None and stored.status == "waiting"
    assert d.backend.history(cid, 0, 100)[-1].text == LEFT
    assert cid not in d.hub.conversations  # let go of once written


def test_a_claim_still_being_written_is_handed_back_after_it_commits() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.hold = True
    d.send(anna, type="claim", conversation_id=cid)
    d.backend.remove_staff("Anna")
    d.run(d.hub.staff_removed(staff_id(d, anna), 1.0, WALL))
    d.hold = False
    d.commit()
    statuses = [f["status"] for f in d.take(guest) if f["type"] == "status"]
    assert statuses == ["staff", "waiting"]
    assert d.backend.conversation(cid).status == "waiting"  # type: ignore[union-attr]


def test_a_removed_console_can_do_nothing_more_before_it_is_gone() -> None:
    d = Driver()
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    anna = d.staff("Anna")
    d.backend.remove_staff("Anna")
    d.run(d.hub.staff_removed(staff_id(d, anna), 1.0, WALL))
    d.take(anna)
    d.take(guest)
    d.send(anna, type="claim", conversation_id=cid)
    d.send(anna, type="watch", conversation_id=cid)
    assert d.take(anna) == [] and d.take(guest) == []
    assert d.backend.conversation(cid).status == "ai"  # type: ignore[union-attr]


def test_a_sign_in_whose_read_was_in_flight_is_refused() -> None:
    d = Driver()
    member = d.backend.add_staff("Anna")
    session = d.connect()
    token = d.hub.signer.issue("s", member.staff_id)
    [read] = d.hub.frame(session, json.dumps({"type": "hello", "token": token}), 0.0, WALL)
    assert isinstance(read, Read)
    result = d.backend.staff_sign_in(member.staff_id)  # read before the removal
    d.backend.remove_staff("Anna")
    d.run(d.hub.staff_removed(member.staff_id, 1.0, WALL))
    d.run(d.hub.loaded(read, result, 1.0, WALL))
    closed_for(d, session, STAFF_REMOVED)
    assert session not in d.hub.staff_room


def test_removing_someone_else_leaves_a_conversation_alone() -> None:
    d = Driver()
    guest, _anna, cid = held_by_anna(d)
    ben = d.staff("Ben")
    d.backend.remove_staff("Ben")
    d.run(d.hub.staff_removed(staff_id(d, ben), 1.0, WALL))
    assert d.take(guest) == []
    assert d.backend.conversation(cid).status == "staff"  # type: ignore[union-attr]


def test_the_status_table_hands_back_only_what_the_removed_member_holds() -> None:
    held = ConversationState("staff", "s_anna", "Anna")
    transition = apply_event(held, "staff_removed", staff_id="s_anna")
    assert transition is not None
    assert transition.state == ConversationState("waiting")
    assert transition.system_text == LEFT
    assert apply_event(held, "staff_removed", staff_id="s_ben") is None
    assert apply_event(ConversationState("waiting"), "staff_removed", staff_id="s_anna") is None
    with pytest.raises(ValueError):
        apply_event(held, "staff_removed")


# ----------------------------------------------------------------- revocation, one by one


def test_revoking_closes_consoles_signed_in_with_an_older_token_only() -> None:
    d = Driver()
    guest, anna, cid = held_by_anna(d)
    member = d.backend.revoke_staff("Anna")
    assert member is not None and member.generation == 1
    fresh = d.connect()
    d.send(fresh, type="hello", token=d.hub.signer.issue("s", member.staff_id, 1))
    assert types(d.take(fresh))[:2] == ["welcome", "queue"]
    d.run(d.hub.staff_revoked(member.staff_id, 1, 1.0, WALL))
    closed_for(d, anna, STAFF_TOKEN_REVOKED)
    assert fresh not in d.closes
    # Revoking is not leaving: Anna keeps the conversation, under her new token.
    assert d.take(guest) == []
    assert d.backend.conversation(cid).status == "staff"  # type: ignore[union-attr]


def test_an_older_generation_is_refused_at_hello() -> None:
    d = Driver()
    member = d.backend.add_staff("Anna")
    old = d.hub.signer.issue("s", member.staff_id)
    d.backend.revoke_staff("Anna")
    session = d.connect()
    d.send(session, type="hello", token=old)
    [error] = d.take(session)
    assert (error["code"], error["message"]) == ("auth_failed", STAFF_TOKEN_REVOKED)
    assert d.closes[session][0] == CloseCode.AUTH_FAILED


# ------------------------------------------------------------------------- the secret


def test_a_new_secret_closes_every_session_whose_token_no_longer_verifies() -> None:
    d = Driver()
    guest, welcome = d.guest()
    anna = d.staff("Anna")
    waiting = d.connect()  # not signed in yet: nothing to close
    d.run(d.hub.secret_rotated(TokenSigner(b"n" * 32), 1.0, WALL))
    closed_for(d, guest, SECRET_ROTATED)
    closed_for(d, anna, SECRET_ROTATED)
    assert waiting not in d.closes
    again = d.connect()
    d.send(again, type="hello", token=welcome["token"])
    assert d.take(again)[0]["code"] == "auth_failed"


def test_a_session_signed_in_under_the_new_secret_stays() -> None:
    d = Driver()
    signer = TokenSigner(b"n" * 32)
    member = d.backend.add_staff("Anna")
    d.run(d.hub.secret_rotated(signer, 1.0, WALL))
    anna = d.connect()
    d.send(anna, type="hello", token=signer.issue("s", member.staff_id))
    assert types(d.take(anna))[:2] == ["welcome", "queue"]
    guest, welcome = d.guest()
    assert signer.verify(welcome["token"]) is not None
    d.run(d.hub.secret_rotated(signer, 2.0, WALL))
    assert anna not in d.closes and guest not in d.closes


# ------------------------------------------------------------------- idle guest tokens

DAY = 86400.0


def hello_at(d: Driver, token: str, wall: float) -> tuple[int, list[Any]]:
    session = d.connect()
    actions = d.hub.frame(session, json.dumps({"type": "hello", "token": token}), 0.0, wall)
    touched: list[Any] = []
    for action in actions:
        if isinstance(action, Read):
            result = getattr(d.backend, action.method)(*action.args)
            more = d.hub.loaded(action, result, 0.0, wall)
            touched += [a for a in more if isinstance(a, Write)]
            d.run(more)
    return session, touched


def test_a_guest_token_unused_for_longer_than_the_idle_limit_is_refused() -> None:
    d = Driver()
    d.hub.config = replace(d.hub.config, guest_token_idle_s=30 * DAY)
    _, welcome = d.guest()
    row = d.backend.conversation(welcome["conversation_id"])
    assert row is not None
    last = max(row.updated_ts, row.last_seen_ts)
    session, _ = hello_at(d, welcome["token"], last + 30 * DAY + 1)
    [error] = d.take(session)
    assert error["code"] == "auth_failed" and "30 days" in error["message"]
    assert d.closes[session][0] == CloseCode.AUTH_FAILED


def test_a_sign_in_within_the_limit_counts_as_use_once_an_hour() -> None:
    d = Driver()
    d.hub.config = replace(d.hub.config, guest_token_idle_s=30 * DAY)
    _, welcome = d.guest()
    row = d.backend.conversation(welcome["conversation_id"])
    assert row is not None
    soon = row.last_seen_ts + 29 * DAY
    session, touched = hello_at(d, welcome["token"], soon)
    assert types(d.take(session)) == ["welcome"]
    assert [(type(w.operation), w.operation.at) for w in touched] == [(TouchGuest, soon)]
    # Recorded: 29 days on from that sign-in, the token still works ...
    later, touched = hello_at(d, welcome["token"], soon + 29 * DAY)
    assert types(d.take(later)) == ["welcome"]
    # ... and a sign-in within the hour after one recorded writes nothing.
    again, touched_again = hello_at(d, welcome["token"], soon + 29 * DAY + 60)
    assert types(d.take(again)) == ["welcome"] and touched_again == []


def test_a_message_counts_as_use() -> None:
    d = Driver()
    d.hub.config = replace(d.hub.config, guest_token_idle_s=30 * DAY)
    _guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    row = d.backend.conversation(cid)
    assert row is not None
    # Someone wrote 20 days after the guest's last sign-in (the memory backend stamps
    # real time, so the row is moved on by hand).
    d.backend._rows[cid].updated_ts = row.last_seen_ts + 20 * DAY
    session, _ = hello_at(d, welcome["token"], row.last_seen_ts + 40 * DAY)
    assert types(d.take(session)) == ["welcome"]


def test_idle_expiry_off_never_refuses_nor_writes() -> None:
    d = Driver()  # guest_token_idle_s = 0
    _, welcome = d.guest()
    session, touched = hello_at(d, welcome["token"], WALL + 3650 * DAY)
    assert types(d.take(session)) == ["welcome"] and touched == []


# ---------------------------------------------------------------------------- tokens


def test_a_staff_token_carries_its_generation_under_the_mac() -> None:
    signer = TokenSigner(b"k" * 32)
    first = signer.issue("s", "s_abc")
    second = signer.issue("s", "s_abc", 2)
    assert first.count(".") == 2 and second.count(".") == 3  # generation 0: the old form
    assert signer.verify_generation(first) == ("s", "s_abc", 0)
    assert signer.verify_generation(second) == ("s", "s_abc", 2)
    assert signer.verify(second) == ("s", "s_abc")
    kind, ident, _, mac = second.split(".")
    for forged in (f"{kind}.{ident}.3.{mac}", f"{kind}.{ident}.02.{mac}", f"g.{ident}.2.{mac}"):
        assert signer.verify_generation(forged) is None
    # A three-part token whose id smuggles a generation is no two-part one either.
    assert signer.verify_generation(f"s.s_abc:2.{mac}") is None
    with pytest.raises(ValueError):
        signer.issue("g", "g_abc", 1)
