"""The plain-HTTP front, over real sockets."""

from __future__ import annotations

import json
import os

import pytest
import trio
import trio.testing

from trio_chat import ChatServer
from trio_chat.server._http import PrefixStream

from ..helpers import connect


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            data += chunk
    await stream.aclose()
    return data


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n".encode()


async def test_index_is_html(server: ChatServer) -> None:
    assert server.port
    response = await exchange(server.port, get("/"))
    assert response.startswith(b"HTTP/1.1 200")
    assert b"text/html" in response and b"<!doctype html>" in response.lower()


async def test_head_has_headers_but_no_body(server: ChatServer) -> None:
    assert server.port
    response = await exchange(server.port, get("/", "HEAD"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""


async def test_healthz_is_json(server: ChatServer) -> None:
    assert server.port
    response = await exchange(server.port, get("/healthz?verbose=1"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"application/json" in head
    health = json.loads(body)
    assert health["status"] == "ok" and health["connections"] == 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/nope"), b"404"),
        (get("/static/../_server.py"), b"404"),
        (get("/static/.hidden"), b"404"),
        (get("/", "POST", "Content-Length: 0\r\n"), b"405"),
        (get("/ws"), b"426"),
        (b"GARBAGE\r\n\r\n", b"400"),
    ],
)
async def test_everything_else_gets_a_clear_status(
    server: ChatServer, request_bytes: bytes, status: bytes
) -> None:
    assert server.port
    response = await exchange(server.port, request_bytes)
    assert response.startswith(b"HTTP/1.1 " + status), response[:80]


async def test_keep_alive_then_upgrade_on_the_same_connection(server: ChatServer) -> None:
    """Plain requests and then a WebSocket upgrade share one TCP connection: the
    upgrade's bytes are replayed to trio-websocket from where that request began."""
    assert server.port
    import trio_websocket

    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    two = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 2
    await stream.send_all(two)
    data = b""
    with trio.fail_after(5):
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += await stream.receive_some()
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "t", "/ws")
        await ws.send_message(json.dumps({"type": "hello", "token": None}))
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome"
        await ws.aclose()


async def test_websocket_still_works_after_http_traffic(server: ChatServer) -> None:
    assert server.port
    await exchange(server.port, get("/"))
    async with connect(server.port) as client:
        assert (await client.hello(None))["type"] == "welcome"


async def test_prefix_stream_replays_then_continues() -> None:
    left, right = trio.testing.memory_stream_pair()
    stream = PrefixStream(right, b"abcdef")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some() == b"ef"
    await left.send_all(b"gh")
    assert await stream.receive_some() == b"gh"
    await stream.send_all(b"out")
    assert await left.receive_some() == b"out"


async def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_prefix_stream_writes_without_blocking_when_the_socket_has_room() -> None:
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    assert stream.can_send_without_blocking
    assert stream.send_without_blocking(b"hello")
    assert await far.receive_some() == b"hello"
    assert not PrefixStream(trio.testing.memory_stream_pair()[0], b"").can_send_without_blocking


async def test_bytes_the_socket_did_not_take_go_out_first_in_the_next_send_all() -> None:
    near, far = await socket_stream_pair()
    near.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    stream = PrefixStream(near, b"")
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket's buffer
    assert not stream.send_without_blocking(big)
    received = bytearray()

    async def read_all() -> None:
        while chunk := await far.receive_some():
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        # Another sender (trio-websocket answering a ping) comes after the held bytes.
        await stream.send_all(b"pong")
        await stream.aclose()
    assert bytes(received) == big + b"pong"


async def test_writing_without_blocking_to_a_dead_socket_raises_the_stream_errors() -> None:
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    await far.aclose()
    with pytest.raises(trio.BrokenResourceError):
        stream.send_without_blocking(b"anyone there?")
    await near.aclose()
    # The closed socket's number may belong to a new connection by now: never write.
    with pytest.raises(trio.ClosedResourceError):
        stream.send_without_blocking(b"anyone there?")


class CountedReads:
    """``os.read`` as the prefix stream calls it, counted: calls, and those that
    found the socket empty."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.empty = 0
        real = os.read

        def read(fd: int, size: int) -> bytes:
            self.calls += 1
            try:
                return real(fd, size)
            except BlockingIOError:
                self.empty += 1
                raise

        monkeypatch.setattr(os, "read", read)


async def test_a_socket_is_read_once_per_frame_when_the_peer_waits_for_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chat client sends its next frame after our answer: the stream waits for the
    socket, then reads once (trio's own stream reads, meets an empty socket, waits,
    and reads again: a system call more per message)."""
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    reads = CountedReads(monkeypatch)

    async def peer() -> None:
        for k in range(5):
            await far.send_all(f"frame {k}".encode())
            assert await far.receive_some() == b"answer"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        for k in range(5):
            assert await stream.receive_some() == f"frame {k}".encode()
            assert stream.send_without_blocking(b"answer")
    assert (reads.calls, reads.empty) == (5, 0)


async def test_after_a_full_read_the_next_one_reads_before_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    await far.send_all(bytes(10_000))
    waits = 0
    real_wait = trio.lowlevel.wait_readable

    async def counted_wait(sock: trio.socket.SocketType) -> None:
        nonlocal waits
        waits += 1
        await real_wait(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted_wait)
    reads = CountedReads(monkeypatch)
    got = b""
    while len(got) < 10_000:
        got += await stream.receive_some(4096)
    assert got == bytes(10_000)
    # 4096 (waited: nothing was known), 4096 (full before: read at once), the rest.
    assert (waits, reads.calls, reads.empty) == (1, 3, 0)
    # Full again? No: the last read was short, so the next one waits first.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some, 4096)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert (waits, reads.calls) == (2, 3)


async def test_reading_ends_as_a_stream_does_eof_reset_close_and_cancel() -> None:
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    # Cancelled while waiting: nothing is lost; the next receive gets what came.
    async with trio.open_nursery() as nursery:

        async def waiting() -> None:
            await stream.receive_some()
            raise AssertionError("nothing was sent")

        nursery.start_soon(waiting)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await far.send_all(b"still here")
    assert await stream.receive_some() == b"still here"
    with pytest.raises(ValueError):
        await stream.receive_some(0)
    # The peer closes: b"" (end of stream), again and again.
    await far.aclose()
    assert await stream.receive_some() == b""
    assert await stream.receive_some() == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    # Closed by another task while waiting.
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    async with trio.open_nursery() as nursery:

        async def closed_while_waiting() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()

        nursery.start_soon(closed_while_waiting)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    # The peer goes away leaving our bytes unread: the read fails (ECONNRESET).
    near, far = await socket_stream_pair()
    stream = PrefixStream(near, b"")
    await stream.send_all(b"unread by the peer")
    await far.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        while await stream.receive_some():
            pass
