"""A load generator cheap enough to measure servers faster than itself.

Every connection is an ``asyncio.Protocol`` on a raw socket: the upgrade request and
the frames are built by hand (client frames masked with one key per connection, by a
single integer XOR), server frames are split by their headers, and answers are matched
by bytes, never parsed as JSON. One process drives many connections. How much the
generator can do is not assumed but measured in the same run, against
:class:`NullServer`, which answers every frame with a pre-built frame of the shape the
real server sends (see ``_scenarios.scenario_throughput``).

Three dialects, one per kind of server measured:

* ``chat``: trio-chat's protocol v1 (``hello``, then ``message`` frames, answered by an
  ``ack`` and the message pushed back);
* ``echo``: a bare WebSocket echo server, answered by the same frame;
* ``socketio``: Socket.IO 5 over Engine.IO 4 (an event with an ack id, answered by the
  ack and an emit to the guest's room).

No Trio here: this module runs only in the load-generator processes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import time
from collections.abc import Callable
from typing import Final, cast

from ..core import client_protocol as wire
from ..core.backoff import Backoff, retry_delay
from ..core.protocol import MAX_HISTORY_LIMIT, CloseCode
from ..server._wire import apply_mask

__all__ = [
    "DIALECTS",
    "NullServer",
    "StormGuest",
    "WsClient",
    "client_frame",
    "field",
    "open_client",
    "server_frame",
    "split_frames",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT: Final = 0x1
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

DIALECTS: Final = ("chat", "echo", "socketio")


def _header(opcode: int, length: int, mask_bit: int) -> bytes:
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 1 << 16:
        return bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")


def client_frame(payload: bytes, mask: bytes, opcode: int = TEXT) -> bytes:
    """A masked client frame (RFC 6455 5.3): the payload XORed with ``mask`` as one
    big integer, which costs about a microsecond for a chat message."""
    return _header(opcode, len(payload), 0x80) + mask + apply_mask(payload, mask)


def server_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """An unmasked (server) frame."""
    return _header(opcode, len(payload), 0) + payload


def split_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete frame off the front of ``buffer``: (opcode, payload) pairs.
    Masked payloads are returned still masked; nothing here needs to read them."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    size = len(buffer)
    while size - pos >= 2:
        second = buffer[pos + 1]
        length = second & 0x7F
        head = 2
        if length == 126:
            if size - pos < 4:
                break
            length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if size - pos < 10:
                break
            length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            head = 10
        if second & 0x80:
            head += 4
        end = pos + head + length
        if end > size:
            break
        frames.append((buffer[pos] & 0x0F, bytes(buffer[pos + head : end])))
        pos = end
    del buffer[:pos]
    return frames


def field(payload: bytes, name: bytes) -> bytes | None:
    """The string value of JSON field ``name`` in ``payload``, found by bytes (the
    servers measured write no space after the colon and no escapes in these values)."""
    key = b'"' + name + b'":"'
    start = payload.find(key)
    if start < 0:
        return None
    start += len(key)
    return payload[start : payload.index(b'"', start)]


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


# ------------------------------------------------------------------------- client


class WsClient(asyncio.Protocol):
    """One WebSocket client connection speaking ``dialect``.

    ``ready`` resolves once the session is open (after ``welcome`` for chat, the
    namespace connect for Socket.IO, the handshake for echo). Afterwards each text
    frame that answers a message calls ``on_answer(payload, now)``, and every other
    text frame ``on_other(payload, now)``; ``now`` is ``time.monotonic()``.
    """

    def __init__(
        self,
        dialect: str,
        host: str,
        path: str,
        token: str | None = None,
        on_answer: Callable[[WsClient, bytes, float], None] | None = None,
        on_other: Callable[[WsClient, bytes, float], None] | None = None,
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.host = host
        self.path = path
        self.token = token
        self.on_answer = on_answer
        self.on_other = on_other
        self.mask = os.urandom(4)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buffer = bytearray()
        self.sent_at = 0.0  # the closed loop's one message in flight
        self.ack_ids = 0  # Socket.IO ack ids, per connection
        self.index = 0  # free for the driver
        self.welcome = b""  # chat: the welcome frame
        self.close_code: int | None = None  # the server's close frame's code, if any

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path.encode(), self.host.encode(), key)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"connection lost: {exc}")
        if not self.ready.done():
            self.ready.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                self._fail(f"upgrade refused: {status.decode(errors='replace')}")
                return
            del self.buffer[: end + 4]
            self.upgraded = True
            self._opened()
        now = time.monotonic()
        for opcode, payload in split_frames(self.buffer):
            if opcode == TEXT:
                self._text(payload, now)
            elif opcode == PING:
                self._send(payload, PONG)
            elif opcode == CLOSE:
                # Answer the close (RFC 6455 5.5.1) and hang up.
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self._send(payload[:2], CLOSE)
                assert self.transport is not None
                self.transport.close()
                return

    # the dialects
    def _opened(self) -> None:
        if self.dialect == "chat":
            self._send(wire.hello_frame(self.token).encode())
        elif self.dialect == "echo":
            self.ready.set_result(None)
        # Socket.IO: the server speaks first (Engine.IO's open packet).

    def _text(self, payload: bytes, now: float) -> None:
        if self.ready.done():
            if self.dialect == "chat":
                answer = b'"type":"ack"' in payload
            elif self.dialect == "echo":
                answer = True
            else:
                answer = payload[:2] == b"43"
                if payload == b"2":  # Engine.IO ping
                    self._send(b"3")
                    return
            if answer:
                if self.on_answer is not None:
                    self.on_answer(self, payload, now)
            elif self.on_other is not None:
                self.on_other(self, payload, now)
            return
        if self.dialect == "chat":
            if b'"type":"welcome"' in payload:
                self.welcome = payload
                self.ready.set_result(None)
            elif b'"type":"error"' in payload:
                self._fail(f"hello refused: {payload[:200]!r}")
        elif payload[:1] == b"0":  # Engine.IO open: join the default namespace
            self._send(b"40")
        elif payload[:2] == b"40":
            self.ready.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def _send(self, payload: bytes, opcode: int = TEXT) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload, self.mask, opcode))

    def send_message(self, client_msg_id: str, text: str) -> None:
        """Send one chat message (an event with an ack id for Socket.IO)."""
        if self.dialect == "socketio":
            body = b'{"client_msg_id":"%s","text":"%s"}' % (client_msg_id.encode(), text.encode())
            self.ack_ids += 1
            self._send(b'42%d["message",%s]' % (self.ack_ids, body))
        else:
            self._send(wire.message_request(client_msg_id, text).encode())

    def send_json(self, payload: bytes) -> None:
        self._send(payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(
    url: str,
    dialect: str,
    *,
    token: str | None = None,
    source: str | None = None,
    on_answer: Callable[[WsClient, bytes, float], None] | None = None,
    on_other: Callable[[WsClient, bytes, float], None] | None = None,
    within: float = 30.0,
) -> WsClient:
    """Connect to ``url`` (``ws://host:port/path``) from local address ``source`` and
    wait until the session is open (each step within ``within`` seconds)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    if dialect == "socketio":
        path = "socket.io/?EIO=4&transport=websocket"
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(
            lambda: WsClient(dialect, hostport, "/" + path, token, on_answer, on_other),
            host,
            int(port),
            local_addr=(source, 0) if source else None,
        ),
        within,
    )
    try:
        await asyncio.wait_for(client.ready, within)
    except BaseException:
        client.close()
        raise
    return client


# ------------------------------------------------------------------- storm guest


class StormGuest:
    """A guest that reconnects by the client's own rule, on the raw connections above:
    the storm benchmark's guest.

    The rule is :func:`~trio_chat.core.backoff.retry_delay`, which
    :class:`~trio_chat.ChatClient` follows too: the backoff's delay after a failure or a
    drop, what is left of the server's hint after a restart, the backoff reset after a
    connection that lasted ``healthy_after``. Back means reconnected with the guest's
    token and caught up with its history. Cheap enough that a load process acts on its
    guests' timers when they fall due (late by 5-42 ms at p99 in the judged storms of
    10,000 guests, against 89-579 ms with ``ChatClient``s), so the storm's peak measures
    the rule, not the generator.
    """

    HISTORY_PAGE: Final = MAX_HISTORY_LIMIT  # as many as the server gives at once

    def __init__(
        self,
        url: str,
        backoff: Backoff,
        *,
        source: str | None = None,
        connect_within: float = 10.0,
        healthy_after: float = 10.0,
        on_back: Callable[[StormGuest], None] | None = None,
    ) -> None:
        self.url = url
        self.backoff = backoff
        self.source = source
        self.connect_within = connect_within
        self.healthy_after = healthy_after
        self.on_back = on_back
        self._random = random.Random(backoff.seed)  # the hint's jitter, as ChatClient's
        self.token: str | None = None
        self.held = 0  # the highest seq of its conversation it holds
        self.hint: tuple[float, float] | None = None  # (seconds, time.monotonic() of arrival)
        self.reconnects = 0  # sessions resumed and caught up
        self.synced = False  # connected, with nothing left to fetch
        self.attempts: list[float] = []  # wall clock of each connection attempt
        self.returns: list[float] = []  # wall clock of each resumed session caught up
        self.lateness: list[tuple[float, float]] = []  # (wall clock, seconds past due)
        self._welcomed_once = False
        self._resumed = False  # this session resumed an earlier one

    async def run(self, pacing: asyncio.Semaphore | None = None) -> None:
        """Connect (the first time under ``pacing``, to pace a crowd's setup up to the
        welcome), then reconnect whenever the connection ends, until the backoff gives
        up."""
        while True:
            self.attempts.append(time.time())
            if pacing is not None:
                async with pacing:
                    client = await self._connect()
                pacing = None
            else:
                client = await self._connect()
            code, healthy = CloseCode.ABNORMAL, False
            if client is not None:
                connected_at = time.monotonic()
                await client.closed
                self.synced = False
                code = client.close_code or CloseCode.ABNORMAL
                healthy = time.monotonic() - connected_at >= self.healthy_after
            if healthy:
                self.backoff.reset()
            now = time.monotonic()
            given, self.hint = self.hint, None
            delay = retry_delay(self.backoff, code, given, now, self._random)
            if delay is None:
                return
            await asyncio.sleep(delay)
            self.lateness.append((time.time(), time.monotonic() - now - delay))

    async def _connect(self) -> WsClient | None:
        """A session up to its welcome, or None if it failed on the way."""
        try:
            client = await open_client(
                self.url,
                "chat",
                token=self.token,
                source=self.source,
                on_answer=self._frame,
                on_other=self._frame,
                within=self.connect_within,
            )
        except (OSError, TimeoutError):  # refused, reset, timed out (ConnectionError too)
            return None
        self._welcome(client, wire.parse_server_frame(client.welcome))
        return client

    def _welcome(self, client: WsClient, welcome: wire.ServerFrame) -> None:
        assert isinstance(welcome, wire.Welcome)
        self.token = welcome.token or self.token
        self._resumed, self._welcomed_once = self._welcomed_once, True
        if welcome.last_seq > self.held:
            self._ask_history(client)
        else:
            self._caught_up()

    def _ask_history(self, client: WsClient) -> None:
        client.send_json(wire.history_request(self.held, self.HISTORY_PAGE).encode())

    def _caught_up(self) -> None:
        self.synced = True
        if self._resumed:
            self._resumed = False
            self.reconnects += 1
            self.returns.append(time.time())
            if self.on_back is not None:
                self.on_back(self)

    def _frame(self, client: WsClient, payload: bytes, now: float) -> None:
        if b'"type":"reconnect"' in payload:
            frame = wire.parse_server_frame(payload)
            assert isinstance(frame, wire.Reconnect)
            self.hint = (frame.after_ms / 1000, now)
        elif b'"type":"history"' in payload:
            history = wire.parse_server_frame(payload)
            assert isinstance(history, wire.History)
            for message in history.messages:
                self.held = max(self.held, message.seq)
            if history.has_more or self.held < history.last_seq:
                self._ask_history(client)
            else:
                self._caught_up()
        elif b'"type":"message"' in payload:
            pushed = wire.parse_server_frame(payload)
            if isinstance(pushed, wire.Pushed) and pushed.message.seq == self.held + 1:
                self.held += 1
            elif isinstance(pushed, wire.Pushed) and pushed.message.seq > self.held:
                self.synced = False
                self._ask_history(client)  # a gap: fetch it


# -------------------------------------------------------------------- null server


def _null_answers(dialect: str) -> tuple[bytes, bytes]:
    """(the answer to the session's first frame, the answer to every later one), each
    shaped and sized as the real server's."""
    if dialect == "chat":
        welcome = (
            b'{"type":"welcome","role":"guest","token":"g_0000000000000000.xxxxxxxxxxxxxxxxxxxxxx",'
            b'"guest_id":"g_0000000000000000","conversation_id":"c_0000000000000000",'
            b'"status":"ai","last_seq":0,"read_seq":0,"heartbeat_s":0,"server":"null"}'
        )
        ack = (
            b'{"type":"ack","client_msg_id":"b0-0000","seq":1,'
            b'"conversation_id":"c_0000000000000000","ts":"2026-01-01T00:00:00.000Z"}'
        )
        push = (
            b'{"type":"message","seq":1,"conversation_id":"c_0000000000000000",'
            b'"sender":"guest","author":"g_0000000000000000","text":"msg 0000",'
            b'"ts":"2026-01-01T00:00:00.000Z","client_msg_id":"b0-0000"}'
        )
        return server_frame(welcome), server_frame(ack) + server_frame(push)
    if dialect == "echo":
        echo = b'{"type":"message","client_msg_id":"b0-0000","text":"msg 0000"}'
        return server_frame(echo), server_frame(echo)
    connected = b'40{"sid":"AAAAAAAAAAAAAAAAAAAA"}'
    ack = b"431[{}]"
    emit = b'42["message",{"client_msg_id":"b0-0000","text":"msg 0000"}]'
    return server_frame(connected), server_frame(ack) + server_frame(emit)


class NullServer(asyncio.Protocol):
    """A server that does no work: it answers the WebSocket upgrade, then every frame
    with a pre-built frame (or two) of the shape ``dialect``'s real server sends. The
    load generator's ceiling is its rate against this."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.first, self.answer = _null_answers(dialect)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.frames = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            start = head.lower().find(b"sec-websocket-key:")
            key = head[start + 18 :].split(b"\r\n", 1)[0].strip() if start >= 0 else b""
            del self.buffer[: end + 4]
            self.upgraded = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % _accept_key(key)
            )
            if self.dialect == "socketio":
                self.transport.write(
                    server_frame(b'0{"sid":"AAAAAAAAAAAAAAAAAAAA","pingInterval":25000}')
                )
        out = []
        for opcode, payload in split_frames(self.buffer):
            if opcode != TEXT or (self.dialect == "socketio" and len(payload) == 1):
                continue  # control frames, and Engine.IO pongs, need no answer
            out.append(self.first if self.frames == 0 and self.dialect != "echo" else self.answer)
            self.frames += 1
        if out:
            self.transport.write(b"".join(out))


async def serve_null(dialect: str, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: NullServer(dialect), host, port, backlog=4096)
