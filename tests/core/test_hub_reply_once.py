"""The hub's side of "exactly one concierge reply per guest message" (issue #16): the
reply names the guest message it answers and is stored only while the conversation is
the concierge's; a reply the storage refuses (another server process answered first,
or took the conversation from the concierge) pushes nothing and frees the concierge for
the next message; a reply another process holds the lease of is let go."""

from __future__ import annotations

from typing import Any

from tests.core.test_hub import WALL, Driver, types
from trio_chat.core.hub import Write
from trio_chat.core.storage import AppendMessage


def typing_off(cid: str) -> dict[str, Any]:
    return {"type": "typing", "conversation_id": cid, "sender": "ai", "active": False}


def stored_elsewhere(d: Driver, cid: str, answers: int, text: str) -> None:
    """Another server process's commit on the shared database (this hub hears of it
    only through a cluster notice, which this driver does not deliver)."""
    d.backend.apply_batch(
        [
            AppendMessage(
                conversation_id=cid, sender="ai", author="concierge", text=text, reply_to=answers
            )
        ]
    )


def test_the_reply_names_the_guest_message_it_answers_and_expects_the_concierge() -> None:
    d = Driver(concierge=True)
    guest, _ = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="one")
    d.send(guest, type="message", client_msg_id="m2", text="two")
    [start] = d.replies
    d.hold = True
    d.reply(start, "first answer")
    [write] = d.held
    assert isinstance(write, Write) and isinstance(write.operation, AppendMessage)
    assert write.operation.reply_to == 1 and write.operation.expect == ("ai", None)
    d.commit()
    [_, second] = d.replies
    d.reply(second, "second answer")
    [write] = d.held
    assert isinstance(write.operation, AppendMessage) and write.operation.reply_to == 2


def test_a_reply_stored_by_another_process_first_is_not_pushed_and_frees_the_concierge() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [start] = d.replies
    d.take(guest)
    stored_elsewhere(d, cid, 1, "At seven, from the other node.")
    d.reply(start, "At seven, from this node.")
    assert d.take(guest) == [typing_off(cid)]  # no second answer pushed
    history = d.backend.history(cid, 0, 10)
    assert [(m.sender, m.text) for m in history] == [
        ("guest", "breakfast?"),
        ("ai", "At seven, from the other node."),
    ]
    # Not stuck: the next message is answered.
    d.send(guest, type="message", client_msg_id="m2", text="and dinner?")
    assert len(d.replies) == 2 and d.replies[1].message.seq == 3


def test_a_reply_to_a_conversation_claimed_on_another_process_is_not_stored() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [start] = d.replies
    d.take(guest)
    staff = d.backend.add_staff("Olga")
    d.backend.apply_batch(
        [
            AppendMessage(
                conversation_id=cid,
                sender="system",
                text="Olga joined",
                status=("staff", staff.staff_id, "Olga"),
                expect=("ai", None),
            )
        ]
    )
    d.reply(start)
    assert "message" not in types(d.take(guest))
    assert [m.sender for m in d.backend.history(cid, 0, 10)] == ["guest", "system"]


def test_a_reply_another_process_holds_the_lease_of_is_let_go() -> None:
    d = Driver(concierge=True)
    guest, welcome = d.guest()
    cid = welcome["conversation_id"]
    d.send(guest, type="message", client_msg_id="m1", text="one")
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert len(d.replies) == 1
    d.take(guest)
    d.run(d.hub.reply_abandoned(cid, d.now, WALL))
    frames = d.take(guest)
    assert frames[0] == typing_off(cid)
    assert [r.message.seq for r in d.replies] == [1, 2]  # the next one is asked for
    assert [m.sender for m in d.backend.history(cid, 0, 10)] == ["guest", "guest"]
    d.run(d.hub.reply_abandoned("no-such-conversation", d.now, WALL))  # harmless
