"""The Trio guest-chat server: one port, protocol v1, durable history.

Task tree (every task has an owner that outlives it)::

    ChatServer.run
    ├── Store.run                        the one database writer (group commit)
    └── work nursery
        ├── accept loop (trio.serve_listeners)
        ├── heartbeat sweeper            one task pings every connection
        ├── background tasks             concierge replies, reopen-after-resolve
        └── one nursery per TCP connection
            ├── HTTP front / our reader loop   (one reader per connection)
            ├── trio-websocket's socket reader
            ├── writer (only while the socket cannot take the outbox at once)
            └── a heartbeat ping (only while one is in flight)

Everything that must follow a commit (the ack, the pushes, scheduling the concierge)
runs in the operation's ``on_commit`` callback, in the store's writer task, so it
happens exactly once and in ``seq`` order whatever becomes of the connection that
asked for it.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import random
import struct
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import trio
import trio_websocket
import wsproto.events
import wsproto.utilities
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

from . import _protocol as proto
from ._concierge import Responder, ResponderReply, ResponderRequest, RulesResponder
from ._conversation import ConversationState, apply_event
from ._errors import ConnectionLost, ProtocolError, StorageError
from ._http import HttpFront, PrefixStream, json_response, static_response, text_response
from ._protocol import CloseCode, ErrorCode, Message
from ._ratelimit import TokenBucket
from ._store import Appended, AppendMessage, ConversationRow, CreateGuest, Database, SetRead, Store
from ._tokens import TokenSigner
from ._version import __version__

__all__ = ["ChatServer", "ServerConfig"]

log = logging.getLogger("trio_chat.server")

SERVER_NAME: Final = f"trio-chat/{__version__}"
BAD_FRAME_LIMIT: Final = 20
FLOOD_CLOSE_AFTER: Final = 10.0
FLOOD_QUIET: Final = 1.0  # seconds without a refusal that end a flood


@dataclass
class ServerConfig:
    """Everything ``trio-chat serve`` can set. Times are in seconds."""

    db_path: str | Path = "trio-chat.db"
    host: str = "127.0.0.1"
    port: int = 8765
    hello_timeout: float = 10.0
    heartbeat: float = 20.0
    concierge: str = "rules"  # "rules" or "off"
    rate_limit: float = 10.0  # messages per second per connection; 0 = off
    rate_burst: int = 20
    open_registration: bool = True
    max_frame_bytes: int = proto.MAX_FRAME_BYTES
    outbox_limit: int = 256  # frames queued for one connection before it is cut off
    handshake_timeout: float = 10.0
    close_timeout: float = 2.0
    # A restart's reconnect.after_ms: the window opens once this process is likely gone
    # and its successor listening, then spreads the crowd at about the rate a server
    # takes reconnections (storm benchmark, 4,000 guests on two cores).
    restart_delay: float = 0.25  # a new process's start, after this one is gone
    drain_per_connection: float = 0.00075  # this process's shutdown, per connection
    shutdown_spread: float = 3.0  # the window is at least this long,
    shutdown_spread_per_connection: float = 0.0015  # and at least this much per connection
    shutdown_grace: float = 5.0  # how long shutdown waits for in-flight work
    typing_delay: float = 0.3  # how long the concierge "types" before answering
    responder_timeout: float = 30.0
    synchronous: str = "FULL"
    backlog: int = 4096
    seed: int | None = None  # for the shutdown spread; None = random


WRITE_BATCH: Final = 64


def text_frame(text: str) -> bytes:
    """One whole text frame as a server sends it: unmasked, no extension (RFC 6455 5.2).

    The same bytes as ``wsproto``'s ``send(TextMessage(text))`` for a connection that
    negotiated no extension, which ours never do (``accept()`` offers none), for a
    fraction of the cost: wsproto's took 6 % of the server's time per message.
    """
    payload = text.encode()
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 0x10000:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


def _serialize(ws: WebSocketConnection, frames: Iterable[str]) -> bytes:
    """The wire bytes of text frames; raises ``ConnectionClosed`` once a close began."""
    if ws._close_reason is not None:
        raise ConnectionClosed(ws._close_reason)
    if ws._wsproto.state != ConnectionState.OPEN:
        # Let wsproto say what may still be sent.
        return b"".join([ws._wsproto.send(wsproto.events.TextMessage(data=f)) for f in frames])
    return b"".join([text_frame(f) for f in frames])


async def send_frames(ws: WebSocketConnection, frames: Iterable[str]) -> None:
    """Send text frames with one socket write.

    trio-websocket (pinned below 0.13) sends one frame per write and has no batch API;
    this mirrors its ``WebSocketConnection._send`` for several frames at once: same
    lock, same error translation. Raises ``ConnectionClosed``.
    """
    data = _serialize(ws, frames)
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None


async def close_without_reply(ws: WebSocketConnection, code: int, reason: str | None) -> None:
    """Send a close frame, then close the TCP connection without waiting for the peer's
    close frame (RFC 6455 allows it; the peer has everything we sent before our FIN).

    Mirrors trio-websocket's ``WebSocketConnection._aclose`` (pinned below 0.13) minus
    its wait for the closing handshake. Never raises for a connection already gone.
    """
    if ws._close_reason is None and ws._wsproto.state == ConnectionState.OPEN:
        ws._close_reason = trio_websocket.CloseReason(code, reason)
        data = ws._wsproto.send(wsproto.events.CloseConnection(code=code, reason=reason))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with ws._stream_lock:
                await ws._stream.send_all(data)
    await ws._close_stream()


# --------------------------------------------------------------------- live state


class Conversation:
    """The live view of one conversation, while anyone is subscribed or working on it."""

    __slots__ = (
        "assigned_name",
        "assigned_to",
        "busy",
        "concierge_lock",
        "conversation_id",
        "guest_connections",
        "guest_id",
        "guest_name",
        "last_seq",
        "lock",
        "preview",
        "read_seq",
        "status",
        "subscribers",
        "updated_ts",
    )

    def __init__(self, row: ConversationRow) -> None:
        self.conversation_id = row.conversation_id
        self.guest_id = row.guest_id
        self.guest_name = row.guest_name
        self.status = row.status
        self.assigned_to = row.assigned_staff_id
        self.assigned_name = row.assigned_name
        self.last_seq = row.last_seq
        self.read_seq = row.read_seq
        self.updated_ts = row.updated_ts
        self.preview = row.preview
        self.subscribers: set[Connection] = set()
        self.guest_connections = 0
        self.busy = 0  # tasks and queued writes that still need this object
        # Created on first use: most idle guests never need them.
        self.lock: trio.Lock | None = None
        self.concierge_lock: trio.Lock | None = None

    @property
    def state(self) -> ConversationState:
        return ConversationState(self.status, self.assigned_to, self.assigned_name)

    def transition_lock(self) -> trio.Lock:
        if self.lock is None:
            self.lock = trio.Lock()
        return self.lock

    def summary(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "guest_id": self.guest_id,
            "guest_name": self.guest_name,
            "status": self.status,
            "assigned_to": self.assigned_name,
            "last_seq": self.last_seq,
            "read_seq": self.read_seq,
            "updated_ts": proto.format_ts(self.updated_ts),
            "guest_online": self.guest_connections > 0,
            "preview": self.preview,
        }


class Connection:
    """One WebSocket connection: its identity, subscriptions and outbox."""

    __slots__ = (
        "_drained",
        "_outbox",
        "bad_frames",
        "bucket",
        "close_code",
        "close_reason",
        "conversation",
        "flood_since",
        "last_limited",
        "name",
        "nursery",
        "ping_in_flight",
        "reader_scope",
        "role",
        "server",
        "staff_id",
        "stream",
        "subscriptions",
        "writer_running",
        "ws",
    )

    def __init__(
        self,
        server: ChatServer,
        ws: WebSocketConnection,
        nursery: trio.Nursery,
        stream: PrefixStream | None = None,
    ) -> None:
        self.server = server
        self.ws = ws
        # Set when the stream under ``ws`` can write without blocking.
        self.stream = stream if stream is not None and stream.can_send_without_blocking else None
        self.nursery = nursery
        self.role: str | None = None  # "guest" or "staff" once hello succeeded
        self.staff_id: str | None = None
        self.name: str | None = None
        self.conversation: Conversation | None = None  # a guest's own
        self.subscriptions: set[Conversation] | None = None  # a staff member's
        self._outbox: deque[str] | None = None
        self._drained: trio.Event | None = None
        self.writer_running = False
        self.ping_in_flight = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.reader_scope = trio.CancelScope()
        self.bucket: TokenBucket | None = None
        self.bad_frames = 0
        self.flood_since: float | None = None
        self.last_limited = 0.0

    # -- outbound ------------------------------------------------------------------

    def deliver(self, frame: str) -> None:
        """Queue a frame without waiting. A connection that falls too far behind is cut
        off (1013) and catches up from history when it comes back. Once a close was
        requested nothing more is queued: the client recovers it from history."""
        if self.close_code is not None:
            return
        if self._outbox is None:
            self._outbox = deque()
        if len(self._outbox) >= self.server.config.outbox_limit:
            self.request_close(CloseCode.TRY_LATER, "too far behind; reconnect and fetch history")
            return
        self._outbox.append(frame)
        if not self.writer_running:
            self.writer_running = True
            corked = self.server.corked
            if corked is None:
                self.flush()
            else:
                corked.append(self)

    def flush(self) -> None:
        """Write the outbox now if the socket takes it without waiting (the usual
        case); otherwise the writer task sends what is left. Needs ``writer_running``
        set, and leaves it cleared when nothing is left to send."""
        outbox = self._outbox
        stream = self.stream
        # trio-websocket's own sends (pongs, closes) hold its lock while they wait.
        if stream is not None and outbox and not self.ws._stream_lock.locked():
            try:
                data = _serialize(self.ws, outbox)
                outbox.clear()
                if stream.send_without_blocking(data):
                    self._outbox = None
                    self._writer_done()
                    return
            except (
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                wsproto.utilities.LocalProtocolError,  # closing, and wsproto knew first
            ):
                self._writer_done()
                self.request_close(CloseCode.ABNORMAL, "connection lost")
                return
            # The socket's buffer is full: the stream holds the rest back, and the
            # writer's first send pushes it out ahead of anything else.
        self.nursery.start_soon(self._write)

    async def _write(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        try:
            while True:
                # Usually an ack and its message wait together: one write for both.
                frames = list(itertools.islice(outbox, WRITE_BATCH))
                await send_frames(self.ws, frames)
                for _ in frames:
                    outbox.popleft()
                if not outbox:
                    break
            # Idle connections are the common case: do not keep an empty deque around.
            self._outbox = None
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_close(CloseCode.ABNORMAL, "connection lost")
        finally:
            self._writer_done()

    def _writer_done(self) -> None:
        self.writer_running = False
        if self._drained is not None:
            self._drained.set()

    async def wait_drained(self) -> None:
        while self.writer_running:
            self._drained = trio.Event()
            await self._drained.wait()

    def request_close(self, code: int, reason: str) -> None:
        """Close this connection soon with ``code``; the first request wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.reader_scope.cancel()

    async def heartbeat(self, answer_within: float) -> None:
        try:
            with trio.move_on_after(answer_within) as scope:
                await self.ws.ping()
            if scope.cancelled_caught:
                self.request_close(CloseCode.SERVER_ERROR, "no answer to ping")
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_close(CloseCode.ABNORMAL, "connection lost")
        finally:
            self.ping_in_flight = False

    # -- inbound -------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`ConnectionLost` when the socket is done."""
        try:
            return await self.ws.get_message()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost("the peer closed the connection") from None

    def error(self, exc: ProtocolError, retry_after_ms: int | None = None) -> None:
        self.deliver(proto.error_frame(exc.code, exc.message, exc.ref, retry_after_ms))


# -------------------------------------------------------------------------- server


class ChatServer:
    """The guest-chat server.

    ``responder`` replaces the concierge (anything implementing
    :class:`~trio_chat.Responder`); by default ``config.concierge`` picks the rules
    concierge or none. Start it with ``port = await nursery.start(server.run)``; stop
    it gracefully with :meth:`shutdown`, or cancel it.
    """

    def __init__(self, config: ServerConfig | None = None, *, responder: Responder | None = None):
        self.config = config if config is not None else ServerConfig()
        if responder is None and self.config.concierge == "rules":
            responder = RulesResponder()
        elif self.config.concierge not in ("rules", "off"):
            raise ValueError(f"unknown concierge {self.config.concierge!r} (use rules or off)")
        self.responder = responder
        self.port: int | None = None
        self.started_at = time.monotonic()
        self.connections: set[Connection] = set()
        # While commit callbacks run: connections with frames to write at the end.
        self.corked: list[Connection] | None = None
        self.conversations: dict[str, Conversation] = {}
        self.staff_room: set[Connection] = set()
        self.closes: Counter[int] = Counter()  # connections closed, by close code
        self._random = random.Random(self.config.seed)
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._accepting = trio.CancelScope()
        self._work: trio.Nursery | None = None
        self._store: Store | None = None
        self._signer: TokenSigner | None = None
        self._handlers = 0
        self._background = 0
        self._idle = trio.Event()  # set whenever a handler or background task ends
        self._froze_gc = False

    # -- lifecycle -----------------------------------------------------------------

    @property
    def store(self) -> Store:
        assert self._store is not None, "the server is not running"
        return self._store

    @contextmanager
    def _corked(self) -> Iterator[None]:
        """Frames delivered inside go out together at the end, one write per
        connection: a committed batch's acks, messages and summaries."""
        corked: list[Connection] = []
        self.corked = corked
        try:
            yield
        finally:
            self.corked = None
            for conn in corked:
                try:
                    conn.flush()
                except Exception:
                    # This runs on the loop's own callback: a bug here must cost one
                    # connection, not every other write of the batch (or the server).
                    log.exception("writing to a connection failed")
                    conn._writer_done()
                    conn.request_close(CloseCode.SERVER_ERROR, "internal error")

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (graceful) or cancellation.

        Reports the bound port through ``task_status``. Raises :class:`StorageError`
        if the database cannot be opened and ``OSError`` if the port cannot be bound.
        """
        db = await trio.to_thread.run_sync(
            lambda: Database(self.config.db_path, synchronous=self.config.synchronous)
        )
        try:
            self._signer = TokenSigner(db.secret())
            self._store = Store(db, callbacks_context=self._corked)
            async with trio.open_nursery() as storage:
                await storage.start(self._store.run)
                try:
                    await self._serve(task_status)
                finally:
                    # The writer commits what is queued, then returns.
                    self._store.close()
        finally:
            if self._froze_gc:
                gc.unfreeze()
            db.close()
            self._stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(
            self.config.port, host=self.config.host, backlog=self.config.backlog
        )
        self.port = listeners[0].socket.getsockname()[1]
        front = HttpFront(
            {"/": self._index, "/healthz": self._healthz},
            self._websocket,
            idle_timeout=self.config.handshake_timeout,
            server_header=SERVER_NAME,
        )
        async with trio.open_nursery() as work:
            self._work = work
            work.start_soon(self._accept, listeners, front)
            work.start_soon(self._heartbeat_sweeper)
            await self._answer_unanswered()
            task_status.started(self.port)
            await self._shutdown.wait()
            await self._drain_for_shutdown()
            work.cancel_scope.cancel()

    async def _accept(self, listeners: list[trio.SocketListener], front: HttpFront) -> None:
        assert self._work is not None

        async def handle(stream: trio.SocketStream) -> None:
            await self._handle_stream(stream, front)

        # Cancelled at shutdown, serve_listeners closes the listeners: from then on
        # connection attempts are refused at once, not parked in the backlog.
        with self._accepting:
            await trio.serve_listeners(handle, listeners, handler_nursery=self._work)

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, tell every client to come back
        later (``reconnect`` with spread-out ``after_ms``, close 1012), let writes in
        flight finish (bounded), then stop. :meth:`run` returns when it is done."""
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _answer_unanswered(self) -> None:
        """After a crash or restart, give the concierge's owed replies (the last hour)."""
        if self.responder is None:
            return
        owed = await self.store.read(self.store.db.unanswered, time.time() - 3600)
        for row, message in owed:
            self._spawn(self._live(row), self._after_guest_message, message)

    async def _drain_for_shutdown(self) -> None:
        self._accepting.cancel()
        # Thousands of connections end at once: the cycle collector would rescan every
        # live object of all of them again and again (half the shutdown time with
        # 4,000 guests). Frozen, they are left to reference counting; run() unfreezes,
        # unless the host process had frozen objects of its own.
        if gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze_gc = True
        crowd = len(self.connections)
        opens_ms = int(
            (self.config.restart_delay + crowd * self.config.drain_per_connection) * 1000
        )
        spread_ms = int(
            max(self.config.shutdown_spread, crowd * self.config.shutdown_spread_per_connection)
            * 1000
        )
        for conn in list(self.connections):
            after_ms = opens_ms + self._random.randrange(max(1, spread_ms))
            conn.deliver(proto.reconnect_frame(after_ms, "server restarting"))
            conn.request_close(CloseCode.RESTARTING, "server restarting")
        with trio.move_on_after(self.config.shutdown_grace):
            while self._handlers or self._background:
                self._idle = trio.Event()
                await self._idle.wait()

    # -- plain HTTP ----------------------------------------------------------------

    def _index(self) -> Any:
        return static_response("index.html") or text_response(200, "trio-chat\n")

    def _healthz(self) -> Any:
        return json_response(
            {
                "status": "ok",
                "server": SERVER_NAME,
                "version": __version__,
                "uptime_s": round(time.monotonic() - self.started_at, 3),
                "connections": len(self.connections),
                "guests_online": sum(1 for c in self.connections if c.role == "guest"),
                "staff_online": len(self.staff_room),
                "conversations_loaded": len(self.conversations),
                "closes": {str(code): n for code, n in sorted(self.closes.items())},
            }
        )

    # -- connections ---------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream, front: HttpFront) -> None:
        # The one place a connection's failure stops: nothing here reaches another
        # connection or the server (trio-websocket would let it end serve_websocket).
        self._handlers += 1
        try:
            await front.handle(stream)
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._handlers -= 1
            self._idle.set()
            with trio.move_on_after(self.config.close_timeout) as scope:
                scope.shield = True
                await trio.aclose_forcefully(stream)

    async def _websocket(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            ws: WebSocketConnection | None = None
            with trio.move_on_after(self.config.handshake_timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    stream,
                    # Counts characters, not bytes; the byte limit is checked on receipt.
                    max_message_size=self.config.max_frame_bytes,
                )
                ws = await request.accept()
            if ws is None:
                nursery.cancel_scope.cancel()
                return
            conn = Connection(
                self, ws, nursery, stream if isinstance(stream, PrefixStream) else None
            )
            self.connections.add(conn)
            try:
                with conn.reader_scope:
                    await self._session(conn)
            except ConnectionLost:
                pass
            finally:
                self.connections.discard(conn)
                self._detach(conn)
                await self._close(conn)
                nursery.cancel_scope.cancel()

    async def _close(self, conn: Connection) -> None:
        code = conn.close_code
        if code is None:
            conn.close_code = code = CloseCode.NORMAL
        elif code not in (CloseCode.TRY_LATER, CloseCode.ABNORMAL, CloseCode.SERVER_ERROR):
            # Let the last frames (reconnect, the auth error, ...) out first. A client
            # cut off for being slow or dead gets no such courtesy.
            with trio.move_on_after(self.config.close_timeout) as scope:
                scope.shield = True
                await conn.wait_drained()
        if code == CloseCode.ABNORMAL:
            code = CloseCode.NORMAL
        self.closes[code] += 1
        with trio.move_on_after(self.config.close_timeout) as scope:
            scope.shield = True
            if self.shutting_down:
                # Thousands of close handshakes took seconds of the restart on two
                # cores, and the new process cannot listen until this one is gone.
                await close_without_reply(conn.ws, code, conn.close_reason or None)
            else:
                # trio-websocket's close waits for the peer without a time limit.
                await conn.ws.aclose(code, conn.close_reason or None)

    async def _session(self, conn: Connection) -> None:
        await self._hello_phase(conn)
        while True:
            raw = await conn.receive()
            await self._dispatch(conn, raw)

    def _bad_frame(self, conn: Connection, exc: ProtocolError) -> None:
        conn.error(exc)
        conn.bad_frames += 1
        if conn.bad_frames >= BAD_FRAME_LIMIT:
            conn.request_close(CloseCode.POLICY, f"{BAD_FRAME_LIMIT} bad frames in a row")

    async def _hello_phase(self, conn: Connection) -> None:
        # The timeout bounds waiting for hello, not answering it: a slow disk must not
        # turn a valid hello into 4408.
        hello: proto.Hello | None = None
        with trio.move_on_after(self.config.hello_timeout):
            while hello is None:
                raw = await conn.receive()
                if self._oversized(conn, raw):
                    raise ConnectionLost("frame too big")
                try:
                    frame = proto.parse_client_frame(raw)
                except ProtocolError as exc:
                    # A malformed hello is a bad hello; anything else is "not yet".
                    if exc.code != ErrorCode.BAD_JSON and exc.ref != "hello":
                        exc = ProtocolError(ErrorCode.AUTH_REQUIRED, "send hello first", exc.ref)
                    self._bad_frame(conn, exc)
                    continue
                if isinstance(frame, proto.Hello):
                    hello = frame
                else:
                    self._bad_frame(
                        conn,
                        ProtocolError(ErrorCode.AUTH_REQUIRED, "send hello first", _ref(frame)),
                    )
        if hello is None:
            conn.request_close(CloseCode.HELLO_TIMEOUT, "no hello in time")
            raise ConnectionLost("no hello in time")
        await self._hello(conn, hello)

    def _oversized(self, conn: Connection, raw: str | bytes) -> bool:
        """Close with 1009 and return True for a frame over the byte limit.

        trio-websocket counts characters; the contract counts UTF-8 bytes. Characters
        never outnumber bytes, and a character is at most 4 bytes, so only long text
        needs encoding to check."""
        limit = self.config.max_frame_bytes
        if isinstance(raw, bytes):
            size = len(raw)
        elif len(raw) * 4 <= limit:
            return False
        else:
            size = len(raw.encode())
        if size <= limit:
            return False
        conn.request_close(CloseCode.TOO_BIG, f"frame over {limit} bytes")
        return True

    async def _hello(self, conn: Connection, hello: proto.Hello) -> None:
        assert self._signer is not None
        if hello.token is None:
            if not self.config.open_registration:
                self._auth_failed(
                    conn, "this server issues guest tokens at the desk; registration is closed"
                )
            created = await self.store.submit(CreateGuest(name=hello.name))
            token = self._signer.issue("g", created.guest_id)
            self._attach_guest(conn, created, token)
            return
        verified = self._signer.verify(hello.token)
        if verified is None:
            self._auth_failed(conn, "unknown or invalid token")
        kind, ident = verified
        if kind == "g":
            row = await self.store.read(self.store.db.conversation_of_guest, ident)
            if row is None:
                self._auth_failed(conn, "unknown guest")
            self._attach_guest(conn, row, hello.token)
        else:
            member = await self.store.read(self.store.db.staff_member, ident)
            if member is None:
                self._auth_failed(conn, "this staff member was removed")
            await self._attach_staff(conn, member.staff_id, member.name, hello.token)

    def _auth_failed(self, conn: Connection, why: str) -> NoReturn:
        conn.deliver(proto.error_frame(ErrorCode.AUTH_FAILED, why, "hello"))
        conn.request_close(CloseCode.AUTH_FAILED, "authentication failed")
        raise ConnectionLost(why)

    # -- the hub: conversations and subscriptions ----------------------------------------

    def _live(self, row: ConversationRow) -> Conversation:
        """The live conversation for ``row``; a loaded one wins over a fresh read."""
        conv = self.conversations.get(row.conversation_id)
        if conv is None:
            conv = self.conversations[row.conversation_id] = Conversation(row)
        return conv

    @asynccontextmanager
    async def _pinned(self, conversation_id: str) -> AsyncIterator[Conversation]:
        """The live conversation, kept in memory until the block ends (so a subscription
        made inside it cannot land on an evicted copy). Raises ``not_found``."""
        conv = self.conversations.get(conversation_id)
        if conv is None:
            row = await self.store.read(self.store.db.conversation, conversation_id)
            if row is None:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND, f"no conversation {conversation_id}", conversation_id
                )
            conv = self._live(row)
        conv.busy += 1
        try:
            yield conv
        finally:
            conv.busy -= 1
            self._release(conv)

    def _release(self, conv: Conversation) -> None:
        if not conv.subscribers and conv.busy == 0:
            self.conversations.pop(conv.conversation_id, None)

    def _attach_guest(self, conn: Connection, row: ConversationRow, token: str) -> None:
        conv = self._live(row)
        conn.role = "guest"
        conn.conversation = conv
        conn.name = conv.guest_name
        if self.config.rate_limit > 0:
            conn.bucket = TokenBucket(
                self.config.rate_limit, self.config.rate_burst, trio.current_time()
            )
        # Subscribing and reading last_seq happen in one step: every later commit
        # reaches this connection live.
        conv.subscribers.add(conn)
        conv.guest_connections += 1
        conn.deliver(
            proto.encode(
                {
                    "type": "welcome",
                    "role": "guest",
                    "token": token,
                    "guest_id": conv.guest_id,
                    "conversation_id": conv.conversation_id,
                    "status": conv.status,
                    "last_seq": conv.last_seq,
                    "read_seq": conv.read_seq,
                    "heartbeat_s": self.config.heartbeat,
                    "server": SERVER_NAME,
                }
            )
        )
        if conv.status != "ai":
            conn.deliver(proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name))
        if conv.guest_connections == 1:
            self._summary_changed(conv)

    async def _attach_staff(self, conn: Connection, staff_id: str, name: str, token: str) -> None:
        conn.role = "staff"
        conn.staff_id = staff_id
        conn.name = name
        conn.subscriptions = set()
        conn.deliver(
            proto.encode(
                {
                    "type": "welcome",
                    "role": "staff",
                    "token": token,
                    "staff_id": staff_id,
                    "name": name,
                    "heartbeat_s": self.config.heartbeat,
                    "server": SERVER_NAME,
                }
            )
        )
        rows = await self.store.read(self.store.db.queue, time.time())
        held = await self.store.read(self.store.db.held_by, staff_id)
        async with AsyncExitStack() as stack:
            held_convs = [await stack.enter_async_context(self._pinned(c)) for c in held]
            # From here on no await: the queue, the staff room and re-subscription form
            # one step, so no summary change falls between the queue and the live pushes.
            summaries = {r.conversation_id: Conversation(r).summary() for r in rows}
            for conv in self.conversations.values():
                # A guest online right now counts as active, even before writing.
                if (
                    conv.status in ("waiting", "staff")
                    or conv.guest_connections
                    or conv.conversation_id in summaries
                ):
                    summaries[conv.conversation_id] = conv.summary()
            ordered = sorted(summaries.values(), key=lambda s: s["updated_ts"], reverse=True)
            conn.deliver(proto.encode({"type": "queue", "conversations": ordered[:500]}))
            self.staff_room.add(conn)
            for conv in held_convs:
                if conv.status == "staff" and conv.assigned_to == staff_id:
                    self._subscribe(conn, conv)

    def _subscribe(self, conn: Connection, conv: Conversation) -> None:
        assert conn.subscriptions is not None
        conv.subscribers.add(conn)
        conn.subscriptions.add(conv)
        conn.deliver(
            proto.encode(
                {
                    "type": "subscribed",
                    "conversation_id": conv.conversation_id,
                    "last_seq": conv.last_seq,
                    "status": conv.status,
                    "assigned_to": conv.assigned_name,
                }
            )
        )

    def _detach(self, conn: Connection) -> None:
        if conn.role == "guest" and conn.conversation is not None:
            conv = conn.conversation
            conv.subscribers.discard(conn)
            conv.guest_connections -= 1
            if conv.guest_connections == 0:
                self._summary_changed(conv)
            self._release(conv)
        elif conn.role == "staff" and conn.subscriptions is not None:
            self.staff_room.discard(conn)
            for conv in conn.subscriptions:
                conv.subscribers.discard(conn)
                self._release(conv)
            conn.subscriptions.clear()

    def _broadcast(self, conv: Conversation, frame: str, *, skip: Connection | None = None) -> None:
        for sub in conv.subscribers:
            if sub is not skip:
                sub.deliver(frame)

    def _summary_changed(self, conv: Conversation) -> None:
        if self.staff_room:
            frame = proto.encode({"type": "conversation", **conv.summary()})
            for staff in self.staff_room:
                staff.deliver(frame)

    # -- writes -------------------------------------------------------------------------

    def _append_operation(
        self,
        conv: Conversation,
        *,
        sender: str,
        author: str | None,
        text: str,
        author_key: str | None = None,
        client_msg_id: str | None = None,
        status: tuple[str, str | None, str | None] | None = None,
        origin: Connection | None = None,
        after: Callable[[Appended], None] | None = None,
    ) -> AppendMessage:
        """The write that stores a message; once committed it acks ``origin``, pushes
        the message (and the new status) to the subscribers and runs ``after``. The
        conversation stays pinned in memory until the write is done either way."""

        def on_commit(result: Appended) -> None:
            message = result.message
            if origin is not None and message.client_msg_id is not None:
                origin.deliver(proto.ack_frame(message))
            if not result.duplicate:
                conv.last_seq = message.seq
                conv.preview = message.text[:120]
                conv.updated_ts = time.time()
                if status is not None:
                    conv.status, conv.assigned_to, conv.assigned_name = status
                self._broadcast(conv, proto.message_frame(message))
                if status is not None:
                    self._broadcast(
                        conv,
                        proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name),
                    )
                if after is not None:
                    after(result)
                self._summary_changed(conv)
            unpin()

        def on_error(error: StorageError) -> None:
            log.error("storage failed: %s", error)
            if origin is not None:
                origin.error(
                    ProtocolError(
                        ErrorCode.INTERNAL,
                        "the server could not store that; please retry",
                        client_msg_id,
                    )
                )
            unpin()

        def unpin() -> None:
            conv.busy -= 1
            self._release(conv)

        conv.busy += 1
        return AppendMessage(
            conversation_id=conv.conversation_id,
            sender=sender,
            author=author,
            author_key=author_key,
            text=text,
            client_msg_id=client_msg_id,
            status=status,
            on_commit=on_commit,
            on_error=on_error,
        )

    async def _append(self, conv: Conversation, **fields: Any) -> Appended:
        """Store a message and wait until it is committed and pushed."""
        return await self.store.submit(self._append_operation(conv, **fields))

    async def _post(self, conv: Conversation, **fields: Any) -> None:
        """Queue a client's message without waiting for its commit: the reader goes
        back to reading, and the ack (or an ``internal`` error) follows the commit."""
        with contextlib.suppress(StorageError):  # on_error has told the client
            await self.store.enqueue(self._append_operation(conv, **fields))

    def _spawn(
        self, conv: Conversation, fn: Callable[[Conversation, Message], Any], message: Message
    ) -> None:
        """Run background work for ``conv`` in the server's nursery (not the connection's:
        a reply must still come if the guest closes the tab)."""
        if self._work is None or self._shutdown.is_set():
            return
        conv.busy += 1
        self._background += 1

        async def task() -> None:
            try:
                await fn(conv, message)
            except (StorageError, ProtocolError) as exc:
                log.warning("background work for %s failed: %s", conv.conversation_id, exc)
            except Exception:
                log.exception("background work for %s failed", conv.conversation_id)
            finally:
                conv.busy -= 1
                self._release(conv)
                self._background -= 1
                self._idle.set()

        self._work.start_soon(task)

    async def _transition(
        self,
        conv: Conversation,
        event: Any,
        *,
        staff_id: str | None = None,
        staff_name: str | None = None,
        after: Callable[[Appended], None] | None = None,
    ) -> bool:
        """Apply a state-machine event under the conversation's lock; store its system
        message and new status in one commit. False when nothing changed.
        Raises ProtocolError (conflict, forbidden) from the state machine."""
        async with conv.transition_lock():
            transition = apply_event(conv.state, event, staff_id=staff_id, staff_name=staff_name)
            if transition is None:
                return False
            new = transition.state
            await self._append(
                conv,
                sender="system",
                author=None,
                text=transition.system_text,
                status=(new.status, new.assigned_to, new.assigned_name),
                after=after,
            )
            return True

    # -- frames ---------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, raw: str | bytes) -> None:
        if self._oversized(conn, raw):
            raise ConnectionLost("frame too big")
        try:
            frame = proto.parse_client_frame(raw)
        except ProtocolError as exc:
            self._bad_frame(conn, exc)
            return
        try:
            if conn.role == "guest":
                await self._guest_frame(conn, frame)
            else:
                await self._staff_frame(conn, frame)
            conn.bad_frames = 0
        except ProtocolError as exc:
            self._bad_frame(conn, exc)
        except StorageError as exc:
            log.error("storage failed: %s", exc)
            conn.error(
                ProtocolError(
                    ErrorCode.INTERNAL, "the server could not store that; please retry", _ref(frame)
                )
            )
        except (ConnectionLost, trio.Cancelled):
            raise
        except Exception:
            log.exception("frame handler failed")
            conn.error(ProtocolError(ErrorCode.INTERNAL, "internal error", _ref(frame)))

    def _common_frame(self, conn: Connection, frame: proto.ClientFrame) -> bool:
        if isinstance(frame, proto.Ping):
            conn.deliver(proto.pong_frame(frame.id))
            return True
        if isinstance(frame, proto.Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already received", "hello")
        return False

    async def _guest_frame(self, conn: Connection, frame: proto.ClientFrame) -> None:
        conv = conn.conversation
        assert conv is not None
        if self._common_frame(conn, frame):
            return
        if isinstance(frame, proto.SendMessage):
            await self._guest_message(conn, conv, frame)
        elif isinstance(frame, proto.HistoryRequest):
            await self._history(conn, conv, frame)
        elif isinstance(frame, proto.Escalate):
            changed = await self._transition(conv, "escalate")
            if not changed:
                conn.deliver(
                    proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name)
                )
        elif isinstance(frame, proto.Typing):
            self._broadcast(
                conv, proto.typing_frame(conv.conversation_id, "guest", frame.active), skip=conn
            )
        elif isinstance(frame, proto.Read):
            await self._read(conn, conv, "guest", frame.seq)
        elif isinstance(frame, proto.StaffAction):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"{frame.action} is for staff only", frame.action
            )

    async def _guest_message(
        self, conn: Connection, conv: Conversation, frame: proto.SendMessage
    ) -> None:
        author_key = "g:" + conv.guest_id
        if conn.bucket is not None:
            now = trio.current_time()
            wait_ms = conn.bucket.try_take(now)
            if wait_ms:
                await self._rate_limited(conn, conv, frame, author_key, wait_ms, now)
                return
        await self._post(
            conv,
            sender="guest",
            author=conv.guest_id,
            text=frame.text,
            author_key=author_key,
            client_msg_id=frame.client_msg_id,
            origin=conn,
            after=lambda result: self._guest_message_committed(conv, result.message),
        )

    async def _rate_limited(
        self,
        conn: Connection,
        conv: Conversation,
        frame: proto.SendMessage,
        author_key: str,
        wait_ms: int,
        now: float,
    ) -> None:
        # A retry of a stored message is answered before the limit applies.
        stored = await self.store.read(
            self.store.db.message_by_client_id,
            conv.conversation_id,
            author_key,
            frame.client_msg_id,
        )
        if stored is not None:
            conn.deliver(proto.ack_frame(stored))
            return
        # A flood ends only after a quiet spell; messages that squeeze through at the
        # refill rate do not end it.
        if conn.flood_since is None or now - conn.last_limited > FLOOD_QUIET:
            conn.flood_since = now
        conn.last_limited = now
        if now - conn.flood_since >= FLOOD_CLOSE_AFTER:
            conn.request_close(CloseCode.RATE_LIMITED, "still flooding after being told")
        conn.error(
            ProtocolError(
                ErrorCode.RATE_LIMITED, "slow down: too many messages", frame.client_msg_id
            ),
            retry_after_ms=wait_ms,
        )

    def _guest_message_committed(self, conv: Conversation, message: Message) -> None:
        # Only start a task when there is work: most messages in a busy hotel go to
        # conversations with staff, or to a server running without a concierge.
        if conv.status == "resolved" or (conv.status == "ai" and self.responder is not None):
            self._spawn(conv, self._after_guest_message, message)

    async def _after_guest_message(self, conv: Conversation, message: Message) -> None:
        """Reopen a resolved conversation, then let the concierge answer."""
        if conv.status == "resolved":
            await self._transition(conv, "guest_message")
        if conv.status != "ai" or self.responder is None:
            return
        await self._concierge_reply(conv, message)

    async def _concierge_reply(self, conv: Conversation, message: Message) -> None:
        assert self.responder is not None
        if conv.concierge_lock is None:
            conv.concierge_lock = trio.Lock()
        async with conv.concierge_lock:
            if conv.status != "ai":
                return
            self._broadcast(conv, proto.typing_frame(conv.conversation_id, "ai", True))
            typing = True

            def stop_typing(_: object = None) -> None:
                nonlocal typing
                if typing:
                    typing = False
                    self._broadcast(conv, proto.typing_frame(conv.conversation_id, "ai", False))

            try:
                reply = await self._ask_responder(conv, message)
                await trio.sleep(self.config.typing_delay)
                async with conv.transition_lock():
                    if conv.status != "ai":
                        return  # staff took over while the concierge was thinking
                    # Typing ends with the answer, in the same write.
                    await self._append(
                        conv, sender="ai", author="concierge", text=reply.text, after=stop_typing
                    )
            finally:
                stop_typing()
            if reply.escalate:
                await self._transition(conv, "concierge_escalate")

    async def _ask_responder(self, conv: Conversation, message: Message) -> ResponderReply:
        assert self.responder is not None
        window = getattr(self.responder, "history_window", 0)
        recent: list[Message] = []
        if window:
            recent = await self.store.read(self.store.db.recent, conv.conversation_id, window)
        request = ResponderRequest(
            conv.conversation_id, conv.guest_id, conv.guest_name, message.text, tuple(recent)
        )
        try:
            with trio.fail_after(self.config.responder_timeout):
                return await self.responder.respond(request)
        except Exception:
            log.exception("the responder failed; handing over to staff")
            return ResponderReply(
                "I'm sorry, I'm having trouble answering right now. I'm "
                "asking a member of our team to help you.",
                escalate=True,
            )

    async def _history(
        self, conn: Connection, conv: Conversation, frame: proto.HistoryRequest
    ) -> None:
        messages = await self.store.read(
            self.store.db.history, conv.conversation_id, frame.after_seq, frame.limit
        )
        last_seq = max(conv.last_seq, messages[-1].seq if messages else 0)
        conn.deliver(proto.history_frame(conv.conversation_id, messages, last_seq))

    async def _read(self, conn: Connection, conv: Conversation, reader: str, seq: int) -> None:
        seq = min(seq, conv.last_seq)
        if reader == "staff" and seq > conv.read_seq:
            conv.read_seq = seq
            self._summary_changed(conv)
        self._broadcast(conv, proto.read_frame(conv.conversation_id, reader, seq), skip=conn)
        await self.store.submit(
            SetRead(conversation_id=conv.conversation_id, reader=reader, seq=seq)
        )

    async def _staff_frame(self, conn: Connection, frame: proto.ClientFrame) -> None:
        assert conn.staff_id is not None and conn.name is not None
        assert conn.subscriptions is not None
        if self._common_frame(conn, frame):
            return
        if isinstance(frame, proto.Escalate):
            raise ProtocolError(ErrorCode.FORBIDDEN, "escalate is for guests", "escalate")
        conversation_id = getattr(frame, "conversation_id", None)
        if conversation_id is None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"staff must name the conversation_id in {_ref(frame)}",
                _ref(frame),
            )
        async with self._pinned(conversation_id) as conv:
            await self._staff_conversation_frame(conn, conv, frame)

    async def _staff_conversation_frame(
        self, conn: Connection, conv: Conversation, frame: proto.ClientFrame
    ) -> None:
        assert conn.staff_id is not None and conn.name is not None
        assert conn.subscriptions is not None
        holds = conv.status == "staff" and conv.assigned_to == conn.staff_id
        if isinstance(frame, proto.StaffAction):
            await self._staff_action(conn, conv, frame.action)
        elif isinstance(frame, proto.SendMessage):
            if not holds:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    "claim the conversation before writing",
                    frame.client_msg_id,
                )
            await self._post(
                conv,
                sender="staff",
                author=conn.name,
                text=frame.text,
                author_key="s:" + conn.staff_id,
                client_msg_id=frame.client_msg_id,
                origin=conn,
            )
        elif isinstance(frame, proto.HistoryRequest):
            await self._history(conn, conv, frame)
        elif isinstance(frame, proto.Typing):
            if not holds:
                raise ProtocolError(ErrorCode.FORBIDDEN, "only the holder may type", "typing")
            self._broadcast(
                conv, proto.typing_frame(conv.conversation_id, "staff", frame.active), skip=conn
            )
        elif isinstance(frame, proto.Read):
            if not holds and conv not in conn.subscriptions:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, "claim or watch the conversation first", "read"
                )
            await self._read(conn, conv, "staff", frame.seq)

    async def _staff_action(self, conn: Connection, conv: Conversation, action: str) -> None:
        assert conn.staff_id is not None and conn.subscriptions is not None
        if action == "watch":
            self._subscribe(conn, conv)
        elif action == "unwatch":
            conv.subscribers.discard(conn)
            conn.subscriptions.discard(conv)
            self._release(conv)
        elif action == "claim":

            def subscribe_claimer(_: Appended) -> None:
                # Runs right after the system message and status reached the existing
                # subscribers, so the claimer's last_seq includes that message.
                if conn in self.connections:
                    self._subscribe(conn, conv)

            changed = await self._transition(
                conv, "claim", staff_id=conn.staff_id, staff_name=conn.name, after=subscribe_claimer
            )
            if not changed:
                self._subscribe(conn, conv)
        else:
            await self._transition(conv, action, staff_id=conn.staff_id, staff_name=conn.name)

    # -- heartbeat ----------------------------------------------------------------------

    async def _heartbeat_sweeper(self) -> None:
        interval = self.config.heartbeat
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            for conn in list(self.connections):
                if not conn.ping_in_flight and conn.close_code is None:
                    conn.ping_in_flight = True
                    conn.nursery.start_soon(conn.heartbeat, interval)


def _ref(frame: proto.ClientFrame) -> str:
    if isinstance(frame, proto.SendMessage):
        return frame.client_msg_id
    if isinstance(frame, proto.StaffAction):
        return frame.action
    return {
        proto.Hello: "hello",
        proto.HistoryRequest: "history",
        proto.Escalate: "escalate",
        proto.Typing: "typing",
        proto.Read: "read",
        proto.Ping: "ping",
    }.get(type(frame), "unknown")
