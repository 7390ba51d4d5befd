"""The HTTP front, connection admission and input robustness, attacked over real sockets.

Each ``attack_<name>(port)`` performs one attack against a server on 127.0.0.1:port
and asserts its answer; the witness module runs them against ``trio-chat serve``
started with ``ATTACK_SERVER_FLAGS[name]`` (nothing: the defaults).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from trio_chat import ChatServer
from trio_chat.bench._loadgen import CLOSE, client_frame, split_frames
from trio_chat.server._admission import ConnectionLimits, OriginPolicy

from ..conftest import make_config
from ..helpers import connect, free_port, server_process, wait_for_port

ATTACK_SERVER_FLAGS: dict[str, tuple[str, ...]] = {
    "endless_body": (),
    "connection_flood": (),  # the default per-address cap (500) is what answers
    "cross_site_websocket": (),
    "registration_flood": (),  # the default: 30 a minute, bursts of 60
    "non_ascii_token": (),
    "huge_after_seq": (),
    "cut_short_body": (),
    "oversized_head": (),
    "smuggled_request": (),
    "framed_page": (),
}


# ------------------------------------------------------------------------ helpers

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def assert_no_tracebacks(records: list[logging.LogRecord]) -> None:
    """Nothing a client sends may make the server log a traceback."""
    with_traceback = [r for r in records if r.exc_info]
    assert not with_traceback, [f"{r.name}: {r.getMessage()}" for r in with_traceback]


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test here: the server logged no traceback (trio's own loggers included)."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_tracebacks(caplog.records)


@asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[ChatServer]:
    async with trio.open_nursery() as nursery:
        server = ChatServer(make_config(tmp_path, **overrides))
        await nursery.start(server.run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass  # a reset after the answer
    return data


async def exchange(port: int, request: bytes, *, within: float = 10) -> bytes:
    """Send raw bytes; everything the server answers until it closes."""
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            return await read_until_closed(stream)


def upgrade_request(port: int, *headers: str, host: str | None = None) -> bytes:
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def upgrade_status(port: int, *headers: str, host: str | None = None) -> int:
    """The status the server answers a WebSocket upgrade with."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade_request(port, *headers, host=host))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                assert chunk, head
                head += chunk
    return int(head.split(b" ", 2)[1])


async def hello_answer(port: int, token: Any) -> tuple[dict[str, Any], int]:
    """The first frame answering a hello with ``token``, and the close code after it."""
    with trio.fail_after(20):
        async with connect(port) as client:
            frame = await client.hello(token)
            reason = await client.closed()
    return frame, reason.code


# ----------------------------------------------------------------------- attacks


async def attack_endless_body(port: int) -> None:
    """A request whose body never ends: the server answers and then, instead of
    draining forever, closes (after 64 KiB here; a silent body by the deadline)."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            answer = b""
            chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
            try:
                while True:
                    await stream.send_all(chunk)
                    with trio.move_on_after(0.01):
                        answer += await stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server closed: what we want
            answer += await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 405"), answer[:60]


async def attack_connection_flood(port: int, limit: int = 600) -> None:
    """Connections from one address, held open: beyond the per-address cap the server
    answers 503 (and still answers /healthz, which counts the refusals)."""
    with trio.fail_after(60):
        held: list[trio.SocketStream] = []
        try:
            for _ in range(limit):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                held.append(stream)
                await stream.send_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await stream.receive_some()
                if head.startswith(b"HTTP/1.1 503"):
                    assert b"Retry-After" in head
                    break
                assert head.startswith(b"HTTP/1.1 404"), head[:60]
            else:
                raise AssertionError(f"{limit} connections from one address were all served")
            health = await exchange(port, HEALTHZ)
            assert health.startswith(b"HTTP/1.1 200")
            refused = json.loads(health.partition(b"\r\n\r\n")[2])["refused"]
            assert refused["max_connections_per_ip"] >= 1
        finally:
            for stream in held:
                await stream.aclose()


async def attack_cross_site_websocket(port: int) -> None:
    """A page on another site opens a WebSocket with the visitor's browser: 403."""
    assert await upgrade_status(port, "Origin: https://evil.example") == 403
    # The DNS-rebinding variant: a foreign name that resolves to us.
    status = await upgrade_status(
        port, f"Origin: http://evil.example:{port}", host=f"evil.example:{port}"
    )
    assert status == 403


async def attack_registration_flood(port: int, attempts: int = 200) -> None:
    """New guest identities as fast as possible: refused with rate_limited and 4429
    long before ``attempts``."""
    with trio.fail_after(60):
        for _ in range(attempts):
            async with connect(port) as client:
                answer = await client.hello(None)
                if answer["type"] == "error":
                    assert answer["code"] == "rate_limited" and answer["ref"] == "hello"
                    assert answer["retry_after_ms"] > 0
                    assert (await client.closed()).code == 4429
                    return
                assert answer["type"] == "welcome"
    raise AssertionError(f"{attempts} registrations from one address were all accepted")


async def attack_non_ascii_token(port: int) -> None:
    for token in ("g.é.x", "g.\ud800.x", "ｇ.g_1.abc"):
        frame, code = await hello_answer(port, token)
        assert frame["type"] == "error" and frame["code"] == "auth_failed", frame
        assert code == 4401


async def attack_huge_after_seq(port: int) -> None:
    """Integers beyond what storage holds: a bad frame, and the session goes on."""
    with trio.fail_after(20):
        async with connect(port) as client:
            assert (await client.hello(None))["type"] == "welcome"
            await client.send(type="history", after_seq=10**20)
            error = await client.expect("error")
            assert error["code"] == "bad_message" and error["ref"] == "history"
            await client.send(type="read", seq=10**20)
            error = await client.expect("error")
            assert error["code"] == "bad_message" and error["ref"] == "read"
            await client.send(type="ping", id=1)
            assert (await client.expect("pong"))["id"] == 1


async def attack_cut_short_body(port: int) -> None:
    """A body shorter than its Content-Length, then EOF: answered, then a quiet close."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            await stream.send_eof()
            answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 405"), answer[:60]


async def attack_oversized_head(port: int) -> None:
    """A 20 KiB request head sent in one piece (h11 alone took up to ~32 KiB)."""
    filler = "X-Filler: " + "a" * 1000 + "\r\n"
    head = ("GET / HTTP/1.1\r\nHost: x\r\n" + filler * 20 + "\r\n").encode()
    answer = await exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:60]


async def attack_smuggled_request(port: int) -> None:
    """Content-Length and Transfer-Encoding together: 400 and close, so the bytes
    after a chunked body are never served as a second request."""
    answer = await exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:60]
    assert answer.count(b"HTTP/1.1") == 1


async def attack_framed_page(port: int) -> None:
    """The pages may not be framed by another site, leak their address or be sniffed;
    a bad request's answer echoes nothing of it."""
    for path in ("/", "/static/chat.js", "/healthz", "/nope"):
        answer = await exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"content-security-policy: default-src 'self'; frame-ancestors 'none'" in head, path
        assert b"referrer-policy: no-referrer" in head, path
        assert b"x-content-type-options: nosniff" in head, path
    answer = await exchange(port, b"<script>alert(1)</script> / HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"script" not in answer and b"alert" not in answer


# ------------------------------------------------ the attacks, on in-process servers


@pytest.mark.parametrize(
    "attack",
    [
        attack_endless_body,
        attack_cross_site_websocket,
        attack_non_ascii_token,
        attack_huge_after_seq,
        attack_cut_short_body,
        attack_oversized_head,
        attack_smuggled_request,
        attack_framed_page,
    ],
)
async def test_attack_is_answered(tmp_path: Path, attack: Any) -> None:
    async with serving(tmp_path) as server:
        assert server.port
        await attack(server.port)
        # The server still serves.
        assert (await exchange(server.port, HEALTHZ))[:12] == b"HTTP/1.1 200"


async def test_connection_flood_is_refused_beyond_the_per_address_cap(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections_per_ip=5) as server:
        assert server.port
        await attack_connection_flood(server.port, limit=10)
        assert server.limits.refused["max_connections_per_ip"] >= 1


async def test_the_total_cap_refuses_with_503_and_healthz_still_answers(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=2, max_connections_per_ip=0) as server:
        assert server.port
        idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(2)]
        # A WebSocket upgrade over the cap: refused before the upgrade.
        assert await upgrade_status(server.port) == 503
        health = await exchange(server.port, HEALTHZ)
        body = json.loads(health.partition(b"\r\n\r\n")[2])
        assert body["refused"]["max_connections"] == 2 and body["tcp_connections"] == 2
        for stream in idle:
            await stream.aclose()
        # Once they go, the slots are free again.
        with trio.fail_after(5):
            # No event tells when the server has seen the EOFs: poll its count.
            while server.limits.active:  # noqa: ASYNC110
                await trio.sleep(0.01)
        async with connect(server.port) as client:
            assert (await client.hello(None))["type"] == "welcome"


async def test_registration_flood_is_refused_per_address(tmp_path: Path) -> None:
    async with serving(tmp_path, registrations_per_minute=6, registration_burst=3) as server:
        assert server.port
        async with connect(server.port) as client:
            token = (await client.hello(None))["token"]
        await attack_registration_flood(server.port, attempts=3)
        # Coming back with a token is not a registration: still welcome.
        async with connect(server.port) as client:
            assert (await client.hello(token))["type"] == "welcome"


async def test_registrations_can_be_unlimited(tmp_path: Path) -> None:
    async with serving(tmp_path, registrations_per_minute=0, registration_burst=1) as server:
        assert server.port
        for _ in range(5):
            async with connect(server.port) as client:
                assert (await client.hello(None))["type"] == "welcome"


# ----------------------------------------------------------- deadlines before hello


async def test_a_silent_body_is_cut_off_by_the_deadline(
    tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, handshake_timeout=10.0) as server:
        assert server.port
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nabc"
            )
            start = trio.current_time()
            with trio.fail_after(60):
                answer = await read_until_closed(stream)
            assert answer.startswith(b"HTTP/1.1 405")
            assert 9.9 <= trio.current_time() - start <= 11


async def test_a_silent_connection_is_cut_off_by_the_deadline(
    tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    async with serving(tmp_path, handshake_timeout=10.0) as server:
        assert server.port
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
            with trio.fail_after(60):
                assert await read_until_closed(stream) == b""
        assert server.limits.active == 0


# ----------------------------------------------------------------------- origins


def origin_request(origin: str | None, host: str) -> h11.Request:
    headers = [("Host", host)]
    if origin is not None:
        headers.append(("Origin", origin))
    return h11.Request(method="GET", target="/ws", headers=headers)


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "127.0.0.1:8765", True),  # a program, not a page
        ("http://127.0.0.1:8765", "127.0.0.1:8765", True),  # our own page
        ("http://localhost:3000", "127.0.0.1:8765", True),  # a developer's page
        ("http://[::1]:5173", "127.0.0.1:8765", True),
        ("https://evil.example", "127.0.0.1:8765", False),
        ("http://evil.example:8765", "evil.example:8765", False),  # DNS rebinding
        ("null", "127.0.0.1:8765", False),  # a sandboxed frame or a file
        ("http://127.0.0.1:9999", "127.0.0.1:9999", True),  # loopback origin, any port
    ],
)
def test_the_default_origin_policy_on_a_loopback_server(
    origin: str | None, host: str, allowed: bool
) -> None:
    policy = OriginPolicy((), "127.0.0.1")
    assert policy.allows(origin_request(origin, host), 8765) is allowed


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("https://chat.hotel.example", "chat.hotel.example", True),  # configured
        ("HTTPS://Chat.Hotel.Example:443", "chat.hotel.example", True),
        ("http://chat.hotel.example", "chat.hotel.example", False),  # another scheme
        ("http://localhost:3000", "10.0.0.5:8765", False),  # no loopback default now
        ("http://10.0.0.5:8765", "10.0.0.5:8765", True),  # our own, on a wildcard bind
        ("http://10.0.0.5:8766", "10.0.0.5:8766", False),  # not our port
        ("https://evil.example", "10.0.0.5:8765", False),
    ],
)
def test_configured_origins_on_a_wildcard_server(origin: str, host: str, allowed: bool) -> None:
    policy = OriginPolicy(("https://chat.hotel.example",), "0.0.0.0")
    assert policy.allows(origin_request(origin, host), 8765) is allowed


async def test_the_guest_page_origin_may_connect_and_a_foreign_one_may_not(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as server:
        port = server.port
        assert port
        assert await upgrade_status(port, f"Origin: http://127.0.0.1:{port}") == 101
        assert await upgrade_status(port) == 101
        assert await upgrade_status(port, "Origin: https://evil.example") == 403
        health = await exchange(port, HEALTHZ)
        assert json.loads(health.partition(b"\r\n\r\n")[2])["refused"]["origin"] == 1


def test_connection_limits_count_per_address_and_in_total() -> None:
    limits = ConnectionLimits(max_total=3, max_per_address=2)
    assert limits.enter("a") is None and limits.enter("a") is None
    assert limits.enter("a") == "max_connections_per_ip"
    assert limits.enter("b") is None
    assert limits.enter("c") == "max_connections"
    limits.leave("a")
    assert limits.enter("c") is None
    assert dict(limits.refused) == {"max_connections_per_ip": 1, "max_connections": 1}
    off = ConnectionLimits(0, 0)
    assert all(off.enter("a") is None for _ in range(1000))


# ---------------------------------------------------------------------- EMFILE


def test_running_out_of_file_descriptors_backs_off_and_recovers(tmp_path: Path) -> None:
    """A real server limited to 128 files, flooded by 150 idle connections: accept
    backs off quietly (a line or two, no traceback) and /healthz answers once they go."""
    port = free_port()
    log_path = tmp_path / "server.log"

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_chat",
                "serve",
                "--db",
                str(tmp_path / "chat.db"),
                "--port",
                str(port),
                "--max-connections",
                "0",
                "--max-connections-per-ip",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            preexec_fn=low_file_limit,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        )
        try:
            wait_for_port(port, proc)
            trio.run(_flood_then_recover, port)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    log = log_path.read_text()
    assert "Traceback" not in log, log[:3000]
    complaints = [line for line in log.splitlines() if "cannot accept" in line]
    assert 1 <= len(complaints) <= 3, log[:3000]


async def _flood_then_recover(port: int) -> None:
    import socket

    hogs = []
    for _ in range(150):
        sock = socket.socket()
        sock.connect(("127.0.0.1", port))
        hogs.append(sock)
    # While the descriptors are gone, /healthz cannot even be accepted.
    with trio.move_on_after(1.5) as starved:
        await exchange(port, HEALTHZ, within=1.5)
    assert starved.cancelled_caught
    for sock in hogs:
        sock.close()
    answer = await exchange(port, HEALTHZ, within=15)
    assert answer.startswith(b"HTTP/1.1 200")


# --------------------------------------------------------- silent guests expire


async def test_guests_who_never_wrote_expire_and_their_tokens_then_fail(
    tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    # The revocation watcher is off: its polls, each a read in a thread, would keep a
    # virtual clock from jumping the tenth of a day this waits.
    async with serving(
        tmp_path, expire_silent_guests=86400.0, concierge="off", revocation_poll=0
    ) as server:
        assert server.port
        async with connect(server.port) as silent:
            silent_token = (await silent.hello(None))["token"]
        async with connect(server.port) as writer:
            writer_token = (await writer.hello(None))["token"]
            await writer.send(type="message", client_msg_id="m1", text="hello")
            await writer.expect("ack")
        # Both registered long ago (in wall time, which the expiry compares with).
        with sqlite3.connect(tmp_path / "chat.db") as db:
            db.execute("UPDATE guests SET created_ts = created_ts - 2 * 86400")
        await trio.sleep(8640 + 1)  # virtual time: the task runs every tenth of a day
        await server.wait_idle()  # its write committed
        assert server.expired_guests == 1
        frame, code = await hello_answer(server.port, silent_token)
        assert frame["code"] == "auth_failed" and code == 4401
        async with connect(server.port) as writer:
            assert (await writer.hello(writer_token))["type"] == "welcome"


# ------------------------------------------------------------- the CLI's flags


def test_the_serve_flags_reach_the_config(tmp_path: Path) -> None:
    from trio_chat._cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--max-connections",
            "0",
            "--max-connections-per-ip",
            "7",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
            "--registrations-per-minute",
            "0",
            "--expire-silent-guests",
            "0",
        ]
    )
    assert args.max_connections == 0 and args.max_connections_per_ip == 7
    assert args.allowed_origin == ["https://a.example", "https://b.example"]
    assert args.registrations_per_minute == 0 and args.expire_silent_guests == 0


def test_a_real_server_refuses_a_foreign_origin(tmp_path: Path) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port, "--allowed-origin", "https://a.example"):
        assert trio.run(upgrade_status, port, "Origin: https://a.example") == 101
        assert trio.run(upgrade_status, port, "Origin: http://localhost:3000") == 403


# ------------------------------------------------- expiry, in both storage backends


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    from trio_chat.server._store import Database
    from trio_chat.server._store_memory import MemoryBackend

    db = Database(tmp_path / "chat.db") if request.param == "sqlite" else MemoryBackend()
    yield db
    db.close()


def test_only_silent_old_unheld_guests_expire(backend: Any) -> None:
    from trio_chat.core.storage import AppendMessage, CreateGuest, ExpireSilentGuests

    def guest() -> Any:
        return backend.apply_batch([CreateGuest(name=None)])[0]

    silent, wrote, escalated, kept, staff_wrote = (guest() for _ in range(5))
    backend.apply_batch(
        [
            AppendMessage(conversation_id=wrote.conversation_id, sender="guest", text="hi"),
            AppendMessage(
                conversation_id=escalated.conversation_id,
                sender="system",
                text="a person will be with you",
                status=("waiting", None, None),
            ),
            AppendMessage(conversation_id=staff_wrote.conversation_id, sender="staff", text="hi"),
        ]
    )
    later = time.time() + 1
    [expired] = backend.apply_batch(
        [ExpireSilentGuests(before=later, keep=frozenset({kept.guest_id}))]
    )
    assert sorted(expired) == sorted([silent.guest_id, staff_wrote.guest_id])
    assert backend.conversation_of_guest(silent.guest_id) is None
    assert backend.conversation(staff_wrote.conversation_id) is None
    assert backend.history(staff_wrote.conversation_id, 0, 10) == []
    for survivor in (wrote, escalated, kept):
        assert backend.conversation_of_guest(survivor.guest_id) is not None
    # Nobody registered after ``before`` expires.
    fresh = guest()
    assert backend.apply_batch([ExpireSilentGuests(before=later - 3600)])[0] == []
    assert backend.conversation_of_guest(fresh.guest_id) is not None


def test_a_guest_who_writes_in_the_same_batch_does_not_expire(tmp_path: Path) -> None:
    from trio_chat.core.storage import AppendMessage, CreateGuest, ExpireSilentGuests
    from trio_chat.server._store import Database

    db = Database(tmp_path / "chat.db")
    row = db.apply_batch([CreateGuest(name=None)])[0]
    _, expired = db.apply_batch(
        [
            AppendMessage(conversation_id=row.conversation_id, sender="guest", text="hi"),
            ExpireSilentGuests(before=time.time() + 1),
        ]
    )
    assert expired == [] and db.history(row.conversation_id, 0, 10)[0].text == "hi"
    db.close()


async def test_a_frame_over_the_limit_is_read_to_its_end_so_its_sender_gets_the_1009(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The server stops decoding at the limit but takes the rest of the frame unread
    before it closes: closed with 16 MiB unread, the socket reset the connection under
    the close frame, and a sender still sending saw 1006 (and a broken send), not 1009."""
    srv = ChatServer(make_config(tmp_path, max_frame_bytes=64 * 1024))
    await nursery.start(srv.run)
    assert srv.port
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with stream:
            await stream.send_all(upgrade_request(srv.port))
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some()
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 101 ")
            await stream.send_all(client_frame(b"x" * (16 * 1024 * 1024), b"mask"))
            await stream.send_eof()
            rest = bytearray(received.split(b"\r\n\r\n", 1)[1])
            while chunk := await stream.receive_some():
                rest += chunk
    [(opcode, payload)] = split_frames(rest)
    assert (opcode, int.from_bytes(payload[:2], "big")) == (CLOSE, 1009)
