"""The status table's words and preconditions, exactly: guests read the system
messages as they are, and a caller that forgets who acts is a programming error."""

from __future__ import annotations

import pytest

from trio_chat.core.conversation import ConversationState, Event, apply_event

ANNA = ConversationState("staff", "s_anna", "Anna")


@pytest.mark.parametrize(
    ("start", "event", "text"),
    [
        (
            ConversationState("ai"),
            "escalate",
            "You asked to talk to a person. A member of our team will be with you shortly.",
        ),
        (
            ConversationState("ai"),
            "concierge_escalate",
            "Our concierge has asked a member of our team to help. "
            "Someone will be with you shortly.",
        ),
        (ConversationState("waiting"), "claim", "Anna from our team has joined the conversation."),
        (ANNA, "release", "Anna has handed you back to our concierge, who is here to help."),
        (ANNA, "resolve", "Anna marked this conversation as resolved. Write again any time."),
        (
            ConversationState("resolved"),
            "guest_message",
            "Welcome back! Our concierge is here to help again.",
        ),
    ],
)
def test_every_transition_tells_the_guest_what_happened_in_these_words(
    start: ConversationState, event: Event, text: str
) -> None:
    transition = apply_event(start, event, staff_id="s_anna", staff_name="Anna")
    assert transition is not None and transition.system_text == text


@pytest.mark.parametrize("event", ["claim", "release", "resolve"])
@pytest.mark.parametrize(
    ("staff_id", "staff_name"), [(None, None), ("s_anna", None), (None, "Anna")]
)
def test_staff_events_need_both_the_staff_id_and_the_name(
    event: Event, staff_id: str | None, staff_name: str | None
) -> None:
    with pytest.raises(ValueError, match=f"^{event} needs staff_id and staff_name$"):
        apply_event(ANNA, event, staff_id=staff_id, staff_name=staff_name)
