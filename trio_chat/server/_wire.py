"""The server's WebSocket layer: RFC 6455 framing on bytes the server already owns.

The HTTP front (``_http``) reads the upgrade request with h11; this module answers it
(no extension, no subprotocol) and then carries frames over the same stream, with one
reader (the session's own loop) and one writer at a time. Incoming frames are decoded
by a sans-I/O *frame engine*: ``wsproto``'s ``Connection`` or ``websockets``'
``Protocol`` (which unmasks in C), both through their public APIs, picked by
measurement (``ENGINES``, docs/benchmarks.md). Outgoing text frames are written here
(:func:`text_frame`): a server frame is a two-to-ten-byte header and the payload.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, Protocol

import h11
import trio

from ..core.errors import ConnectionLost
from ._http import PrefixStream

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "FrameTooBig",
    "WebSocket",
    "handshake_response",
    "text_frame",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_BYTES: Final = 64 * 1024

OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA


class FrameTooBig(ConnectionLost):
    """A message over the byte limit arrived (the server closes with 1009)."""


class ProtocolViolation(ConnectionLost):
    """The peer broke RFC 6455 (bad framing, bad UTF-8): close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 0x10000:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + payload


def text_frame(text: str) -> bytes:
    """One whole text frame as a server sends it: unmasked, no extension (RFC 6455
    5.2); the same bytes as wsproto's ``send(TextMessage(text))``."""
    return _frame(OP_TEXT, text.encode())


def close_frame(code: int, reason: str = "") -> bytes:
    return _frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])


def handshake_response(request: h11.Request, server_header: bytes) -> bytes:
    """The ``101 Switching Protocols`` answering ``request`` (already checked to be a
    WebSocket upgrade). No extension is accepted, so frames never carry RSV bits."""
    key = b""
    for name, value in request.headers:
        if name.lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\nServer: " + server_header + b"\r\n\r\n"
    )


# ------------------------------------------------------------------- frame engines


class Incoming(NamedTuple):
    """What a frame engine found: a whole ``message`` (str or bytes), a ``ping`` or
    ``pong`` payload, or the peer's ``close`` (code, reason). (A tuple: one is made
    per message, and a frozen dataclass took a third of the plain path's time.)"""

    kind: str
    data: str | bytes = b""
    code: int = 1005


class FrameEngine(Protocol):
    def receive(self, data: bytes) -> list[Incoming]:
        """Decode ``data``; raises :class:`FrameTooBig` or :class:`ProtocolViolation`."""
        ...


class WsprotoEngine:
    """wsproto's post-handshake ``Connection`` (its documented use when the handshake
    is done elsewhere). It does not limit message size: counted here, in bytes."""

    def __init__(self, max_message_bytes: int) -> None:
        from wsproto.connection import Connection, ConnectionType

        self._connection = Connection(ConnectionType.SERVER)
        self._limit = max_message_bytes
        self._parts: list[str | bytes] = []
        self._size = 0

    def receive(self, data: bytes) -> list[Incoming]:
        from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
        from wsproto.utilities import RemoteProtocolError

        self._connection.receive_data(data)
        found: list[Incoming] = []
        try:
            for event in self._connection.events():
                if isinstance(event, TextMessage | BytesMessage):
                    part = event.data if isinstance(event.data, str) else bytes(event.data)
                    self._size += len(part.encode()) if isinstance(part, str) else len(part)
                    if self._size > self._limit:
                        raise FrameTooBig(f"a message over {self._limit} bytes")
                    self._parts.append(part)
                    if event.message_finished:
                        found.append(Incoming("message", _joined(self._parts)))
                        self._parts, self._size = [], 0
                elif isinstance(event, Ping):
                    found.append(Incoming("ping", bytes(event.payload)))
                elif isinstance(event, Pong):
                    found.append(Incoming("pong", bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    if event.code in (1002, 1007):
                        # wsproto reports a peer's broken frame as a close of its own.
                        raise ProtocolViolation(event.code, event.reason or "protocol error")
                    found.append(Incoming("close", event.reason or "", event.code))
        except RemoteProtocolError as exc:
            raise ProtocolViolation(1002, str(exc)) from None
        return found


def _joined(parts: list[str | bytes]) -> str | bytes:
    if isinstance(parts[0], str):
        return "".join([p for p in parts if isinstance(p, str)])
    return b"".join([p for p in parts if isinstance(p, bytes)])


# The largest payload read without the engine (see _read_plain_texts): unmasked in
# Python, which costs about the engine's own overhead at 4 KiB.
PLAIN_TEXT_BYTES: Final = 2048


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 5.3: each byte XOR the mask's byte at its index mod 4 (one big-int XOR,
    in C, instead of a Python step per byte). Masks and unmasks alike: the load
    generator's client frames use it too."""
    length = len(payload)
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little"
    )


def _read_plain_texts(data: bytes, limit: int) -> tuple[list[Incoming], int]:
    """The messages of the whole *plain* text frames at the start of ``data``, and the
    bytes they took. Plain: final (a message of one frame), masked as a client's must
    be, no reserved bit, a payload of at most ``limit`` bytes in its shortest length
    encoding. The first frame that is anything else, or not whole, ends the run: it is
    the engine's. Raises :class:`ProtocolViolation` (1007) for a payload that is not
    UTF-8, as the engine's path does."""
    found: list[Incoming] = []
    start = 0
    end_of_data = len(data)
    while end_of_data - start >= 6:
        if data[start] != 0x81:  # FIN, no RSV, text
            break
        length = data[start + 1] ^ 0x80  # the mask bit must be set: else >= 0x80 here
        if length < 126:
            mask_at = start + 2
        elif length == 126 and end_of_data - start >= 8:
            length = int.from_bytes(data[start + 2 : start + 4], "big")
            if length < 126:
                break  # not the shortest encoding: the engine decides
            mask_at = start + 4
        else:
            break  # unmasked (length > 127), 64-bit lengths, or a header not all here
        end = mask_at + 4 + length
        if length > limit or end > end_of_data:
            break
        payload = apply_mask(data[mask_at + 4 : end], data[mask_at : mask_at + 4])
        try:
            found.append(Incoming("message", payload.decode()))
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(1007, str(exc)) from None
        start = end
    return found, start


class _FrameBoundary:
    """Follows the frame headers of the bytes given to an engine, to tell when it holds
    no part of a frame and no message is half-assembled: only then may the next plain
    text frame bypass it (the engine would return to the same state after it)."""

    __slots__ = ("_header", "_remaining", "fragmented", "given_up")

    def __init__(self) -> None:
        self._header = bytearray()  # the bytes of a header not all here yet
        self._remaining = 0  # payload bytes of the current frame still to come
        self.fragmented = False  # a data message's first frame came, not its last
        self.given_up = False  # a close, or bytes no engine accepts: never bypass again

    @property
    def clean(self) -> bool:
        return not (self._remaining or self._header or self.fragmented or self.given_up)

    def feed(self, data: bytes) -> None:
        at, end = 0, len(data)
        while at < end and not self.given_up:
            if self._remaining:
                step = min(self._remaining, end - at)
                self._remaining -= step
                at += step
                continue
            had = len(self._header)
            self._header += data[at : at + 14 - had]  # 14: the longest header
            header = self._header
            if len(header) < 2:
                at = end
                continue
            length = header[1] & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            size += 4 if header[1] & 0x80 else 0
            if len(header) < size:
                at = end
                continue
            at += size - had
            if length == 126:
                length = int.from_bytes(header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(header[2:10], "big")
            self._remaining = length
            self._header = bytearray()
            self._follow(header[0])

    def _follow(self, first: int) -> None:
        opcode, final = first & 0x0F, bool(first & 0x80)
        if first & 0x70 or opcode not in (0x0, 0x1, 0x2, 0x9, 0xA):
            # A reserved bit or opcode (the engine refuses it), or a close (the engine
            # discards what follows it).
            self.given_up = True
        elif opcode in (0x1, 0x2):
            self.fragmented = not final
        elif opcode == 0x0 and final:
            self.fragmented = False


class WebsocketsEngine:
    """``websockets``' sans-I/O ``Protocol``, opened (the handshake was ours): it
    unmasks in C and enforces the size limit itself.

    A plain text frame (one whole message, small, see :func:`_read_plain_texts`) that
    arrives while the protocol holds nothing unfinished is read here instead: the
    protocol would end in the state it began in, and its generic path cost 6.9 µs of
    the loop's time per message against 1.3 µs (docs/benchmarks.md). Everything else,
    and whatever follows it in the same read, goes to the protocol."""

    def __init__(self, max_message_bytes: int) -> None:
        from websockets.protocol import Protocol as WsProtocol
        from websockets.protocol import Side, State

        self._protocol = WsProtocol(Side.SERVER, state=State.OPEN, max_size=max_message_bytes)
        self._text: bool | None = None  # the kind of the message being assembled
        self._parts: list[bytes] = []
        self._plain_limit = min(PLAIN_TEXT_BYTES, max_message_bytes)
        # Made when the protocol is first given bytes, dropped when it holds nothing
        # again: most connections never need one (idle memory, issue 17).
        self._boundary: _FrameBoundary | None = None

    def receive(self, data: bytes) -> list[Incoming]:
        found: list[Incoming] = []
        boundary = self._boundary
        if boundary is None:
            found, used = _read_plain_texts(data, self._plain_limit)
            if used == len(data):
                return found
            data = data[used:]
            boundary = self._boundary = _FrameBoundary()
        boundary.feed(data)
        if boundary.clean:
            self._boundary = None
        return self._receive(data, found)

    def _receive(self, data: bytes, found: list[Incoming]) -> list[Incoming]:
        from websockets.exceptions import PayloadTooBig, ProtocolError
        from websockets.frames import Frame, Opcode

        protocol = self._protocol
        protocol.receive_data(data)
        # The protocol queues its own answers (pongs, close replies): ours are sent
        # by the connection, so drop them.
        protocol.data_to_send()
        for frame in protocol.events_received():
            if not isinstance(frame, Frame):
                continue  # handshake events: the handshake was ours
            if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
                # Unfragmented messages arrive whole; fragments are joined below.
                text = frame.opcode is Opcode.TEXT
                found.append(self._message(text, bytes(frame.data), frame.fin))
            elif frame.opcode is Opcode.CONT:
                found.append(self._message(None, bytes(frame.data), frame.fin))
            elif frame.opcode is Opcode.PING:
                found.append(Incoming("ping", bytes(frame.data)))
            elif frame.opcode is Opcode.PONG:
                found.append(Incoming("pong", bytes(frame.data)))
            elif frame.opcode is Opcode.CLOSE:
                rcvd = protocol.close_rcvd
                code = rcvd.code if rcvd is not None else 1005
                reason = rcvd.reason if rcvd is not None else ""
                found.append(Incoming("close", reason, code))
        error = protocol.parser_exc
        if error is not None:
            if isinstance(error, PayloadTooBig):
                raise FrameTooBig(str(error))
            code = 1007 if isinstance(error, UnicodeDecodeError) else 1002
            if isinstance(error, ProtocolError | UnicodeDecodeError):
                raise ProtocolViolation(code, str(error))
            raise ProtocolViolation(1002, str(error))
        return [m for m in found if m.kind != "part"]

    def _message(self, text: bool | None, data: bytes, fin: bool) -> Incoming:
        if text is not None:
            self._text, self._parts = text, []
        self._parts.append(bytes(data))
        if not fin:
            return Incoming("part")
        whole = b"".join(self._parts)
        self._parts = []
        if self._text:
            try:
                return Incoming("message", whole.decode())
            except UnicodeDecodeError as exc:
                raise ProtocolViolation(1007, str(exc)) from None
        return Incoming("message", whole)


def _bytes(data: str | bytes) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


ENGINES: Final[dict[str, Callable[[int], FrameEngine]]] = {
    "wsproto": WsprotoEngine,
    "websockets": WebsocketsEngine,
}
DEFAULT_ENGINE: Final = "websockets"  # 1.08-1.21 x wsproto (docs/benchmarks.md, engines)


# ---------------------------------------------------------------------- connection


class WebSocket:
    """One accepted WebSocket: one reader (:meth:`receive`), one writer at a time.

    Writes go straight to the socket when it has room (:meth:`write_now`), as
    asyncio's transports do; otherwise through :meth:`send`, which waits. Pings and
    close replies the reader must send go through the same lock, so frames never
    interleave. Every failure of the peer surfaces as :class:`ConnectionLost`.
    """

    __slots__ = (
        "_engine",
        "_lock",
        "_messages",
        "_pongs",
        "close_sent",
        "peer_closed",
        "stream",
    )

    def __init__(self, stream: PrefixStream, engine: FrameEngine) -> None:
        self.stream = stream
        self._engine = engine
        self._lock = trio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._pongs: dict[bytes, trio.Event] = {}
        self.close_sent = False
        self.peer_closed: tuple[int, str] | None = None

    # -- reading --------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message. Raises :class:`ConnectionLost` when the peer closed or
        went away, :class:`FrameTooBig` or :class:`ProtocolViolation` when it broke
        the rules (the caller closes with their code)."""
        while not self._messages:
            if self.peer_closed is not None:
                raise ConnectionLost("the peer closed the connection")
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionLost("the connection broke") from None
            if not data:
                raise ConnectionLost("the peer closed the connection")
            for incoming in self._engine.receive(data):
                await self._take(incoming)
        return self._messages.popleft()

    async def _take(self, incoming: Incoming) -> None:
        if incoming.kind == "message":
            self._messages.append(incoming.data)
        elif incoming.kind == "ping":
            await self._send_control(_frame(OP_PONG, _bytes(incoming.data)))
        elif incoming.kind == "pong":
            waiter = self._pongs.pop(_bytes(incoming.data), None)
            if waiter is not None:
                waiter.set()
        elif incoming.kind == "close" and self.peer_closed is None:
            self.peer_closed = (incoming.code, str(incoming.data))
            # Answer with the same code (RFC 6455 5.5.1), unless we closed first.
            code = incoming.code if incoming.code not in (1005, 1006) else 1000
            await self._send_control(close_frame(code))
            self.close_sent = True

    async def _send_control(self, frame: bytes) -> None:
        if self.close_sent:
            return
        with contextlib.suppress(ConnectionLost):  # the reader finds out on its next receive
            await self.send(frame)

    # -- writing --------------------------------------------------------------------

    @property
    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may be called: no send is in progress and the
        stream can write without waiting."""
        return self.stream.can_send_without_blocking and not self._lock.locked()

    def write_now(self, data: bytes) -> bool:
        """Write as much of ``data`` as the socket takes now (needs
        :attr:`can_write_now`). True when all of it went; otherwise the rest is held
        and the caller must ``await send(b"")`` before anything else. Raises
        :class:`ConnectionLost`."""
        if self.close_sent:
            raise ConnectionLost("closing")
        try:
            return self.stream.send_without_blocking(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost("the connection broke") from None

    async def send(self, data: bytes) -> None:
        """Write ``data`` (and anything held back before it). Raises
        :class:`ConnectionLost`."""
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionLost("the connection broke") from None

    async def send_texts(self, frames: Iterable[str]) -> None:
        if self.close_sent:
            raise ConnectionLost("closing")
        await self.send(b"".join([text_frame(f) for f in frames]))

    async def send_frames(self, data: bytes) -> None:
        """Write frames already encoded (:func:`text_frame`), after anything held back.
        Raises :class:`ConnectionLost`."""
        if self.close_sent:
            raise ConnectionLost("closing")
        await self.send(data)

    async def ping(self, within: float) -> bool:
        """Send a ping; True if its pong came back within ``within`` seconds (the
        session's reader must be running to see it)."""
        payload = os.urandom(4)
        answered = self._pongs[payload] = trio.Event()
        try:
            await self.send(_frame(OP_PING, payload))
            with trio.move_on_after(within):
                await answered.wait()
            return answered.is_set()
        finally:
            self._pongs.pop(payload, None)

    async def close(self, code: int, reason: str = "", *, wait_for_peer: float = 0.0) -> None:
        """Send a close frame (once), wait up to ``wait_for_peer`` seconds for the
        peer's answer (0: not at all, RFC 6455 allows it: the peer has everything we
        sent before our FIN), then close the stream. Never raises for a peer already
        gone."""
        if not self.close_sent:
            self.close_sent = True
            with trio.move_on_after(max(wait_for_peer, 1.0)):
                try:
                    await self.send(close_frame(code, reason))
                except ConnectionLost:
                    wait_for_peer = 0.0
        if wait_for_peer > 0 and self.peer_closed is None:
            with trio.move_on_after(wait_for_peer):
                try:
                    while self.peer_closed is None:
                        await self.receive()
                except (FrameTooBig, ProtocolViolation):
                    # No frame can be read past this one: take what the peer is still
                    # sending (the rest of a frame over the limit) unread. Closed with
                    # it unread, the socket would reset the connection, and a peer not
                    # yet done sending would lose our close frame (1006, not our code).
                    await self._drain()
                except ConnectionLost:
                    pass
        await trio.aclose_forcefully(self.stream)

    async def _drain(self) -> None:
        """Read and drop whatever comes until the peer closes (or it breaks)."""
        try:
            while await self.stream.receive_some(RECEIVE_BYTES):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
