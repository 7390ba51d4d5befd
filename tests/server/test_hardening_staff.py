"""Staff hardening, end to end: revocation, secrets and tokens (docs/security.md).

Real sockets, real SQLite files, and the command line run as a separate process on the
same database, as an administrator would. The ``attack_*`` functions are the witness
tests' building blocks: each performs one attack against a server running on
127.0.0.1:``port`` whose database is ``db`` (the command line needs it, as the attacker
of a removal or a rotation is the administrator's own change) and asserts the server's
answer, within ``fail_after`` bounds."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_chat import ChatServer, CloseCode
from trio_chat.core.hub import SECRET_ROTATED, STAFF_REMOVED, STAFF_TOKEN_REVOKED
from trio_chat.core.tokens import TokenSigner
from trio_chat.server._secrets import SECRET_FILE_ENV
from trio_chat.server._store import Database

from ..conftest import make_config
from ..helpers import RawClient, connect, free_port, server_process

LEFT = "Anna has left; someone else from our team will be with you shortly."
# The server looks twice a second; a second from the command's exit is the promise.
NOTICED_WITHIN = 1.0
DAY = 86400.0


async def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """``trio-chat ARGS`` in its own process; its standard output."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_chat", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )
    if check:
        assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def add_staff(db: Path, name: str) -> str:
    return (await cli("staff", "add", name, "--db", str(db))).strip().splitlines()[-1]


async def signed_in_staff(client: RawClient, token: str) -> dict[str, Any]:
    welcome = await client.hello(token)
    assert welcome["type"] == "welcome" and welcome["role"] == "staff", welcome
    await client.expect("queue")
    return welcome


async def closed_with_4401(client: RawClient, why: str) -> None:
    """The console is told why, then closed with 4401, within the promised second."""
    with trio.fail_after(NOTICED_WITHIN):
        reason = await client.closed()
    assert reason.code == CloseCode.AUTH_FAILED
    errors = [f for f in client.seen if f["type"] == "error"]
    assert errors and (errors[-1]["code"], errors[-1]["message"]) == ("auth_failed", why)


async def refused_at_hello(port: int, token: str) -> str:
    async with connect(port) as client:
        with trio.fail_after(10):
            error = await client.hello(token)
            assert error["code"] == "auth_failed", error
            assert (await client.closed()).code == CloseCode.AUTH_FAILED
    return str(error["message"])


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# -------------------------------------------------------------------------- attacks


async def attack_removed_staff_keeps_console(port: int, db: Path) -> None:
    """A removed staff member's open console is closed with 4401 within a second of
    ``trio-chat staff remove`` (another process); their conversation goes back to
    waiting with a system message, and a colleague can claim it."""
    anna_token = await add_staff(db, "Anna")
    ben_token = await add_staff(db, "Ben")
    async with connect(port) as guest, connect(port) as anna, connect(port) as ben:
        welcome = await guest.hello(None, name="Room 12")
        cid = welcome["conversation_id"]
        await guest.send(type="escalate")
        await guest.expect("status", status="waiting")
        await signed_in_staff(anna, anna_token)
        await signed_in_staff(ben, ben_token)
        await anna.send(type="claim", conversation_id=cid)
        await anna.expect("subscribed", conversation_id=cid)
        await guest.expect("status", status="staff", assigned_to="Anna")

        await cli("staff", "remove", "Anna", "--db", str(db))
        await closed_with_4401(anna, STAFF_REMOVED)
        with trio.fail_after(NOTICED_WITHIN):
            await guest.expect("message", sender="system", text=LEFT)
            await guest.expect("status", status="waiting", assigned_to=None)

        await ben.send(type="claim", conversation_id=cid)
        with trio.fail_after(10):
            await ben.expect("subscribed", conversation_id=cid)
            await guest.expect("status", status="staff", assigned_to="Ben")
        assert not [f for f in ben.seen if f["type"] == "error"]
    assert "this staff member was removed" in await refused_at_hello(port, anna_token)


async def attack_revoked_staff_token(port: int, db: Path) -> None:
    """``trio-chat staff revoke`` closes consoles signed in with the old token (4401),
    the old token no longer signs in, and the new one it printed does."""
    old = await add_staff(db, "Carl")
    async with connect(port) as console:
        await signed_in_staff(console, old)
        new = (await cli("staff", "revoke", "Carl", "--db", str(db))).strip().splitlines()[-1]
        await closed_with_4401(console, STAFF_TOKEN_REVOKED)
    assert new != old
    assert await refused_at_hello(port, old) == STAFF_TOKEN_REVOKED
    async with connect(port) as console:
        await signed_in_staff(console, new)


async def attack_rotated_secret(port: int, db: Path) -> None:
    """After ``trio-chat secret rotate --yes`` every session signed in with an old
    token is closed (4401), old tokens no longer sign in, and ``staff token`` prints a
    working one."""
    old = await add_staff(db, "Dora")
    async with connect(port) as guest, connect(port) as console:
        welcome = await guest.hello(None)
        await signed_in_staff(console, old)
        await cli("secret", "rotate", "--yes", "--db", str(db))
        await closed_with_4401(console, SECRET_ROTATED)
        await closed_with_4401(guest, SECRET_ROTATED)
    assert await refused_at_hello(port, welcome["token"]) == "unknown or invalid token"
    assert await refused_at_hello(port, old) == "unknown or invalid token"
    new = (await cli("staff", "token", "Dora", "--db", str(db))).strip()
    async with connect(port) as console:
        await signed_in_staff(console, new)


async def attack_read_the_secret_from_the_database(port: int, db: Path) -> None:
    """The database holds the token secret: it and its side files are its owner's
    only (another local user cannot read them to mint a staff token)."""
    async with connect(port) as guest:  # a write, so the WAL and its index exist
        with trio.fail_after(10):
            await guest.hello(None)
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert path.exists() and private(path), oct(path.stat().st_mode)


async def attack_stale_guest_token(port: int, db: Path) -> None:
    """A guest token unused for longer than the idle limit (30 days by default) no
    longer signs in."""
    token = (await cli("guest", "add", "Room 7", "--db", str(db))).strip().splitlines()[-1]
    guest_id = token.split(".")[1]
    long_ago = time.time() - 31 * DAY
    with sqlite3.connect(db) as conn:  # as if unused for 31 days
        conn.execute("UPDATE guests SET last_seen_ts = ? WHERE guest_id = ?", (long_ago, guest_id))
        conn.execute(
            "UPDATE conversations SET updated_ts = ? WHERE guest_id = ?", (long_ago, guest_id)
        )
    conn.close()
    assert "has expired" in await refused_at_hello(port, token)


ATTACKS = [
    attack_removed_staff_keeps_console,
    attack_revoked_staff_token,
    attack_rotated_secret,
    attack_read_the_secret_from_the_database,
    attack_stale_guest_token,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
async def test_attack_against_trio_chat_serve(attack: Any, tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    with server_process(db, port, "--concierge", "off"):
        await attack(port, db)


# ------------------------------------------------------------ the same route, in-process


async def test_removing_through_the_api_closes_the_console_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = ChatServer(make_config(tmp_path, revocation_poll=3600.0))
    port = await nursery.start(server.run)
    token = await add_staff(tmp_path / "chat.db", "Anna")
    async with connect(port) as guest, connect(port) as anna:
        cid = (await guest.hello(None))["conversation_id"]
        await signed_in_staff(anna, token)
        await anna.send(type="claim", conversation_id=cid)
        await guest.expect("status", status="staff")
        # The hourly look would be far too late: the API wakes the watcher.
        assert await server.remove_staff("Anna")
        await closed_with_4401(anna, STAFF_REMOVED)
        with trio.fail_after(NOTICED_WITHIN):
            await guest.expect("status", status="waiting")
    assert not await server.remove_staff("Anna")


async def test_revoking_and_rotating_through_the_api(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = ChatServer(make_config(tmp_path, revocation_poll=3600.0))
    port = await nursery.start(server.run)
    token = await add_staff(tmp_path / "chat.db", "Anna")
    async with connect(port) as anna:
        await signed_in_staff(anna, token)
        new = await server.revoke_staff("Anna")
        assert new is not None
        await closed_with_4401(anna, STAFF_TOKEN_REVOKED)
    assert await server.revoke_staff("Nobody") is None
    async with connect(port) as anna:
        await signed_in_staff(anna, new)
        await server.rotate_secret()
        await closed_with_4401(anna, SECRET_ROTATED)


async def test_a_member_removed_while_the_server_was_down_holds_nothing_after_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    db_path = tmp_path / "chat.db"
    db = Database(db_path)
    member = db.add_staff("Anna")
    row = db.add_guest("Room 3")
    db.writer.execute(
        "UPDATE conversations SET status = 'staff', assigned_staff_id = ?, assigned_name = ? "
        "WHERE conversation_id = ?",
        (member.staff_id, member.name, row.conversation_id),
    )
    assert db.remove_staff("Anna")
    db.close()
    server = ChatServer(make_config(tmp_path))
    await nursery.start(server.run)
    await server.wait_idle()
    found = server.store.db.conversation(row.conversation_id)
    assert (found.status, found.assigned_staff_id) == ("waiting", None)
    assert server.store.db.recent(row.conversation_id, 1)[0].text == LEFT


# --------------------------------------------------------------------- files and secret


def test_a_new_database_its_side_files_and_its_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "chat.db"
    db = Database(path)
    db.add_guest("Room 1")  # a write: the WAL and its index now exist
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert file.exists() and private(file), (file, oct(file.stat().st_mode))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    db.close()


def test_an_existing_readable_database_is_made_private_on_open(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    Database(path).close()
    for suffix in ("", "-wal", "-shm"):
        file = Path(f"{path}{suffix}")
        file.touch()
        file.chmod(0o644)
    Database(path).close()
    for suffix in ("", "-wal", "-shm"):
        file = Path(f"{path}{suffix}")
        if file.exists():
            assert private(file), (file, oct(file.stat().st_mode))


# The schema the first release created (schema 1), to prove an old database still opens.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE guests (guest_id TEXT PRIMARY KEY, name TEXT, created_ts REAL NOT NULL);
CREATE TABLE staff (
    staff_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_ts REAL NOT NULL);
CREATE TABLE conversations (
    conversation_id TEXT PRIMARY KEY,
    guest_id TEXT NOT NULL UNIQUE REFERENCES guests(guest_id),
    status TEXT NOT NULL DEFAULT 'ai', assigned_staff_id TEXT, assigned_name TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0, read_seq INTEGER NOT NULL DEFAULT 0,
    guest_read_seq INTEGER NOT NULL DEFAULT 0, updated_ts REAL NOT NULL,
    preview TEXT NOT NULL DEFAULT '');
CREATE INDEX conversations_by_status ON conversations(status, updated_ts);
CREATE TABLE messages (
    conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,
    author TEXT, author_key TEXT, text TEXT NOT NULL, ts TEXT NOT NULL,
    client_msg_id TEXT, PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_idempotency
    ON messages(conversation_id, author_key, client_msg_id) WHERE client_msg_id IS NOT NULL;
"""


async def test_a_database_of_the_old_schema_opens_and_its_tokens_still_work(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "chat.db"
    secret = "ab" * 32
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_1)
        conn.execute("INSERT INTO meta VALUES ('schema', '1'), ('secret', ?)", (secret,))
        conn.execute("INSERT INTO staff VALUES ('s_old', 'Olga', ?)", (now,))
        conn.execute("INSERT INTO guests VALUES ('g_old', 'Room 9', ?)", (now,))
        conn.execute("INSERT INTO conversations(conversation_id, guest_id, updated_ts) "
                     "VALUES ('c_old', 'g_old', ?)", (now,))  # fmt: skip
    conn.close()
    signer = TokenSigner(bytes.fromhex(secret))
    server = ChatServer(make_config(tmp_path))
    port = await nursery.start(server.run)
    async with connect(port) as staff, connect(port) as guest:
        await signed_in_staff(staff, signer.issue("s", "s_old"))
        welcome = await guest.hello(signer.issue("g", "g_old"))
        assert welcome["conversation_id"] == "c_old"
    db = Database(path)  # a second opener finds it migrated
    assert db.staff_member("s_old") is not None
    assert db.revoke_staff("Olga") is not None
    db.close()


async def test_rotating_asks_for_confirmation_and_says_guests_lose_access(
    tmp_path: Path,
) -> None:
    db = tmp_path / "chat.db"
    token = await add_staff(db, "Anna")
    done = await trio.run_process(
        [sys.executable, "-m", "trio_chat", "secret", "rotate", "--db", str(db)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    warning = done.stderr.decode()
    assert done.returncode == 1 and "--yes" in warning
    assert "guests lose access to their conversations" in warning
    assert (await cli("staff", "token", "Anna", "--db", str(db))).strip() == token  # unchanged


async def test_the_secret_can_live_in_its_own_private_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    secret_file = tmp_path / "keys" / "token.secret"
    env = {SECRET_FILE_ENV: str(secret_file)}
    db = tmp_path / "chat.db"
    token = (await cli("staff", "add", "Anna", "--db", str(db), env=env)).strip().splitlines()[-1]
    assert secret_file.exists() and private(secret_file)
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    from_db = Database(db)
    db_token = TokenSigner(from_db.secret()).issue("g", from_db.add_guest("Room 1").guest_id)
    from_db.close()
    server = ChatServer(make_config(tmp_path, secret_file=secret_file))
    port = await nursery.start(server.run)
    async with connect(port) as anna:
        await signed_in_staff(anna, token)
        # The database's own secret signs nothing here.
        assert await refused_at_hello(port, db_token) == "unknown or invalid token"
        before = secret_file.read_text()
        await cli("secret", "rotate", "--yes", "--db", str(db), "--secret-file", str(secret_file))
        assert secret_file.read_text() != before and private(secret_file)
        await closed_with_4401(anna, SECRET_ROTATED)
    new = (await cli("staff", "token", "Anna", "--db", str(db), env=env)).strip()
    async with connect(port) as anna:
        await signed_in_staff(anna, new)
