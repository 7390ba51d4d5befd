"""An instant answer stored with the guest message it answers (``AppendMessage.answer``),
on every backend: in the same transaction, right after it, only if the guest message is
new and the conversation is still the concierge's; a failed batch keeps neither."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.commit_path_probe import guest_message, staff_joins
from trio_chat.core.storage import AppendMessage


def asked(cid: str, cmid: str = "m1", text: str = "where is breakfast?") -> AppendMessage:
    """A guest message with the concierge's answer to store with it."""
    message = guest_message(cid, cmid, text)
    message.answer = AppendMessage(
        conversation_id=cid,
        sender="ai",
        author="concierge",
        text=f"answer to {text}",
        expect=("ai", None),
    )
    return message


def stored(db: Any, cid: str) -> list[tuple[int, str, str]]:
    return [(m.seq, m.sender, m.text) for m in db.history(cid, 0, 100)]


def test_the_answer_follows_its_guest_message_in_the_same_commit(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    other = db.add_guest("Ben").conversation_id
    # Two conversations in one batch: each answer right behind its own message.
    first, second = db.apply_batch([asked(cid), asked(other, text="and dinner?")])
    assert not first.duplicate and first.message.seq == 1
    assert first.answer is not None and not first.answer.duplicate
    assert first.answer.conflict is None and first.answer.message.seq == 2
    assert first.answer.message.sender == "ai" and first.answer.message.author == "concierge"
    assert second.answer is not None and second.answer.message.seq == 2
    assert stored(db, cid) == [
        (1, "guest", "where is breakfast?"),
        (2, "ai", "answer to where is breakfast?"),
    ]
    row = db.conversation(cid)
    assert row.last_seq == 2 and row.preview == "answer to where is breakfast?"
    # Answered: nothing is owed after a restart.
    assert db.unanswered(0) == []
    # The next message's seq follows the answer's.
    (again,) = db.apply_batch([asked(cid, "m2", "and lunch?")])
    assert again.message.seq == 3 and again.answer is not None
    assert again.answer.message.seq == 4


def test_a_retried_guest_message_gets_no_second_answer(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    (first,) = db.apply_batch([asked(cid)])
    # The retry, alone and beside a new message in one batch (the one-statement path
    # meets the retry and the batch is applied again one message at a time).
    (retry,) = db.apply_batch([asked(cid)])
    assert retry.duplicate and retry.message.seq == 1 and retry.answer is None
    retried, new = db.apply_batch([asked(cid), asked(cid, "m2", "and dinner?")])
    assert retried.duplicate and retried.answer is None
    assert new.message.seq == 3 and new.answer is not None and new.answer.message.seq == 4
    assert [seq for seq, _, _ in stored(db, cid)] == [1, 2, 3, 4]
    assert first.answer is not None


def test_a_conversation_that_left_the_concierge_stores_the_guest_message_alone(
    db: Any,
) -> None:
    """Staff claimed first (in the same batch here): the guest message is stored, its
    answer is not, and the result says why (the guest message then asks the usual way,
    and is met by the new status)."""
    cid = db.add_guest("Ana").conversation_id
    claim, message = db.apply_batch([staff_joins(cid), asked(cid)])
    assert claim.conflict is None and message.message.seq == 2
    assert message.answer is not None and message.answer.conflict is not None
    assert message.answer.conflict[0] == "staff"
    assert stored(db, cid) == [(1, "system", "Olga joined."), (2, "guest", "where is breakfast?")]
    assert db.conversation(cid).last_seq == 2


def test_a_failed_batch_stores_neither(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    with pytest.raises(Exception):  # noqa: B017 - whichever error the backend raises
        db.apply_batch([asked(cid), asked("no-such-conversation")])
    assert stored(db, cid) == []
    (again,) = db.apply_batch([asked(cid)])
    assert again.message.seq == 1 and again.answer is not None
