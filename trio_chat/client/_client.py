"""The reconnecting chat client: backoff with jitter, offline outbox, exact resume.

A :class:`ChatClient` runs its connection in its own nursery (use it as an async
context manager). Per connection there is one reader and one writer task; the user's
calls only touch the outbox and a bounded queue of control frames, so a blocked
network never blocks a caller beyond what it asked to wait for.

Trio and trio-websocket errors are translated here, in :meth:`ChatClient._connect_once`,
into close codes and :mod:`trio_chat` exceptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Final, Literal, Self

import trio
import trio_websocket

from ..core import client_protocol as wire
from ..core.backoff import CRASH_SPREAD, Backoff, retry_delay
from ..core.client_state import Outbox, OutgoingMessage, Transcript, check_text
from ..core.errors import AuthenticationFailed, ClientClosed, MessageRejected, ProtocolError
from ..core.protocol import CloseCode, ErrorCode, Message

__all__ = ["ChatClient", "ClientEvent", "StaffClient"]

log = logging.getLogger("trio_chat.client")

State = Literal["connecting", "connected", "reconnecting", "offline", "closed"]
CONTROL_QUEUE: Final = 256
# Messages asked for per history request when filling a gap (the server's maximum).
HISTORY_PAGE: Final = 500
EVENT_LOG: Final = 10_000


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """Something that happened to a client.

    ``kind`` is one of ``state``, ``queued`` (a message entered the outbox), ``message``,
    ``ack``, ``status``, ``typing``, ``read``, ``draft`` (the concierge's answer so
    far as ``text``; ``None`` once the stored answer replaced it), ``error``, ``pong``,
    ``closed`` (a connection ended), and for staff ``queue`` (``conversations``: a list of
    :class:`ConversationSummary`), ``conversation`` (``summary``: one entry changed),
    ``subscribed`` and ``presence`` (``staff``: the names of the staff on duty).
    ``at`` is Trio's clock (virtual under ``MockClock``), ``wall`` the POSIX time.
    """

    kind: str
    at: float
    wall: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Ended:
    """How one connection ended."""

    code: int
    reason: str
    welcomed: bool
    healthy: bool


class _Waiter:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.result, self.error = result, error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.result


class ChatClient:
    """A guest's connection to a trio-chat server that keeps itself alive.

    ``url`` is the server's WebSocket URL (``ws://host:port/ws``). ``token`` resumes a
    guest (``None``: the server creates one; read :attr:`token` afterwards to come
    back as the same guest). ``backoff=None`` gives each client a fresh default
    :class:`Backoff` with full jitter and its first retry spread over 5 s.
    ``heartbeat=None`` uses the server's ``heartbeat_s``; 0 turns the watchdog off.
    ``healthy_after`` is how long a connection must last before the backoff starts
    again from its first delay. ``ssl_context`` verifies a ``wss://`` server (default:
    the system's trusted CAs and the URL's host name).
    """

    role = "guest"

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        name: str | None = None,
        backoff: Backoff | None = None,
        heartbeat: float | None = None,
        connect_timeout: float = 10.0,
        healthy_after: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        room: str | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.token = token
        self.name = name
        self.room = room  # a new guest's room number, shown to staff (extension)
        self.backoff = backoff if backoff is not None else Backoff(spread=CRASH_SPREAD)
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.healthy_after = healthy_after
        self.state: State = "connecting"
        self.attempt = 0  # connection attempts since the last healthy connection
        self.retry_at: float | None = None  # Trio time of the next attempt, while waiting
        self.close_reason: str | None = None
        self.last_close_code: int | None = None
        self.guest_id: str | None = None
        self.conversation_id: str | None = None
        self.status: str | None = None
        self.assigned_to: str | None = None
        self.read_seq = 0
        self.typing: dict[str, bool] = {}
        # The concierge's answer so far, by conversation, while it is being written.
        self.drafts: dict[str, str] = {}
        self.transcripts: dict[str, Transcript] = {}
        self.reconnects = 0
        self.event_log: deque[ClientEvent] = deque(maxlen=EVENT_LOG)
        self._outbox = Outbox()
        self._waiters: dict[str, _Waiter] = {}
        self._listeners: list[trio.MemorySendChannel[ClientEvent]] = []
        self._callbacks: list[Callable[[ClientEvent], None]] = []
        self._pings: dict[str, _Waiter] = {}
        self._ping_ids = 0
        self._welcomed_once = False
        self._online = True
        self._connection_no = 0
        # The server's reconnect.after_ms (or retry_after_ms), in seconds, and the Trio
        # time it arrived: the wait is counted from then, not from the close.
        self._hint: tuple[float, float] | None = None
        self._control: trio.MemorySendChannel[str | None] | None = None
        self._session: trio.CancelScope | None = None
        self._wait_scope: trio.CancelScope | None = None
        self._online_changed = trio.Event()
        self._changed = trio.Event()  # set (and replaced) on every event
        self._history_pending: set[str] = set()
        self._last_received = 0.0
        self._dead = False  # the watchdog gave up on the current connection
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._random = random.Random(self.backoff.seed)

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._token = trio.lowlevel.current_trio_token()
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.close()
        result: bool | None = await self._nursery_manager.__aexit__(exc_type, exc, tb)
        return result

    def close(self) -> None:
        """Stop for good: close the connection and fail every waiting :meth:`send`."""
        self._call_soon(self._close_now, "closed by the client")

    def _close_now(self, reason: str, error: BaseException | None = None) -> None:
        if self.state != "closed":
            self.close_reason = reason
            self._set_state("closed", reason=reason)
        failure = error if error is not None else ClientClosed(reason)
        for waiter in self._waiters.values():
            waiter.finish(error=failure)
        self._waiters.clear()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- plain methods, safe from any callback on the Trio thread --------------------

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` now if we are inside Trio, else hand it to Trio (a widget
        callback in Jupyter runs outside Trio's context, on the same thread)."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            if self._token is None:
                raise ClientClosed("the client is not running") from None
            self._token.run_sync_soon(fn, *args)
        else:
            fn(*args)

    def set_online(self, online: bool) -> None:
        """The network went away (``False``: close, stop trying, show ``offline``; sends
        wait in the outbox) or came back (``True``: reconnect at once)."""
        self._call_soon(self._set_online_now, online)

    def _set_online_now(self, online: bool) -> None:
        if online == self._online or self.state == "closed":
            return
        self._online = online
        if not online and self._session is not None:
            self._session.cancel()
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        self._online_changed.set()
        self._online_changed = trio.Event()

    def reconnect_now(self) -> None:
        """Skip the current wait and try at once (a tab becoming visible again)."""
        self._call_soon(self._reconnect_now)

    def _reconnect_now(self) -> None:
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- what users call ------------------------------------------------------------

    @property
    def transcript(self) -> list[Message]:
        """The guest's conversation in ``seq`` order, with no gap and no duplicate."""
        if self.conversation_id is None:
            return []
        return self._transcript(self.conversation_id).messages

    @property
    def synced(self) -> bool:
        """Connected, with every earlier message fetched (no history in flight)."""
        return (
            self.state == "connected"
            and not self._history_pending
            and not any(t.gap for t in self.transcripts.values())
        )

    @property
    def pending(self) -> list[OutgoingMessage]:
        """Messages sent but not yet acknowledged, oldest first."""
        return list(self._outbox)

    async def send(self, text: str) -> Message:
        """Send ``text``; return the stored message once the server acknowledged it,
        even if the connection drops and comes back in between.

        Raises :class:`MessageRejected` (empty or over 4000 characters, or refused by
        the server), :class:`ClientClosed` or :class:`AuthenticationFailed`.
        """
        return await self._send_message(OutgoingMessage(text.strip()), text)

    async def _send_message(self, outgoing: OutgoingMessage, text: str) -> Message:
        why = check_text(text)
        if why is not None:
            code = ErrorCode.TOO_LARGE if "over" in why else ErrorCode.BAD_MESSAGE
            raise MessageRejected(code, why)
        self._check_open()
        waiter = _Waiter()
        self._waiters[outgoing.client_msg_id] = waiter
        self._outbox.add(outgoing)
        self._emit("queued", client_msg_id=outgoing.client_msg_id, text=outgoing.text)
        self._kick()
        result: Message = await waiter.wait()
        return result

    async def escalate(self, reason: str | None = None) -> None:
        """Ask for a member of staff."""
        await self._send_control(wire.escalate_frame(reason))

    async def set_typing(self, active: bool) -> None:
        await self._send_control(wire.typing_request(active), live_only=True)

    async def mark_read(self, seq: int) -> None:
        await self._send_control(wire.read_request(seq))

    async def wait_for_state(self, *states: State) -> State:
        """Wait until the client is in one of ``states``; returns it."""
        await self.wait_until(lambda: self.state in states)
        return self.state

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true; it is checked after every event (a
        message, an ack, a state change...). Raises :class:`ClientClosed` if the client
        closes first (unless the predicate is then true)."""
        while not predicate():
            if self.state == "closed":
                raise ClientClosed(self.close_reason or "closed")
            await self._changed.wait()

    def add_listener(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously for every event (widgets, terminals);
        returns a function that removes it. A failing callback is logged, not raised."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def ping(self) -> float:
        """Round-trip an application ping; returns the seconds it took. Everything the
        server queued for us before answering has arrived by then (it answers in order).
        Waits for a connection first; raises :class:`ClientClosed`."""
        self._ping_ids += 1
        ping_id = f"p{self._ping_ids}"
        waiter = _Waiter()
        self._pings[ping_id] = waiter
        started = trio.current_time()
        try:
            await self._send_control(wire.ping_frame(ping_id))
            while True:
                # A pong lost with its connection is asked for again on the next one.
                connection = self._connection_no

                def answered_or_reconnected(connection: int = connection) -> bool:
                    return waiter.event.is_set() or self._connection_no != connection

                with trio.move_on_after(self.connect_timeout):
                    await self.wait_until(answered_or_reconnected)
                if waiter.event.is_set():
                    break
                await self._send_control(wire.ping_frame(ping_id))
        finally:
            self._pings.pop(ping_id, None)
        return trio.current_time() - started

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Every event from now on, as an async iterator (slow readers lose the oldest)."""
        send, receive = trio.open_memory_channel[ClientEvent](1000)
        self._listeners.append(send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            if send in self._listeners:  # _emit drops listeners whose reader went away
                self._listeners.remove(send)

    def _check_open(self) -> None:
        if self.state == "closed":
            raise ClientClosed(self.close_reason or "closed")

    async def _send_control(self, frame: str, *, live_only: bool = False) -> None:
        """Send a frame, waiting for a connection first (a user's intent, such as an
        escalation, survives an outage). ``live_only`` frames (typing) are dropped
        while disconnected: sent later they would be false. Raises ClientClosed."""
        while True:
            self._check_open()
            if self._control is not None and self.state == "connected":
                connection = self._connection_no
                try:
                    await self._control.send(frame)
                    return
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    if live_only:
                        return
                    # The connection ended under us, and the state still says
                    # "connected" until its reader notices. Wait for that: retrying at
                    # once would spin without yielding (a failed send does not), so the
                    # reader never runs and no deadline can fire.
                    await self.wait_until(partial(self._left_connection, connection))
                    continue
            if live_only:
                return
            await self.wait_until(lambda: self.state in ("connected", "closed"))

    def _left_connection(self, connection: int) -> bool:
        return self._connection_no != connection or self.state != "connected"

    def _kick(self) -> None:
        if self._control is not None and self.state == "connected":
            # Busy writer or a connection going away: either way the outbox is flushed
            # by the writer already running, or after the next welcome.
            with contextlib.suppress(
                trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
            ):
                self._control.send_nowait(None)  # None: flush the outbox

    # -- events and state -----------------------------------------------------------

    def _emit(self, kind: str, **data: Any) -> None:
        event = ClientEvent(kind, trio.current_time(), time.time(), data)
        self.event_log.append(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("an event listener failed")
        self._changed.set()
        self._changed = trio.Event()
        for listener in list(self._listeners):
            try:
                listener.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.remove(listener)

    def _set_state(self, state: State, **data: Any) -> None:
        self.state = state
        self._emit("state", state=state, attempt=self.attempt, **data)

    def _transcript(self, conversation_id: str) -> Transcript:
        transcript = self.transcripts.get(conversation_id)
        if transcript is None:
            transcript = self.transcripts[conversation_id] = Transcript()
        return transcript

    # -- the connection loop -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if not self._online:
                    self._set_state("offline")
                    await self._online_changed.wait()
                    continue
                self.attempt += 1
                self._set_state("reconnecting" if self._welcomed_once else "connecting")
                try:
                    ended = await self._connect_once()
                except* trio_websocket.HandshakeError as refused:
                    # A refused handshake (an HTTP 503 from a load balancer with no node
                    # up) is raised by trio-websocket's reader task, so out of the
                    # attempt's nursery rather than from the connect: a failed attempt.
                    self._session = self._control = None
                    why = f"handshake refused: {refused.exceptions[0]!r}"
                    ended = _Ended(CloseCode.ABNORMAL, why, False, False)
                self.last_close_code = ended.code
                self._emit("closed", code=ended.code, reason=ended.reason)
                if ended.code == CloseCode.AUTH_FAILED:
                    self._close_now(
                        f"authentication failed: {ended.reason}", AuthenticationFailed(ended.reason)
                    )
                    return
                if ended.code == CloseCode.NORMAL and ended.welcomed:
                    self._close_now("the server closed the connection")
                    return
                if not self._online:
                    continue
                if ended.healthy:
                    self.backoff.reset()
                    self.attempt = 1
                delay = self._next_delay(ended.code)
                if delay is None:
                    self._close_now(f"gave up after {self.attempt} attempts")
                    return
                await self._wait(delay)
        finally:
            if self.state != "closed":
                self._close_now(self.close_reason or "closed")

    def _next_delay(self, code: int) -> float | None:
        given, self._hint = self._hint, None
        return retry_delay(self.backoff, code, given, trio.current_time(), self._random)

    async def _wait(self, delay: float) -> None:
        self.retry_at = trio.current_time() + delay
        self._set_state(
            "reconnecting" if self._welcomed_once else "connecting",
            delay=delay,
            retry_at=self.retry_at,
        )
        with trio.CancelScope() as scope:
            self._wait_scope = scope
            await trio.sleep(delay)
        self._wait_scope = None
        self.retry_at = None

    async def _connect_once(self) -> _Ended:
        """One connection: connect, hello, sync, then read until it ends.

        The one place where trio-websocket and Trio errors become close codes."""
        self._connection_no += 1
        self._dead = False
        welcomed = False
        connected_at = 0.0
        code, reason = CloseCode.ABNORMAL, "connection lost"
        ws: trio_websocket.WebSocketConnection | None = None
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as session:
                self._session = session
                try:
                    # The whole attempt (TCP, WebSocket handshake, hello to welcome) has
                    # one timeout: trio-websocket 0.12's connect can hang for ever.
                    with trio.fail_after(self.connect_timeout):
                        ws = await self._open_websocket(nursery)
                        welcome = await self._hello(ws)
                    welcomed = True
                    connected_at = trio.current_time()
                    await self._serve(ws, welcome, nursery)
                except trio.TooSlowError:
                    code, reason = CloseCode.ABNORMAL, "connect timed out"
                except (ValueError, ProtocolError) as exc:
                    code, reason = CloseCode.ABNORMAL, f"unreadable frame from the server: {exc}"
                except AuthenticationFailed as exc:
                    code, reason = CloseCode.AUTH_FAILED, str(exc)
                except trio_websocket.ConnectionClosed as exc:
                    if exc.reason is not None:
                        code, reason = exc.reason.code, exc.reason.reason or exc.reason.name
                except trio_websocket.HandshakeError as exc:
                    code, reason = CloseCode.ABNORMAL, f"handshake failed: {exc!r}"
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    code, reason = CloseCode.ABNORMAL, f"network error: {exc}"
            self._session = None
            self._control = None
            if session.cancelled_caught:
                if not self._online:
                    code, reason = CloseCode.GOING_AWAY, "offline"
                elif self._dead:
                    code, reason = CloseCode.ABNORMAL, "no answer from the server"
            if code == CloseCode.TOO_BIG:
                self._reject_in_flight(
                    ErrorCode.TOO_LARGE, "the server refused a message as too big"
                )
            if ws is not None:
                # trio-websocket's close waits for the peer without a limit. A link we
                # gave up on gets no close handshake at all: the socket is just closed.
                polite = 0.0 if self._dead or not self._online else 1.0
                with trio.move_on_after(polite) as scope:
                    scope.shield = True
                    await ws.aclose()
            nursery.cancel_scope.cancel()
        healthy = welcomed and trio.current_time() - connected_at >= self.healthy_after
        return _Ended(code, reason, welcomed, healthy)

    async def _open_websocket(self, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
        """The WebSocket connection to :attr:`url`. For ``wss://`` the TLS handshake is
        done here first: trio-websocket's connect waits for ever when it fails (an
        untrusted certificate), so its ``ssl.SSLError`` is raised at once instead."""
        url = urllib.parse.urlsplit(self.url)
        if url.scheme != "wss":
            return await trio_websocket.connect_websocket_url(
                nursery, self.url, message_queue_size=64
            )
        host, port = url.hostname or "", url.port or 443
        context = self.ssl_context if self.ssl_context is not None else ssl.create_default_context()
        tls = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context, https_compatible=True
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tls)
            if isinstance(exc.__cause__, ssl.SSLError):
                raise exc.__cause__ from None  # names what failed: the certificate, ...
            raise
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        return await trio_websocket.wrap_client_stream(
            nursery,
            tls,
            url.netloc.rpartition("@")[2],  # the Host header: host[:port], as in the URL
            resource,
            message_queue_size=64,
        )

    async def _hello(self, ws: trio_websocket.WebSocketConnection) -> wire.Welcome:
        await ws.send_message(wire.hello_frame(self.token, self.name, self.room))
        while True:
            frame = wire.parse_server_frame(await ws.get_message())
            if isinstance(frame, wire.Welcome):
                return frame
            if isinstance(frame, wire.ServerError) and frame.code == ErrorCode.AUTH_FAILED:
                raise AuthenticationFailed(frame.message or "authentication failed")

    async def _serve(
        self, ws: trio_websocket.WebSocketConnection, welcome: wire.Welcome, nursery: trio.Nursery
    ) -> None:
        send, receive = trio.open_memory_channel[str | None](CONTROL_QUEUE)
        self._control = send
        self._last_received = trio.current_time()
        self._history_pending.clear()
        if self._welcomed_once:
            self.reconnects += 1
        self._welcomed_once = True
        self.attempt = 0
        self._on_welcome(welcome)
        self._set_state("connected")
        nursery.start_soon(self._writer, ws, receive, self._connection_no)
        interval = self.heartbeat if self.heartbeat is not None else welcome.heartbeat_s
        if interval > 0:
            nursery.start_soon(self._watchdog, interval)
        self._kick()
        while True:
            raw = await ws.get_message()
            self._last_received = trio.current_time()
            try:
                self._on_frame(wire.parse_server_frame(raw))
            except ProtocolError as exc:
                # A frame we cannot read is logged and skipped: clients ignore what
                # they do not understand.
                log.warning("ignoring a frame we cannot read: %s", exc)

    async def _writer(
        self,
        ws: trio_websocket.WebSocketConnection,
        control: trio.MemoryReceiveChannel[str | None],
        connection: int,
    ) -> None:
        try:
            async with control:
                async for frame in control:
                    if frame is not None:
                        await ws.send_message(frame)
                        continue
                    for outgoing in self._outbox.due(connection, trio.current_time()):
                        outgoing.sent_on = connection
                        outgoing.sends += 1
                        await ws.send_message(outgoing.frame())
        except (
            trio_websocket.ConnectionClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass  # the reader reports how the connection ended

    async def _watchdog(self, interval: float) -> None:
        """Application pings: a link that went silent is noticed within 2 x interval."""
        ping = 0
        while True:
            await trio.sleep(interval / 4)
            if trio.current_time() - self._last_received > 1.5 * interval:
                self._dead = True
                if self._session is not None:
                    self._session.cancel()
                return
            if trio.current_time() - self._last_received > interval / 2 and self._control:
                ping += 1
                with contextlib.suppress(trio.WouldBlock):
                    self._control.send_nowait(wire.ping_frame(ping))

    def _request_history(self, conversation_id: str, after_seq: int) -> None:
        if conversation_id in self._history_pending or self._control is None:
            return
        frame = wire.history_request(
            after_seq, HISTORY_PAGE, conversation_id if self.role == "staff" else None
        )
        try:
            self._control.send_nowait(frame)
            self._history_pending.add(conversation_id)
        except trio.WouldBlock:
            pass  # asked again when the next frame shows the gap

    # -- frames -------------------------------------------------------------------------

    def _on_welcome(self, welcome: wire.Welcome) -> None:
        self.token = welcome.token or self.token
        self.guest_id = welcome.guest_id
        self.conversation_id = welcome.conversation_id
        self.status = welcome.status
        self.read_seq = welcome.read_seq
        if self.conversation_id is not None:
            transcript = self._transcript(self.conversation_id)
            if welcome.last_seq > transcript.held:
                self._request_history(self.conversation_id, transcript.held)

    def _on_frame(self, frame: wire.ServerFrame) -> None:
        if isinstance(frame, wire.Pushed):
            self._on_message(frame.message)
        elif isinstance(frame, wire.Ack):
            self._on_ack(frame)
        elif isinstance(frame, wire.History):
            self._on_history(frame)
        elif isinstance(frame, wire.StatusChanged):
            if frame.conversation_id == self.conversation_id:
                self.status = frame.status
                self.assigned_to = frame.assigned_to
            self._emit(
                "status",
                conversation_id=frame.conversation_id,
                status=frame.status,
                assigned_to=frame.assigned_to,
            )
        elif isinstance(frame, wire.Draft):
            self.drafts[frame.conversation_id] = frame.text
            self._emit("draft", conversation_id=frame.conversation_id, text=frame.text)
        elif isinstance(frame, wire.TypingChanged):
            self.typing[frame.sender] = frame.active
            if frame.sender == "ai" and not frame.active:
                self._end_draft(frame.conversation_id)
            self._emit(
                "typing",
                conversation_id=frame.conversation_id,
                sender=frame.sender,
                active=frame.active,
            )
        elif isinstance(frame, wire.ReadMark):
            if frame.reader == "staff":
                self.read_seq = max(self.read_seq, frame.seq)
            self._emit(
                "read", conversation_id=frame.conversation_id, reader=frame.reader, seq=frame.seq
            )
        elif isinstance(frame, wire.ServerError):
            self._on_error(frame)
        elif isinstance(frame, wire.Reconnect):
            self._hint = (frame.after_ms / 1000, trio.current_time())
        elif isinstance(frame, wire.Pong):
            waiter = self._pings.get(str(frame.id))
            if waiter is not None:
                waiter.finish(None)
                self._emit("pong", id=frame.id)
        # anything else: nothing to do (any frame proves the link is alive)

    def _end_draft(self, conversation_id: str) -> None:
        if self.drafts.pop(conversation_id, None) is not None:
            self._emit("draft", conversation_id=conversation_id, text=None)

    def _on_message(self, message: Message) -> None:
        if message.sender == "ai":
            self._end_draft(message.conversation_id)  # the stored answer replaces it
        transcript = self._transcript(message.conversation_id)
        self._emit("pushed", seq=message.seq, conversation_id=message.conversation_id)
        for added in transcript.add(message):
            self._emit("message", message=added)
        if transcript.gap:
            self._request_history(message.conversation_id, transcript.held)

    def _on_history(self, frame: wire.History) -> None:
        conversation_id = frame.conversation_id
        self._history_pending.discard(conversation_id)
        transcript = self._transcript(conversation_id)
        for message in frame.messages:
            for added in transcript.add(message):
                self._emit("message", message=added)
        if frame.has_more or transcript.gap or transcript.held < frame.last_seq:
            self._request_history(conversation_id, transcript.held)

    def _on_ack(self, frame: wire.Ack) -> None:
        cmid = frame.client_msg_id
        outgoing = self._outbox.remove(cmid)
        if outgoing is None:
            return
        message = Message(
            seq=frame.seq,
            conversation_id=frame.conversation_id,
            sender=self.role,
            author=self.guest_id if self.role == "guest" else self.name,
            text=outgoing.text,
            ts=frame.ts,
            client_msg_id=cmid,
        )
        # ``resent``: the ack may answer a retry, whose original push went to a
        # connection that is gone (the message then comes from history).
        self._emit("ack", client_msg_id=cmid, seq=message.seq, resent=outgoing.sends > 1)
        waiter = self._waiters.pop(cmid, None)
        if waiter is not None:
            waiter.finish(message)

    def _on_error(self, frame: wire.ServerError) -> None:
        code = frame.code
        ref = frame.ref
        self._emit("error", code=code, message=frame.message, ref=ref)
        outgoing = self._outbox.get(ref) if isinstance(ref, str) else None
        if outgoing is not None:
            if code in (ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL):
                # Not refused, just not now: try again (same client_msg_id) later.
                wait = (frame.retry_after_ms or 1000) / 1000
                self._hint = (wait, trio.current_time())
                outgoing.sent_on = None
                outgoing.not_before = trio.current_time() + wait
                if self._nursery is not None:
                    self._nursery.start_soon(self._kick_later, wait)
                return
            self._outbox.remove(ref)  # type: ignore[arg-type]
            waiter = self._waiters.pop(ref, None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.finish(error=MessageRejected(code, frame.message))
            return
        if ref == "history" and code == ErrorCode.RATE_LIMITED and self._nursery is not None:
            # One page at a time, and pages cost: ask again for what is still missing.
            self._nursery.start_soon(self._history_later, (frame.retry_after_ms or 1000) / 1000)
            return
        self._on_request_error(code, ref, frame.message)

    async def _history_later(self, delay: float) -> None:
        await trio.sleep(delay)
        for conversation_id in list(self._history_pending):
            self._history_pending.discard(conversation_id)
            self._request_history(conversation_id, self._transcript(conversation_id).held)

    def _on_request_error(self, code: str, ref: Any, message: str) -> None:
        """An error about a request (not a message); staff clients resolve waiters."""

    async def _kick_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._kick()

    def _reject_in_flight(self, code: str, why: str) -> None:
        in_flight = self._outbox.in_flight(self._connection_no)
        if in_flight:
            first = in_flight[0]
            self._outbox.remove(first.client_msg_id)
            waiter = self._waiters.pop(first.client_msg_id, None)
            if waiter is not None:
                waiter.finish(error=MessageRejected(code, why))


class StaffClient(ChatClient):
    """A staff console's connection: the queue, claims, replies, hand-backs.

    ``token`` is a staff token from ``trio-chat staff add``. :attr:`queue` holds the
    latest summary of every conversation the server reported; :attr:`transcripts`
    holds the conversations this connection is subscribed to.
    """

    role = "staff"

    def __init__(self, url: str, *, token: str, **kwargs: Any) -> None:
        super().__init__(url, token=token, **kwargs)
        self.staff_id: str | None = None
        self.queue: dict[str, wire.ConversationSummary] = {}
        self.queue_ready = False  # the current connection's queue has arrived
        self.subscribed: set[str] = set()
        self.on_duty: tuple[str, ...] = ()  # staff signed in, by name (staff_presence)
        self._watching: set[str] = set()
        self._action_waiters: dict[str, deque[tuple[str, _Waiter]]] = {}

    def _on_welcome(self, welcome: wire.Welcome) -> None:
        self.token = welcome.token or self.token
        self.staff_id = welcome.staff_id
        self.name = welcome.name or self.name
        self.subscribed.clear()
        self.queue_ready = False
        # The server re-subscribes us to what we hold; watches we renew ourselves.
        for conversation_id in self._watching:
            if self._control is not None:
                self._control.send_nowait(wire.staff_action_frame("watch", conversation_id))

    def _on_frame(self, frame: wire.ServerFrame) -> None:
        if isinstance(frame, wire.Queue):
            self.queue = {c.conversation_id: c for c in frame.conversations}
            self.queue_ready = True
            self._emit("queue", conversations=list(frame.conversations))
        elif isinstance(frame, wire.StaffPresence):
            self.on_duty = frame.staff
            self._emit("presence", staff=list(frame.staff))
        elif isinstance(frame, wire.ConversationChanged):
            summary = frame.summary
            self.queue[summary.conversation_id] = summary
            self._emit("conversation", summary=summary)
        elif isinstance(frame, wire.Subscribed):
            conversation_id = frame.conversation_id
            self.subscribed.add(conversation_id)
            transcript = self._transcript(conversation_id)
            if frame.last_seq > transcript.held:
                self._request_history(conversation_id, transcript.held)
            self._finish_action(("claim", "watch"), conversation_id)
            self._emit(
                "subscribed",
                conversation_id=conversation_id,
                last_seq=frame.last_seq,
                status=frame.status,
                assigned_to=frame.assigned_to,
            )
        else:
            if isinstance(frame, wire.StatusChanged):
                conversation_id = frame.conversation_id
                known = self.queue.get(conversation_id)
                if known is not None:
                    # The server also sends the whole entry (``conversation``); this
                    # keeps the queue right between the two frames.
                    self.queue[conversation_id] = dataclasses.replace(
                        known, status=frame.status, assigned_to=frame.assigned_to
                    )
                if frame.status == "ai":
                    self._finish_action(("release",), conversation_id)
                elif frame.status == "resolved":
                    self._finish_action(("resolve",), conversation_id)
            super()._on_frame(frame)

    def _finish_action(self, actions: tuple[str, ...], conversation_id: str) -> None:
        for action in actions:
            waiters = self._action_waiters.get(action)
            if not waiters:
                continue
            for entry in list(waiters):
                if entry[0] == conversation_id:
                    waiters.remove(entry)
                    entry[1].finish(None)
                    return

    def _on_request_error(self, code: str, ref: Any, message: str) -> None:
        waiters = self._action_waiters.get(str(ref))
        if waiters:
            _, waiter = waiters.popleft()
            waiter.finish(error=ProtocolError(code, message, str(ref)))

    async def _action(self, action: wire.StaffAction, conversation_id: str) -> None:
        waiter = _Waiter()
        self._action_waiters.setdefault(action, deque()).append((conversation_id, waiter))
        try:
            await self._send_control(wire.staff_action_frame(action, conversation_id))
            await waiter.wait()
        finally:
            waiters = self._action_waiters.get(action)
            if waiters and (conversation_id, waiter) in waiters:
                waiters.remove((conversation_id, waiter))

    async def claim(self, conversation_id: str) -> None:
        """Take the conversation; returns once subscribed. Raises ``ProtocolError``
        (``conflict``, ``not_found``)."""
        await self._action("claim", conversation_id)

    async def release(self, conversation_id: str) -> None:
        """Hand the conversation back to the concierge."""
        await self._action("release", conversation_id)

    async def resolve(self, conversation_id: str) -> None:
        await self._action("resolve", conversation_id)

    async def watch(self, conversation_id: str) -> None:
        """Follow a conversation without claiming it (renewed after reconnects)."""
        self._watching.add(conversation_id)
        await self._action("watch", conversation_id)

    async def unwatch(self, conversation_id: str) -> None:
        self._watching.discard(conversation_id)
        self.subscribed.discard(conversation_id)
        await self._send_control(wire.staff_action_frame("unwatch", conversation_id))

    async def reply(self, conversation_id: str, text: str) -> Message:
        """Write to a conversation this staff member holds; returns the stored message."""
        return await self._send_message(
            OutgoingMessage(text.strip(), conversation_id=conversation_id), text
        )

    async def send(self, text: str) -> Message:  # pragma: no cover - guidance only
        raise TypeError("staff write with reply(conversation_id, text)")

    async def set_typing(self, active: bool, conversation_id: str | None = None) -> None:
        await self._send_control(wire.typing_request(active, conversation_id), live_only=True)

    async def mark_read(self, seq: int, conversation_id: str | None = None) -> None:
        await self._send_control(wire.read_request(seq, conversation_id))

    def transcript_of(self, conversation_id: str) -> list[Message]:
        return self._transcript(conversation_id).messages
