"""Crash safety and the admin CLI, against real `trio-chat serve` processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from ..helpers import connect, free_port, server_process

pytestmark = pytest.mark.slow

GUESTS = 8


async def guest_writes_until_cut(
    port: int, acked: dict[str, dict[str, Any]], sent: list[str], enough: trio.Event, index: int
) -> str:
    """Write as fast as acks allow until the connection dies; returns the token."""
    token = ""
    try:
        async with connect(port) as guest:
            token = (await guest.hello(None))["token"]
            tokens[index] = token
            for i in range(100_000):
                cmid = f"g{index}-m{i}"
                sent.append(cmid)
                await guest.send(type="message", client_msg_id=cmid, text=f"message {i}")
                ack = await guest.expect("ack", client_msg_id=cmid)
                acked[cmid] = ack
                if len(acked) >= 400:
                    enough.set()
    except (
        trio_websocket.ConnectionClosed,
        trio_websocket.HandshakeError,
        OSError,
        trio.BrokenResourceError,
    ):
        pass
    return token


tokens: dict[int, str] = {}


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
async def test_every_acknowledged_message_survives_a_restart(
    tmp_path: Path, stop: signal.Signals
) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    acked: dict[str, dict[str, Any]] = {}
    sent: list[str] = []
    tokens.clear()
    with server_process(db, port, "--concierge", "off", "--rate-limit", "0") as proc:
        enough = trio.Event()
        async with trio.open_nursery() as nursery:
            for index in range(GUESTS):
                nursery.start_soon(guest_writes_until_cut, port, acked, sent, enough, index)
            with trio.fail_after(30):
                await enough.wait()
            proc.send_signal(stop)  # mid-traffic: some messages are in flight
    assert len(acked) >= 400 and len(tokens) == GUESTS

    with server_process(db, port, "--concierge", "off", "--rate-limit", "0"):
        for index, token in tokens.items():
            async with connect(port) as guest:
                welcome = await guest.hello(token)
                history = await guest.fetch_history(welcome["last_seq"])
                # No gap, no reuse: seq runs 1..last_seq.
                assert [m["seq"] for m in history] == list(range(1, welcome["last_seq"] + 1))
                by_id = {m["client_msg_id"]: m for m in history}
                assert len(by_id) == len(history)
                mine = {k: v for k, v in acked.items() if k.startswith(f"g{index}-")}
                for cmid, ack in mine.items():
                    assert by_id[cmid]["seq"] == ack["seq"]
                    assert by_id[cmid]["ts"] == ack["ts"]
                # Retrying whatever was sent but never acknowledged stores it once.
                unacked = [c for c in sent if c.startswith(f"g{index}-") and c not in acked]
                for cmid in unacked:
                    await guest.send(type="message", client_msg_id=cmid, text="retry")
                    ack = await guest.expect("ack", client_msg_id=cmid)
                    if cmid in by_id:
                        assert ack["seq"] == by_id[cmid]["seq"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_chat", *args], capture_output=True, text=True, timeout=60
    )


async def test_staff_added_while_the_server_runs_can_log_in_at_once(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    with server_process(db, port):
        added = cli("staff", "add", "Anna Berg", "--db", str(db))
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip().splitlines()[-1]
        async with connect(port) as desk:
            welcome = await desk.hello(token)
            assert welcome["role"] == "staff" and welcome["name"] == "Anna Berg"
        listed = cli("staff", "list", "--db", str(db))
        assert "Anna Berg" in listed.stdout
        assert cli("staff", "token", "Anna Berg", "--db", str(db)).stdout.strip() == token
        assert cli("staff", "remove", "Anna Berg", "--db", str(db)).returncode == 0
        async with connect(port) as desk:
            refused = await desk.hello(token)
            assert refused["code"] == "auth_failed"
            assert (await desk.closed()).code == 4401
        assert cli("staff", "remove", "Nobody", "--db", str(db)).returncode == 1
        assert cli("staff", "add", "", "--db", str(db)).returncode == 1


async def test_guest_tokens_for_a_closed_registration_server(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    with server_process(db, port, "--no-open-registration"):
        issued = cli("guest", "add", "Room 101", "--db", str(db))
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip().splitlines()[-1]
        async with connect(port) as guest:
            welcome = await guest.hello(token)
            assert welcome["type"] == "welcome"
        async with connect(port) as stranger:
            assert (await stranger.hello(None))["code"] == "auth_failed"


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database " * 100)
    result = cli("staff", "list", "--db", str(not_db))
    assert result.returncode == 2 and "cannot open database" in result.stderr
    assert cli("serve", "--rate-limit", "-1").returncode == 2
    assert cli("serve", "--concierge", "gpt").returncode == 2


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--port", str(port), "--db", str(tmp_path / "x.db"))
    assert result.returncode == 2 and "cannot listen" in result.stderr
