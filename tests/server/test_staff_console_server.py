"""The server's side of the staff console: its page and canned replies over HTTP, the
guest's room end to end and in an old database, and the sign-in links of the CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from trio_chat import ChatServer
from trio_chat.server._concierge import KnowledgeBase
from trio_chat.server._staff_console import canned_replies, sign_in_link
from trio_chat.server._store import Database

from ..helpers import connect, staff_token
from .test_hardening_staff import SCHEMA_1
from .test_http import exchange, get


async def test_staff_serves_the_console_page(server: ChatServer) -> None:
    assert server.port
    response = await exchange(server.port, get("/staff"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/html" in head
    assert b'<script type="module" src="/static/staff.js">' in body
    # Under the CSP the server is about to send (default-src 'self'): no inline code.
    assert b"<script>" not in body and b"<style" not in body and b" style=" not in body
    assert b"onclick" not in body.lower()


async def test_canned_replies_are_the_knowledge_base_answers(server: ChatServer) -> None:
    assert server.port
    response = await exchange(server.port, get("/staff/canned.json"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head
    canned = json.loads(body)
    kb = KnowledgeBase.default()
    assert canned["hotel"] == kb.hotel_name == "Harbourview Hotel"
    breakfast = next(r for r in canned["replies"] if r["id"] == "breakfast")
    assert breakfast["text"] == next(t.answer for t in kb.topics if t.id == "breakfast")
    # Small talk is left out; every other topic is there, in the file's order.
    assert [r["id"] for r in canned["replies"]] == [t.id for t in kb.topics if not t.smalltalk]
    assert len(canned["replies"]) < len(kb.topics)


def test_canned_replies_follow_the_knowledge_base_they_are_given() -> None:
    kb = KnowledgeBase.from_dict(
        {
            "topic": [
                {"id": "spa", "title": "Spa", "answer": " Open 9-21. "},
                {"id": "hi", "title": "Hello", "answer": "Hello!", "smalltalk": True},
            ]
        }
    )
    assert canned_replies(kb) == [{"id": "spa", "title": "Spa", "text": "Open 9-21."}]


async def test_a_guest_s_room_reaches_a_staff_console_over_real_sockets(
    server: ChatServer, tmp_path: Path
) -> None:
    assert server.port
    token = staff_token(server.config.db_path, "Anna")
    async with connect(server.port) as staff, connect(server.port) as guest:
        await staff.hello(token)
        await staff.expect("staff_presence", staff=["Anna"])
        await guest.hello(None, name="Maria Lopez", room="412")
        entry = await staff.expect("conversation", guest_name="Maria Lopez")
        assert entry["guest_room"] == "412"


def test_a_database_from_before_rooms_opens_and_keeps_its_guests(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_db = sqlite3.connect(path)
    old_db.executescript(SCHEMA_1)  # the first release's tables: guests without room
    old_db.executescript(
        "INSERT INTO meta VALUES ('schema', '1'), ('secret', '" + "ab" * 32 + "');"
        "INSERT INTO guests VALUES ('g_old', 'Old Guest', 1.0);"
        "INSERT INTO conversations(conversation_id, guest_id, updated_ts) "
        "VALUES ('c_old', 'g_old', 1.0);"
        "INSERT INTO staff VALUES ('s_anna', 'Anna', 1.0);"
    )
    old_db.commit()
    old_db.close()
    db = Database(path)  # migrates: adds guests.room
    try:
        old = db.conversation_of_guest("g_old")
        assert old is not None and old.guest_name == "Old Guest" and old.guest_room is None
        assert old.last_seq == 0
        new = db.add_guest("Maria", "412")
        stored = db.conversation(new.conversation_id)
        assert stored is not None and stored.guest_room == "412"
        assert [m.name for m in db.list_staff()] == ["Anna"]
    finally:
        db.close()
    # Opening again is a no-op: the step ran once.
    Database(path).close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_chat", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_staff_add_prints_a_sign_in_link_and_the_token_alone_on_the_last_line(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "chat.db")
    added = run_cli("staff", "add", "Anna Berg", "--db", db, "--url", "https://chat.hotel.example/")
    assert added.returncode == 0, added.stderr
    *before, token = added.stdout.splitlines()
    assert token.startswith("s.") and " " not in token
    assert before == [f"https://chat.hotel.example/staff#token={token}"]
    linked = run_cli("staff", "link", "Anna Berg", "--db", db, "--url", "http://10.0.0.5:8765")
    assert linked.returncode == 0, linked.stderr
    assert linked.stdout.splitlines() == [f"http://10.0.0.5:8765/staff#token={token}"]


def test_a_bad_url_adds_nobody_and_an_unknown_name_has_no_link(tmp_path: Path) -> None:
    db = str(tmp_path / "chat.db")
    refused = run_cli("staff", "add", "Anna", "--db", db, "--url", "chat.hotel.example")
    assert refused.returncode == 1 and "http(s)" in refused.stderr and refused.stdout == ""
    assert run_cli("staff", "list", "--db", db).stdout == ""
    missing = run_cli("staff", "link", "Nobody", "--db", db)
    assert missing.returncode == 1 and "no staff member" in missing.stderr


@pytest.mark.parametrize("url", ["ws://x/ws", "https://x/?a=1", "https://x/#t", ""])
def test_a_sign_in_link_needs_a_plain_http_address(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        sign_in_link(url, "s.x.y")
