"""Protocol v1 codec: parse and validate client frames, build server frames.

Pure code, no I/O and no Trio. The server, the mock server and the clients all use
this module, so there is exactly one implementation of the wire format.

Parsing turns one WebSocket message (``str`` or ``bytes``) into a typed frame object
or raises :class:`~trio_chat.ProtocolError` with the wire error code the contract
assigns to that kind of bad frame. Building turns server-side facts into compact JSON
text, ready to be sent as it is to any number of connections.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, get_args

from .errors import ProtocolError

__all__ = [
    "CLIENT_TYPES",
    "MAX_CLIENT_MSG_ID",
    "MAX_FRAME_BYTES",
    "MAX_HISTORY_LIMIT",
    "MAX_TEXT",
    "CloseCode",
    "ErrorCode",
    "Message",
    "Reader",
    "Role",
    "Sender",
    "Status",
    "format_ts",
    "parse_client_frame",
]

MAX_TEXT: Final = 4000
MAX_CLIENT_MSG_ID: Final = 64
MAX_FRAME_BYTES: Final = 64 * 1024
DEFAULT_HISTORY_LIMIT: Final = 200
MAX_HISTORY_LIMIT: Final = 500
MAX_SERVER_FRAME_BYTES: Final = 1024 * 1024
MAX_INTEGER_FIELD: Final = 2**63 - 1  # an integer field beyond is out of range (SQLite's)
MAX_ROOM_CHARS: Final = 20  # hello's room (extension): "412", "Garden Suite 3"

_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]+\Z")

# The protocol's closed vocabularies. (Clients reading frames keep these as plain
# strings: a later server may add a value, and clients ignore what they do not know.)
Status: TypeAlias = Literal["ai", "waiting", "staff", "resolved"]
Role: TypeAlias = Literal["guest", "staff"]
Sender: TypeAlias = Literal["guest", "ai", "staff", "system"]
Reader: TypeAlias = Literal["guest", "staff"]


class ErrorCode:
    """The wire error codes of protocol v1 (the ``code`` of an ``error`` frame)."""

    BAD_JSON: Final = "bad_json"
    BAD_MESSAGE: Final = "bad_message"
    UNKNOWN_TYPE: Final = "unknown_type"
    AUTH_REQUIRED: Final = "auth_required"
    AUTH_FAILED: Final = "auth_failed"
    FORBIDDEN: Final = "forbidden"
    NOT_FOUND: Final = "not_found"
    TOO_LARGE: Final = "too_large"
    RATE_LIMITED: Final = "rate_limited"
    CONFLICT: Final = "conflict"
    INTERNAL: Final = "internal"


class CloseCode:
    """WebSocket close codes used by protocol v1."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001
    ABNORMAL: Final = 1006
    POLICY: Final = 1008
    TOO_BIG: Final = 1009
    SERVER_ERROR: Final = 1011
    RESTARTING: Final = 1012
    TRY_LATER: Final = 1013
    AUTH_FAILED: Final = 4401
    HELLO_TIMEOUT: Final = 4408
    RATE_LIMITED: Final = 4429


# The last second formatted, and its text: messages come many to a second. A tuple
# replaced whole, so a thread reading it always sees a matching pair.
_formatted_second: tuple[int, str] = (-1, "")


def format_ts(epoch: float | None = None) -> str:
    """Format a POSIX time as protocol v1 wants: ISO 8601, UTC, milliseconds, ``Z``."""
    global _formatted_second
    if epoch is None:
        epoch = time.time()
    millis = int(epoch * 1000)
    seconds, ms = divmod(millis, 1000)
    formatted = _formatted_second
    if formatted[0] != seconds:
        formatted = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        _formatted_second = formatted
    return f"{formatted[1]}.{ms:03d}Z"


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None
    name: str | None
    room: str | None = None  # extension: the guest's room number, shown to staff
    # Extension, staff only: the queue also lists conversations resolved in the last
    # 24 hours (a console's "resolved today"); the contract's queue leaves them out.
    resolved: bool = False


@dataclass(frozen=True, slots=True)
class SendMessage:
    client_msg_id: str
    text: str
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    after_seq: int
    limit: int
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Escalate:
    reason: str | None


@dataclass(frozen=True, slots=True)
class Typing:
    active: bool
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Read:
    seq: int
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class Ping:
    id: Any


@dataclass(frozen=True, slots=True)
class StaffAction:
    """``claim``, ``release``, ``resolve``, ``watch`` or ``unwatch``."""

    action: Literal["claim", "release", "resolve", "watch", "unwatch"]
    conversation_id: str


ClientFrame: TypeAlias = (
    Hello | SendMessage | HistoryRequest | Escalate | Typing | Read | Ping | StaffAction
)

STAFF_ONLY_TYPES: Final = frozenset({"claim", "release", "resolve", "watch", "unwatch"})
CLIENT_TYPES: Final = frozenset(
    {"hello", "message", "history", "escalate", "typing", "read", "ping"} | STAFF_ONLY_TYPES
)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


# Built once: json.loads and json.dumps with options build a new decoder or encoder
# per call, a tenth of the cost of parsing a chat frame.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _loads(raw: str) -> Any:
    try:
        return _DECODER.decode(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity and huge ints
        # (int_max_str_digits); RecursionError is absurd nesting.
        raise ProtocolError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None


class _Fields:
    """Typed access to a frame's fields, raising ``bad_message`` with a clear reason."""

    __slots__ = ("obj", "ref", "type")

    def __init__(self, obj: dict[str, Any], frame_type: str) -> None:
        self.obj = obj
        self.type = frame_type
        self.ref: str | None = frame_type

    def bad(self, why: str, code: str = ErrorCode.BAD_MESSAGE) -> ProtocolError:
        return ProtocolError(code, f"{self.type}: {why}", self.ref)

    def string(self, name: str, *, optional: bool = False) -> str | None:
        value = self.obj.get(name)
        if value is None:
            if optional:
                return None
            raise self.bad(f"field {name!r} is required and must be a string")
        if not isinstance(value, str):
            raise self.bad(f"field {name!r} must be a string")
        return value

    def integer(self, name: str, *, optional: bool = False) -> int | None:
        value = self.obj.get(name)
        if value is None and optional:
            return None
        # bool is a subclass of int in Python; the contract says booleans are not integers.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(f"field {name!r} must be an integer")
        # Beyond what SQLite stores (its OverflowError cost the frame a traceback): no
        # sequence number or limit is ever that large.
        if not -MAX_INTEGER_FIELD <= value <= MAX_INTEGER_FIELD:
            raise self.bad(f"field {name!r} is out of range")
        return value

    def boolean(self, name: str) -> bool:
        value = self.obj.get(name)
        if not isinstance(value, bool):
            raise self.bad(f"field {name!r} must be true or false")
        return value

    def identifier(self, name: str, *, optional: bool = False) -> str | None:
        value = self.string(name, optional=optional)
        if value is not None and not _ID_RE.match(value):
            raise self.bad(f"field {name!r} may only use A-Z a-z 0-9 . _ -")
        return value


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Parse one WebSocket message from a client.

    Needs the message as received: ``str`` for a text frame, ``bytes`` for a binary one.
    Returns a frame object. Raises :class:`ProtocolError` with the contract's code:
    ``bad_json`` (binary frame, not JSON, NaN, absurd nesting or number size),
    ``bad_message`` (not an object, no ``type``, missing or ill-typed field),
    ``unknown_type``, or ``too_large`` (``text`` over 4000, ``client_msg_id`` over 64).
    """
    if isinstance(raw, bytes | bytearray):
        raise ProtocolError(ErrorCode.BAD_JSON, "binary frames are not allowed; send JSON text")
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a frame must be a JSON object")
    frame_type = obj.get("type")
    if not isinstance(frame_type, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a frame needs a string field 'type'")
    parser = _PARSERS.get(frame_type)
    if parser is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame_type[:40]!r}", frame_type[:64]
        )
    return parser(_Fields(obj, frame_type))


# C0 controls (ESC among them), DEL and C1 controls: in a name shown to staff they
# could drive a terminal (clear it, retitle it, fake lines). A name is cosmetic, so they
# are dropped rather than the hello refused.
_NAME_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def _parse_hello(f: _Fields) -> Hello:
    token = f.string("token", optional=True)
    name = f.string("name", optional=True)
    if name is not None:
        name = _NAME_CONTROLS.sub("", name).strip()[:80] or None
    room = f.string("room", optional=True)
    if room is not None:
        room = _NAME_CONTROLS.sub("", room).strip()[:MAX_ROOM_CHARS] or None
    resolved = f.boolean("resolved") if "resolved" in f.obj else False
    return Hello(token=token, name=name, room=room, resolved=resolved)


def _parse_message(f: _Fields) -> SendMessage:
    cmid = f.obj.get("client_msg_id")
    if isinstance(cmid, str) and cmid:
        f.ref = cmid[:MAX_CLIENT_MSG_ID]
    cmid = f.string("client_msg_id")
    text = f.string("text")
    conversation_id = f.identifier("conversation_id", optional=True)
    assert cmid is not None and text is not None
    if len(cmid) > MAX_CLIENT_MSG_ID:
        raise f.bad(f"client_msg_id is over {MAX_CLIENT_MSG_ID} characters", ErrorCode.TOO_LARGE)
    if not _ID_RE.match(cmid):
        raise f.bad("client_msg_id may only use A-Z a-z 0-9 . _ - (1 to 64 characters)")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise f.bad(f"text is over {MAX_TEXT} characters", ErrorCode.TOO_LARGE)
    if not text:
        raise f.bad("text is empty")
    return SendMessage(client_msg_id=cmid, text=text, conversation_id=conversation_id)


def _parse_history(f: _Fields) -> HistoryRequest:
    after_seq = f.integer("after_seq")
    limit = f.integer("limit", optional=True)
    assert after_seq is not None
    if after_seq < 0:
        raise f.bad("after_seq must be 0 or more")
    if limit is None:
        limit = DEFAULT_HISTORY_LIMIT
    elif limit < 1:
        raise f.bad("limit must be 1 or more")
    return HistoryRequest(
        after_seq=after_seq,
        limit=min(limit, MAX_HISTORY_LIMIT),
        conversation_id=f.identifier("conversation_id", optional=True),
    )


def _parse_escalate(f: _Fields) -> Escalate:
    reason = f.string("reason", optional=True)
    return Escalate(reason=reason.strip()[:500] or None if reason else None)


def _parse_typing(f: _Fields) -> Typing:
    return Typing(
        active=f.boolean("active"), conversation_id=f.identifier("conversation_id", optional=True)
    )


def _parse_read(f: _Fields) -> Read:
    seq = f.integer("seq")
    assert seq is not None
    if seq < 0:
        raise f.bad("seq must be 0 or more")
    return Read(seq=seq, conversation_id=f.identifier("conversation_id", optional=True))


def _parse_ping(f: _Fields) -> Ping:
    return Ping(id=f.obj.get("id"))


def _parse_staff_action(f: _Fields) -> StaffAction:
    conversation_id = f.identifier("conversation_id")
    assert conversation_id is not None
    return StaffAction(action=f.type, conversation_id=conversation_id)  # type: ignore[arg-type]


_PARSERS: Final[dict[str, Callable[[_Fields], ClientFrame]]] = {
    "hello": _parse_hello,
    "message": _parse_message,
    "history": _parse_history,
    "escalate": _parse_escalate,
    "typing": _parse_typing,
    "read": _parse_read,
    "ping": _parse_ping,
    **dict.fromkeys(STAFF_ONLY_TYPES, _parse_staff_action),
}


# ------------------------------------------------------------------ server frames


@dataclass(frozen=True, slots=True)
class Message:
    """A stored chat message, as every party sees it."""

    seq: int
    conversation_id: str
    sender: str
    author: str | None
    text: str
    ts: str
    client_msg_id: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "conversation_id": self.conversation_id,
            "sender": self.sender,
            "author": self.author,
            "text": self.text,
            "ts": self.ts,
            "client_msg_id": self.client_msg_id,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Message:
        """Build from a ``message`` frame or a ``history`` entry; raises ``ProtocolError``."""
        try:
            seq = obj["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise TypeError("seq")
            return cls(
                seq=seq,
                conversation_id=str(obj["conversation_id"]),
                sender=str(obj["sender"]),
                author=None if obj.get("author") is None else str(obj["author"]),
                text=str(obj["text"]),
                ts=str(obj["ts"]),
                client_msg_id=None
                if obj.get("client_msg_id") is None
                else str(obj["client_msg_id"]),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"malformed message object: {exc}") from None


def encode(obj: dict[str, Any]) -> str:
    """Serialize one frame compactly (UTF-8 text, no NaN)."""
    return _ENCODER.encode(obj)


# A JSON string (the encoder's own escaping, as inside any frame it encodes).
_string: Final = _ENCODER.encode


def _string_or_null(value: str | None) -> str:
    return "null" if value is None else _string(value)


_SENDERS: Final = {sender: _string(sender) for sender in get_args(Sender)}  # encoded once


# The two frames of every chat message (its ack, and its push to each party) are
# written out field by field: encoding a dict built for the purpose cost four times as
# much (1.8 against 0.4 us an ack). The bytes are encode()'s, key for key
# (tests/core/test_protocol.py holds them to it).
def message_frame(message: Message) -> str:
    sender = _SENDERS.get(message.sender) or _string(message.sender)
    return (
        f'{{"type":"message","seq":{message.seq:d},'
        f'"conversation_id":{_string(message.conversation_id)},'
        f'"sender":{sender},"author":{_string_or_null(message.author)},'
        f'"text":{_string(message.text)},"ts":{_string(message.ts)},'
        f'"client_msg_id":{_string_or_null(message.client_msg_id)}}}'
    )


def ack_frame(message: Message) -> str:
    return (
        f'{{"type":"ack","client_msg_id":{_string_or_null(message.client_msg_id)},'
        f'"seq":{message.seq:d},"conversation_id":{_string(message.conversation_id)},'
        f'"ts":{_string(message.ts)}}}'
    )


def error_frame(
    code: str, message: str, ref: str | None = None, retry_after_ms: int | None = None
) -> str:
    obj: dict[str, Any] = {"type": "error", "code": code, "message": message, "ref": ref}
    if retry_after_ms is not None:
        obj["retry_after_ms"] = retry_after_ms
    return encode(obj)


def status_frame(conversation_id: str, status: Status, assigned_to: str | None) -> str:
    return encode(
        {
            "type": "status",
            "conversation_id": conversation_id,
            "status": status,
            "assigned_to": assigned_to,
        }
    )


# The concierge's typing on and off go out with every answer, the same two frames per
# conversation: encoded once while the conversation is busy (frames are immutable).
@functools.lru_cache(maxsize=4096)
def typing_frame(conversation_id: str, sender: Sender, active: bool) -> str:
    return encode(
        {"type": "typing", "conversation_id": conversation_id, "sender": sender, "active": active}
    )


def draft_frame(conversation_id: str, text: str) -> str:
    """The concierge's answer so far (an extension: clients that do not know ``draft``
    ignore it and get the same answer as one ``message`` when it is stored)."""
    return encode(
        {"type": "draft", "conversation_id": conversation_id, "sender": "ai", "text": text}
    )


def read_frame(conversation_id: str, reader: Reader, seq: int) -> str:
    return encode(
        {"type": "read", "conversation_id": conversation_id, "reader": reader, "seq": seq}
    )


def pong_frame(ping_id: Any, at: float | None = None) -> str:
    """The answer to a ``ping``; ``at`` is the POSIX time (default: now)."""
    return encode({"type": "pong", "id": ping_id, "ts": format_ts(at)})


def reconnect_frame(after_ms: int, reason: str) -> str:
    return encode({"type": "reconnect", "after_ms": after_ms, "reason": reason})


def history_frame(
    conversation_id: str,
    messages: list[Message],
    last_seq: int,
    *,
    full_page: bool = True,
    budget: int | None = None,
) -> str:
    """Build a ``history`` reply, cutting the list short to stay under 1 MiB.

    ``messages`` must be in ascending ``seq`` order. ``has_more`` is true when the
    list was cut (by size, or because storage returned a ``full_page`` at the caller's
    limit) and older-than-``last_seq`` messages remain to fetch. A short page is the
    whole history as of its read: a message committed after the read is not "more" but
    news, which reaches subscribers live (``last_seq`` still counts it).
    """
    budget = MAX_SERVER_FRAME_BYTES - 4096 if budget is None else budget
    kept: list[dict[str, Any]] = []
    used = 0
    for message in messages:
        wire = message.to_wire()
        # Bytes of UTF-8, not characters: the limit is on what crosses the network.
        size = len(encode(wire).encode()) + 1
        if kept and used + size > budget:
            break
        kept.append(wire)
        used += size
    newest = kept[-1]["seq"] if kept else None
    cut = len(kept) < len(messages) or full_page
    has_more = cut and newest is not None and newest < last_seq
    return encode(
        {
            "type": "history",
            "conversation_id": conversation_id,
            "messages": kept,
            "last_seq": last_seq,
            "has_more": has_more,
        }
    )
