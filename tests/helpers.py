"""Shared test tools: a raw protocol client and ways to start servers."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events

from trio_chat import create_staff_token

RECV_TIMEOUT = 10.0


def _deadline(seconds: float) -> float:
    """A receive guard in Trio time, or none under a MockClock: there a virtual deadline
    would fire while SQLite works in a thread (the clock jumps whenever the loop idles),
    so those tests rely on pytest-timeout's wall-clock guard instead."""
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        return math.inf
    return seconds


class RawClient:
    """A protocol client with no cleverness: send dicts, receive dicts.

    ``seen`` records every frame received. Frames skipped by :meth:`expect` wait in a
    backlog, searched first (in order) by later calls, so a test never loses a frame
    by looking for another.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []
        self._backlog: deque[dict[str, Any]] = deque()

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def _receive_new(self) -> dict[str, Any]:
        with trio.fail_after(_deadline(RECV_TIMEOUT)):
            frame: dict[str, Any] = json.loads(await self.ws.get_message())
        self.seen.append(frame)
        return frame

    async def recv(self) -> dict[str, Any]:
        """The next frame not yet taken."""
        if self._backlog:
            return self._backlog.popleft()
        return await self._receive_new()

    async def _take(self, match: Any) -> dict[str, Any]:
        for frame in self._backlog:
            if match(frame):
                self._backlog.remove(frame)
                return frame
        while True:
            frame = await self._receive_new()
            if match(frame):
                return frame
            self._backlog.append(frame)

    async def expect(self, frame_type: str, **fields: Any) -> dict[str, Any]:
        """The first frame of ``frame_type`` whose fields match ``fields``."""
        return await self._take(
            lambda f: f["type"] == frame_type and all(f.get(k) == v for k, v in fields.items())
        )

    async def next_of(self, *types: str) -> dict[str, Any]:
        """The first frame whose type is one of ``types``."""
        return await self._take(lambda f: f["type"] in types)

    async def hello(self, token: str | None = None, **extra: Any) -> dict[str, Any]:
        await self.send(type="hello", token=token, **extra)
        return await self.recv()

    async def fetch_history(self, last_seq: int) -> list[dict[str, Any]]:
        """Every message up to ``last_seq``, paging through ``history`` replies."""
        messages: list[dict[str, Any]] = []
        while len(messages) < last_seq:
            await self.send(type="history", after_seq=len(messages), limit=500)
            reply = await self._take(
                lambda f: (
                    f["type"] == "history"
                    or (
                        f["type"] == "error"
                        and f["ref"] == "history"
                        and f["code"] == "rate_limited"
                    )
                )
            )
            if reply["type"] == "error":  # history costs tokens too: ask again later
                await trio.sleep(reply["retry_after_ms"] / 1000)
                continue
            messages += reply["messages"]
        return messages

    async def closed(self, within: float = 3 * RECV_TIMEOUT) -> trio_websocket.CloseReason:
        """Read until the server closes; return its close reason."""
        with trio.fail_after(_deadline(within)):
            try:
                while True:
                    self.seen.append(json.loads(await self.ws.get_message()))
            except trio_websocket.ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[RawClient]:
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{port}/ws", connect_timeout=5, disconnect_timeout=2
    ) as ws:
        yield RawClient(ws)


def staff_token(db_path: str | Path, name: str) -> str:
    """Add a staff member the way ``trio-chat staff add`` does (its own connection)."""
    return create_staff_token(db_path, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server_process(db_path: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``trio-chat serve`` in a subprocess, waited for until it answers /healthz."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_chat",
            "serve",
            "--db",
            str(db_path),
            "--port",
            str(port),
            "--typing-delay",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Block until the server prints its WebSocket URL (it does so once listening)."""
    assert proc.stdout is not None
    seen = []
    for line in iter(proc.stdout.readline, b""):
        seen.append(line.decode(errors="replace"))
        if f":{port}/ws" in seen[-1]:
            # Keep draining so a chatty server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    proc.wait(timeout=10)
    raise RuntimeError(f"server exited with {proc.returncode}: {''.join(seen)}")


class SilentPeer:
    """A WebSocket client built on bare wsproto that can stop reading the socket:
    a half-dead peer that never answers pings, whose received bytes can be read later."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int, receive_buffer: int | None = None) -> SilentPeer:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            # Before connecting, so the advertised window is small from the start.
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        peer = cls(trio.SocketStream(sock))
        await peer.stream.send_all(peer.ws.send(wsproto.events.Request(host="x", target="/ws")))
        await peer.events_until(wsproto.events.AcceptConnection)
        return peer

    async def send(self, **frame: Any) -> None:
        await self.stream.send_all(self.ws.send(wsproto.events.TextMessage(json.dumps(frame))))

    async def events_until(self, kind: type[Any]) -> list[Any]:
        """Read and parse (answering nothing) until an event of ``kind`` arrives."""
        seen: list[Any] = []
        while True:
            for event in self.ws.events():
                seen.append(event)
                if isinstance(event, kind):
                    return seen
            data = await self.stream.receive_some()
            if not data:
                return seen
            self.ws.receive_data(data)
