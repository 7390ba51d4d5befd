"""A small OpenAI-compatible chat completions server for the tests, on Trio and h11.

Answers are scripted per prompt: the guest's message (the last ``user`` message) picks
a list of behaviours, one per request for that prompt (the last one repeats), so a test
can say "429, then a streamed answer". Every request's JSON body is kept in
``requests`` for assertions about what the model was told.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio


@dataclass(frozen=True)
class Stream:
    """Stream ``pieces`` as content deltas, ``gap`` seconds apart; ``hand_over`` ends
    with a call of the hand_to_staff tool."""

    pieces: Sequence[str]
    gap: float = 0.0
    hand_over: bool = False
    first_after: float = 0.0  # seconds before the first chunk
    hang_after: int | None = None  # stop sending (forever) after this many pieces


@dataclass(frozen=True)
class Status:
    """Answer with this HTTP status and a JSON error body."""

    code: int
    retry_after: float | None = None


@dataclass(frozen=True)
class Malformed:
    """One good chunk, then a chunk that is not a chat completions chunk."""


Behaviour = Stream | Status | Malformed


@dataclass
class FakeLlm:
    script: dict[str, list[Behaviour]] = field(default_factory=dict)
    default: Behaviour = field(default_factory=lambda: Stream(["I can help with that."]))
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    _asked: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def asked(self, prompt: str) -> int:
        """How many requests came for this guest message."""
        return self._asked[prompt]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    def _behaviour(self, body: dict[str, Any]) -> Behaviour:
        prompt = next(
            (m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"), ""
        )
        steps = self.script.get(prompt)
        self._asked[prompt] += 1
        if not steps:
            return self.default
        return steps[min(self._asked[prompt] - 1, len(steps) - 1)]

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request, body = await _read_request(conn, stream)
        except (h11.RemoteProtocolError, trio.BrokenResourceError):
            return
        self.headers.append({k.decode(): v.decode() for k, v in request.headers})
        payload = json.loads(body)
        self.requests.append(payload)
        behaviour = self._behaviour(payload)
        try:
            await self._answer(conn, stream, behaviour)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream, b: Behaviour) -> None:
        async def send(event: Any) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        if isinstance(b, Status):
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            if b.retry_after is not None:
                headers.append((b"retry-after", str(b.retry_after).encode()))
            body = json.dumps({"error": {"message": "scripted", "code": b.code}}).encode()
            await send(h11.Response(status_code=b.code, headers=headers))
            await send(h11.Data(data=body))
            await send(h11.EndOfMessage())
            return
        await send(
            h11.Response(
                status_code=200,
                headers=[(b"content-type", b"text/event-stream"), (b"connection", b"close")],
            )
        )

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await send(h11.Data(data=f"data: {data}\n\n".encode()))

        if isinstance(b, Malformed):
            await event(_chunk({"content": "Breakfast is"}))
            await event({"nonsense": True})
            await event("[DONE]")
            await send(h11.EndOfMessage())
            return
        await trio.sleep(b.first_after)
        await event(_chunk({"role": "assistant", "content": ""}))
        for i, piece in enumerate(b.pieces):
            if b.hang_after is not None and i >= b.hang_after:
                await trio.sleep_forever()
            if i:
                await trio.sleep(b.gap)
            await event(_chunk({"content": piece}))
        if b.hang_after is not None and b.hang_after >= len(b.pieces):
            await trio.sleep_forever()
        if b.hand_over:
            call = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "hand_to_staff", "arguments": '{"reason": "asked"}'},
            }
            await event(_chunk({"tool_calls": [call]}))
        await event(_chunk({}, finish="tool_calls" if b.hand_over else "stop"))
        await event("[DONE]")
        await send(h11.EndOfMessage())


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError
