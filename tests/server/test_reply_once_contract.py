"""At most one concierge reply per guest message, decided by the storage (issue #16):
the reply carries the guest message it answers (``AppendMessage.reply_to``) and a
second reply to the same guest message stores nothing, on every backend. Also: the key
is added to existing databases (a schema-2 SQLite file, a PostgreSQL database of
schema 2), idempotently."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.server.commit_path_probe import concierge_reply
from trio_chat.core.storage import AppendMessage
from trio_chat.server._backends import open_backend


def guest(cid: str, text: str = "where is breakfast?") -> AppendMessage:
    return AppendMessage(
        conversation_id=cid, sender="guest", author="Ana", author_key="g:1", text=text
    )


reply = concierge_reply


def test_a_second_reply_to_the_same_guest_message_stores_nothing(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    (asked,) = db.apply_batch([guest(cid)])
    (first,) = db.apply_batch([reply(cid, asked.message.seq)])
    assert not first.duplicate and first.message.seq == 2
    (second,) = db.apply_batch([reply(cid, asked.message.seq, "Ask at the desk.")])
    assert second.duplicate and second.conflict is None
    assert second.message.seq == 2 and second.message.text == "On the first floor."
    stored = db.history(cid, 0, 100)
    assert [(m.seq, m.sender, m.text) for m in stored] == [
        (1, "guest", "where is breakfast?"),
        (2, "ai", "On the first floor."),
    ]
    row = db.conversation(cid)
    assert row.last_seq == 2 and row.preview == "On the first floor."
    # The next guest message has a key of its own.
    (again,) = db.apply_batch([guest(cid, "and dinner?")])
    (third,) = db.apply_batch([reply(cid, again.message.seq, "Until ten.")])
    assert not third.duplicate and third.message.seq == 4
    assert db.unanswered(0) == []


def test_the_loser_of_a_batch_is_rolled_back_with_it(db: Any) -> None:
    """A failed batch takes its reply's key with it: the reply may be given again."""
    cid = db.add_guest("Ana").conversation_id
    (asked,) = db.apply_batch([guest(cid)])
    with pytest.raises(Exception):  # noqa: B017 - whichever error the backend raises
        db.apply_batch([reply(cid, asked.message.seq), guest("no-such-conversation")])
    (first,) = db.apply_batch([reply(cid, asked.message.seq)])
    assert not first.duplicate and first.message.seq == 2


def test_a_reply_to_a_conversation_that_left_the_concierge_stores_nothing(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    (asked,) = db.apply_batch([guest(cid)])
    db.apply_batch(
        [
            AppendMessage(
                conversation_id=cid,
                sender="system",
                text="claimed",
                status=("staff", "s-1", "Olga"),
                expect=("ai", None),
            )
        ]
    )
    (late,) = db.apply_batch([reply(cid, asked.message.seq)])
    assert late.conflict is not None and late.conflict[0] == "staff"
    assert [m.sender for m in db.history(cid, 0, 100)] == ["guest", "system"]


# A database file as schema 2 made it, before the reply key (copied from that release:
# the tables the test touches, with the meta rows that say schema 2).
_SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE guests (guest_id TEXT PRIMARY KEY, name TEXT, created_ts REAL NOT NULL,
    last_seen_ts REAL NOT NULL DEFAULT 0, room TEXT);
CREATE TABLE staff (staff_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    created_ts REAL NOT NULL, generation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE revocations (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    staff_id TEXT, generation INTEGER NOT NULL DEFAULT 0, ts REAL NOT NULL);
CREATE TABLE conversations (conversation_id TEXT PRIMARY KEY,
    guest_id TEXT NOT NULL UNIQUE REFERENCES guests(guest_id),
    status TEXT NOT NULL DEFAULT 'ai', assigned_staff_id TEXT, assigned_name TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0, read_seq INTEGER NOT NULL DEFAULT 0,
    guest_read_seq INTEGER NOT NULL DEFAULT 0, updated_ts REAL NOT NULL,
    preview TEXT NOT NULL DEFAULT '');
CREATE TABLE messages (conversation_id TEXT NOT NULL, seq INTEGER NOT NULL,
    sender TEXT NOT NULL, author TEXT, author_key TEXT, text TEXT NOT NULL,
    ts TEXT NOT NULL, client_msg_id TEXT, PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_idempotency
    ON messages(conversation_id, author_key, client_msg_id) WHERE client_msg_id IS NOT NULL;
INSERT INTO meta VALUES ('schema', '2'), ('secret', 'abababababababababababababababab');
INSERT INTO guests VALUES ('g-old', 'Ana', 0, 0, NULL);
INSERT INTO conversations(conversation_id, guest_id, last_seq, updated_ts, preview)
    VALUES ('c-old', 'g-old', 2, 0, 'Thanks');
INSERT INTO messages VALUES ('c-old', 1, 'guest', 'Ana', 'g:g-old', 'Hi', '0', NULL),
    ('c-old', 2, 'ai', 'concierge', NULL, 'Hello!', '0', NULL);
"""


def test_a_schema_2_sqlite_file_gets_the_reply_key_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_2)
    for _ in range(2):  # the second open finds it done
        db: Any = open_backend(path)
        try:
            assert [m.text for m in db.history("c-old", 0, 2)] == ["Hi", "Hello!"]
            (asked,) = db.apply_batch([guest("c-old", "one more")])
            assert asked.message.seq in (3, 5)
            (first,) = db.apply_batch([reply("c-old", asked.message.seq)])
            (second,) = db.apply_batch([reply("c-old", asked.message.seq)])
            assert not first.duplicate and second.duplicate
        finally:
            db.close()
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        senders = [r[0] for r in conn.execute("SELECT sender FROM messages ORDER BY seq")]
    assert version == "2"
    assert senders == ["guest", "ai", "guest", "ai", "guest", "ai"]


def test_a_schema_2_postgres_database_gets_the_reply_key_in_place(pg_url: str) -> None:
    import psycopg

    from trio_chat.server._backends import init_db
    from trio_chat.server._store_postgres import MIGRATIONS, PostgresBackend

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_ts DOUBLE PRECISION NOT NULL)"
        )
        conn.execute(MIGRATIONS[0])
        conn.execute(MIGRATIONS[1])
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0), (2, 0)")
        conn.execute("INSERT INTO meta VALUES ('secret', %s)", ("ab" * 32,))
        conn.execute("INSERT INTO guests(guest_id, name, created_ts) VALUES ('g-old', 'Ana', 0)")
        conn.execute(
            "INSERT INTO conversations(conversation_id, guest_id, guest_name, updated_ts) "
            "VALUES ('c-old', 'g-old', 'Ana', 0)"
        )
    backend = PostgresBackend(pg_url)
    try:
        (asked,) = backend.apply_batch([guest("c-old")])
        (first,) = backend.apply_batch([reply("c-old", asked.message.seq)])
        (second,) = backend.apply_batch([reply("c-old", asked.message.seq)])
        assert not first.duplicate and second.duplicate
        assert [m.sender for m in backend.history("c-old", 0, 10)] == ["guest", "ai"]
    finally:
        backend.close()
    assert f"schema version {len(MIGRATIONS)}" in init_db(pg_url)  # again: nothing to do
