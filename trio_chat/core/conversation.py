"""The conversation state machine: who may move a conversation where, and what it says.

Pure code, modelled on h11's ``_state.py``: one explicit table of transitions, and a
function that applies an event to a state and returns what should happen (the new
state and the system message guests read), or raises the wire error the contract
names. The server stores and broadcasts; this module only decides.

States (``status`` on the wire): ``ai`` (the concierge answers), ``waiting``
(escalated, no staff yet), ``staff`` (claimed by one staff member), ``resolved``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from .errors import ProtocolError
from .protocol import ErrorCode, Status

__all__ = ["ConversationState", "Transition", "apply_event"]

Event: TypeAlias = Literal[
    "escalate",  # the guest asks for a person
    "concierge_escalate",  # the concierge hands over by itself
    "claim",
    "release",
    "resolve",
    "guest_message",  # a guest writes (reopens a resolved conversation)
    "staff_removed",  # the holder was removed or revoked: back in the queue
]

# (state, event) -> new state. A pair missing from the table is "no change" for the
# idempotent events and an error for the staff ones (see apply_event).
TRANSITIONS: Final[dict[tuple[Status, Event], Status]] = {
    ("ai", "escalate"): "waiting",
    ("resolved", "escalate"): "waiting",
    ("ai", "concierge_escalate"): "waiting",
    ("ai", "claim"): "staff",
    ("waiting", "claim"): "staff",
    ("resolved", "claim"): "staff",
    ("staff", "release"): "ai",
    ("staff", "resolve"): "resolved",
    ("resolved", "guest_message"): "ai",
    ("staff", "staff_removed"): "waiting",
}


@dataclass(frozen=True, slots=True)
class ConversationState:
    """What the state machine needs to know about a conversation."""

    status: Status
    assigned_to: str | None = None  # staff_id of the holder
    assigned_name: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of an event that changes the conversation.

    ``system_text`` is the message stored as ``sender: "system"``; ``state`` is the
    state afterwards.
    """

    state: ConversationState
    system_text: str


def _system_text(event: str, new: ConversationState, old: ConversationState) -> str:
    if event == "escalate":
        return "You asked to talk to a person. A member of our team will be with you shortly."
    if event == "concierge_escalate":
        return (
            "Our concierge has asked a member of our team to help. "
            "Someone will be with you shortly."
        )
    if event == "claim":
        return f"{new.assigned_name} from our team has joined the conversation."
    if event == "release":
        return f"{old.assigned_name} has handed you back to our concierge, who is here to help."
    if event == "resolve":
        return f"{old.assigned_name} marked this conversation as resolved. Write again any time."
    if event == "guest_message":
        return "Welcome back! Our concierge is here to help again."
    if event == "staff_removed":
        return f"{old.assigned_name} has left; someone else from our team will be with you shortly."
    raise AssertionError(event)


def apply_event(
    state: ConversationState,
    event: Event,
    *,
    staff_id: str | None = None,
    staff_name: str | None = None,
) -> Transition | None:
    """Apply ``event`` to ``state``.

    Needs ``staff_id`` and ``staff_name`` for ``claim``, ``release`` and ``resolve``;
    ``staff_id`` for ``staff_removed``, which changes only a conversation that staff
    member holds (the server's own event, never refused).
    Returns the :class:`Transition`, or ``None`` when the event changes nothing (an
    escalation of a conversation already waiting or with staff, a claim by the holder,
    a guest message outside ``resolved``). Raises :class:`ProtocolError` with
    ``conflict`` (claim of a conversation another staff member holds) or ``forbidden``
    (release or resolve by anyone but the holder).
    """
    if event in ("claim", "release", "resolve") and (staff_id is None or staff_name is None):
        raise ValueError(f"{event} needs staff_id and staff_name")
    if event == "staff_removed":
        if staff_id is None:
            raise ValueError("staff_removed needs staff_id")
        if state.status != "staff" or state.assigned_to != staff_id:
            return None
    if event == "claim" and state.status == "staff":
        if state.assigned_to == staff_id:
            return None
        raise ProtocolError(
            ErrorCode.CONFLICT, f"{state.assigned_name} already holds this conversation", "claim"
        )
    if event in ("release", "resolve") and (
        state.status != "staff" or state.assigned_to != staff_id
    ):
        raise ProtocolError(
            ErrorCode.FORBIDDEN, f"only the staff member holding it may {event} it", event
        )
    new_status = TRANSITIONS.get((state.status, event))
    if new_status is None:
        return None
    if new_status == "staff":
        new = ConversationState("staff", staff_id, staff_name)
    else:
        new = ConversationState(new_status)
    return Transition(state=new, system_text=_system_text(event, new, state))
