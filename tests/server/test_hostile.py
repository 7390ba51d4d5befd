"""Every attack of docs/security.md against one real server while a witness guest and a
witness staff member chat through it: the witnesses see nothing lost, nothing late by
more than a second, nothing different, and the server logs no traceback.

The witnesses connect from 127.0.0.2, the attacks from 127.0.0.1: two hosts as the
server sees them, so a per-address limit that stops an attacker is not the witnesses'
limit (a hotel whose guests share one NAT address shares its generous budget; that is
what the limits' own tests cover).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio_websocket

from ..helpers import RawClient, free_port, staff_token
from ..ui import test_text_safety as text_attacks
from . import test_hardening_http as http_attacks
from . import test_hardening_memory as memory_attacks
from . import test_hardening_staff as staff_attacks
from . import test_tls as tls_attacks

Attack = Callable[[int, Path], Awaitable[None]]  # (the server's port, its database)

WITNESS_HOST = "127.0.0.2"
LATE = 1.0  # seconds: a witness message slower than this counts as late
WITNESS_PERIOD = 0.1  # a guest message, and a staff answer, ten times a second


# ------------------------------------------------------------------- the attacks


async def attack_garbage_frames(port: int) -> None:
    """Frames that are not the protocol: the server answers bad_message and, past its
    threshold, closes the connection (1008), never more."""
    async with _attacker(port) as ws:
        await ws.send_message(json.dumps({"type": "hello", "token": None}))
        for junk in ["{", "[]", '{"type":"nope"}', "\x00" * 100, '{"type":"message"}'] * 20:
            try:
                await ws.send_message(junk)
            except trio_websocket.ConnectionClosed:
                break
        reason = await _closed(ws)
        assert reason.code == 1008, reason


async def attack_oversized_frame(port: int) -> None:
    """A frame over the limit: close 1009, nothing stored."""
    async with _attacker(port) as ws:
        await ws.send_message(json.dumps({"type": "hello", "token": None}))
        try:
            await ws.send_message("x" * (2 * 1024 * 1024))
        except trio_websocket.ConnectionClosed as exc:  # closed while we were still sending
            reason = exc.reason
        else:
            reason = await _closed(ws)
        assert reason is not None and reason.code == 1009, reason


async def attack_slowloris_head(port: int) -> None:
    """An HTTP head sent a byte at a time, never finished, from many sockets."""
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
    try:
        for stream in streams:
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        await trio.sleep(1.5)
    finally:
        for stream in streams:
            await stream.aclose()


def on_port(attack: Callable[[int], Awaitable[None]]) -> Attack:
    """An attack that needs only the server's port."""

    async def run(port: int, db: Path) -> None:
        await attack(port)

    run.__name__ = attack.__name__
    return run


def _attacks_of(module: ModuleType) -> list[Callable[[int], Awaitable[None]]]:
    return [getattr(module, name) for name in dir(module) if name.startswith("attack_")]


# Every attack but one: rotating the secret signs out everyone by design, the
# witnesses included (an administrator's act, tested on its own).
ATTACKS: list[Attack] = [
    *map(on_port, [attack_garbage_frames, attack_oversized_frame, attack_slowloris_head]),
    *map(on_port, _attacks_of(http_attacks)),
    *map(on_port, _attacks_of(memory_attacks)),
    *map(on_port, _attacks_of(text_attacks)),
    *[a for a in staff_attacks.ATTACKS if a is not staff_attacks.attack_rotated_secret],
]
# Against a server on TLS, with the witnesses on wss://.
TLS_ATTACKS: list[Attack] = [*map(on_port, _attacks_of(tls_attacks))]


# ------------------------------------------------------------------- the witnesses


class Witness:
    """A guest and a staff member talking through the server in both directions; every
    message's travel time is recorded by its receiver."""

    def __init__(self, guest: RawClient, desk: RawClient, conversation_id: str) -> None:
        self.guest = guest
        self.desk = desk
        self.conversation_id = conversation_id
        self.sent: list[tuple[str, str]] = []  # (direction, text) in order
        self.received: dict[str, list[tuple[str, float]]] = {"to_desk": [], "to_guest": []}
        self._sent_at: dict[str, float] = {}
        self._arrived = trio.Event()

    async def talk(self, until: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, self.desk, "to_desk", "guest")
            nursery.start_soon(self._listen, self.guest, "to_guest", "staff")
            i = 0
            while not until.is_set():
                i += 1
                await self._say(self.guest, "to_desk", f"guest-{i}")
                await self._say(self.desk, "to_guest", f"desk-{i}", self.conversation_id)
                await trio.sleep(WITNESS_PERIOD)
            # Whatever is still travelling gets its second to arrive.
            with trio.move_on_after(LATE + 0.5):
                await self._until(
                    lambda: all(len(self.received[d]) >= self._count(d) for d in self.received)
                )
            nursery.cancel_scope.cancel()

    async def exchanged(self, more: int) -> None:
        """Wait until ``more`` further messages arrived each way."""
        goal = {d: len(r) + more for d, r in self.received.items()}
        await self._until(lambda: all(len(self.received[d]) >= goal[d] for d in goal))

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._arrived.wait()

    def _count(self, direction: str) -> int:
        return sum(1 for d, _ in self.sent if d == direction)

    async def _say(
        self, client: RawClient, direction: str, text: str, conversation_id: str | None = None
    ) -> None:
        frame: dict[str, Any] = {"type": "message", "client_msg_id": text, "text": text}
        if conversation_id is not None:
            frame["conversation_id"] = conversation_id
        self.sent.append((direction, text))
        self._sent_at[text] = trio.current_time()
        await client.send(**frame)

    async def _listen(self, client: RawClient, direction: str, sender: str) -> None:
        while True:
            frame = await client.next_of("message")
            if frame["sender"] == sender:
                text = frame["text"]
                self.received[direction].append(
                    (text, trio.current_time() - self._sent_at.get(text, trio.current_time()))
                )
                self._arrived.set()
                self._arrived = trio.Event()

    def verdict(self) -> list[str]:
        problems = []
        for direction in self.received:
            sent = [t for d, t in self.sent if d == direction]
            got = [t for t, _ in self.received[direction]]
            if got != sent:
                problems.append(f"{direction}: sent {len(sent)}, got {len(got)} or out of order")
            late = [(t, round(s, 3)) for t, s in self.received[direction] if s > LATE]
            if late:
                problems.append(f"{direction}: late {late[:5]}")
        return problems


@asynccontextmanager
async def _witness_client(port: int, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawClient]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=WITNESS_HOST)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    if tls is not None:
        stream = trio.SSLStream(tcp, tls, server_hostname="127.0.0.1")
        await stream.do_handshake()
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
        try:
            yield RawClient(ws)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _witnesses(
    port: int, db: Path, desk_name: str, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Witness]:
    token = staff_token(db, desk_name)
    async with _witness_client(port, tls) as guest, _witness_client(port, tls) as desk:
        welcome = await guest.hello(None, name="Witness Guest")
        cid = welcome["conversation_id"]
        await desk.hello(token)
        await guest.send(type="escalate")
        await desk.expect("conversation", conversation_id=cid, status="waiting")
        await desk.send(type="claim", conversation_id=cid)
        await desk.expect("subscribed", conversation_id=cid)
        yield Witness(guest, desk, cid)


@asynccontextmanager
async def _attacker(port: int) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{port}/ws", connect_timeout=5, disconnect_timeout=1
    ) as ws:
        yield ws


async def _closed(ws: trio_websocket.WebSocketConnection) -> trio_websocket.CloseReason:
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason


class ServerLog:
    """Everything the server process prints, collected by a thread as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._proc = proc

    def wait_listening(self, port: int) -> None:
        assert self._proc.stdout is not None
        for line in iter(self._proc.stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))
            if f":{port}/ws" in self.lines[-1]:
                threading.Thread(target=self._collect, daemon=True).start()
                return
        raise RuntimeError("the server exited: " + "".join(self.lines))

    def _collect(self) -> None:
        assert self._proc.stdout is not None
        for line in iter(self._proc.stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def _serving(db: Path, *flags: str) -> Iterator[tuple[int, ServerLog]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_chat", "serve", "--db", str(db), "--port", str(port),
         "--typing-delay", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )  # fmt: skip
    log = ServerLog(proc)
    try:
        log.wait_listening(port)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.text, log.text[-4000:]


@pytest.fixture
def hostile_server(tmp_path: Path) -> Iterator[tuple[int, Path, ServerLog]]:
    """A server of the defaults for each attack: every attack comes from 127.0.0.1,
    and one attack's use of the address's budgets (new guests, connections) must not
    decide the next one's answer."""
    db = tmp_path / "chat.db"
    with _serving(db) as (port, log):
        yield port, db, log


@pytest.fixture
def hostile_tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, ServerLog, ssl.SSLContext]]:
    """The same on TLS (a test CA), and the context the witnesses trust it with."""
    import trustme

    base = tmp_path
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    db = base / "chat.db"
    with _serving(db, "--certfile", str(base / "server.pem")) as (port, log):
        yield port, db, log, trusting


async def _witnessed(
    attack: Attack, port: int, db: Path, log: ServerLog, tls: ssl.SSLContext | None = None
) -> None:
    with trio.fail_after(60):
        async with _witnesses(port, db, f"Desk ({attack.__name__})", tls) as witness:
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(witness.talk, done)
                await witness.exchanged(2)  # the witnesses are talking before the attack
                try:
                    await attack(port, db)
                finally:
                    await witness.exchanged(2)  # and after it
                    done.set()
    assert witness.sent, "the witnesses never spoke"
    assert witness.verdict() == []
    assert "Traceback" not in log.text, log.text[-4000:]


def _ids(attacks: list[Attack]) -> list[str]:
    return [attack.__name__.removeprefix("attack_") for attack in attacks]


@pytest.mark.parametrize("attack", ATTACKS, ids=_ids(ATTACKS))
async def test_the_witnesses_see_nothing_of_an_attack(
    attack: Attack, hostile_server: tuple[int, Path, ServerLog]
) -> None:
    await _witnessed(attack, *hostile_server)


@pytest.mark.parametrize("attack", TLS_ATTACKS, ids=_ids(TLS_ATTACKS))
async def test_the_witnesses_on_tls_see_nothing_of_an_attack(
    attack: Attack, hostile_tls_server: tuple[int, Path, ServerLog, ssl.SSLContext]
) -> None:
    await _witnessed(attack, *hostile_tls_server)
