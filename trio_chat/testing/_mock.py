"""An in-process mock of the chat server, with scripted replies and injectable faults.

It speaks protocol v1 through the same codec as the real server (``trio_chat._protocol``)
but keeps everything in memory and answers from a small script, so a client can be
exercised, and broken on purpose, without SQLite, a concierge or a subprocess.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from .. import _protocol as proto
from .._errors import ProtocolError
from .._protocol import CloseCode, ErrorCode, Message

__all__ = ["CannedReply", "MockServer"]


@dataclass(frozen=True)
class CannedReply:
    """When a guest message matches ``pattern`` (a regular expression, case-insensitive),
    the mock answers ``text``; ``escalate`` hands the conversation to the mock staff."""

    pattern: str
    text: str
    escalate: bool = False


DEFAULT_REPLIES: tuple[CannedReply, ...] = (
    CannedReply(
        r"\b(person|human|staff|manager|someone)\b",
        "Of course, I'm bringing in a member of our team.",
        escalate=True,
    ),
    CannedReply(
        r"\b(terrible|unacceptable|awful|refund)\b",
        "I'm so sorry. A member of our team will help you personally.",
        escalate=True,
    ),
    CannedReply(r"breakfast", "Breakfast is served from 6:30 to 10:30."),
    CannedReply(r"wi-?fi|internet", "The Wi-Fi network is Mock-Guest; no password needed."),
    CannedReply(r"check.?out", "Check-out is by 11 am."),
    CannedReply(r"check.?in", "Check-in is from 3 pm."),
    CannedReply(r".", "I'm the mock concierge. I can talk about breakfast, Wi-Fi and check-in."),
)


@dataclass
class _Conversation:
    conversation_id: str
    guest_id: str
    token: str
    messages: list[Message] = field(default_factory=list)
    status: str = "ai"
    assigned_to: str | None = None
    by_client_id: dict[tuple[str, str], Message] = field(default_factory=dict)
    subscribers: set[trio_websocket.WebSocketConnection] = field(default_factory=set)


class MockServer:
    """A scripted protocol-v1 server for tests and experiments.

    ``replies`` choose the concierge's answer by message content; when one escalates,
    a mock staff member (``staff_name``) joins after ``staff_delay`` seconds and says
    ``staff_greeting``. Faults, at any time: :meth:`drop_all`, :meth:`refuse`,
    :meth:`close_all`, :meth:`delay_acks`, :meth:`withhold_acks`, :meth:`send_reconnect`.
    :attr:`attempts` records the Trio time of every connection attempt.

    Start with ``port = await nursery.start(mock.run)``; ``url`` is then set.
    """

    def __init__(
        self,
        *,
        replies: Sequence[CannedReply] = DEFAULT_REPLIES,
        staff_name: str = "Sam",
        staff_delay: float = 1.0,
        staff_greeting: str = "Hi, Sam from the front desk here. How can I help?",
        heartbeat: float = 0.0,
        reply_delay: float = 0.0,
    ) -> None:
        self.replies = [(re.compile(r.pattern, re.IGNORECASE), r) for r in replies]
        self.staff_name = staff_name
        self.staff_delay = staff_delay
        self.staff_greeting = staff_greeting
        self.heartbeat = heartbeat
        self.reply_delay = reply_delay
        self.port: int | None = None
        self.attempts: list[float] = []
        self.conversations: dict[str, _Conversation] = {}
        self.refusing = False
        self.ack_delay = 0.0
        self.acks_withheld = False
        self._connections: dict[trio_websocket.WebSocketConnection, trio.CancelScope] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # -- faults ---------------------------------------------------------------------

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once with 1013 ("try later")."""
        self.refusing = refusing

    def drop_all(self) -> None:
        """Drop every connection without a close frame (as a network failure would)."""
        for scope in list(self._connections.values()):
            scope.cancel()

    def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "closing") -> None:
        """Close every connection with ``code``."""
        for ws in list(self._connections):
            self._spawn(ws.aclose, code, reason)

    def send_reconnect(
        self, after_ms: int, reason: str = "restart", code: int = CloseCode.RESTARTING
    ) -> None:
        """Send every client a ``reconnect`` hint, then close with ``code``."""
        for ws in list(self._connections):
            self._spawn(self._hint_then_close, ws, after_ms, reason, code)

    def delay_acks(self, seconds: float) -> None:
        """Hold every ack (and the push that follows) for ``seconds``."""
        self.ack_delay = seconds

    def withhold_acks(self, withheld: bool = True) -> None:
        """Store messages but never acknowledge them (until a retry after a reconnect)."""
        self.acks_withheld = withheld

    def history_of(self, token: str) -> list[Message]:
        """A guest's stored conversation, by their token."""
        for conversation in self.conversations.values():
            if conversation.token == token:
                return list(conversation.messages)
        raise KeyError(token)

    # -- serving ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            server = await nursery.start(
                lambda task_status: trio_websocket.serve_websocket(
                    self._handle,
                    "127.0.0.1",
                    0,
                    ssl_context=None,
                    handler_nursery=nursery,
                    task_status=task_status,
                )
            )
            self.port = server.port
            task_status.started(self.port)

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _hint_then_close(
        self, ws: trio_websocket.WebSocketConnection, after_ms: int, reason: str, code: int
    ) -> None:
        try:
            await ws.send_message(proto.reconnect_frame(after_ms, reason))
            await ws.aclose(code, reason)
        except trio_websocket.ConnectionClosed:
            pass

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.attempts.append(trio.current_time())
        ws = await request.accept()
        if self.refusing:
            await ws.send_message(proto.reconnect_frame(1000, "busy"))
            await ws.aclose(CloseCode.TRY_LATER, "busy")
            return
        with trio.CancelScope() as scope:
            self._connections[ws] = scope
            conversation: _Conversation | None = None
            try:
                conversation = await self._hello(ws)
                if conversation is None:
                    return
                while True:
                    await self._frame(ws, conversation, await ws.get_message())
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                self._connections.pop(ws, None)
                if conversation is not None:
                    conversation.subscribers.discard(ws)
        if scope.cancelled_caught:
            # A dropped connection: close the socket without the close handshake.
            with trio.move_on_after(0):
                await ws.aclose()

    async def _hello(self, ws: trio_websocket.WebSocketConnection) -> _Conversation | None:
        frame = proto.parse_client_frame(await ws.get_message())
        if not isinstance(frame, proto.Hello):
            await ws.send_message(proto.error_frame(ErrorCode.AUTH_REQUIRED, "hello first"))
            await ws.aclose(CloseCode.AUTH_FAILED)
            return None
        if frame.token is None:
            n = next(self._ids)
            conversation = _Conversation(f"c_mock{n}", f"g_mock{n}", f"g.mock{n}.token")
            self.conversations[conversation.conversation_id] = conversation
        else:
            found = [c for c in self.conversations.values() if c.token == frame.token]
            if not found:
                await ws.send_message(
                    proto.error_frame(ErrorCode.AUTH_FAILED, "unknown token", "hello")
                )
                await ws.aclose(CloseCode.AUTH_FAILED)
                return None
            conversation = found[0]
        conversation.subscribers.add(ws)
        await ws.send_message(
            proto.encode(
                {
                    "type": "welcome",
                    "role": "guest",
                    "token": conversation.token,
                    "guest_id": conversation.guest_id,
                    "conversation_id": conversation.conversation_id,
                    "status": conversation.status,
                    "last_seq": len(conversation.messages),
                    "read_seq": 0,
                    "heartbeat_s": self.heartbeat,
                    "server": "trio-chat-mock/1",
                }
            )
        )
        if conversation.status != "ai":
            await ws.send_message(
                proto.status_frame(
                    conversation.conversation_id, conversation.status, conversation.assigned_to
                )
            )
        return conversation

    async def _frame(
        self, ws: trio_websocket.WebSocketConnection, conversation: _Conversation, raw: str | bytes
    ) -> None:
        try:
            frame = proto.parse_client_frame(raw)
        except ProtocolError as exc:
            await ws.send_message(proto.error_frame(exc.code, exc.message, exc.ref))
            return
        cid = conversation.conversation_id
        if isinstance(frame, proto.SendMessage):
            await self._guest_message(ws, conversation, frame)
        elif isinstance(frame, proto.HistoryRequest):
            after = [m for m in conversation.messages if m.seq > frame.after_seq][: frame.limit]
            await ws.send_message(proto.history_frame(cid, after, len(conversation.messages)))
        elif isinstance(frame, proto.Ping):
            await ws.send_message(proto.pong_frame(frame.id))
        elif isinstance(frame, proto.Escalate):
            await self._escalate(conversation)
        elif isinstance(frame, proto.Typing | proto.Read):
            pass  # no other party to relay to
        else:
            await ws.send_message(
                proto.error_frame(
                    ErrorCode.FORBIDDEN, "not for guests", type(frame).__name__.lower()
                )
            )

    async def _store(
        self,
        conversation: _Conversation,
        sender: str,
        author: str | None,
        text: str,
        client_msg_id: str | None = None,
    ) -> Message:
        message = Message(
            len(conversation.messages) + 1,
            conversation.conversation_id,
            sender,
            author,
            text,
            proto.format_ts(),
            client_msg_id,
        )
        conversation.messages.append(message)
        return message

    async def _push(self, conversation: _Conversation, frame: str) -> None:
        for subscriber in list(conversation.subscribers):
            try:
                await subscriber.send_message(frame)
            except trio_websocket.ConnectionClosed:
                conversation.subscribers.discard(subscriber)

    async def _guest_message(
        self,
        ws: trio_websocket.WebSocketConnection,
        conversation: _Conversation,
        frame: proto.SendMessage,
    ) -> None:
        key = (conversation.guest_id, frame.client_msg_id)
        original = conversation.by_client_id.get(key)
        if original is not None:  # a retry: the original ack, nothing pushed
            await ws.send_message(proto.ack_frame(original))
            return
        message = await self._store(
            conversation, "guest", conversation.guest_id, frame.text, frame.client_msg_id
        )
        conversation.by_client_id[key] = message
        if self.acks_withheld:
            return
        if self.ack_delay:
            await trio.sleep(self.ack_delay)
        await ws.send_message(proto.ack_frame(message))
        await self._push(conversation, proto.message_frame(message))
        if conversation.status == "ai":
            self._spawn(self._reply, conversation, frame.text)

    async def _reply(self, conversation: _Conversation, text: str) -> None:
        cid = conversation.conversation_id
        await self._push(conversation, proto.typing_frame(cid, "ai", True))
        await trio.sleep(self.reply_delay)
        reply = next(r for pattern, r in self.replies if pattern.search(text))
        message = await self._store(conversation, "ai", "concierge", reply.text)
        await self._push(conversation, proto.message_frame(message))
        await self._push(conversation, proto.typing_frame(cid, "ai", False))
        if reply.escalate:
            await self._escalate(conversation)

    async def _escalate(self, conversation: _Conversation) -> None:
        if conversation.status in ("waiting", "staff"):
            return
        await self._set_status(
            conversation, "waiting", None, "A member of our team will be with you shortly."
        )
        self._spawn(self._staff_joins, conversation)

    async def _staff_joins(self, conversation: _Conversation) -> None:
        await trio.sleep(self.staff_delay)
        await self._set_status(
            conversation,
            "staff",
            self.staff_name,
            f"{self.staff_name} from our team has joined the conversation.",
        )
        message = await self._store(conversation, "staff", self.staff_name, self.staff_greeting)
        await self._push(conversation, proto.message_frame(message))

    async def _set_status(
        self, conversation: _Conversation, status: str, assigned_to: str | None, text: str
    ) -> None:
        conversation.status, conversation.assigned_to = status, assigned_to
        message = await self._store(conversation, "system", None, text)
        await self._push(conversation, proto.message_frame(message))
        await self._push(
            conversation, proto.status_frame(conversation.conversation_id, status, assigned_to)
        )
