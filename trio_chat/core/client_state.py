"""The client's bookkeeping, as pure code: the transcript and the outbox.

No I/O and no Trio: the connection loop in ``_client`` feeds these with what arrives
and asks them what to send.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

from .client_protocol import message_request
from .protocol import MAX_CLIENT_MSG_ID, MAX_TEXT, Message

__all__ = ["Outbox", "OutgoingMessage", "Transcript"]


class Transcript:
    """One conversation's messages in ``seq`` order, with no gap and no duplicate.

    Messages may arrive in any order and more than once (history and live pushes
    overlap by design). :meth:`add` keeps the contiguous prefix in :attr:`messages`
    and parks anything beyond a gap until the gap is filled.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._parked: dict[int, Message] = {}
        self.duplicates = 0  # messages dropped because their seq was already held

    @property
    def held(self) -> int:
        """The highest ``seq`` held with nothing missing below it."""
        return self.messages[-1].seq if self.messages else 0

    @property
    def gap(self) -> bool:
        """True while a message beyond a missing one is parked (fetch history)."""
        return bool(self._parked)

    def add(self, message: Message) -> list[Message]:
        """Take a message; returns those that became part of the transcript, in order."""
        if message.seq <= self.held or message.seq in self._parked:
            self.duplicates += 1
            return []
        if message.seq != self.held + 1:
            self._parked[message.seq] = message
            return []
        added = [message]
        self.messages.append(message)
        while (following := self._parked.pop(self.held + 1, None)) is not None:
            self.messages.append(following)
            added.append(following)
        return added


_counter = itertools.count(1)


def new_client_msg_id() -> str:
    """Unique per client process and unguessable across clients."""
    return f"c{next(_counter)}-{secrets.token_hex(6)}"


@dataclass(eq=False)
class OutgoingMessage:
    """A message the user sent, until the server acknowledges or refuses it."""

    text: str
    client_msg_id: str = field(default_factory=new_client_msg_id)
    conversation_id: str | None = None  # staff messages name their conversation
    sent_on: int | None = None  # the connection number it was last sent on
    sends: int = 0  # how many times it was written to a connection
    not_before: float = 0.0  # retry time after rate_limited (client clock)

    def frame(self) -> str:
        return message_request(self.client_msg_id, self.text, self.conversation_id)


def check_text(text: str) -> str | None:
    """Why the server would refuse ``text``, or ``None`` if it is fine."""
    trimmed = text.strip()
    if not trimmed:
        return "the message is empty"
    if len(trimmed) > MAX_TEXT:
        return f"the message is over {MAX_TEXT} characters"
    return None


class Outbox:
    """Messages waiting to be acknowledged, in the order the user sent them.

    A message leaves only when acknowledged or refused: after a reconnect every
    message still here is sent again with its original ``client_msg_id``, which the
    server recognises, so nothing is lost and nothing is stored twice.
    """

    def __init__(self) -> None:
        self._items: dict[str, OutgoingMessage] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
        return iter(list(self._items.values()))

    def add(self, message: OutgoingMessage) -> None:
        assert len(message.client_msg_id) <= MAX_CLIENT_MSG_ID
        self._items[message.client_msg_id] = message

    def get(self, client_msg_id: str) -> OutgoingMessage | None:
        return self._items.get(client_msg_id)

    def remove(self, client_msg_id: str) -> OutgoingMessage | None:
        return self._items.pop(client_msg_id, None)

    def due(self, connection: int, now: float) -> list[OutgoingMessage]:
        """Messages not yet sent on this connection whose retry time has come."""
        return [m for m in self._items.values() if m.sent_on != connection and m.not_before <= now]

    def in_flight(self, connection: int) -> list[OutgoingMessage]:
        return [m for m in self._items.values() if m.sent_on == connection]
