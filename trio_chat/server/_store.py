"""Durable storage in SQLite, with one writer and group commit.

Two layers:

* :class:`Database` is plain synchronous code around :mod:`sqlite3`. The admin
  commands (``trio-chat staff add`` ...) use it directly.
* :class:`Store` is the Trio side. Every write is an *operation* put on a queue; one
  writer thread takes everything queued, applies the whole batch in one transaction
  and commits once (so concurrent messages share an fsync), then hands the batch back
  to the event loop, where each operation's ``on_commit`` callback runs, in order, in
  one step. The server uses those callbacks to update its
  in-memory view and push frames, which is why pushes leave in ``seq`` order and why
  "subscribe and read ``last_seq``" is atomic: both happen in a single Trio step.

``seq`` is assigned inside the transaction from the conversation row, so it has no
gaps even across a crash: a batch either commits whole or not at all, and nothing is
acknowledged before its commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from itertools import chain
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from ..core.errors import StorageError
from ..core.protocol import Message, format_ts
from ..core.storage import (
    Appended,
    AppendMessage,
    ConversationRow,
    CreateGuest,
    Operation,
    Revocation,
    SetRead,
    StaffMember,
    StaffSignIn,
    TouchGuest,
)
from ..core.tokens import new_id

__all__ = [
    "AppendMessage",
    "Appended",
    "ConversationRow",
    "CreateGuest",
    "Database",
    "Operation",
    "SetRead",
    "StaffMember",
    "Store",
]

log = logging.getLogger("trio_chat.store")

T = TypeVar("T")

SCHEMA_VERSION: Final = 2  # 2: staff token generations, guests' last sign-in, revocations
MAX_BATCH: Final = 512
# Committed writes between two background checkpoints. Not the WAL's size: its file
# stays as large as it once grew while SQLite reuses it from the start.
CHECKPOINT_EVERY: Final = 1_000
BACKSTOP_CHECKPOINT_PAGES: Final = 16_384  # 64 MiB of 4 KiB pages
PREVIEW_CHARS: Final = 120

# (head, one row, tail) of the batch statements: see Database._execute_rows.
ROWS_PER_STATEMENT: Final = 64  # the transaction path's chunks: 16 x 64 parameters
_INSERT_MESSAGES: Final = (
    "INSERT INTO message_batch(conversation_id, seq, sender, author, author_key, text, ts, "
    "client_msg_id, updated_ts, preview, new_status, assigned_staff_id, assigned_name, "
    "expect_status, expect_staff_id, reply_to) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "",
)
_PARAMETERS_PER_ROW: Final = _INSERT_MESSAGES[1].count("?")

# ---- the commit path (issue 17): temporary objects of the writer connection, never
# stored in the file (no migration: a schema-2 file is used as it is). Inserting a row
# into the view stores the message and writes its conversation's summary (and status,
# for a transition) in the same SQLite step, so a batch of new messages is ONE
# statement, committed by itself: one GIL hand-off pair per batch where BEGIN, INSERT,
# UPDATE and COMMIT took four. The checks a message may carry run in the same step: a
# transition's or a reply's expected status (``expect``) and a reply's key
# (``reply_to``). Its statements run under the outer statement's conflict handling: a
# retry (the idempotency index), a key already taken or a status changed meanwhile
# aborts the whole statement, and the batch is applied again one operation at a time.
_WRITER_TEMP_SCHEMA: Final = """
CREATE TEMP VIEW message_batch(conversation_id, seq, sender, author, author_key,
    text, ts, client_msg_id, updated_ts, preview, new_status, assigned_staff_id, assigned_name,
    expect_status, expect_staff_id, reply_to)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL
    WHERE 0;
CREATE TEMP TRIGGER message_batch_insert INSTEAD OF INSERT ON message_batch
BEGIN
    SELECT RAISE(ABORT, 'status changed')
    WHERE NEW.expect_status IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM conversations WHERE conversation_id = NEW.conversation_id
        AND status = NEW.expect_status AND assigned_staff_id IS NEW.expect_staff_id);
    INSERT INTO concierge_replies(conversation_id, guest_seq, reply_seq)
    SELECT NEW.conversation_id, NEW.reply_to, NEW.seq WHERE NEW.reply_to IS NOT NULL;
    INSERT INTO messages(conversation_id, seq, sender, author, author_key, text, ts,
                         client_msg_id)
    VALUES (NEW.conversation_id, NEW.seq, NEW.sender, NEW.author, NEW.author_key, NEW.text,
            NEW.ts, NEW.client_msg_id);
    UPDATE conversations SET last_seq = NEW.seq, updated_ts = NEW.updated_ts,
        preview = NEW.preview,
        status = coalesce(NEW.new_status, status),
        assigned_staff_id = iif(NEW.new_status IS NULL, assigned_staff_id, NEW.assigned_staff_id),
        assigned_name = iif(NEW.new_status IS NULL, assigned_name, NEW.assigned_name)
    WHERE conversation_id = NEW.conversation_id;
END;
"""
# The writer thread's GIL hand-offs: after each SQLite call it must take the GIL back
# from the event loop, which, when busy, keeps it up to sys.getswitchinterval() (5 ms by
# default) per hand-off; every ack waits for the commit. While a threaded Store runs,
# the interval is at most this (see Store.run).
WRITER_SWITCH_INTERVAL: Final = 0.001
_SQLITE_BUSY: Final = 5  # a primary result code: another connection holds the lock
# sqlite3 binds int, float and str directly but sends every other parameter, None among
# them, through its adaptation protocol, which looks up ``__adapt__`` on a type that has
# none and formats the AttributeError it then discards: about 3,300 instructions per
# None (callgrind), and a message row carries six (the answer's seven), 6 % of all the
# server's instructions per message with the concierge on. A registered adapter is
# found first. ``{}.get`` returns None for any key without a Python frame, so None still
# binds as NULL, for every sqlite3 user in the process (the registry is global).
_NOTHING_REGISTERED: Final[dict[None, None]] = {}
sqlite3.register_adapter(type(None), _NOTHING_REGISTERED.get)
# ---- end of the commit path's block

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS guests (
    guest_id TEXT PRIMARY KEY,
    name TEXT,
    created_ts REAL NOT NULL,
    last_seen_ts REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS staff (
    staff_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ts REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    staff_id TEXT,
    generation INTEGER NOT NULL DEFAULT 0,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    guest_id TEXT NOT NULL UNIQUE REFERENCES guests(guest_id),
    status TEXT NOT NULL DEFAULT 'ai',
    assigned_staff_id TEXT,
    assigned_name TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    read_seq INTEGER NOT NULL DEFAULT 0,
    guest_read_seq INTEGER NOT NULL DEFAULT 0,
    updated_ts REAL NOT NULL,
    preview TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS conversations_by_status ON conversations(status, updated_ts);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    author TEXT,
    author_key TEXT,
    text TEXT NOT NULL,
    ts TEXT NOT NULL,
    client_msg_id TEXT,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages(conversation_id, author_key, client_msg_id) WHERE client_msg_id IS NOT NULL;
"""


_CONVERSATION_COLUMNS: Final = (
    "c.conversation_id, c.guest_id, g.name, c.status, c.assigned_staff_id, c.assigned_name, "
    "c.last_seq, c.read_seq, c.updated_ts, c.preview, g.last_seen_ts, g.room, c.guest_read_seq"
)
_CONVERSATION_FIELDS: Final = 13

# Schema 1 -> 2, run once under the write lock (existing rows keep working: generation 0
# is the three-part token every existing staff member holds).
_MIGRATE_1_TO_2: Final = (
    "ALTER TABLE staff ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE guests ADD COLUMN last_seen_ts REAL NOT NULL DEFAULT 0",
)

# -- reply once (the concierge's reply per guest message) --
# The key of each concierge reply: the guest message it answers. A second reply to the
# same guest message finds its key taken and stores nothing (``AppendMessage.reply_to``).
# Created on every open (IF NOT EXISTS): databases of schema 2 made before it get it.
_REPLY_KEYS: Final = """
CREATE TABLE IF NOT EXISTS concierge_replies (
    conversation_id TEXT NOT NULL,
    guest_seq INTEGER NOT NULL,
    reply_seq INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, guest_seq)
) WITHOUT ROWID;
"""

PRIVATE_FILE: Final = 0o600  # the database holds the token secret: its owner only
PRIVATE_DIR: Final = 0o700


def make_private(path: Path) -> None:
    """Create ``path`` (and its directory) readable by its owner only, or tighten an
    existing file and SQLite's side files, which SQLite creates with the main file's
    mode. ``os.open`` with a mode, not a umask: the umask is the whole process's, and
    the server opens its database from a worker thread."""
    if str(path) == ":memory:":
        return
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=PRIVATE_DIR, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm", "-journal"):
        side = Path(f"{path}{suffix}")
        try:
            if side.stat().st_mode & 0o077:
                side.chmod(PRIVATE_FILE)
        except FileNotFoundError:
            continue
        except PermissionError:
            # Someone else's file (an admin command run as another user): say so.
            log.warning("cannot restrict %s to its owner; anyone who can read it can sign "
                        "in as staff", side)  # fmt: skip


# ------------------------------------------------------------------------ database


class Database:
    """Synchronous access to one SQLite file (WAL mode).

    ``synchronous`` is SQLite's setting: ``FULL`` (the default) survives power loss as
    well as a killed process; ``NORMAL`` survives a killed process only.
    Raises :class:`StorageError` when the file cannot be opened or is not ours.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        try:
            make_private(self.path)
            self.writer = self._connect(synchronous)
            # Checkpoints run beside the writer (Store's checkpointer), not inside its
            # commits, where one took up to 200 ms and held every ack behind it. The
            # writer checkpoints itself only if the WAL ever grows this far anyway.
            self.writer.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
            self.reader = self._connect(synchronous)
            self._checkpointer: sqlite3.Connection | None = None
            self._synchronous = synchronous
            self._migrate()
            self.writer.executescript(_WRITER_TEMP_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc
        # Only the writer thread touches these; a failed batch clears the first.
        self._last_seq: dict[str, int] = {}
        self._touched: dict[str, tuple[int, float, str, tuple[str, str | None, str | None] | None]]
        self._touched = {}  # conversation rows to write at the end of the batch
        self._rows: list[tuple[Any, ...]] = []  # messages to insert at the end of the batch
        self._clock: tuple[float, str] | None = None  # the batch's time, and formatted
        self._optimistic = True
        # _apply_alone: the statement checks expect and reply_to (else append does)
        self._checks_in_statement = False
        # sqlite3 connections are not thread-safe; each is used by one thread at a time.
        self._read_lock = threading.Lock()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _migrate(self) -> None:
        self.writer.executescript(_SCHEMA)
        row = self.writer.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self.writer.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?), ('secret', ?)",
                (str(SCHEMA_VERSION), secrets.token_hex(32)),
            )
        elif int(row[0]) == 1:
            with self._transaction():
                # Looked at again under the lock: another process may have migrated.
                (version,) = self.writer.execute(
                    "SELECT value FROM meta WHERE key = 'schema'"
                ).fetchone()
                if int(version) == 1:
                    for statement in _MIGRATE_1_TO_2:
                        self.writer.execute(statement)
                    self.writer.execute(
                        "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),)
                    )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StorageError(f"{self.path} has schema {row[0]}, expected {SCHEMA_VERSION}")
        self._add_guest_room()
        self.writer.executescript(_REPLY_KEYS)

    def _add_guest_room(self) -> None:
        """Migration step (the staff console): guests.room, the room number a guest
        gives in hello. Added to databases made before it; existing guests have none.
        Decided by the column's presence, so it runs once whatever the schema number."""
        columns = {r[1] for r in self.writer.execute("PRAGMA table_info(guests)")}
        if "room" not in columns:
            self.writer.execute("ALTER TABLE guests ADD COLUMN room TEXT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction on the writer connection (administration only; the
        server's writes go through :meth:`apply_batch`)."""
        self.writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.writer.execute("ROLLBACK")
            raise
        self.writer.execute("COMMIT")

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the database file without blocking the writer
        or readers (a ``PASSIVE`` checkpoint), on a connection of its own. Raises
        :class:`StorageError` if SQLite fails."""
        try:
            if self._checkpointer is None:
                self._checkpointer = self._connect(self._synchronous)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"checkpoint failed: {exc}") from exc

    # -- writes (writer thread only) -----------------------------------------------

    def apply_batch(self, operations: list[Operation[Any]]) -> list[Any]:
        """Apply every operation in one transaction and commit once.

        The common batch costs one statement, not a few per message: the writer thread
        gives up the GIL for every SQLite step and under load waits for the busy event
        loop to take it back. So a batch of new messages only (the common one, the
        concierge's replies and the transitions' system messages included) is applied
        assuming every check passes: one multi-row ``INSERT`` into the
        ``message_batch`` view stores the messages and their conversations' rows, checks
        each expected status and takes each reply's key, and, run outside any
        transaction, commits by itself: any batch the writer takes (``MAX_BATCH``)
        fits one statement's parameters on SQLite builds of the last years. Any other
        batch, or one too large for SQLite's limit, runs the same inserts between
        ``BEGIN IMMEDIATE`` and ``COMMIT``, with the checks made one operation at a
        time. If a check fails or an insert
        meets a retry of a stored message (rare: the statement aborts, nothing of it
        stays), the batch is applied again one message at a time in a transaction.

        Returns one result per operation. Raises :class:`StorageError` if the batch
        could not commit; then nothing of it was stored.
        """
        self._clock = None  # read at the batch's first new message
        try:
            if 0 < len(operations) <= self._one_statement_operations() and all(
                isinstance(op, AppendMessage) for op in operations
            ):
                results = self._apply_alone(operations)
                if results is not None:
                    return results
                self._last_seq.clear()
            self.writer.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply(operations, optimistic=True)
                if results is None:
                    self.writer.execute("ROLLBACK")
                    self._last_seq.clear()
                    self.writer.execute("BEGIN IMMEDIATE")
                    results = self._apply(operations, optimistic=False)
                    assert results is not None
                self.writer.execute("COMMIT")
            except BaseException:
                if self.writer.in_transaction:
                    self.writer.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._last_seq.clear()
            raise StorageError(f"database write failed: {exc}") from exc
        except BaseException:
            self._last_seq.clear()
            raise
        return results

    def _one_statement_operations(self) -> int:
        """How many new messages one statement may store: each makes up to two rows
        (itself and its instant answer) within SQLite's limit on parameters.

        Batches of more than 64 used to take the transaction path, with a statement
        per 64 rows and a check statement per answer: with 200 guests, most batches did
        (200 guests, concierge on: 1.35 x the messages a second once they did not)."""
        return self._parameter_limit() // (2 * _PARAMETERS_PER_ROW)

    def _parameter_limit(self) -> int:
        """SQLite's limit on one statement's parameters (999 before 3.32)."""
        return self.writer.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)

    def _apply_alone(self, operations: list[Operation[Any]]) -> list[Any] | None:
        """New messages only, in one statement that is its own transaction (SQLite
        commits it at its end, ``synchronous`` as configured) and makes the messages'
        checks itself. ``None`` if it stored nothing and the batch must take the
        transaction path: it met a retry, a reply's key already taken or a status other
        than expected, or another connection held the lock when it needed it."""
        self._optimistic = True
        self._checks_in_statement = True
        self._rows = []
        self._touched = {}
        try:
            results = [op.apply(self) for op in operations]
            head, row_sql, tail = _INSERT_MESSAGES
            sql = head + ",".join([row_sql] * len(self._rows)) + tail
            self.writer.execute(sql, list(chain.from_iterable(self._rows)))
        except sqlite3.IntegrityError:
            return None
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != _SQLITE_BUSY:
                raise
            return None
        finally:
            self._checks_in_statement = False
            self._rows = []
            self._touched = {}
        return results

    def _apply(self, operations: list[Operation[Any]], *, optimistic: bool) -> list[Any] | None:
        """Apply the batch; ``None`` when an optimistic pass met a retry."""
        self._optimistic = optimistic
        self._rows = []
        self._touched = {}
        try:
            results = [op.apply(self) for op in operations]
            try:
                self._execute_rows(_INSERT_MESSAGES, self._rows)
            except sqlite3.IntegrityError:
                # A retry (the statement was undone, the transaction stays open).
                if optimistic:
                    return None
                raise
            return results
        finally:
            self._rows = []
            self._touched = {}

    def _execute_rows(self, statement: tuple[str, str, str], rows: list[tuple[Any, ...]]) -> int:
        """Run a statement over many rows with one SQLite step per chunk of rows (a
        multi-row ``VALUES``), not one per row; returns the rows changed."""
        head, row_sql, tail = statement
        # Fewer rows a chunk where SQLite takes fewer parameters.
        per_chunk = max(1, min(ROWS_PER_STATEMENT, self._parameter_limit() // row_sql.count("?")))
        changed = 0
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start : start + per_chunk]
            sql = head + ",".join([row_sql] * len(chunk)) + tail
            changed += self.writer.execute(sql, list(chain.from_iterable(chunk))).rowcount
        return changed

    def _next_seq(self, conversation_id: str) -> int:
        last = self._last_seq.get(conversation_id)
        if last is None:
            row = self.writer.execute(
                "SELECT last_seq FROM conversations WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise StorageError(f"no conversation {conversation_id}")
            # Kept even if this message turns out a retry (it takes no seq): read once.
            last = self._last_seq[conversation_id] = int(row[0])
        return last + 1

    def append(self, op: AppendMessage) -> Appended:
        in_statement = self._checks_in_statement
        if op.expect is not None and not in_statement:
            conflict = self._conflict(op)
            if conflict is not None:
                return conflict
        seq = self._next_seq(op.conversation_id)
        if op.reply_to is not None and not in_statement and not self._take_reply_key(op, seq):
            return self._stored_reply(op)
        # The messages of one commit share its time: the clock is read, and the time
        # formatted, once a batch (an answered guest message is two messages).
        clock = self._clock
        if clock is None:
            now = time.time()
            clock = self._clock = (now, format_ts(now))
        now, ts = clock
        message = Message(
            seq, op.conversation_id, op.sender, op.author, op.text, ts, op.client_msg_id
        )
        new_status = op.status if op.status is not None else (None, None, None)
        preview = op.text[:PREVIEW_CHARS]
        row = (
            op.conversation_id,
            seq,
            op.sender,
            op.author,
            op.author_key,
            op.text,
            ts,
            op.client_msg_id,
            now,
            preview,
            *new_status,
            *(op.expect if in_statement and op.expect is not None else (None, None)),
            op.reply_to if in_statement else None,
        )
        if self._optimistic:
            self._rows.append(row)
        else:
            try:
                self._execute_rows(_INSERT_MESSAGES, [row])
            except sqlite3.IntegrityError:
                # The unique index on (conversation, author, client_msg_id): a retry,
                # possibly of a message earlier in this same batch.
                found = self.writer.execute(
                    "SELECT seq, sender, author, text, ts FROM messages WHERE "
                    "conversation_id = ? AND author_key = ? AND client_msg_id = ?",
                    (op.conversation_id, op.author_key, op.client_msg_id),
                ).fetchone()
                if found is None:
                    raise
                original = Message(
                    found[0],
                    op.conversation_id,
                    found[1],
                    found[2],
                    found[3],
                    found[4],
                    op.client_msg_id,
                )
                return Appended(original, duplicate=True)
        self._last_seq[op.conversation_id] = seq
        touched = self._touched.get(op.conversation_id)
        status = op.status if op.status is not None else (touched[3] if touched else None)
        # Written by the row's own insert (the view's trigger); kept for the checks of
        # later operations in this batch (_conflict, expire_silent_guests).
        self._touched[op.conversation_id] = (seq, now, preview, status)
        return Appended(message, duplicate=False, at=now)

    # -- reply once -------------------------------------------------------------------

    def _take_reply_key(self, op: AppendMessage, seq: int) -> bool:
        """Insert-or-nothing of the reply's key, in the batch's transaction: False when
        the guest message has its reply already."""
        cursor = self.writer.execute(
            "INSERT OR IGNORE INTO concierge_replies(conversation_id, guest_seq, reply_seq) "
            "VALUES (?, ?, ?)",
            (op.conversation_id, op.reply_to, seq),
        )
        return cursor.rowcount == 1

    def _stored_reply(self, op: AppendMessage) -> Appended:
        """The reply that holds the key (``duplicate``: nothing new was written)."""
        found = self.writer.execute(
            "SELECT m.seq, m.sender, m.author, m.text, m.ts FROM concierge_replies r "
            "JOIN messages m ON m.conversation_id = r.conversation_id AND m.seq = r.reply_seq "
            "WHERE r.conversation_id = ? AND r.guest_seq = ?",
            (op.conversation_id, op.reply_to),
        ).fetchone()
        if found is None:  # in this very batch, not inserted yet: never asked twice
            found = (0, op.sender, op.author, op.text, "")
        seq, sender, author, text, ts = found
        return Appended(
            Message(seq, op.conversation_id, sender, author, text, ts, None), duplicate=True
        )

    def _conflict(self, op: AppendMessage) -> Appended | None:
        """A status change decided against a state that is no longer the stored one
        (the state as this batch left it so far, else the row). Only transitions carry
        ``expect``, so the common message costs nothing here."""
        touched = self._touched.get(op.conversation_id)
        if touched is not None and touched[3] is not None:
            stored: tuple[Any, ...] = touched[3]
        else:
            row = self.writer.execute(
                "SELECT status, assigned_staff_id, assigned_name FROM conversations "
                "WHERE conversation_id = ?",
                (op.conversation_id,),
            ).fetchone()
            if row is None:
                raise StorageError(f"no conversation {op.conversation_id}")
            stored = tuple(row)
        if op.expect == (stored[0], stored[1]):
            return None
        return Appended(
            Message(0, op.conversation_id, op.sender, op.author, op.text, "", None),
            duplicate=False,
            conflict=(stored[0], stored[1], stored[2]),
        )

    def set_read(self, op: SetRead) -> None:
        column = "read_seq" if op.reader == "staff" else "guest_read_seq"
        self.writer.execute(
            f"UPDATE conversations SET {column} = MAX({column}, ?) WHERE conversation_id = ?",
            (op.seq, op.conversation_id),
        )

    def create_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        guest_id = new_id("g")
        conversation_id = new_id("c")
        now = time.time()
        self.writer.execute(
            "INSERT INTO guests(guest_id, name, room, created_ts, last_seen_ts) "
            "VALUES (?, ?, ?, ?, ?)",
            (guest_id, name, room, now, now),
        )
        self.writer.execute(
            "INSERT INTO conversations(conversation_id, guest_id, updated_ts) VALUES (?, ?, ?)",
            (conversation_id, guest_id, now),
        )
        return ConversationRow(
            conversation_id, guest_id, name, "ai", None, None, 0, 0, now, "", now, room
        )

    def touch_guest(self, op: TouchGuest) -> None:
        self.writer.execute(
            "UPDATE guests SET last_seen_ts = MAX(last_seen_ts, ?) WHERE guest_id = ?",
            (op.at, op.guest_id),
        )

    def expire_silent_guests(
        self,
        before: float,
        keep: frozenset[str],
        keep_conversations: frozenset[str] = frozenset(),
    ) -> list[str]:
        rows = self.writer.execute(
            "SELECT g.guest_id, c.conversation_id FROM guests g JOIN conversations c "
            "USING (guest_id) WHERE g.created_ts < ? AND c.status IN ('ai', 'resolved') "
            "AND NOT EXISTS (SELECT 1 FROM messages m WHERE "
            "m.conversation_id = c.conversation_id AND m.sender = 'guest')",
            (before,),
        ).fetchall()
        # A message appended earlier in this batch is only inserted at its end: a
        # conversation touched in this batch is not silent.
        doomed = [
            (guest_id, conversation_id)
            for guest_id, conversation_id in rows
            if guest_id not in keep
            and conversation_id not in keep_conversations
            and conversation_id not in self._touched
        ]
        by_conversation = [(conversation_id,) for _, conversation_id in doomed]
        self.writer.executemany("DELETE FROM messages WHERE conversation_id = ?", by_conversation)
        self.writer.executemany(
            "DELETE FROM conversations WHERE conversation_id = ?", by_conversation
        )
        self.writer.executemany(
            "DELETE FROM guests WHERE guest_id = ?", [(guest_id,) for guest_id, _ in doomed]
        )
        for _, conversation_id in doomed:
            self._last_seq.pop(conversation_id, None)
        return [guest_id for guest_id, _ in doomed]

    # -- reads (any thread, serialised) ---------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._read_lock:
            try:
                return self.reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"database read failed: {exc}") from exc

    def secret(self) -> bytes:
        rows = self._read("SELECT value FROM meta WHERE key = 'secret'")
        return bytes.fromhex(rows[0][0])

    def _conversation_where(self, column: str, value: str) -> ConversationRow | None:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c JOIN guests g USING (guest_id) "
            f"WHERE c.{column} = ?",
            (value,),
        )
        return ConversationRow(*rows[0]) if rows else None

    def conversation_of_guest(self, guest_id: str) -> ConversationRow | None:
        return self._conversation_where("guest_id", guest_id)

    def conversation(self, conversation_id: str) -> ConversationRow | None:
        return self._conversation_where("conversation_id", conversation_id)

    def held_by(self, staff_id: str) -> list[str]:
        rows = self._read(
            "SELECT conversation_id FROM conversations WHERE status = 'staff' "
            "AND assigned_staff_id = ?",
            (staff_id,),
        )
        return [r[0] for r in rows]

    def queue(self, now: float, limit: int = 500) -> list[ConversationRow]:
        """Every waiting and staff conversation, ai ones active in the last 24 h, and
        those resolved in the last 24 h (the hub passes them on only to a console that
        asks: the contract's queue has none)."""
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c JOIN guests g USING (guest_id) "
            "WHERE c.status IN ('waiting', 'staff') "
            "OR (c.status = 'ai' AND c.last_seq > 0 AND c.updated_ts > ?) "
            "OR (c.status = 'resolved' AND c.updated_ts > ?) "
            "ORDER BY c.updated_ts DESC LIMIT ?",
            (now - 86400, now - 86400, limit),
        )
        return [ConversationRow(*r) for r in rows]

    def history(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        rows = self._read(
            "SELECT seq, sender, author, text, ts, client_msg_id FROM messages "
            "WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (conversation_id, after_seq, limit),
        )
        return [Message(r[0], conversation_id, r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def recent(self, conversation_id: str, count: int) -> list[Message]:
        rows = self._read(
            "SELECT seq, sender, author, text, ts, client_msg_id FROM messages "
            "WHERE conversation_id = ? ORDER BY seq DESC LIMIT ?",
            (conversation_id, count),
        )
        return [
            Message(r[0], conversation_id, r[1], r[2], r[3], r[4], r[5]) for r in reversed(rows)
        ]

    def message_by_client_id(
        self, conversation_id: str, author_key: str, client_msg_id: str
    ) -> Message | None:
        """The message an author already stored under ``client_msg_id``, if any."""
        rows = self._read(
            "SELECT seq, sender, author, text, ts FROM messages WHERE conversation_id = ? "
            "AND author_key = ? AND client_msg_id = ?",
            (conversation_id, author_key, client_msg_id),
        )
        if not rows:
            return None
        seq, sender, author, text, ts = rows[0]
        return Message(seq, conversation_id, sender, author, text, ts, client_msg_id)

    def unanswered(self, since: float) -> list[tuple[ConversationRow, Message]]:
        """Conversations in ``ai`` whose newest message is a guest's, updated after
        ``since``: the concierge owes them a reply (the server stopped before it came)."""
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS}, m.sender, m.author, m.text, m.ts, m.client_msg_id "
            "FROM conversations c JOIN guests g USING (guest_id) JOIN messages m "
            "ON m.conversation_id = c.conversation_id AND m.seq = c.last_seq "
            "WHERE c.status = 'ai' AND m.sender = 'guest' AND c.updated_ts > ?",
            (since,),
        )
        found = []
        for r in rows:
            row = ConversationRow(*r[:_CONVERSATION_FIELDS])
            sender, author, text, ts, cmid = r[_CONVERSATION_FIELDS:]
            found.append(
                (row, Message(row.last_seq, row.conversation_id, sender, author, text, ts, cmid))
            )
        return found

    def staff_sign_in(self, staff_id: str) -> StaffSignIn:
        """Who the staff member is (``None`` once removed), the queue and what they hold."""
        member = self.staff_member(staff_id)
        if member is None:
            return StaffSignIn(None, [], [])
        held = self.held_conversations(staff_id)
        return StaffSignIn(member, self.queue(time.time()), held)

    def staff_member(self, staff_id: str) -> StaffMember | None:
        rows = self._read(
            "SELECT staff_id, name, generation FROM staff WHERE staff_id = ?", (staff_id,)
        )
        return StaffMember(*rows[0]) if rows else None

    def held_conversations(self, staff_id: str) -> list[ConversationRow]:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c JOIN guests g USING (guest_id) "
            "WHERE c.status = 'staff' AND c.assigned_staff_id = ?",
            (staff_id,),
        )
        return [ConversationRow(*r) for r in rows]

    def revocations_since(self, after_seq: int) -> list[Revocation]:
        rows = self._read(
            "SELECT seq, kind, staff_id, generation FROM revocations WHERE seq > ? ORDER BY seq",
            (after_seq,),
        )
        return [Revocation(*r) for r in rows]

    # -- administration (used by the CLI, outside the server) -------------------------

    def add_staff(self, name: str) -> StaffMember:
        """Add a staff member; raises ``ValueError`` if the name is taken or empty."""
        name = name.strip()
        if not name:
            raise ValueError("a staff member needs a name")
        member = StaffMember(new_id("s"), name)
        try:
            self.writer.execute(
                "INSERT INTO staff(staff_id, name, created_ts) VALUES (?, ?, ?)",
                (member.staff_id, member.name, time.time()),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a staff member named {name!r} already exists") from None
        return member

    def list_staff(self) -> list[StaffMember]:
        return [
            StaffMember(*r)
            for r in self._read("SELECT staff_id, name, generation FROM staff ORDER BY name")
        ]

    def _find_staff(self, name_or_id: str) -> StaffMember | None:
        row = self.writer.execute(
            "SELECT staff_id, name, generation FROM staff WHERE name = ? OR staff_id = ? "
            "ORDER BY name = ? DESC LIMIT 1",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        return StaffMember(*row) if row else None

    def _record(self, kind: str, staff_id: str | None = None, generation: int = 0) -> None:
        self.writer.execute(
            "INSERT INTO revocations(kind, staff_id, generation, ts) VALUES (?, ?, ?, ?)",
            (kind, staff_id, generation, time.time()),
        )

    def remove_staff(self, name_or_id: str) -> bool:
        """Remove by name or id; their tokens stop working at once, and a running
        server (this process or another) closes their consoles and hands their
        conversations back (it polls :meth:`revocations_since`). False if unknown."""
        with self._transaction():
            member = self._find_staff(name_or_id)
            if member is None:
                return False
            self.writer.execute("DELETE FROM staff WHERE staff_id = ?", (member.staff_id,))
            self._record("removed", member.staff_id)
        return True

    def revoke_staff(self, name_or_id: str) -> StaffMember | None:
        """Invalidate every token the staff member holds (their generation goes up;
        a running server closes consoles signed in with an older one). Returns the
        member with the new generation, or ``None`` if unknown."""
        with self._transaction():
            member = self._find_staff(name_or_id)
            if member is None:
                return None
            generation = member.generation + 1
            self.writer.execute(
                "UPDATE staff SET generation = ? WHERE staff_id = ?",
                (generation, member.staff_id),
            )
            self._record("revoked", member.staff_id, generation)
        return StaffMember(member.staff_id, member.name, generation)

    def rotate_secret(self) -> None:
        """Replace the token secret kept here: no token issued before verifies, and a
        running server notices (a ``secret`` revocation) and closes their sessions."""
        with self._transaction():
            self.writer.execute(
                "UPDATE meta SET value = ? WHERE key = 'secret'", (secrets.token_hex(32),)
            )
            self._record("secret")

    def add_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        return self.apply_batch([CreateGuest(name=name, room=room)])[0]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- Trio


_running_writers = 0  # threaded stores running in this process (event loop's thread)
_switch_interval_before = 0.0


@contextlib.contextmanager
def _short_gil_hand_offs(interval: float | None) -> Iterator[None]:
    """While a threaded store runs, the process's GIL switch interval is at most
    ``interval`` (see WRITER_SWITCH_INTERVAL), and back as it was when the last one
    stops. Only the writer (and the checkpointer) waits on it: they are blocked in
    SQLite most of the time, so a busy loop is asked for the GIL only when one of
    them has something to do, and gets it back after a few microseconds."""
    global _running_writers, _switch_interval_before
    if interval is None:
        yield
        return
    if _running_writers == 0:
        _switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _switch_interval_before))
    _running_writers += 1
    try:
        yield
    finally:
        _running_writers -= 1
        if _running_writers == 0:
            sys.setswitchinterval(_switch_interval_before)


class _Pending:
    __slots__ = ("counted", "done", "error", "operation", "result")

    def __init__(self, operation: Operation[Any], *, waited: bool = True) -> None:
        self.operation = operation
        self.counted = True  # holds a place in the queue's bound
        self.done = trio.Event() if waited else None
        self.result: Any = None
        self.error: StorageError | None = None

    def fail(self, error: StorageError) -> None:
        self.error = error
        on_error = self.operation.on_error
        self._let_go()
        if on_error is not None:
            on_error(error)
        if self.done is not None:
            self.done.set()

    def succeed(self, result: Any) -> None:
        self.result = result
        on_commit = self.operation.on_commit
        self._let_go()
        if on_commit is not None:
            on_commit(result)
        if self.done is not None:
            self.done.set()

    def _let_go(self) -> None:
        """Exactly one of the operation's callbacks runs, once: the operation lets go of
        both first. They refer back to it (the shell's closures hold the hub's
        ``Write``, which holds the operation), a reference cycle per write that only
        the cycle collector would free: under load its collections of those cycles
        stalled every ack for up to 300 ms (the steady benchmark's p99)."""
        self.operation.on_commit = self.operation.on_error = None


class Store:
    """The Trio face of a storage backend: group-committed writes, and reads.

    With ``threaded`` (SQLite, whose calls block), batches are applied in a writer
    thread and reads in a worker thread; without (the memory backend, whose calls
    return at once), both run on the event loop, which also keeps Trio's ``MockClock``
    from jumping while a write is under way.

    Run :meth:`run` in a nursery (``await nursery.start(store.run)``) before writing.
    """

    def __init__(
        self,
        db: Any,
        *,
        threaded: bool = True,
        max_queued: int = 10_000,
        checkpoint_every: int = CHECKPOINT_EVERY,
        callbacks_context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        switch_interval: float | None = WRITER_SWITCH_INTERVAL,
    ) -> None:
        self.db = db
        self._threaded = threaded
        self._switch_interval = switch_interval if threaded else None
        self._in_loop_kick: trio.Event | None = None
        # Entered around each batch's callbacks (the server collects its writes there).
        self._callbacks_context = callbacks_context
        # The writer thread takes from this queue directly, batch after batch, with no
        # trip through the event loop between batches: under load every such trip
        # waited for a busy loop, and the next commit with it.
        self._queued: deque[_Pending] = deque()
        # Wakes the writer thread when it sleeps on an empty queue. Only the loop's
        # thread appends and sets the flags below, only the writer pops; deque
        # operations and attribute writes are atomic, so no lock is needed (a lock and
        # a Condition.notify per message cost the loop more than the append itself).
        self._kick: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._writer_waiting = False
        self._stopping = False  # close(): commit what is queued, then stop
        self._aborting = False  # run() cancelled: fail what is queued, then stop
        self._room = trio.Semaphore(max_queued)
        self._token: trio.lowlevel.TrioToken | None = None
        self._read_thread = trio.CapacityLimiter(1)
        self._checkpoint_wanted = trio.Event()
        self._checkpoint_every = checkpoint_every
        self._since_checkpoint = 0  # writer thread only
        self.batches = 0
        self.operations = 0
        self.checkpoints = 0
        # Set by the checkpoint thread after a pass, read by the writer thread (a bool:
        # a late look only delays the finish to the next batch).
        self._finish_checkpoint = False
        self.pending = 0  # writes queued or being committed
        self._settled: trio.Event | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer. Returns once :meth:`close` was called and the queue is empty.

        A dedicated worker thread commits batch after batch; each committed batch's
        ``on_commit`` callbacks run back on the event loop, in commit order, in one
        step (so pushes leave in ``seq`` order), while the thread already works on the
        next batch. A callback that raises is logged; it cannot stop the store.

        If it is cancelled instead, whatever is still queued fails with
        :class:`StorageError` (nothing of it was stored, so nothing was acknowledged);
        a batch already committing finishes, and its callbacks run.
        """
        self._token = trio.lowlevel.current_trio_token()
        finished = trio.Event()

        async def writer() -> None:
            try:
                if self._threaded:
                    await trio.to_thread.run_sync(self._write_batches)
                else:
                    await self._write_in_loop()
            finally:
                finished.set()

        task_status.started()
        try:
            with _short_gil_hand_offs(self._switch_interval):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer)
                    if self._threaded:
                        nursery.start_soon(self._checkpoint_when_wanted)
                    try:
                        await finished.wait()
                        nursery.cancel_scope.cancel()  # the checkpointer
                    except BaseException:
                        self._aborting = True
                        self._wake_writer()
                        raise
        finally:
            # Cancelled before the thread even started: fail what it left behind.
            self._aborting = self._aborting or not self._stopping
            left = list(self._queued)
            self._queued.clear()
            self._complete(left, StorageError("the store stopped before this write"))

    def _wake_writer(self) -> None:
        if not self._threaded:
            if self._in_loop_kick is not None:
                self._in_loop_kick.set()
            return
        if self._writer_waiting:
            self._writer_waiting = False
            self._kick.put(None)

    def _write_batches(self) -> None:
        """The writer thread's loop."""
        assert self._token is not None
        queued = self._queued
        while True:
            if self._finish_checkpoint:
                self._finish_checkpoint = False
                self._complete_checkpoint()
            # The flags first: the loop sets them only after its last append.
            stopping, aborting = self._stopping, self._aborting
            batch = [queued.popleft() for _ in range(min(MAX_BATCH, len(queued)))]
            if not batch:
                if stopping or aborting:
                    return
                self._writer_waiting = True
                # Whatever came between the look at the queue and the flag has not
                # seen the flag: look again before sleeping. (A wake-up with nothing
                # to do is harmless; a lost one would not be.)
                if not (queued or self._stopping or self._aborting):
                    self._kick.get()
                self._writer_waiting = False
                continue
            outcome = self._apply(batch, aborting)
            if not isinstance(outcome, StorageError):
                self._since_checkpoint += len(batch)
                if self._since_checkpoint >= self._checkpoint_every:
                    self._since_checkpoint = 0
                    self._token.run_sync_soon(self._checkpoint_wanted.set)
            # FIFO: callbacks run in commit order, and all before run() returns.
            self._token.run_sync_soon(self._complete, batch, outcome)

    def _complete_checkpoint(self) -> None:
        """Finish, between two batches, what the checkpoint thread began.

        That thread copies the WAL into the database while batches keep appending to it,
        so under a steady load it never copies the last frame, the WAL never starts
        over, and it grows to the backstop, where every commit checkpoints (the steady
        benchmark: a 64 MiB WAL within 10 s, acks stalled 200-300 ms at p99). Here
        nothing appends: the frames since the thread's pass are few, the checkpoint
        completes, and the next commit starts the WAL over."""
        try:
            self.db.checkpoint()
        except StorageError as exc:
            log.warning("%s", exc)

    def _apply(self, batch: list[_Pending], aborting: bool) -> list[Any] | StorageError:
        """One batch, applied by the backend as one transaction (either writer's)."""
        if aborting:
            return StorageError("the store stopped before this write")
        try:
            results: list[Any] = self.db.apply_batch([p.operation for p in batch])
        except StorageError as exc:
            return exc
        return results

    async def _write_in_loop(self) -> None:
        """The writer of a backend that does not block: batch after batch on the loop,
        each batch's callbacks right after it."""
        queued = self._queued
        while True:
            stopping, aborting = self._stopping, self._aborting
            batch = [queued.popleft() for _ in range(min(MAX_BATCH, len(queued)))]
            if not batch:
                if stopping or aborting:
                    return
                self._in_loop_kick = trio.Event()
                await self._in_loop_kick.wait()
                continue
            self._complete(batch, self._apply(batch, aborting))
            # Let the loop run between batches, as it does while a thread commits.
            await trio.lowlevel.checkpoint()

    async def _checkpoint_when_wanted(self) -> None:
        """Checkpoint the WAL in a thread of its own whenever it has grown, so that no
        commit has to (a failed checkpoint is logged; the next one tries again)."""
        limiter = trio.CapacityLimiter(1)
        while True:
            await self._checkpoint_wanted.wait()
            self._checkpoint_wanted = trio.Event()
            try:
                await trio.to_thread.run_sync(self.db.checkpoint, limiter=limiter)
            except StorageError as exc:
                log.warning("%s", exc)
            else:
                self.checkpoints += 1
                self._finish_checkpoint = True

    def _complete(self, batch: list[_Pending], outcome: list[Any] | StorageError) -> None:
        """Back on the event loop: confirm a committed batch, or fail it."""
        if not isinstance(outcome, StorageError):
            self.batches += 1
            self.operations += len(batch)
        self.pending -= len(batch)
        if self.pending == 0 and self._settled is not None:
            self._settled.set()
        with self._callbacks_context():
            for index, pending in enumerate(batch):
                if pending.counted:
                    self._room.release()
                try:
                    if isinstance(outcome, StorageError):
                        pending.fail(outcome)
                    else:
                        pending.succeed(outcome[index])
                except Exception:
                    # A callback's bug must not take the other writes (or the loop) down.
                    log.exception("a write's callback failed")

    async def wait_settled(self) -> None:
        """Until no write is queued or being committed."""
        while self.pending:
            self._settled = trio.Event()
            await self._settled.wait()

    async def submit(self, operation: Operation[T]) -> T:
        """Queue a write and wait until it is committed and its ``on_commit`` has run.

        Raises :class:`StorageError` if its batch failed or the store is closed. Either
        way exactly one of the operation's callbacks runs.
        """
        pending = _Pending(operation)
        await self._queue(pending)
        # If we are cancelled here the write still happens and its on_commit still runs:
        # everything that must follow a commit lives in on_commit, not in the caller.
        assert pending.done is not None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    async def enqueue(self, operation: Operation[Any]) -> None:
        """Queue a write without waiting for its commit: its ``on_commit`` or
        ``on_error`` callback says how it went. Waits (and is a checkpoint) only while
        the queue is full. Raises :class:`StorageError` if the store is closed."""
        await self._queue(_Pending(operation, waited=False))

    def put(self, operation: Operation[Any]) -> None:
        """Queue a write now, from a commit's callback (which cannot wait): the writes
        a commit sets off (a reopening, the concierge handing over). Not bounded by the
        queue's limit, which holds back clients, not the server's own follow-ups."""
        pending = _Pending(operation, waited=False)
        pending.counted = False
        if self._stopping or self._aborting:
            pending.fail(StorageError("the store is closed"))
            return
        self._queued.append(pending)
        self.pending += 1
        self._wake_writer()

    async def _queue(self, pending: _Pending) -> None:
        # Every operation ends in exactly one callback: on_commit, or on_error, here
        # too when it never made it into the queue.
        try:
            # No trip through the scheduler unless the queue is full: under load that
            # trip delayed every message's entry into its batch by a turn of the loop.
            self._room.acquire_nowait()
        except trio.WouldBlock:
            try:
                await self._room.acquire()
            except BaseException:
                pending.fail(StorageError("cancelled before it was queued"))
                raise
        closed = self._stopping or self._aborting
        if not closed:
            self._queued.append(pending)
            self.pending += 1
            # A busy writer looks at the queue anyway when its commit is done.
            self._wake_writer()
        if closed:
            self._room.release()
            pending.fail(StorageError("the store is closed"))
            raise StorageError("the store is closed")

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a backend read (in a worker thread when ``threaded``)."""
        if not self._threaded:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._read_thread)

    def close(self) -> None:
        """Stop taking writes; :meth:`run` returns after committing what is queued."""
        self._stopping = True
        self._wake_writer()
