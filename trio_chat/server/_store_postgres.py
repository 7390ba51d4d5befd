"""Durable storage in PostgreSQL: the storage seam for a cluster of server processes.

Plain synchronous psycopg 3 (its async API needs asyncio), run the way the SQLite
store runs: :class:`~trio_chat.server._store.Store` applies each batch of writes in its
writer thread, as one transaction, and reads in a worker thread. Several server
processes may write to one database at once, so what the SQLite store gets from being
the only writer is here the database's job:

* ``seq`` is assigned inside the transaction from the conversation's row, which the
  batch locks first (``SELECT ... FOR UPDATE``, in one sorted statement so that two
  nodes' batches never deadlock on each other);
* a ``client_msg_id`` is stored once per author and conversation by a unique index
  (``INSERT ... ON CONFLICT DO NOTHING``): a retry on any node gets the original;
* a status change carries the state it was decided against (``AppendMessage.expect``)
  and is applied only if that is still the stored state; otherwise nothing is written
  and the result says ``conflict`` (two staff members on two nodes racing to claim);
* the token secret lives in a table, not a file;
* a revocation (a staff member removed or revoked, the secret rotated) is a row of
  ``revocations`` whose ``seq`` is taken under a table lock held until the commit, so
  ``seq`` order is commit order and every node's watcher, reading ``seq > last``,
  misses none.

The schema is created and migrated by :func:`migrate` (``trio-chat db init`` and every
start), idempotently, under an advisory lock so nodes starting together do not race.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg

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

__all__ = ["PostgresBackend", "migrate"]

PREVIEW_CHARS: Final = 120
CONNECT_TIMEOUT: Final = 5
# Any constant: serialises migrations of nodes that start at the same moment.
_MIGRATION_LOCK: Final = 0x7472_696F_6368_6174 & 0x7FFF_FFFF_FFFF_FFFF

# Each migration runs once, in order, recorded in schema_migrations.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE guests (
        guest_id TEXT PRIMARY KEY,
        name TEXT,
        created_ts DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE staff (
        staff_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_ts DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE conversations (
        conversation_id TEXT PRIMARY KEY,
        guest_id TEXT NOT NULL UNIQUE REFERENCES guests(guest_id),
        guest_name TEXT,
        status TEXT NOT NULL DEFAULT 'ai',
        assigned_staff_id TEXT,
        assigned_name TEXT,
        last_seq BIGINT NOT NULL DEFAULT 0,
        read_seq BIGINT NOT NULL DEFAULT 0,
        guest_read_seq BIGINT NOT NULL DEFAULT 0,
        updated_ts DOUBLE PRECISION NOT NULL,
        preview TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX conversations_by_status ON conversations(status, updated_ts);
    CREATE TABLE messages (
        conversation_id TEXT NOT NULL REFERENCES conversations(conversation_id),
        seq BIGINT NOT NULL,
        sender TEXT NOT NULL,
        author TEXT,
        author_key TEXT,
        text TEXT NOT NULL,
        ts TEXT NOT NULL,
        client_msg_id TEXT,
        PRIMARY KEY (conversation_id, seq)
    );
    CREATE UNIQUE INDEX messages_idempotency
        ON messages(conversation_id, author_key, client_msg_id)
        WHERE client_msg_id IS NOT NULL;
    """,
    # 2: the hardening of the first release (as SQLite's schema 2 and its rooms step):
    # staff token generations, guests' last sign-in and room, and the revocations
    # every node's watcher reads. IF NOT EXISTS: safe on a database that has them.
    """
    ALTER TABLE staff ADD COLUMN IF NOT EXISTS generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE guests ADD COLUMN IF NOT EXISTS last_seen_ts DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE guests ADD COLUMN IF NOT EXISTS room TEXT;
    CREATE TABLE IF NOT EXISTS revocations (
        seq BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        staff_id TEXT,
        generation INTEGER NOT NULL DEFAULT 0,
        ts DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX IF NOT EXISTS guests_by_created ON guests(created_ts);
    """,
    # 3: the concierge's reply, exactly once per guest message. The key of each reply
    # (a second one to the same guest message stores nothing), and the lease of each
    # owed reply: the node answering it, until when (renewed while it works); a node
    # that dies leaves a lease that expires and another node's recovery takes over.
    """
    CREATE TABLE IF NOT EXISTS concierge_replies (
        conversation_id TEXT NOT NULL,
        guest_seq BIGINT NOT NULL,
        reply_seq BIGINT NOT NULL,
        PRIMARY KEY (conversation_id, guest_seq)
    );
    CREATE TABLE IF NOT EXISTS reply_leases (
        conversation_id TEXT NOT NULL,
        guest_seq BIGINT NOT NULL,
        owner TEXT NOT NULL,
        expires_ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (conversation_id, guest_seq)
    );
    """,
)

# The database's clock, not the node's: every node judges a lease by the same time.
_NOW: Final = "extract(epoch FROM clock_timestamp())"
# Take or renew the lease of one owed reply: inserted, or taken over from the same owner
# (a renewal) or from an expired one. The row lock decides between two nodes: the one
# that waited re-reads the row, finds it no longer expired and takes nothing.
_TAKE_LEASE: Final = (
    "INSERT INTO reply_leases AS l(conversation_id, guest_seq, owner, expires_ts) "
    "SELECT o.conversation_id, o.guest_seq, %(owner)s, " + _NOW + " + %(seconds)s "
    "FROM ({owed}) o "
    "ON CONFLICT (conversation_id, guest_seq) DO UPDATE "
    "SET owner = excluded.owner, expires_ts = excluded.expires_ts "
    "WHERE l.owner = excluded.owner OR l.expires_ts < " + _NOW + " "
    "RETURNING l.conversation_id, l.guest_seq"
)
# The replies recovery may take: the newest message of a conversation still with the
# concierge is a guest's, younger than ``since``, and its lease expired, or it has none
# and its node had the time to take one (its node died before it could).
_OWED_AND_FREE: Final = (
    "SELECT c.conversation_id, c.last_seq AS guest_seq FROM conversations c "
    "JOIN messages m ON m.conversation_id = c.conversation_id AND m.seq = c.last_seq "
    "LEFT JOIN reply_leases l "
    "ON l.conversation_id = c.conversation_id AND l.guest_seq = c.last_seq "
    "WHERE c.status = 'ai' AND m.sender = 'guest' AND c.updated_ts > %(since)s "
    "AND (l.owner IS NULL AND c.updated_ts < " + _NOW + " - %(seconds)s "
    "OR l.expires_ts < " + _NOW + ") "
    "ORDER BY c.updated_ts LIMIT %(limit)s"
)

# A conversation's row with its guest's (``c`` and ``g``: every query joins them).
_CONVERSATION_COLUMNS: Final = (
    "c.conversation_id, c.guest_id, c.guest_name, c.status, c.assigned_staff_id, "
    "c.assigned_name, c.last_seq, c.read_seq, c.updated_ts, c.preview, g.last_seen_ts, "
    "g.room, c.guest_read_seq"
)
_CONVERSATION_FIELDS: Final = 13
_CONVERSATIONS: Final = "conversations c JOIN guests g ON g.guest_id = c.guest_id"


def _connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def migrate(url: str) -> int:
    """Create or bring the schema up to date (idempotent; safe while other nodes run or
    start). Returns the schema version. Raises :class:`StorageError`."""
    conn = _connect(url)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_ts DOUBLE PRECISION NOT NULL)"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            done = int(row.fetchone()[0])  # type: ignore[index]
            if done > len(MIGRATIONS):
                raise StorageError(
                    f"the database has schema {done}, newer than this server's {len(MIGRATIONS)}"
                )
            for version in range(done + 1, len(MIGRATIONS) + 1):
                conn.execute(MIGRATIONS[version - 1])
                conn.execute(
                    "INSERT INTO schema_migrations(version, applied_ts) VALUES (%s, %s)",
                    (version, time.time()),
                )
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('secret', %s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(32),),
            )
        return len(MIGRATIONS)
    except psycopg.Error as exc:
        raise StorageError(f"cannot migrate the database: {_first_line(exc)}") from exc
    finally:
        conn.close()


class _Locked:
    """The state of one conversation inside a batch (its row is locked)."""

    __slots__ = (
        "assigned_name",
        "assigned_staff_id",
        "changed",
        "guest_id",
        "guest_name",
        "guest_read_seq",
        "guest_room",
        "last_seen_ts",
        "last_seq",
        "preview",
        "read_seq",
        "status",
        "updated_ts",
    )

    def __init__(self, row: tuple[Any, ...]) -> None:
        (
            _,
            self.guest_id,
            self.guest_name,
            self.status,
            self.assigned_staff_id,
            self.assigned_name,
            self.last_seq,
            self.read_seq,
            self.updated_ts,
            self.preview,
            self.last_seen_ts,
            self.guest_room,
            self.guest_read_seq,
        ) = row
        self.changed = False

    def row(self, conversation_id: str) -> ConversationRow:
        return ConversationRow(
            conversation_id,
            self.guest_id,
            self.guest_name,
            self.status,
            self.assigned_staff_id,
            self.assigned_name,
            self.last_seq,
            self.read_seq,
            self.updated_ts,
            self.preview,
            self.last_seen_ts,
            self.guest_room,
            self.guest_read_seq,
        )


class PostgresBackend:
    """:class:`~trio_chat.core.storage.StorageBackend` on PostgreSQL.

    One writer connection (the store's writer thread) and one reader connection
    (serialised by a lock). A connection that broke is replaced on its next use, so
    the backend recovers by itself once the database is back; meanwhile every call
    raises :class:`StorageError` (nothing of a failed batch is stored).
    """

    blocking = True  # the store runs it in threads

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        if create:
            migrate(url)
        self._writer: psycopg.Connection[Any] | None = None
        self._reader: psycopg.Connection[Any] | None = None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._locked: dict[str, _Locked] = {}  # inside a batch
        self._touches: dict[str, float] = {}  # guest -> last sign-in, written at the end
        # After any failure both connections are replaced before their next use: a
        # connection to a restarted server looks fine until it fails a real request.
        self._reader_stale = False
        self._writer_stale = False
        self._reader_conn()  # fail now, not at the first read, if unreachable
        self.healthy = True  # the last call reached the database

    # -- connections -------------------------------------------------------------------

    def _reader_conn(self) -> psycopg.Connection[Any]:
        if self._reader_stale or self._reader is None or self._reader.closed or self._reader.broken:
            self._reader_stale = False
            if self._reader is not None:
                self._reader.close()
            self._reader = None
            self._reader = _connect(self.url)
        return self._reader

    def _writer_conn(self) -> psycopg.Connection[Any]:
        if self._writer_stale or self._writer is None or self._writer.closed or self._writer.broken:
            self._writer_stale = False
            if self._writer is not None:
                self._writer.close()
            self._writer = None
            self._writer = _connect(self.url)
        return self._writer

    def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()

    @contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            self.healthy = False
            self._reader_stale = self._writer_stale = True
            raise StorageError(f"database {what} failed: {_first_line(exc)}") from exc
        self.healthy = True

    def ping(self) -> None:
        """Raises :class:`StorageError` unless the database answers."""
        self._read("SELECT 1")

    # -- writes (one writer at a time) -------------------------------------------------

    def apply_batch(self, operations: list[Operation[Any]]) -> list[Any]:
        """Apply every operation in one transaction. The rows of every conversation the
        batch touches are locked first, in one sorted statement."""
        with self._write_lock, self._failures("write"):
            conn = self._writer_conn()
            try:
                with conn.transaction():
                    self._lock_conversations(conn, operations)
                    results = [op.apply(self) for op in operations]
                    self._write_conversations(conn)
                    self._write_touches(conn)
                return results
            finally:
                self._locked = {}
                self._touches = {}

    def _lock_conversations(
        self, conn: psycopg.Connection[Any], operations: list[Operation[Any]]
    ) -> None:
        ids = sorted(
            {op.conversation_id for op in operations if isinstance(op, AppendMessage | SetRead)}
        )
        self._conn = conn
        if not ids:
            return
        rows = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} "
            "WHERE c.conversation_id = ANY(%s) ORDER BY c.conversation_id FOR UPDATE OF c",
            (ids,),
        ).fetchall()
        self._locked = {row[0]: _Locked(row) for row in rows}

    def append(self, op: AppendMessage) -> Appended:
        state = self._locked.get(op.conversation_id)
        if state is None:
            raise StorageError(f"no conversation {op.conversation_id}")
        now = time.time()
        if op.expect is not None and op.expect != (state.status, state.assigned_staff_id):
            # Decided against a state that is no longer the stored one: another node
            # changed it first. Nothing is written.
            return Appended(
                Message(0, op.conversation_id, op.sender, op.author, op.text, "", None),
                duplicate=False,
                conflict=(state.status, state.assigned_staff_id, state.assigned_name),
            )
        seq = state.last_seq + 1
        if op.reply_to is not None:
            taken = self._take_reply_key(op, seq)
            if taken is not None:
                return taken
        message = Message(
            seq, op.conversation_id, op.sender, op.author, op.text, format_ts(now), op.client_msg_id
        )
        inserted = self._conn.execute(
            "INSERT INTO messages(conversation_id, seq, sender, author, author_key, text, ts, "
            "client_msg_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (conversation_id, author_key, client_msg_id) "
            "WHERE client_msg_id IS NOT NULL DO NOTHING RETURNING seq",
            (
                op.conversation_id,
                seq,
                op.sender,
                op.author,
                op.author_key,
                op.text,
                message.ts,
                op.client_msg_id,
            ),
        ).fetchone()
        if inserted is None:
            found = self._conn.execute(
                "SELECT seq, sender, author, text, ts FROM messages WHERE conversation_id = %s "
                "AND author_key = %s AND client_msg_id = %s",
                (op.conversation_id, op.author_key, op.client_msg_id),
            ).fetchone()
            if found is None:  # pragma: no cover - the conflict names this very row
                raise StorageError("a conflicting message vanished")
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
        state.last_seq = seq
        state.updated_ts = now
        state.preview = op.text[:PREVIEW_CHARS]
        if op.status is not None:
            state.status, state.assigned_staff_id, state.assigned_name = op.status
        state.changed = True
        return Appended(message, duplicate=False, at=now, row=state.row(op.conversation_id))

    def _take_reply_key(self, op: AppendMessage, seq: int) -> Appended | None:
        """Insert-or-nothing of the reply's key (the conversation's row is locked, and the
        primary key settles any other race); the stored reply when it was taken."""
        inserted = self._conn.execute(
            "INSERT INTO concierge_replies(conversation_id, guest_seq, reply_seq) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING reply_seq",
            (op.conversation_id, op.reply_to, seq),
        ).fetchone()
        if inserted is not None:
            return None
        found = self._conn.execute(
            "SELECT m.seq, m.sender, m.author, m.text, m.ts FROM concierge_replies r "
            "JOIN messages m ON m.conversation_id = r.conversation_id AND m.seq = r.reply_seq "
            "WHERE r.conversation_id = %s AND r.guest_seq = %s",
            (op.conversation_id, op.reply_to),
        ).fetchone()
        if found is None:  # pragma: no cover - the key and its reply commit together
            raise StorageError("a concierge reply's key has no reply")
        reply_seq, sender, author, text, ts = found
        return Appended(
            Message(reply_seq, op.conversation_id, sender, author, text, ts, None), duplicate=True
        )

    def set_read(self, op: SetRead) -> None:
        column = "read_seq" if op.reader == "staff" else "guest_read_seq"
        self._conn.execute(
            f"UPDATE conversations SET {column} = GREATEST({column}, %s) "
            "WHERE conversation_id = %s",
            (op.seq, op.conversation_id),
        )
        state = self._locked.get(op.conversation_id)
        if state is not None and op.reader == "staff":
            state.read_seq = max(state.read_seq, op.seq)
        elif state is not None:
            state.guest_read_seq = max(state.guest_read_seq, op.seq)

    def _write_conversations(self, conn: psycopg.Connection[Any]) -> None:
        changed = [(cid, s) for cid, s in self._locked.items() if s.changed]
        if not changed:
            return
        with conn.cursor() as cursor:
            cursor.executemany(
                "UPDATE conversations SET last_seq = %s, updated_ts = %s, preview = %s, "
                "status = %s, assigned_staff_id = %s, assigned_name = %s "
                "WHERE conversation_id = %s",
                [
                    (
                        s.last_seq,
                        s.updated_ts,
                        s.preview,
                        s.status,
                        s.assigned_staff_id,
                        s.assigned_name,
                        cid,
                    )
                    for cid, s in changed
                ],
            )

    def create_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        guest_id = new_id("g")
        conversation_id = new_id("c")
        now = time.time()
        self._conn.execute(
            "INSERT INTO guests(guest_id, name, room, created_ts, last_seen_ts) "
            "VALUES (%s, %s, %s, %s, %s)",
            (guest_id, name, room, now, now),
        )
        self._conn.execute(
            "INSERT INTO conversations(conversation_id, guest_id, guest_name, updated_ts) "
            "VALUES (%s, %s, %s, %s)",
            (conversation_id, guest_id, name, now),
        )
        return ConversationRow(
            conversation_id, guest_id, name, "ai", None, None, 0, 0, now, "", now, room
        )

    def touch_guest(self, op: TouchGuest) -> None:
        """Written at the end of the batch, in guest order: two nodes' batches touching
        the same guests lock their rows in the same order and never deadlock."""
        self._touches[op.guest_id] = max(op.at, self._touches.get(op.guest_id, op.at))

    def _write_touches(self, conn: psycopg.Connection[Any]) -> None:
        if not self._touches:
            return
        with conn.cursor() as cursor:
            cursor.executemany(
                "UPDATE guests SET last_seen_ts = GREATEST(last_seen_ts, %s) WHERE guest_id = %s",
                [(at, guest_id) for guest_id, at in sorted(self._touches.items())],
            )

    def expire_silent_guests(
        self,
        before: float,
        keep: frozenset[str],
        keep_conversations: frozenset[str] = frozenset(),
    ) -> list[str]:
        """As SQLite's. Several nodes write at once here, so the candidates' rows are
        locked first (an append locks its conversation's row before writing) and only
        then looked at again: a guest whose first message another node committed
        meanwhile is kept, and one cannot write to a conversation being forgotten."""
        silent = (
            "c.status IN ('ai', 'resolved') AND NOT EXISTS (SELECT 1 FROM messages m "
            "WHERE m.conversation_id = c.conversation_id AND m.sender = 'guest')"
        )
        candidates = [
            cid
            for (cid,) in self._conn.execute(
                f"SELECT c.conversation_id FROM {_CONVERSATIONS} "
                f"WHERE g.created_ts < %s AND {silent} ORDER BY c.conversation_id "
                "FOR UPDATE OF c SKIP LOCKED",
                (before,),
            ).fetchall()
            if cid not in self._locked and cid not in keep_conversations
        ]
        if not candidates:
            return []
        # A new statement, a new snapshot (READ COMMITTED), the rows locked: true now.
        rows = self._conn.execute(
            f"SELECT c.guest_id, c.conversation_id FROM {_CONVERSATIONS} "
            f"WHERE c.conversation_id = ANY(%s) AND {silent}",
            (candidates,),
        ).fetchall()
        doomed = [(guest_id, cid) for guest_id, cid in rows if guest_id not in keep]
        if not doomed:
            return []
        # A guest whose row another node's batch holds is being signed in there: keep
        # them, and never wait for that batch. Waiting would hold the rows deleted so
        # far, in the order the plan visits them, while sign-ins lock guests in guest
        # order: a deadlock. The rows are taken here in guest order, skipping held ones.
        free = {
            guest_id
            for (guest_id,) in self._conn.execute(
                "SELECT guest_id FROM guests WHERE guest_id = ANY(%s) "
                "ORDER BY guest_id FOR UPDATE SKIP LOCKED",
                ([guest_id for guest_id, _ in doomed],),
            ).fetchall()
        }
        doomed = [(guest_id, cid) for guest_id, cid in doomed if guest_id in free]
        if not doomed:
            return []
        conversations = [cid for _, cid in doomed]
        guests = [guest_id for guest_id, _ in doomed]
        self._conn.execute("DELETE FROM messages WHERE conversation_id = ANY(%s)", (conversations,))
        self._conn.execute(
            "DELETE FROM conversations WHERE conversation_id = ANY(%s)", (conversations,)
        )
        self._conn.execute("DELETE FROM guests WHERE guest_id = ANY(%s)", (guests,))
        return guests

    # -- reads -------------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._read_lock, self._failures("read"):
            return self._reader_conn().execute(sql, params).fetchall()

    def secret(self) -> bytes:
        """Read each time (rarely: at start and after a rotation), never cached: a
        rotation by another process must be seen."""
        rows = self._read("SELECT value FROM meta WHERE key = 'secret'")
        if not rows:
            raise StorageError("the database has no secret: run 'trio-chat db init'")
        return bytes.fromhex(rows[0][0])

    def _conversation_where(self, column: str, value: str) -> ConversationRow | None:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} WHERE c.{column} = %s",
            (value,),
        )
        return ConversationRow(*rows[0]) if rows else None

    def conversation_of_guest(self, guest_id: str) -> ConversationRow | None:
        return self._conversation_where("guest_id", guest_id)

    def conversation(self, conversation_id: str) -> ConversationRow | None:
        return self._conversation_where("conversation_id", conversation_id)

    def queue(self, now: float, limit: int = 500) -> list[ConversationRow]:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} "
            "WHERE c.status IN ('waiting', 'staff') "
            "OR (c.status = 'ai' AND c.last_seq > 0 AND c.updated_ts > %s) "
            "OR (c.status = 'resolved' AND c.updated_ts > %s) "
            "ORDER BY c.updated_ts DESC LIMIT %s",
            (now - 86400, now - 86400, limit),
        )
        return [ConversationRow(*r) for r in rows]

    def staff_member(self, staff_id: str) -> StaffMember | None:
        rows = self._read(
            "SELECT staff_id, name, generation FROM staff WHERE staff_id = %s", (staff_id,)
        )
        return StaffMember(*rows[0]) if rows else None

    def staff_sign_in(self, staff_id: str) -> StaffSignIn:
        member = self.staff_member(staff_id)
        if member is None:
            return StaffSignIn(None, [], [])
        return StaffSignIn(member, self.queue(time.time()), self.held_conversations(staff_id))

    def held_conversations(self, staff_id: str) -> list[ConversationRow]:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} "
            "WHERE c.status = 'staff' AND c.assigned_staff_id = %s",
            (staff_id,),
        )
        return [ConversationRow(*r) for r in rows]

    def revocations_since(self, after_seq: int) -> list[Revocation]:
        rows = self._read(
            "SELECT seq, kind, staff_id, generation FROM revocations WHERE seq > %s ORDER BY seq",
            (after_seq,),
        )
        return [Revocation(*r) for r in rows]

    def history(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        rows = self._read(
            "SELECT seq, sender, author, text, ts, client_msg_id FROM messages "
            "WHERE conversation_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (conversation_id, after_seq, limit),
        )
        return [Message(r[0], conversation_id, r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def changes_since(
        self, conversation_id: str, after_seq: int, limit: int = 500
    ) -> tuple[ConversationRow | None, list[Message]]:
        """The conversation's row and its messages after ``after_seq``, read in one
        snapshot (so the row's status is the one after the last message returned, when
        all of them fit in ``limit``)."""
        with self._read_lock, self._failures("read"):
            conn = self._reader_conn()
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                found = conn.execute(
                    f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} "
                    "WHERE c.conversation_id = %s",
                    (conversation_id,),
                ).fetchone()
                rows = conn.execute(
                    "SELECT seq, sender, author, text, ts, client_msg_id FROM messages "
                    "WHERE conversation_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                    (conversation_id, after_seq, limit),
                ).fetchall()
        messages = [Message(r[0], conversation_id, r[1], r[2], r[3], r[4], r[5]) for r in rows]
        return (ConversationRow(*found) if found else None), messages

    def recent(self, conversation_id: str, count: int) -> list[Message]:
        rows = self._read(
            "SELECT seq, sender, author, text, ts, client_msg_id FROM messages "
            "WHERE conversation_id = %s ORDER BY seq DESC LIMIT %s",
            (conversation_id, count),
        )
        return [
            Message(r[0], conversation_id, r[1], r[2], r[3], r[4], r[5]) for r in reversed(rows)
        ]

    def message_by_client_id(
        self, conversation_id: str, author_key: str, client_msg_id: str
    ) -> Message | None:
        rows = self._read(
            "SELECT seq, sender, author, text, ts FROM messages WHERE conversation_id = %s "
            "AND author_key = %s AND client_msg_id = %s",
            (conversation_id, author_key, client_msg_id),
        )
        if not rows:
            return None
        seq, sender, author, text, ts = rows[0]
        return Message(seq, conversation_id, sender, author, text, ts, client_msg_id)

    def unanswered(self, since: float) -> list[tuple[ConversationRow, Message]]:
        rows = self._read(
            f"SELECT {_CONVERSATION_COLUMNS}, m.sender, m.author, m.text, m.ts, m.client_msg_id "
            f"FROM {_CONVERSATIONS} JOIN messages m "
            "ON m.conversation_id = c.conversation_id AND m.seq = c.last_seq "
            "WHERE c.status = 'ai' AND m.sender = 'guest' AND c.updated_ts > %s",
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

    # -- reply leases (the concierge's owed replies in a cluster) -----------------------

    def _lease_sql(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """One autocommitted statement on the reader's connection (a lease must not wait
        behind the writer's batches, nor they behind it)."""
        with self._read_lock, self._failures("reply lease"):
            cursor = self._reader_conn().execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []

    def take_reply_lease(
        self, conversation_id: str, guest_seq: int, owner: str, seconds: float
    ) -> bool:
        """Take (or, held by ``owner``, renew) the lease of answering one guest message
        for ``seconds``; False if another owner holds it and it has not expired."""
        one = "SELECT %(cid)s::text AS conversation_id, %(seq)s::bigint AS guest_seq"
        params = {"cid": conversation_id, "seq": guest_seq, "owner": owner, "seconds": seconds}
        return bool(self._lease_sql(_TAKE_LEASE.format(owed=one), params))

    def take_owed_replies(
        self, since: float, owner: str, seconds: float, limit: int = 100
    ) -> list[tuple[ConversationRow, Message]]:
        """Recovery: take the leases of up to ``limit`` owed replies nobody answers (their
        lease expired, or their node died before taking one) and return what to answer.
        Two nodes scanning at once never take the same one. Leases older than any owed
        reply are dropped on the way."""
        params = {"since": since, "owner": owner, "seconds": seconds, "limit": limit}
        taken = self._lease_sql(
            f"WITH taken AS ({_TAKE_LEASE.format(owed=_OWED_AND_FREE)}) "
            f"SELECT {_CONVERSATION_COLUMNS}, m.sender, m.author, m.text, m.ts, "
            f"m.client_msg_id, m.seq FROM taken t JOIN {_CONVERSATIONS} "
            "ON c.conversation_id = t.conversation_id JOIN messages m "
            "ON m.conversation_id = t.conversation_id AND m.seq = t.guest_seq",
            params,
        )
        self._lease_sql("DELETE FROM reply_leases WHERE expires_ts < %(since)s", {"since": since})
        found = []
        for r in taken:
            row = ConversationRow(*r[:_CONVERSATION_FIELDS])
            sender, author, text, ts, cmid, seq = r[_CONVERSATION_FIELDS:]
            found.append((row, Message(seq, row.conversation_id, sender, author, text, ts, cmid)))
        return found

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""

    # -- administration ------------------------------------------------------------------

    def _admin(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._write_lock, self._failures("write"):
            cursor = self._writer_conn().execute(sql, params)
            return cursor.rowcount

    def add_staff(self, name: str) -> StaffMember:
        """Add a staff member; raises ``ValueError`` if the name is taken or empty."""
        name = name.strip()
        if not name:
            raise ValueError("a staff member needs a name")
        member = StaffMember(new_id("s"), name)
        try:
            self._admin(
                "INSERT INTO staff(staff_id, name, created_ts) VALUES (%s, %s, %s)",
                (member.staff_id, member.name, time.time()),
            )
        except StorageError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise ValueError(f"a staff member named {name!r} already exists") from None
            raise
        return member

    def list_staff(self) -> list[StaffMember]:
        return [
            StaffMember(*r)
            for r in self._read("SELECT staff_id, name, generation FROM staff ORDER BY name")
        ]

    @contextmanager
    def _admin_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One administrative write transaction on the writer connection."""
        with self._write_lock, self._failures("write"):
            conn = self._writer_conn()
            with conn.transaction():
                yield conn

    @staticmethod
    def _find_staff(conn: psycopg.Connection[Any], name_or_id: str) -> StaffMember | None:
        """The member named (a name wins over an id), locked until the commit."""
        row = conn.execute(
            "SELECT staff_id, name, generation FROM staff WHERE name = %s OR staff_id = %s "
            "ORDER BY name = %s DESC LIMIT 1 FOR UPDATE",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        return StaffMember(*row) if row else None

    @staticmethod
    def _record(
        conn: psycopg.Connection[Any], kind: str, staff_id: str | None = None, generation: int = 0
    ) -> None:
        # The lock (readers pass) is held until the commit: a seq taken later commits
        # later, so a watcher that read up to some seq never finds a smaller one after.
        conn.execute("LOCK TABLE revocations IN EXCLUSIVE MODE")
        conn.execute(
            "INSERT INTO revocations(kind, staff_id, generation, ts) VALUES (%s, %s, %s, %s)",
            (kind, staff_id, generation, time.time()),
        )

    def remove_staff(self, name_or_id: str) -> bool:
        """Remove by name or id; every node's watcher finds the ``removed`` revocation,
        closes the member's consoles and hands their conversations back."""
        with self._admin_transaction() as conn:
            member = self._find_staff(conn, name_or_id)
            if member is None:
                return False
            conn.execute("DELETE FROM staff WHERE staff_id = %s", (member.staff_id,))
            self._record(conn, "removed", member.staff_id)
        return True

    def revoke_staff(self, name_or_id: str) -> StaffMember | None:
        """Raise the member's token generation (older tokens stop working); the member
        with the new generation, or ``None`` if unknown."""
        with self._admin_transaction() as conn:
            member = self._find_staff(conn, name_or_id)
            if member is None:
                return None
            generation = member.generation + 1
            conn.execute(
                "UPDATE staff SET generation = %s WHERE staff_id = %s",
                (generation, member.staff_id),
            )
            self._record(conn, "revoked", member.staff_id, generation)
        return StaffMember(member.staff_id, member.name, generation)

    def rotate_secret(self) -> None:
        """A new token secret for every node: no token signed before verifies."""
        with self._admin_transaction() as conn:
            conn.execute(
                "UPDATE meta SET value = %s WHERE key = 'secret'", (secrets.token_hex(32),)
            )
            self._record(conn, "secret")

    def add_guest(self, name: str | None, room: str | None = None) -> ConversationRow:
        return self.apply_batch([CreateGuest(name=name, room=room)])[0]  # type: ignore[no-any-return]
