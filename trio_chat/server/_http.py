"""The plain-HTTP front of the server's single port.

Every TCP connection starts here: h11 reads the request head; plain requests (``/``,
``/healthz``, static files) are answered by h11, with keep-alive; a WebSocket upgrade
on ``/ws`` is handed to the WebSocket layer (``_wire``) with the parsed request and a
:class:`PrefixStream` that first yields whatever the client sent after it.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import h11
import trio

__all__ = ["HttpFront", "PrefixStream", "Route"]

MAX_HEAD_BYTES: Final = 16 * 1024  # a request line and headers, counted by us (431 beyond)
RECEIVE_BYTES: Final = 16 * 1024
# A body nobody asked for (we serve GET and HEAD) is read and dropped up to this much so
# the connection can be kept; beyond it the connection is closed instead.
MAX_DRAIN_BYTES: Final = 64 * 1024
# A connection over a cap waits this long at most for the request its 503 answers:
# refusals must not hold descriptors as long as admitted clients may.
REFUSED_READ_TIMEOUT: Final = 1.0

# Sent with every answer. The pages load scripts and styles from files only, so the
# policy needs no 'unsafe-inline'; nobody may frame them (clickjacking), and no page
# address leaks to other sites.
SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
)


RECEIVE_SIZE: Final = 65536  # trio's default for receive_some(None)


class PrefixStream(trio.abc.Stream):
    """A stream that first yields ``prefix``, then whatever ``stream`` yields.

    It can also write without blocking (:meth:`send_without_blocking`) when ``stream``
    is a socket: the server's pushes mostly fit in the kernel's buffer, and then a task
    and its trip through the scheduler per write are pure cost. And it reads a socket
    waiting first (:meth:`receive_some`).
    """

    __slots__ = ("_full", "_prefix", "_socket", "_stream", "_unsent", "client_address")
    _prefix: bytes
    _stream: trio.abc.Stream
    _unsent: bytes
    client_address: str | None

    def __init__(
        self, stream: trio.abc.Stream, prefix: bytes, client_address: str | None = None
    ) -> None:
        if isinstance(stream, PrefixStream) and not stream._prefix and not stream._unsent:
            # Wrapped again once its own prefix is spent (a PROXY header's leftover,
            # then an upgrade's): read the stream underneath directly, keeping the
            # socket for send_without_blocking and the address the header named.
            client_address = client_address or stream.client_address
            stream = stream._stream
        self.client_address = client_address  # a PROXY header's client, if any
        self._stream = stream
        self._prefix = prefix
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._unsent = b""  # what the socket did not take; goes out first in send_all
        self._full = False  # the last read filled its buffer: more is likely waiting

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The stream underneath (for the peer's address)."""
        return self._stream

    @property
    def can_send_without_blocking(self) -> bool:
        return self._socket is not None

    @property
    def held_back(self) -> int:
        """How many bytes :meth:`send_without_blocking` left for the next send."""
        return len(self._unsent)

    @property
    def peer_address(self) -> str | None:
        """The peer's IP address (None when the stream is not an IP socket): the one a
        PROXY header named, if any."""
        if self.client_address is not None:
            return self.client_address
        if self._socket is None:
            return None
        try:
            peer = self._socket.getpeername()
        except OSError:
            return None
        return str(peer[0]) if isinstance(peer, tuple) else None

    def send_without_blocking(self, data: bytes) -> bool:
        """Write ``data`` now, as much as the socket takes without waiting.

        Needs that no :meth:`send_all` is running (the caller's send lock is free)
        and a socket underneath (:attr:`can_send_without_blocking`). Returns True when
        everything was written; False when some bytes are held back: they go out,
        before anything else, in the next :meth:`send_all`, which the caller must
        then make (``send_all(b"")`` will do). Raises ``trio.ClosedResourceError``
        or ``trio.BrokenResourceError`` like :meth:`send_all`.
        """
        assert self._socket is not None and not self._unsent
        # Looked up just before the write, on the loop's thread: the number of a
        # closed socket may already belong to another connection.
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
        if written == len(data):
            return True
        self._unsent = data[written:]
        return False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        sock = self._socket
        if sock is None:
            return bytes(await self._stream.receive_some(max_bytes))
        size = RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        # Waits, then reads. A chat client sends its next frame after our answer, so
        # the socket is empty when we come back to it: trio's stream reads first,
        # meets EAGAIN, then waits and reads again (a third of the loop's system calls
        # per message). Only after a read that filled its buffer is more likely
        # waiting: then read first. Either way one checkpoint, as every receive.
        if self._full:
            await trio.lowlevel.checkpoint_if_cancelled()
            ready = self._read_now(sock, size)
            if ready is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return ready
        while True:
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("the socket was closed")
            await trio.lowlevel.wait_readable(sock)
            ready = self._read_now(sock, size)
            if ready is not None:
                return ready

    def _read_now(self, sock: trio.socket.SocketType, size: int) -> bytes | None:
        """What the socket holds, up to ``size`` bytes (``b""``: the peer closed);
        None when it holds nothing yet."""
        # Looked up just before the read, as for a write: see send_without_blocking.
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            self._full = False
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
        self._full = len(data) == size
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Route = Callable[[], Response]


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json")


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode())


def static_response(name: str) -> Response | None:
    """A file shipped in ``trio_chat/server/static``, or ``None`` if there is no such file."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    resource = resources.files("trio_chat.server") / "static" / name
    if not resource.is_file():
        return None
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type == "application/javascript":
        content_type += "; charset=utf-8"
    return Response(200, resource.read_bytes(), content_type, (("Cache-Control", "no-cache"),))


class _Reject(Exception):
    """The request is refused with ``status`` and the connection closed."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _has_conflicting_length(request: h11.Request) -> bool:
    """Both ``Content-Length`` and ``Transfer-Encoding``: a request smuggling attempt
    (RFC 9112 6.3 allows rejecting it; h11 would let chunked win and serve the rest
    as another request)."""
    names = {name for name, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _is_websocket_upgrade(request: h11.Request) -> bool:
    headers = {k.lower(): v for k, v in request.headers}
    connection_tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
    return (
        headers.get(b"upgrade", b"").lower() == b"websocket"
        and b"upgrade" in connection_tokens
        and b"sec-websocket-key" in headers
        and headers.get(b"sec-websocket-version") == b"13"
    )


class HttpFront:
    """Answers plain HTTP on a stream until it sees a WebSocket upgrade on ``/ws``.

    ``routes`` maps exact paths to handlers producing a :class:`Response`; paths under
    ``/static/`` are served from the package. ``on_websocket`` receives the stream
    (yielding first any bytes that came after the request head) and the request.
    """

    def __init__(
        self,
        routes: dict[str, Route],
        on_websocket: Callable[[PrefixStream, h11.Request], Awaitable[None]],
        *,
        idle_timeout: float,
        server_header: str,
        upgrade_allowed: Callable[[h11.Request], bool] | None = None,
    ) -> None:
        self.routes = routes
        self.on_websocket = on_websocket
        # The deadline of one request's whole cycle: its head, our answer and the
        # drain of its body. Nothing a client does before its WebSocket hello can hold
        # the connection longer without making progress.
        self.idle_timeout = idle_timeout
        self.server_header = server_header.encode()
        self.upgrade_allowed = upgrade_allowed
        self.forbidden_origins = 0  # upgrades refused for their Origin (403)

    async def handle(self, stream: trio.abc.Stream, refused: str | None = None) -> None:
        """Serve one TCP connection. Never raises for anything the peer does.

        ``refused`` (why: a connection cap) answers one request with 503 and closes;
        ``/healthz`` is still answered, so monitoring sees a full server as full."""
        try:
            upgrade = await self._serve_plain(stream, refused)
        except h11.RemoteProtocolError:
            return  # cut short or broken where no answer can go any more
        # The h11 state and its buffers are gone by now: this frame stays suspended for
        # the whole WebSocket session, so it keeps nothing.
        if upgrade is not None:
            request, after = upgrade
            del upgrade
            await self.on_websocket(PrefixStream(stream, after), request)

    async def _serve_plain(
        self, stream: trio.abc.Stream, refused: str | None = None
    ) -> tuple[h11.Request, bytes] | None:
        """Answer plain requests; return a WebSocket upgrade request with the bytes
        that followed it, or None when the connection is done."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        timeout = self.idle_timeout if refused is None else REFUSED_READ_TIMEOUT
        while True:
            with trio.move_on_after(timeout):
                try:
                    request = await self._read_request(stream, conn)
                    if request is None:
                        return None  # the peer closed between requests
                    target = request.target.split(b"?", 1)[0]
                    if refused is not None and target != b"/healthz":
                        raise _Reject(503, b"the server is full; try again later\n")
                    if (
                        target == b"/ws"
                        and request.method == b"GET"
                        and _is_websocket_upgrade(request)
                    ):
                        if self.upgrade_allowed is not None and not self.upgrade_allowed(request):
                            self.forbidden_origins += 1
                            raise _Reject(403, b"forbidden: this origin may not connect\n")
                        return request, bytes(conn.trailing_data[0])
                    response = self._route(request, target)
                    await self._respond(stream, conn, request, response)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    body = b"request head too large\n" if status == 431 else b"bad request\n"
                    await self._send_error(stream, conn, status, body)
                    return None
                except _Reject as reject:
                    await self._send_error(stream, conn, reject.status, reject.body)
                    return None
                except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                    return None
                if refused is not None:
                    return None
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return None
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return None
                continue
            return None  # the deadline passed: idle, too slow, or an endless body

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request; raises ``h11.RemoteProtocolError`` (431) for a head over
        :data:`MAX_HEAD_BYTES`, counted here: h11 checks only an incomplete head, so a
        whole one that came in a single read could reach twice that."""
        while True:
            buffered = len(conn.trailing_data[0])
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if buffered > MAX_HEAD_BYTES:
                    raise h11.RemoteProtocolError("request head too large", 431)
                conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
                continue
            if isinstance(event, h11.Request):
                if buffered - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                    raise h11.RemoteProtocolError("request head too large", 431)
                if _has_conflicting_length(event):
                    raise h11.RemoteProtocolError("both Content-Length and chunked", 400)
                return event
            return None  # ConnectionClosed or PAUSED without a request

    def _route(self, request: h11.Request, target: bytes) -> Response:
        if request.method not in (b"GET", b"HEAD"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        path = target.decode("ascii", "replace")
        if path == "/ws":
            return Response(
                426, b"this endpoint speaks WebSocket only\n", headers=(("Upgrade", "websocket"),)
            )
        route = self.routes.get(path)
        if route is not None:
            return route()
        if path.startswith("/static/"):
            found = static_response(path.removeprefix("/static/"))
            if found is not None:
                return found
        return text_response(404, "not found\n")

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: h11.Request,
        response: Response,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Server", self.server_header.decode()),
            *SECURITY_HEADERS,
            *response.headers,
        ]
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if request.method != b"HEAD":
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        # Drain the request body, if any, so the next cycle can start: within the
        # cycle's deadline, and only so much (then the connection is closed).
        drained = 0
        while conn.their_state is h11.SEND_BODY:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(RECEIVE_BYTES))
                drained += len(data)
                if drained > MAX_DRAIN_BYTES:
                    raise trio.ClosedResourceError("request body too large to drain")
                conn.receive_data(data)

    async def _send_error(
        self, stream: trio.abc.Stream, conn: h11.Connection, status: int, body: bytes
    ) -> None:
        """Answer ``status`` and close. The body is fixed text: nothing of the request
        is echoed."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Server", self.server_header.decode()),
            *SECURITY_HEADERS,
        ]
        if status == 503:
            headers.append(("Retry-After", "5"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
