"""Drafts of the concierge's answer: relayed to the conversation while the answer is
still the concierge's to give, never stored, never after staff took over."""

from __future__ import annotations

import json

from trio_chat.core import client_protocol as wire
from trio_chat.core.hub import Send

from .test_hub import WALL, Driver, types


def test_a_draft_reaches_every_subscriber_and_nothing_is_written() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=cid)
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    d.take(guest), d.take(staff)
    actions = d.hub.drafted(cid, "Breakfast is", 0.0, WALL)
    assert all(isinstance(a, Send) for a in actions)  # no Write: drafts are not stored
    d.run(actions)
    for session in (guest, staff):
        [frame] = d.take(session)
        assert frame == {
            "type": "draft",
            "conversation_id": cid,
            "sender": "ai",
            "text": "Breakfast is",
        }
        assert wire.parse_server_frame(json.dumps(frame)) == wire.Draft(cid, "ai", "Breakfast is")


def test_no_draft_once_staff_took_over_or_the_answer_was_given() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    staff = d.staff()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [start] = d.replies
    d.reply(start)
    d.take(guest)
    assert d.hub.drafted(cid, "late", 0.0, WALL) == []  # answered: no more drafts
    d.send(guest, type="message", client_msg_id="m2", text="and parking?")
    d.send(staff, type="claim", conversation_id=cid)
    d.take(guest)
    assert d.hub.drafted(cid, "Parking is", 0.0, WALL) == []  # staff has it now
    assert d.hub.drafted("c_unknown", "x", 0.0, WALL) == []
    assert "draft" not in types(d.take(guest))
