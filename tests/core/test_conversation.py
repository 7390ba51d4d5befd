"""The conversation state machine, as pure code."""

from __future__ import annotations

import pytest

from trio_chat import ProtocolError
from trio_chat.core.conversation import TRANSITIONS, ConversationState, apply_event
from trio_chat.core.protocol import Status

AI = ConversationState("ai")
WAITING = ConversationState("waiting")
RESOLVED = ConversationState("resolved")
ANNA = ConversationState("staff", "s_anna", "Anna")


@pytest.mark.parametrize("start", [AI, RESOLVED])
def test_escalate_moves_to_waiting(start: ConversationState) -> None:
    transition = apply_event(start, "escalate")
    assert transition is not None
    assert transition.state == WAITING
    assert "member of our team" in transition.system_text


@pytest.mark.parametrize("start", [WAITING, ANNA])
def test_escalate_when_already_waiting_or_with_staff_changes_nothing(
    start: ConversationState,
) -> None:
    assert apply_event(start, "escalate") is None


@pytest.mark.parametrize("start", [AI, WAITING, RESOLVED])
def test_claim_assigns_the_caller(start: ConversationState) -> None:
    transition = apply_event(start, "claim", staff_id="s_anna", staff_name="Anna")
    assert transition is not None and transition.state == ANNA
    assert transition.system_text.startswith("Anna")


def test_claiming_ones_own_again_changes_nothing() -> None:
    assert apply_event(ANNA, "claim", staff_id="s_anna", staff_name="Anna") is None


def test_claim_held_by_another_is_a_conflict() -> None:
    with pytest.raises(ProtocolError) as info:
        apply_event(ANNA, "claim", staff_id="s_ben", staff_name="Ben")
    assert info.value.code == "conflict"


@pytest.mark.parametrize(("event", "status"), [("release", "ai"), ("resolve", "resolved")])
def test_holder_releases_and_resolves(event: str, status: Status) -> None:
    transition = apply_event(ANNA, event, staff_id="s_anna", staff_name="Anna")  # type: ignore[arg-type]
    assert transition is not None and transition.state == ConversationState(status)
    assert "Anna" in transition.system_text


@pytest.mark.parametrize("event", ["release", "resolve"])
@pytest.mark.parametrize(("start", "who"), [(ANNA, "s_ben"), (AI, "s_anna"), (WAITING, "s_anna")])
def test_only_the_holder_may_release_or_resolve(
    event: str, start: ConversationState, who: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        apply_event(start, event, staff_id=who, staff_name="X")  # type: ignore[arg-type]
    assert info.value.code == "forbidden"


def test_a_guest_message_reopens_only_a_resolved_conversation() -> None:
    transition = apply_event(RESOLVED, "guest_message")
    assert transition is not None and transition.state == AI
    for start in (AI, WAITING, ANNA):
        assert apply_event(start, "guest_message") is None


def test_concierge_escalates_only_from_ai() -> None:
    transition = apply_event(AI, "concierge_escalate")
    assert transition is not None and transition.state == WAITING
    assert apply_event(WAITING, "concierge_escalate") is None


def test_staff_events_need_a_staff_member() -> None:
    with pytest.raises(ValueError):
        apply_event(AI, "claim")


def test_every_transition_has_a_guest_readable_text() -> None:
    for (status, event), new in TRANSITIONS.items():
        start = ANNA if status == "staff" else ConversationState(status)
        transition = apply_event(start, event, staff_id="s_anna", staff_name="Anna")
        assert transition is not None and transition.state.status == new
        assert transition.system_text.endswith(".")
