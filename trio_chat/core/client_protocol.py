"""The client's half of protocol v1, pure: every frame a client sends is built here, and
every frame the server sends is parsed here into a type.

The Trio client, the staff client, the mock's scripted staff member and the benchmark's
load generator all build their frames with these functions, so a field renamed in the
protocol is renamed once. :func:`parse_server_frame` turns a server frame into one of
the frozen dataclasses below; a frame of a type this version does not know becomes
:class:`UnknownFrame` (the protocol's compatibility rule: clients ignore what they do
not know), while a known type with missing or mistyped fields raises
:class:`~trio_chat.ProtocolError` (``bad_message``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

from .errors import ProtocolError
from .protocol import ErrorCode, Message, Reader, Role, Sender, Status, encode

__all__ = [
    "Ack",
    "ConversationChanged",
    "ConversationSummary",
    "Draft",
    "History",
    "Pong",
    "Pushed",
    "Queue",
    "ReadMark",
    "Reconnect",
    "ServerError",
    "ServerFrame",
    "StaffAction",
    "StaffPresence",
    "StatusChanged",
    "Subscribed",
    "TypingChanged",
    "UnknownFrame",
    "Welcome",
    "escalate_frame",
    "hello_frame",
    "history_request",
    "message_request",
    "parse_server_frame",
    "ping_frame",
    "read_request",
    "staff_action_frame",
    "typing_request",
]

StaffAction: TypeAlias = Literal["claim", "release", "resolve", "watch", "unwatch"]

# ------------------------------------------------------------------ frames a client sends


def _with_conversation(frame: dict[str, Any], conversation_id: str | None) -> str:
    # Guests never name a conversation (they have one); staff always do.
    if conversation_id is not None:
        frame["conversation_id"] = conversation_id
    return encode(frame)


def hello_frame(token: str | None, name: str | None = None, room: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "hello", "token": token}
    if name:
        frame["name"] = name
    if room:
        frame["room"] = room  # extension: older servers ignore it
    return encode(frame)


def message_request(client_msg_id: str, text: str, conversation_id: str | None = None) -> str:
    frame = {"type": "message", "client_msg_id": client_msg_id, "text": text}
    return _with_conversation(frame, conversation_id)


def history_request(after_seq: int, limit: int, conversation_id: str | None = None) -> str:
    frame = {"type": "history", "after_seq": after_seq, "limit": limit}
    return _with_conversation(frame, conversation_id)


def escalate_frame(reason: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "escalate"}
    if reason:
        frame["reason"] = reason
    return encode(frame)


def typing_request(active: bool, conversation_id: str | None = None) -> str:
    return _with_conversation({"type": "typing", "active": active}, conversation_id)


def read_request(seq: int, conversation_id: str | None = None) -> str:
    return _with_conversation({"type": "read", "seq": seq}, conversation_id)


def ping_frame(ping_id: str | int) -> str:
    return encode({"type": "ping", "id": ping_id})


def staff_action_frame(action: StaffAction, conversation_id: str) -> str:
    return encode({"type": action, "conversation_id": conversation_id})


# ------------------------------------------------------------ frames the server sends


@dataclass(frozen=True, slots=True)
class Welcome:
    role: Role
    token: str | None
    heartbeat_s: float
    server: str
    # guests
    guest_id: str | None = None
    conversation_id: str | None = None
    status: Status | None = None
    last_seq: int = 0
    read_seq: int = 0
    # staff
    staff_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    client_msg_id: str
    seq: int
    conversation_id: str
    ts: str


@dataclass(frozen=True, slots=True)
class Pushed:
    """A ``message`` frame: something stored in a conversation we are subscribed to."""

    message: Message


@dataclass(frozen=True, slots=True)
class History:
    conversation_id: str
    messages: tuple[Message, ...]
    last_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class StatusChanged:
    conversation_id: str
    status: Status
    assigned_to: str | None


@dataclass(frozen=True, slots=True)
class TypingChanged:
    conversation_id: str
    sender: Sender
    active: bool


@dataclass(frozen=True, slots=True)
class ReadMark:
    conversation_id: str
    reader: Reader
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    id: Any
    ts: str | None


@dataclass(frozen=True, slots=True)
class ServerError:
    code: str
    message: str
    ref: str | None
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Reconnect:
    after_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One entry of the staff queue."""

    conversation_id: str
    guest_id: str
    guest_name: str | None
    status: Status
    assigned_to: str | None
    last_seq: int
    read_seq: int
    updated_ts: str
    guest_online: bool
    preview: str | None
    guest_room: str | None = None  # extension: absent from older servers

    @property
    def guest_label(self) -> str:
        """How staff see the guest: the name they gave (else their id), and the room
        where given: ``Maria Lopez · 412``."""
        who = self.guest_name or self.guest_id
        return f"{who} · {self.guest_room}" if self.guest_room else who


@dataclass(frozen=True, slots=True)
class Queue:
    conversations: tuple[ConversationSummary, ...]


@dataclass(frozen=True, slots=True)
class ConversationChanged:
    summary: ConversationSummary


@dataclass(frozen=True, slots=True)
class Subscribed:
    conversation_id: str
    last_seq: int
    status: Status
    assigned_to: str | None


@dataclass(frozen=True, slots=True)
class Draft:
    """The concierge's answer so far (an extension of protocol v1): shown while it is
    written, replaced by the one stored ``message`` that ends it."""

    conversation_id: str
    sender: Sender
    text: str


@dataclass(frozen=True, slots=True)
class StaffPresence:
    """Extension: the staff members on duty (signed in), by name."""

    staff: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame type this client does not know: ignored, per the protocol."""

    type: str
    fields: dict[str, Any]


ServerFrame: TypeAlias = (
    Welcome
    | Ack
    | Pushed
    | History
    | StatusChanged
    | TypingChanged
    | ReadMark
    | Pong
    | ServerError
    | Reconnect
    | Queue
    | ConversationChanged
    | Subscribed
    | Draft
    | StaffPresence
    | UnknownFrame
)

_STATUSES: frozenset[str] = frozenset({"ai", "waiting", "staff", "resolved"})
_ROLES: frozenset[str] = frozenset({"guest", "staff"})
_SENDERS: frozenset[str] = frozenset({"guest", "ai", "staff", "system"})


class _Reader:
    """Typed access to one frame's fields; any mismatch is ``bad_message``."""

    __slots__ = ("obj", "type")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.type = str(obj.get("type"))

    def _fail(self, name: str, wanted: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"server frame {self.type!r}: {name!r} must be {wanted}",
            self.type,
        )

    def text(self, name: str) -> str:
        value = self.obj.get(name)
        if not isinstance(value, str):
            raise self._fail(name, "a string")
        return value

    def text_or_none(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is not None and not isinstance(value, str):
            raise self._fail(name, "a string or null")
        return value

    def integer(self, name: str, default: int | None = None) -> int:
        value = self.obj.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, "an integer")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.obj.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._fail(name, "a number")
        return float(value)

    def flag(self, name: str, default: bool | None = None) -> bool:
        value = self.obj.get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false")
        return value

    def one_of(self, name: str, allowed: frozenset[str]) -> str:
        value = self.obj.get(name)
        if value not in allowed:
            raise self._fail(name, "one of " + ", ".join(sorted(allowed)))
        return cast(str, value)

    def status(self, name: str = "status") -> Status:
        return cast(Status, self.one_of(name, _STATUSES))


def _summary(obj: Any) -> ConversationSummary:
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a queue entry must be an object", "queue")
    f = _Reader({"type": "conversation", **obj})
    return ConversationSummary(
        conversation_id=f.text("conversation_id"),
        guest_id=f.text("guest_id"),
        guest_name=f.text_or_none("guest_name"),
        status=f.status(),
        assigned_to=f.text_or_none("assigned_to"),
        last_seq=f.integer("last_seq", 0),
        read_seq=f.integer("read_seq", 0),
        updated_ts=f.text("updated_ts"),
        guest_online=f.flag("guest_online", False),
        preview=f.text_or_none("preview"),
        guest_room=f.text_or_none("guest_room"),
    )


def _welcome(f: _Reader) -> Welcome:
    role = cast(Role, f.one_of("role", _ROLES))
    token = f.text_or_none("token")
    heartbeat_s = f.number("heartbeat_s", 0.0)
    server = str(f.obj.get("server", ""))
    if role == "staff":
        return Welcome(
            role,
            token,
            heartbeat_s,
            server,
            staff_id=f.text("staff_id"),
            name=f.text_or_none("name"),
        )
    return Welcome(
        role,
        token,
        heartbeat_s,
        server,
        guest_id=f.text("guest_id"),
        conversation_id=f.text("conversation_id"),
        status=f.status(),
        last_seq=f.integer("last_seq", 0),
        read_seq=f.integer("read_seq", 0),
    )


def _history(f: _Reader) -> History:
    raw = f.obj.get("messages", [])
    if not isinstance(raw, list):
        raise f._fail("messages", "a list")
    return History(
        conversation_id=f.text("conversation_id"),
        messages=tuple(Message.from_wire(m) for m in raw),
        last_seq=f.integer("last_seq", 0),
        has_more=f.flag("has_more", False),
    )


def _queue(f: _Reader) -> Queue:
    raw = f.obj.get("conversations", [])
    if not isinstance(raw, list):
        raise f._fail("conversations", "a list")
    return Queue(tuple(_summary(entry) for entry in raw))


def _presence(f: _Reader) -> StaffPresence:
    raw = f.obj.get("staff", [])
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise f._fail("staff", "a list of names")
    return StaffPresence(tuple(raw))


def _error(f: _Reader) -> ServerError:
    retry = f.obj.get("retry_after_ms")
    return ServerError(
        code=f.text("code"),
        message=str(f.obj.get("message", "")),
        ref=None if f.obj.get("ref") is None else str(f.obj["ref"]),
        retry_after_ms=retry if isinstance(retry, int) and not isinstance(retry, bool) else None,
    )


_PARSERS: dict[str, Callable[[_Reader], ServerFrame]] = {
    "welcome": _welcome,
    "ack": lambda f: Ack(
        client_msg_id=f.text("client_msg_id"),
        seq=f.integer("seq"),
        conversation_id=f.text("conversation_id"),
        ts=f.text("ts"),
    ),
    "message": lambda f: Pushed(Message.from_wire(f.obj)),
    "history": _history,
    "status": lambda f: StatusChanged(
        conversation_id=f.text("conversation_id"),
        status=f.status(),
        assigned_to=f.text_or_none("assigned_to"),
    ),
    "typing": lambda f: TypingChanged(
        conversation_id=f.text("conversation_id"),
        sender=cast(Sender, f.one_of("sender", _SENDERS)),
        active=f.flag("active"),
    ),
    "read": lambda f: ReadMark(
        conversation_id=f.text("conversation_id"),
        reader=cast(Reader, f.one_of("reader", _ROLES)),
        seq=f.integer("seq"),
    ),
    "pong": lambda f: Pong(id=f.obj.get("id"), ts=f.text_or_none("ts")),
    "error": _error,
    "reconnect": lambda f: Reconnect(
        after_ms=max(0, f.integer("after_ms", 0)), reason=str(f.obj.get("reason", ""))
    ),
    "queue": _queue,
    "conversation": lambda f: ConversationChanged(_summary(f.obj)),
    "draft": lambda f: Draft(
        conversation_id=f.text("conversation_id"),
        sender=cast(Sender, f.one_of("sender", _SENDERS)),
        text=f.text("text"),
    ),
    "staff_presence": _presence,
    "subscribed": lambda f: Subscribed(
        conversation_id=f.text("conversation_id"),
        last_seq=f.integer("last_seq", 0),
        status=f.status(),
        assigned_to=f.text_or_none("assigned_to"),
    ),
}


def parse_server_frame(raw: str | bytes) -> ServerFrame:
    """One server frame as a type. Raises :class:`~trio_chat.ProtocolError`
    (``bad_message``) for text that is not a JSON object with a ``type``, or for a known
    type whose fields are missing or of the wrong kind."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a server frame that is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a server frame without a type")
    parser = _PARSERS.get(obj["type"])
    if parser is None:
        fields = {k: v for k, v in obj.items() if k != "type"}
        return UnknownFrame(obj["type"], fields)
    frame: ServerFrame = parser(_Reader(obj))
    return frame
