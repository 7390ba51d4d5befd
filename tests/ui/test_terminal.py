"""`trio-chat chat`, driven through its standard input like a person would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import free_port, server_process, staff_token

pytestmark = pytest.mark.slow


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_chat", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
    )


def test_a_guest_asks_and_the_concierge_answers(tmp_path: Path) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        first = chat(
            f"ws://127.0.0.1:{port}/ws", "--name", "Tess", stdin="What time is check-in?\n"
        )
        assert first.returncode == 0, first.stderr
        assert "You: What time is check-in?" in first.stdout
        assert "Concierge: Check-in is from 3 pm" in first.stdout
        token = first.stdout.split("--token", 1)[1].split()[0]
        again = chat(f"ws://127.0.0.1:{port}/ws", "--token", token, stdin="/person\n")
        # The same guest: the earlier conversation comes back, then the hand-over.
        assert "You: What time is check-in?" in again.stdout
        assert "[conversation: waiting]" in again.stdout


def test_staff_see_the_queue_claim_and_reply(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "chat.db"
    with server_process(db, port):
        guest = chat(
            f"ws://127.0.0.1:{port}/ws", "--name", "Ravi", stdin="I need a person please\n"
        )
        assert guest.returncode == 0, guest.stderr
        token = staff_token(db, "Anna")
        listed = chat(f"ws://127.0.0.1:{port}/ws", "--staff", token, stdin="/queue\n")
        line = next(ln for ln in listed.stdout.splitlines() if "Ravi" in ln)
        conversation_id = line.split()[1]
        assert "waiting" in line
        desk = chat(
            f"ws://127.0.0.1:{port}/ws",
            "--staff",
            token,
            stdin=f"/claim {conversation_id}\nHello Ravi, Anna here.\n",
        )
        assert desk.returncode == 0, desk.stderr
        assert "Guest: I need a person please" in desk.stdout
        guest_again = chat(
            f"ws://127.0.0.1:{port}/ws",
            "--token",
            guest.stdout.split("--token", 1)[1].split()[0],
            stdin="",
        )
        assert "Anna: Hello Ravi, Anna here." in guest_again.stdout


def test_quitting_while_the_server_is_unreachable_does_not_hang() -> None:
    port = free_port()
    result = chat(f"ws://127.0.0.1:{port}/ws", stdin="/quit\n")
    assert result.returncode == 0
    assert "--token" not in result.stdout  # never connected, so no guest was created
