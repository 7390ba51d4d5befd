"""The client's transcript and outbox, as pure code."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_chat import Message
from trio_chat.core.client_state import Outbox, OutgoingMessage, Transcript, check_text


def msg(seq: int) -> Message:
    return Message(seq, "c", "guest", "g", f"text {seq}", "ts", None)


def test_in_order_messages_are_taken() -> None:
    transcript = Transcript()
    assert transcript.add(msg(1)) == [msg(1)]
    assert transcript.add(msg(2)) == [msg(2)]
    assert transcript.held == 2 and not transcript.gap


def test_duplicates_are_dropped_and_counted() -> None:
    transcript = Transcript()
    transcript.add(msg(1))
    assert transcript.add(msg(1)) == []
    assert transcript.duplicates == 1


def test_a_gap_parks_later_messages_until_it_is_filled() -> None:
    transcript = Transcript()
    transcript.add(msg(1))
    assert transcript.add(msg(3)) == [] and transcript.gap
    assert transcript.add(msg(3)) == [] and transcript.duplicates == 1
    assert transcript.add(msg(2)) == [msg(2), msg(3)]
    assert not transcript.gap and transcript.held == 3


@given(st.permutations(list(range(1, 30))), st.lists(st.integers(1, 29), max_size=20))
def test_any_arrival_order_with_repeats_gives_one_ordered_copy(
    order: list[int], repeats: list[int]
) -> None:
    transcript = Transcript()
    for seq in order + repeats:
        transcript.add(msg(seq))
    assert [m.seq for m in transcript.messages] == list(range(1, 30))
    assert not transcript.gap


def test_outbox_resends_after_a_new_connection_and_respects_retry_times() -> None:
    outbox = Outbox()
    first, second = OutgoingMessage("a"), OutgoingMessage("b")
    outbox.add(first)
    outbox.add(second)
    assert outbox.due(1, now=0) == [first, second]
    first.sent_on = second.sent_on = 1
    assert outbox.due(1, now=0) == []
    assert outbox.in_flight(1) == [first, second]
    assert outbox.due(2, now=0) == [first, second]  # a new connection: send again
    second.sent_on, second.not_before = None, 5.0
    assert outbox.due(1, now=1) == [] and outbox.due(1, now=5) == [second]
    assert outbox.remove(first.client_msg_id) is first
    assert [m.text for m in outbox] == ["b"] and len(outbox) == 1


def test_client_msg_ids_are_unique_and_valid() -> None:
    import re

    ids = {OutgoingMessage("x").client_msg_id for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", i) for i in ids)


def test_check_text_mirrors_the_server_rules() -> None:
    assert check_text("hi") is None
    assert check_text("   ") is not None
    assert check_text(" " + "x" * 4000 + " ") is None
    assert check_text("x" * 4001) is not None
