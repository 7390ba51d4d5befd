"""The benchmark's load generator: its frames are the RFC's, its answers are matched
right, and the null server answers every frame as the real servers are shaped."""

from __future__ import annotations

import asyncio
import os

import pytest
import wsproto
import wsproto.events
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st

from trio_chat.bench._loadgen import (
    WsClient,
    client_frame,
    field,
    open_client,
    serve_null,
    server_frame,
    split_frames,
)
from trio_chat.bench._workers import closed_loop


def _server_side() -> wsproto.WSConnection:
    """A wsproto server past the handshake: the reference decoder for client frames."""
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    request = next(server.events())
    assert isinstance(request, wsproto.events.Request)
    server.send(wsproto.events.AcceptConnection())
    return server


# Every length form: 7-bit, 16-bit and 64-bit lengths.
@given(st.text(max_size=300) | st.sampled_from(["", "x" * 125, "y" * 126, "z" * 70_000]))
def test_client_frames_decode_as_the_rfc_says(text: str) -> None:
    server = _server_side()
    payload = text.encode()
    server.receive_data(client_frame(payload, os.urandom(4)))
    received = b""
    for event in server.events():
        assert isinstance(event, wsproto.events.TextMessage)
        received += event.data.encode()
    assert received == payload


def test_split_frames_takes_only_complete_frames_of_every_length_form() -> None:
    payloads = [b"a" * 5, b"b" * 126, b"c" * 70_000, b"2"]
    wire = b"".join(server_frame(p) for p in payloads) + server_frame(b"x", 0x9)
    buffer = bytearray()
    seen: list[tuple[int, bytes]] = []
    # Byte counts that cut headers and payloads in the middle.
    for start in range(0, len(wire), 997):
        buffer += wire[start : start + 997]
        seen += split_frames(buffer)
    assert seen == [(1, p) for p in payloads] + [(0x9, b"x")]
    assert buffer == bytearray()
    # A masked frame is split too (the null server's side), its payload left masked.
    masked = bytearray(client_frame(b"hello", b"\x01\x02\x03\x04"))
    [(opcode, body)] = split_frames(masked)
    assert opcode == 1 and len(body) == 5 and body != b"hello"


def test_field_reads_a_string_value_by_bytes() -> None:
    ack = b'{"type":"ack","client_msg_id":"s17","seq":3}'
    assert field(ack, b"client_msg_id") == b"s17"
    assert field(ack, b"conversation_id") is None


def test_server_frames_are_byte_identical_to_wsproto() -> None:
    server = _server_side()
    for text in ("", "x" * 125, "y" * 126, "z" * 70_000):
        assert server.send(wsproto.events.TextMessage(text)) == server_frame(text.encode())


@pytest.mark.parametrize("dialect", ["chat", "echo", "socketio"])
def test_every_message_is_answered_once_by_the_null_server(dialect: str) -> None:
    async def main() -> dict[str, object]:
        server = await serve_null(dialect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await closed_loop(f"ws://127.0.0.1:{port}/ws", dialect, 3, 0.3, None)

    result = asyncio.run(main())
    done = result["done"]
    assert isinstance(done, int) and done > 30
    latencies = result["latencies"]
    assert isinstance(latencies, list) and len(latencies) == done


def test_chat_dialect_against_the_real_protocol_fields() -> None:
    """The chat client opens a session with hello, keeps the welcome, and takes an ack
    (and only an ack) as the answer: the pushed copy of its own message is not one."""
    answers: list[bytes] = []
    others: list[bytes] = []
    pushed: asyncio.Event | None = None

    def other(client: WsClient, payload: bytes, now: float) -> None:
        others.append(payload)
        assert pushed is not None
        pushed.set()

    async def main() -> WsClient:
        nonlocal pushed
        pushed = asyncio.Event()
        server = await serve_null("chat", "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            client = await open_client(
                f"ws://127.0.0.1:{port}/ws",
                "chat",
                on_answer=lambda c, p, now: answers.append(p),
                on_other=other,
            )
            client.send_message("m1", "hi")
            await asyncio.wait_for(pushed.wait(), 5)
            client.close()
            return client

    client = asyncio.run(main())
    assert field(client.welcome, b"conversation_id") == b"c_0000000000000000"
    assert len(answers) == 1 and b'"type":"ack"' in answers[0]
    assert len(others) == 1 and b'"type":"message"' in others[0]


def test_a_refused_upgrade_fails_the_connection_clearly() -> None:
    async def main() -> None:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await open_client(f"ws://127.0.0.1:{port}/ws", "chat", within=5)

    with pytest.raises(ConnectionError, match="403"):
        asyncio.run(main())
