"""The mock server: the real server's session core on memory, with faults on demand.

It is :class:`~trio_chat.ChatServer` itself (the same hub, the same frames and system
messages, over real WebSockets) with three differences: storage is the memory
backend (nothing touches disk; Trio's ``MockClock`` can jump freely), the concierge
answers from a small script of canned replies (or any responder you give it, the rules
concierge included), and a scripted staff member claims every conversation handed over
and greets the guest. Faults (drops, refusals, closes, reconnect hints, slow or missing
acks) are methods to call at any time.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..core import client_protocol as wire
from ..core import protocol as proto
from ..core.protocol import CloseCode, Message
from ..server._concierge import Responder, ResponderReply, ResponderRequest
from ..server._connection import Connection
from ..server._server import ChatServer, ServerConfig
from ..server._store_memory import MemoryBackend

__all__ = ["CannedReply", "MockServer", "ScriptedResponder"]


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


class ScriptedResponder:
    """A :class:`~trio_chat.Responder` answering from :class:`CannedReply` patterns, the
    first match wins; after ``delay`` seconds."""

    history_window = 0

    def __init__(self, replies: Sequence[CannedReply] = DEFAULT_REPLIES, delay: float = 0.0):
        self.replies = [(re.compile(r.pattern, re.IGNORECASE), r) for r in replies]
        self.delay = delay

    async def respond(self, request: ResponderRequest) -> ResponderReply:
        await trio.sleep(self.delay)
        for pattern, reply in self.replies:
            if pattern.search(request.text):
                return ResponderReply(reply.text, reply.escalate)
        return ResponderReply("I'm not sure; let me ask a colleague.", escalate=True)


class _Console:
    """The scripted staff member's console: a session with no socket. It watches the
    staff room and claims (then greets) every conversation that starts waiting."""

    def __init__(self, mock: MockServer, session_id: int) -> None:
        self.mock = mock
        self.session_id = session_id
        self.ping_in_flight = True  # no heartbeat for a session without a socket
        self.close_code: int | None = None
        self.claimed: set[str] = set()
        self._greeting_ids = itertools.count(1)

    def deliver_all(self, frames: Sequence[str]) -> None:
        for raw in frames:
            self.deliver(raw)

    def deliver(self, raw: str) -> None:
        frame = wire.parse_server_frame(raw)
        if isinstance(frame, wire.Queue):
            for summary in frame.conversations:
                self._consider(summary)
        elif isinstance(frame, wire.ConversationChanged):
            self._consider(frame.summary)
        elif isinstance(frame, wire.Subscribed) and frame.conversation_id in self.claimed:
            self.mock._spawn(self._greet, frame.conversation_id)

    def request_close(self, code: int, reason: str) -> None:
        self.close_code = code

    # No socket: nothing is ever held for it, and whatever it is sent is written.
    queued_bytes = 0

    def report_written(self) -> None:
        self.mock.server.written(self.session_id)

    def _consider(self, summary: wire.ConversationSummary) -> None:
        cid = summary.conversation_id
        if summary.status == "waiting" and cid not in self.claimed:
            self.claimed.add(cid)
            self.mock._spawn(self._claim, cid)

    async def _claim(self, conversation_id: str) -> None:
        await trio.sleep(self.mock.staff_delay)
        await self.mock._feed(self.session_id, wire.staff_action_frame("claim", conversation_id))

    async def _greet(self, conversation_id: str) -> None:
        self.claimed.discard(conversation_id)  # a later hand-off is claimed again
        greeting = wire.message_request(
            f"greeting-{next(self._greeting_ids)}", self.mock.staff_greeting, conversation_id
        )
        await self.mock._feed(self.session_id, greeting)


class _MockShell(ChatServer):
    """The server with the mock's faults wired into its shell."""

    def __init__(self, mock: MockServer, config: ServerConfig, responder: Responder | None):
        super().__init__(config, responder=responder, storage=mock.backend)
        self.mock = mock

    def _admit(self, conn: Connection) -> bool:
        self.mock.attempts.append(trio.current_time())
        if self.mock.refusing:
            conn.deliver(proto.reconnect_frame(1000, "busy"))
            conn.request_close(CloseCode.TRY_LATER, "busy")
            return False
        return True

    def _deliver(self, session_id: int, frames: Sequence[str]) -> None:
        kept = []
        for frame in frames:
            if frame.startswith('{"type":"ack"'):
                if self.mock.acks_withheld:
                    continue
                if self.mock.ack_delay > 0:
                    self.mock._spawn(self._late, session_id, frame, self.mock.ack_delay)
                    continue
            kept.append(frame)
        if kept:
            super()._deliver(session_id, kept)

    async def _late(self, session_id: int, frame: str, delay: float) -> None:
        await trio.sleep(delay)
        super()._deliver(session_id, (frame,))


class MockServer:
    """A protocol-v1 server for tests and experiments: the real session core, in memory.

    ``replies`` choose the concierge's answer by message content (``concierge``, any
    :class:`~trio_chat.Responder`, replaces them: the rules concierge, say); when one
    escalates, a mock staff member (``staff_name``, unless ``scripted_staff`` is off)
    claims after ``staff_delay`` seconds and says ``staff_greeting``. Faults, at any
    time: :meth:`drop_all`, :meth:`refuse`, :meth:`close_all`, :meth:`delay_acks`,
    :meth:`withhold_acks`, :meth:`send_reconnect`. :attr:`attempts` records the Trio
    time of every connection attempt.

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
        concierge: Responder | None = None,
        scripted_staff: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        typing_delay: float = 0.0,
    ) -> None:
        self.backend = MemoryBackend()
        self.staff_name = staff_name
        self.staff_delay = staff_delay
        self.staff_greeting = staff_greeting
        self.scripted_staff = scripted_staff
        self.attempts: list[float] = []
        self.refusing = False
        self.ack_delay = 0.0
        self.acks_withheld = False
        self.server = _MockShell(
            self,
            ServerConfig(
                host=host,
                port=port,
                heartbeat=heartbeat,
                typing_delay=typing_delay,
                concierge="off",
                seed=0,
            ),
            concierge if concierge is not None else ScriptedResponder(replies, reply_delay),
        )
        self._nursery: trio.Nursery | None = None
        self._console: _Console | None = None

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # -- faults ---------------------------------------------------------------------

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once with 1013 ("try later")."""
        self.refusing = refusing

    def drop_all(self) -> None:
        """Drop every connection without a close frame (as a network failure would)."""
        for conn in self._sockets():
            conn.drop()

    def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "closing") -> None:
        """Close every connection with ``code``."""
        for conn in self._sockets():
            conn.request_close(code, reason)

    def send_reconnect(
        self, after_ms: int, reason: str = "restart", code: int = CloseCode.RESTARTING
    ) -> None:
        """Send every client a ``reconnect`` hint, then close with ``code``."""
        for conn in self._sockets():
            conn.deliver(proto.reconnect_frame(after_ms, reason))
            conn.request_close(code, reason)

    def delay_acks(self, seconds: float) -> None:
        """Hold every ack for ``seconds`` (the push of the message is not held)."""
        self.ack_delay = seconds

    def withhold_acks(self, withheld: bool = True) -> None:
        """Store messages but never acknowledge them (until a retry after a reconnect)."""
        self.acks_withheld = withheld

    def history_of(self, token: str) -> list[Message]:
        """A guest's stored conversation, by their token. Raises ``KeyError``."""
        verified = self.server.hub.signer.verify(token)
        row = self.backend.conversation_of_guest(verified[1]) if verified else None
        if row is None:
            raise KeyError(token)
        return self.backend.history(row.conversation_id, 0, row.last_seq)

    def add_staff(self, name: str) -> str:
        """Add a staff member; returns their token."""
        member = self.backend.add_staff(name)
        return self.server.hub.signer.issue("s", member.staff_id)

    # -- serving ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            port = await nursery.start(self.server.run)
            if self.scripted_staff:
                await self._start_console()
            task_status.started(port)

    def _sockets(self) -> list[Connection]:
        return [c for c in self.server.connections.values() if isinstance(c, Connection)]

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _start_console(self) -> None:
        server = self.server
        session_id = next(server._sessions)
        self._console = _Console(self, session_id)
        server.connections[session_id] = self._console  # type: ignore[assignment]
        server.hub.opened(session_id)
        await self._feed(session_id, wire.hello_frame(self.add_staff(self.staff_name)))

    async def _feed(self, session_id: int, frame: str) -> None:
        server = self.server
        actions = server.hub.frame(session_id, frame, *server._clock())
        await server._perform(actions, None)
