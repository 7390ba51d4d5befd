"""One WebSocket connection on the server: its session number in the hub, its outbox
and its one writer.

A frame for a connection is queued without waiting (:meth:`Connection.deliver`); the
outbox is written at once when the socket takes it, otherwise by a writer task that
lives only while there is something to send. A connection that falls too far behind is
cut off and recovers from history: nobody waits for a slow consumer.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from ..core.errors import ConnectionLost
from ..core.protocol import CloseCode
from ._wire import FrameTooBig, ProtocolViolation, WebSocket, text_frame

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["Connection"]

WRITE_BATCH: Final = 64


class Connection:
    """One WebSocket connection: its session number in the hub, and its outbox."""

    __slots__ = (
        "_drained",
        "_outbox",
        "close_code",
        "close_reason",
        "dropped",
        "nursery",
        "ping_in_flight",
        "reader_scope",
        "server",
        "session_id",
        "writer_running",
        "ws",
    )

    def __init__(
        self, server: ChatServer, ws: WebSocket, nursery: trio.Nursery, session_id: int
    ) -> None:
        self.server = server
        self.ws = ws
        self.nursery = nursery
        self.session_id = session_id
        self._outbox: deque[str] | None = None
        self._drained: trio.Event | None = None
        self.writer_running = False
        self.ping_in_flight = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.dropped = False  # end without a close frame (a fault the mock injects)
        self.reader_scope = trio.CancelScope()

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
        ws = self.ws
        # A pong or a close the reader is sending holds the lock: then wait behind it.
        if outbox and ws.can_write_now:
            try:
                data = b"".join([text_frame(frame) for frame in outbox])
                outbox.clear()
                if ws.write_now(data):
                    self._outbox = None
                    self._writer_done()
                    return
            except ConnectionLost:
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
                await self.ws.send_texts(frames)
                for _ in frames:
                    outbox.popleft()
                if not outbox:
                    break
            # Idle connections are the common case: do not keep an empty deque around.
            self._outbox = None
        except ConnectionLost:
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

    def drop(self) -> None:
        """End the connection as a network failure would: no close frame."""
        self.dropped = True
        self.request_close(CloseCode.ABNORMAL, "dropped")

    def request_close(self, code: int, reason: str) -> None:
        """Close this connection soon with ``code``; the first request wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.reader_scope.cancel()

    async def heartbeat(self, answer_within: float) -> None:
        try:
            if not await self.ws.ping(answer_within):
                self.request_close(CloseCode.SERVER_ERROR, "no answer to ping")
        except ConnectionLost:
            self.request_close(CloseCode.ABNORMAL, "connection lost")
        finally:
            self.ping_in_flight = False

    # -- inbound -------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`ConnectionLost` when the socket is done
        (after asking for the close code a frame over the limit or a broken frame
        calls for)."""
        try:
            return await self.ws.receive()
        except FrameTooBig:
            self.request_close(
                CloseCode.TOO_BIG, f"frame over {self.server.config.max_frame_bytes} bytes"
            )
            raise
        except ProtocolViolation as exc:
            self.request_close(exc.code, "protocol error")
            raise
