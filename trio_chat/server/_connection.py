"""One WebSocket connection on the server: its session number in the hub, its outbox
and its one writer.

A frame for a connection is queued without waiting (:meth:`Connection.deliver`); the
outbox is written at once when the socket takes it, otherwise by a writer task that
lives only while there is something to send. A connection that falls too far behind is
cut off and recovers from history: nobody waits for a slow consumer.

"Too far behind" is counted in bytes as well as frames (a history page is up to 1 MiB):
what waits in the outbox, what the writer is sending, and what the socket did not take
(:attr:`Connection.queued_bytes`), so one connection never makes the server hold more
than ``ServerConfig.outbox_limit_bytes`` (plus, on an empty outbox, the frames of
one delivery: one frame, or a commit's few for one session).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
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
        "_queued",
        "_report_at",
        "_writing",
        "close_code",
        "close_reason",
        "dropped",
        "enqueued_bytes",
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
        self._outbox: deque[bytes] | None = None  # encoded frames
        self._queued = 0  # bytes in the outbox
        self._writing = 0  # bytes the writer is sending now
        self.enqueued_bytes = 0  # bytes queued since the connection began
        self._report_at: int | None = None  # tell the hub once written_bytes gets here
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
        self.deliver_all((frame,))

    def deliver_all(self, frames: Sequence[str]) -> None:
        """:meth:`deliver` for frames that come together (a commit's ack and pushes to
        one session: five for an answered guest message), with one pass of the
        bookkeeping; whether the connection is too far behind is decided for them
        together."""
        if self.close_code is not None or not frames:
            return
        encoded = []
        size = 0
        for frame in frames:
            data = text_frame(frame)
            encoded.append(data)
            size += len(data)
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        server = self.server
        behind = self.queued_bytes
        # What comes to an empty outbox always fits, however big: a history page must
        # reach a client that reads, whatever the limit.
        if behind and (
            behind + size > server.config.outbox_limit_bytes
            or len(outbox) + len(encoded) > server.config.outbox_limit
        ):
            self.request_close(CloseCode.TRY_LATER, "too far behind; reconnect and fetch history")
            return
        outbox.extend(encoded)
        self._queued += size
        self.enqueued_bytes += size
        if behind + size > server.outbox_peak_bytes:
            server.outbox_peak_bytes = behind + size
        if not self.writer_running:
            self.writer_running = True
            corked = server.corked
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
                data = b"".join(outbox)
                outbox.clear()
                self._queued = 0
                if ws.write_now(data):
                    self._outbox = None
                    self._writer_done()
                    if self._report_at is not None:
                        self._report_if_written()
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
        stream = self.ws.stream
        try:
            while True:
                # Usually an ack and its message wait together: one write for both.
                batch = [outbox.popleft() for _ in range(min(WRITE_BATCH, len(outbox)))]
                size = sum(map(len, batch))
                self._queued -= size
                # The stream sends what it held back first, in this same write.
                self._writing = stream.held_back + size
                await self.ws.send_frames(b"".join(batch))
                self._writing = 0
                if self._report_at is not None:
                    self._report_if_written()
                if not outbox:
                    break
            # Idle connections are the common case: do not keep an empty deque around.
            self._outbox = None
        except ConnectionLost:
            self.request_close(CloseCode.ABNORMAL, "connection lost")
        finally:
            self._writer_done()

    @property
    def queued_bytes(self) -> int:
        """Bytes this connection makes the server hold for its client: the outbox, the
        writer's current write and what the socket did not take."""
        held = self.ws.stream.held_back if self.writer_running else 0
        return self._queued + self._writing + held

    @property
    def written_bytes(self) -> int:
        """Bytes handed to the socket since the connection began (whichever send took
        what the socket held back: the writer's, or a ping's)."""
        return self.enqueued_bytes - self.queued_bytes

    def report_written(self) -> None:
        """Tell the hub (:meth:`ChatServer.written`) once everything queued so far has
        been written to the socket."""
        self._report_at = self.enqueued_bytes
        self._report_if_written()

    def _report_if_written(self) -> None:
        if self._report_at is not None and self.written_bytes >= self._report_at:
            self._report_at = None
            self.server.written(self.session_id)

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
