"""TLS on the one port: https:// and wss:// with a test CA (trustme), through real sockets.

The ``attack_*`` functions are importable on their own (no fixture): each attacks a
TLS server on 127.0.0.1:port and asserts what the server answers.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_chat import Backoff, ChatClient, ChatServer, StaffClient

from ..conftest import make_config
from ..helpers import free_port, server_process, staff_token

# The server's default TLS handshake deadline (ServerConfig.tls_handshake_timeout).
HANDSHAKE_DEADLINE: Final = 10.0
# A TLS record header announcing a 512-byte handshake message that never comes.
PARTIAL_CLIENT_HELLO: Final = b"\x16\x03\x01\x02\x00"
# A handshake record whose message is not a ClientHello (type 0xff) at all.
GARBAGE_TLS_RECORD: Final = b"\x16\x03\x01\x00\x08\xff\x00\x00\x04garb"


# ------------------------------------------------------------------------- attacks


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # a reset counts as the end
            return received
        if not data:
            return received
        received += data


async def attack_plain_http_to_tls_port(port: int) -> None:
    """Plain HTTP (a page request, then a ws:// upgrade) to the TLS port: each is
    answered 400 in plain text naming https://, and the connection is closed."""
    requests = [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ]
    for request in requests:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                answer = await _read_to_eof(stream)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"https://" in answer, answer


async def attack_stalled_tls_handshake(port: int) -> None:
    """Open TCP and start a TLS handshake that never finishes: the server closes the
    connection at its handshake deadline (10 s by default), not later."""
    with trio.fail_after(HANDSHAKE_DEADLINE + 5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(PARTIAL_CLIENT_HELLO)
            assert await _read_to_eof(stream) == b""


async def attack_garbage_tls_handshake(port: int) -> None:
    """A TLS record that holds no valid handshake message: the handshake fails and
    the server closes the connection at once (no waiting for the deadline)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(GARBAGE_TLS_RECORD)
            answer = await _read_to_eof(stream)
    # Nothing, or a TLS alert record: never an HTTP answer or a hang.
    assert answer == b"" or answer[0] == 0x15, answer


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def start_tls(
    nursery: trio.Nursery, tmp_path: Path, leaf: trustme.LeafCert, **overrides: Any
) -> ChatServer:
    server = ChatServer(make_config(tmp_path, ssl_context=server_context(leaf), **overrides))
    await nursery.start(server.run)
    return server


def quick_backoff(max_attempts: int | None = None) -> Backoff:
    return Backoff(initial=0.05, max=0.1, seed=1, max_attempts=max_attempts)


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


# --------------------------------------------------------------- the Python client


async def test_the_python_client_chats_over_wss_and_reconnects(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    server = await start_tls(nursery, tmp_path, leaf, concierge="off")
    url = f"wss://127.0.0.1:{server.port}/ws"
    with trio.fail_after(20):
        async with ChatClient(
            url, name="Ana", ssl_context=client_context(ca), backoff=quick_backoff()
        ) as guest:
            await guest.wait_for_state("connected")  # hello and welcome, over TLS
            first = await guest.send("Is the pool open?")  # the ack, over TLS
            assert first.seq == 1
            guest.set_online(False)  # the link goes; a new TLS connection comes back
            await guest.wait_for_state("offline")
            guest.set_online(True)
            await guest.wait_until(lambda: guest.reconnects == 1 and guest.synced)
            second = await guest.send("And the gym?")
            assert second.seq == 2
            await guest.wait_until(lambda: len(guest.transcript) == 2)
            assert [m.text for m in guest.transcript] == ["Is the pool open?", "And the gym?"]
            token = staff_token(tmp_path / "chat.db", "Sam")
            async with StaffClient(
                url, token=token, ssl_context=client_context(ca), backoff=quick_backoff()
            ) as staff:
                await staff.wait_until(lambda: guest.conversation_id in staff.queue)
                assert staff.queue[guest.conversation_id or ""].guest_label == "Ana"


async def test_a_client_that_does_not_trust_the_certificate_does_not_connect(
    nursery: trio.Nursery,
    tmp_path: Path,
    leaf: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat")
    # The certificate and key as files this time (ServerConfig.certfile, .keyfile).
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    server = ChatServer(make_config(tmp_path, certfile=cert, keyfile=key))
    await nursery.start(server.run)
    # The system's CAs do not include the test CA.
    with trio.fail_after(20):
        async with ChatClient(
            f"wss://127.0.0.1:{server.port}/ws", backoff=quick_backoff(max_attempts=1)
        ) as guest:
            await guest.wait_for_state("closed")
    reasons = [e.data["reason"] for e in guest.event_log if e.kind == "closed"]
    assert reasons and all("CERTIFICATE_VERIFY_FAILED" in r for r in reasons), reasons
    assert guest.guest_id is None
    # The server saw a handshake the client aborted: one line, no traceback.
    assert any("TLS handshake with" in r.getMessage() for r in caplog.records)
    assert_no_tracebacks(caplog)


# ----------------------------------------------------------------- what goes wrong


async def test_plain_http_to_the_tls_port_is_answered_400_without_a_traceback(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: trustme.CA,
    leaf: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat")
    server = await start_tls(nursery, tmp_path, leaf)
    assert server.port
    await attack_plain_http_to_tls_port(server.port)
    assert sum("plain HTTP from" in r.getMessage() for r in caplog.records) == 2
    assert_no_tracebacks(caplog)
    # And the port still serves TLS.
    with trio.fail_after(10):
        async with ChatClient(
            f"wss://127.0.0.1:{server.port}/ws", ssl_context=client_context(ca)
        ) as guest:
            await guest.wait_for_state("connected")


async def test_a_broken_tls_handshake_is_refused_in_one_log_line(
    nursery: trio.Nursery,
    tmp_path: Path,
    leaf: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat")
    server = await start_tls(nursery, tmp_path, leaf)
    assert server.port
    await attack_garbage_tls_handshake(server.port)
    failed = [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert len(failed) == 1 and "failed" in failed[0], failed
    assert_no_tracebacks(caplog)


@pytest.mark.parametrize("sent", [b"", PARTIAL_CLIENT_HELLO], ids=["silent", "partial-hello"])
async def test_a_stalled_tls_handshake_is_dropped_at_the_deadline(
    nursery: trio.Nursery,
    tmp_path: Path,
    leaf: trustme.LeafCert,
    idle_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_chat")
    # The HTTP idle timeout is longer, so only the TLS deadline can end this.
    server = await start_tls(
        nursery, tmp_path, leaf, tls_handshake_timeout=4.0, handshake_timeout=60.0
    )
    assert server.port
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        started = trio.current_time()
        await stream.send_all(sent)
        assert await _read_to_eof(stream) == b""
        assert 4.0 <= trio.current_time() - started < 5.0
    assert any("not done within 4 s" in r.getMessage() for r in caplog.records)
    assert_no_tracebacks(caplog)


async def test_the_attack_on_the_default_deadline_holds(
    nursery: trio.Nursery,
    tmp_path: Path,
    leaf: trustme.LeafCert,
    idle_clock: trio.testing.MockClock,
) -> None:
    server = await start_tls(nursery, tmp_path, leaf, handshake_timeout=60.0)
    assert server.port
    await attack_stalled_tls_handshake(server.port)


# ------------------------------------------------------------------ the command line


def test_serve_with_certfile_and_keyfile(
    tmp_path: Path, ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    port = free_port()
    with server_process(
        tmp_path / "chat.db", port, "--certfile", str(cert), "--keyfile", str(key)
    ) as proc:
        del proc

        async def chat() -> None:
            with trio.fail_after(10):
                async with ChatClient(
                    f"wss://127.0.0.1:{port}/ws", ssl_context=client_context(ca)
                ) as guest:
                    await guest.wait_for_state("connected")
                    assert (await guest.send("hello over TLS")).seq == 1
                await attack_plain_http_to_tls_port(port)

        trio.run(chat)
        # The terminal client, trusting the test CA through --cafile.
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        result = subprocess.run(
            [
                *(sys.executable, "-m", "trio_chat", "chat", f"wss://127.0.0.1:{port}/ws"),
                *("--cafile", str(ca_file), "--name", "Tess"),
            ],
            input="What time is check-in?\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0, result.stderr
        assert "Concierge: Check-in is from 3 pm" in result.stdout


def test_serve_refuses_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("nothing here\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "trio_chat", "serve", "--db", str(tmp_path / "chat.db")),
            *("--port", str(free_port()), "--certfile", str(bad)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2
    assert "cannot use the certificate" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------- Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def spki_sha256(leaf: trustme.LeafCert) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: the base64 SHA-256
    of the leaf certificate's SubjectPublicKeyInfo."""
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def tls_browser(leaf: trustme.LeafCert, tmp_path: Path) -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required under CI=true", pytrace=False)
        pytest.skip("Chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # Chromium accepts our certificate only because its key is pinned here: a
        # different certificate (or plain HTTP) would fail the page load.
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--ignore-certificate-errors-spki-list={spki_sha256(leaf)}",
            ],
        )
        yield browser
        browser.close()


@pytest.mark.slow
def test_the_guest_page_loads_over_https_and_chats_over_wss(
    tmp_path: Path, ca: trustme.CA, leaf: trustme.LeafCert, tls_browser: Any
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    port = free_port()
    with server_process(tmp_path / "chat.db", port, "--certfile", str(cert), "--keyfile", str(key)):
        context = tls_browser.new_context()
        try:
            page = context.new_page()
            response = page.goto(f"https://127.0.0.1:{port}/")
            assert response is not None and response.ok
            assert response.url.startswith("https://")
            page.wait_for_selector('#status[data-state="connected"]', timeout=15_000)
            assert page.evaluate("window.trioChat.url") == f"wss://127.0.0.1:{port}/ws"
            page.fill("#input", "What time is check-in?")
            page.press("#input", "Enter")
            page.wait_for_selector('#messages > li[data-sender="ai"]', timeout=15_000)
            assert (
                page.eval_on_selector('#messages > li[data-sender="guest"]', "li => li.dataset.seq")
                == "1"
            )
            assert "Check-in" in page.inner_text('#messages > li[data-sender="ai"] .body')
        finally:
            context.close()
    # The control: the same browser refuses a server with another certificate of the
    # same CA, so the page above loaded because the pinned key is the one we serve.
    other = tmp_path / "other"
    other.mkdir()
    impostor = ca.issue_cert("127.0.0.1")
    impostor.cert_chain_pems[0].write_to_path(str(other / "cert.pem"))
    impostor.private_key_pem.write_to_path(str(other / "key.pem"))
    port = free_port()
    with server_process(
        other / "chat.db",
        port,
        "--certfile",
        str(other / "cert.pem"),
        "--keyfile",
        str(other / "key.pem"),
    ):
        context = tls_browser.new_context()
        try:
            with pytest.raises(Exception, match="ERR_CERT"):
                context.new_page().goto(f"https://127.0.0.1:{port}/")
        finally:
            context.close()
