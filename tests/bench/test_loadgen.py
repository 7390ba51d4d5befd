"""The benchmark's load generator: its frames are the RFC's, its answers are matched
right, and the null server answers every frame as the real servers are shaped."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import pytest
import wsproto
import wsproto.events
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st

from trio_chat.bench._loadgen import (
    StormGuest,
    WsClient,
    client_frame,
    field,
    open_client,
    serve_null,
    server_frame,
    split_frames,
)
from trio_chat.bench._workers import closed_loop
from trio_chat.core.backoff import Backoff
from trio_chat.core.protocol import CloseCode


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


# -- the storm's guest ----------------------------------------------------------------


def _frame(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"))  # as the server writes them


def _welcome(token: str, last_seq: int) -> str:
    return _frame(
        {
            "type": "welcome",
            "role": "guest",
            "token": token,
            "guest_id": "g_1",
            "conversation_id": "c_1",
            "status": "ai",
            "last_seq": last_seq,
            "read_seq": 0,
            "heartbeat_s": 0,
            "server": "scripted",
        }
    )


def _message(seq: int) -> dict[str, object]:
    return {
        "seq": seq,
        "conversation_id": "c_1",
        "sender": "ai",
        "author": "concierge",
        "text": f"answer {seq}",
        "ts": "2026-01-01T00:00:00.000Z",
    }


async def _scripted_chat_server(
    script: list[Callable[[dict[str, object], Callable[[str], None]], object]],
    seen: list[dict[str, object]],
    closes: list[int],
) -> asyncio.Server:
    """A chat server on wsproto: connection ``n`` plays ``script[n]`` on each client
    frame (the frame, and a way to send one), which returns "close CODE" to end the
    connection with a close frame, "drop" to hang up without one, or None."""
    connections = iter(script)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        play = next(connections)
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)

        def send(text: str) -> None:
            writer.write(ws.send(wsproto.events.Message(data=text)))

        while data := await reader.read(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, wsproto.events.Request):
                    writer.write(ws.send(wsproto.events.AcceptConnection()))
                elif isinstance(event, wsproto.events.TextMessage):
                    frame = json.loads(event.data)
                    seen.append(frame)
                    then = play(frame, send)
                    if isinstance(then, str) and then.startswith("close"):
                        writer.write(ws.send(wsproto.events.CloseConnection(int(then.split()[1]))))
                    elif then == "drop":
                        writer.transport.abort()
                        return
                elif isinstance(event, wsproto.events.CloseConnection):
                    closes.append(event.code)  # the guest's answer to our close
                    writer.close()
                    return

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_storm_guest_follows_a_restart_hint_and_resumes_with_its_history() -> None:
    """Hinted at once (after_ms 0) and closed for a restart, the guest answers the
    close, comes back with its token, fetches the history it lacks, and only then
    counts as back; a drop without a close then sends it to its backoff."""
    seen: list[dict[str, object]] = []
    closes: list[int] = []
    guest_holder: list[StormGuest] = []

    def first(frame: dict[str, object], send: Callable[[str], None]) -> object:
        send(_welcome("t_1", 0))
        send(_frame({"type": "reconnect", "after_ms": 0, "reason": "restart"}))
        return f"close {CloseCode.RESTARTING}"

    def second(frame: dict[str, object], send: Callable[[str], None]) -> object:
        if frame["type"] == "hello":
            send(_welcome("t_1", 2))
            return None
        assert not guest_holder[0].synced  # not back before its history arrived
        assert frame == {"type": "history", "after_seq": 0, "limit": StormGuest.HISTORY_PAGE}
        send(
            _frame(
                {
                    "type": "history",
                    "conversation_id": "c_1",
                    "messages": [_message(1), _message(2)],
                    "last_seq": 2,
                    "has_more": False,
                }
            )
        )
        return None

    async def main() -> StormGuest:
        server = await _scripted_chat_server([first, second], seen, closes)
        port = server.sockets[0].getsockname()[1]
        back = asyncio.Event()
        guest = StormGuest(
            f"ws://127.0.0.1:{port}/ws",
            Backoff(initial=30, jitter="none"),  # a backoff would outlast the test
            on_back=lambda g: back.set(),
        )
        guest_holder.append(guest)
        async with server:
            task = asyncio.create_task(guest.run())
            await asyncio.wait_for(back.wait(), 10)
            task.cancel()
        return guest

    guest = asyncio.run(main())
    assert [f["type"] for f in seen] == ["hello", "hello", "history"]
    assert seen[0]["token"] is None and seen[1]["token"] == "t_1"
    assert closes == [CloseCode.RESTARTING]
    assert guest.reconnects == 1 and guest.synced and guest.held == 2
    assert len(guest.attempts) == 2 and len(guest.returns) == 1
    assert guest.attempts[0] <= guest.attempts[1] <= guest.returns[0]
    assert guest.backoff.attempt == 1  # the hinted retry still counts as one
    # Woken for the hinted retry; a load process that is not starved is not late.
    [(_, late)] = guest.lateness
    assert 0 <= late < 1


def test_a_storm_guest_backs_off_after_a_drop_without_a_close() -> None:
    seen: list[dict[str, object]] = []

    def drop(frame: dict[str, object], send: Callable[[str], None]) -> object:
        send(_welcome("t_1", 0))
        return "drop"

    def welcome_back(frame: dict[str, object], send: Callable[[str], None]) -> object:
        send(_welcome("t_1", 0))
        return None

    async def main() -> StormGuest:
        server = await _scripted_chat_server([drop, welcome_back], seen, [])
        port = server.sockets[0].getsockname()[1]
        back = asyncio.Event()
        # A fresh policy's first retry is its spread's: drawn, then used.
        backoff = Backoff(initial=0.01, jitter="full", spread=0.05, seed=4)
        expected = backoff.delays(1)[0]
        guest = StormGuest(f"ws://127.0.0.1:{port}/ws", backoff, on_back=lambda g: back.set())
        async with server:
            task = asyncio.create_task(guest.run())
            await asyncio.wait_for(back.wait(), 10)
            task.cancel()
        assert guest.attempts[1] - guest.attempts[0] >= expected
        return guest

    guest = asyncio.run(main())
    assert [f.get("token") for f in seen] == [None, "t_1"]
    assert guest.reconnects == 1 and guest.backoff.attempt == 1
