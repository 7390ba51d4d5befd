"""Storage: real SQLite files, group commit, no gaps, idempotency."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_chat import StorageError
from trio_chat.core.storage import StorageBackend
from trio_chat.server._store import (
    ROWS_PER_STATEMENT,
    Appended,
    AppendMessage,
    Database,
    Operation,
    SetRead,
    Store,
)


def guest_message(cid: str, cmid: str | None, text: str = "hi") -> AppendMessage:
    return AppendMessage(
        conversation_id=cid,
        sender="guest",
        author="g",
        author_key="g:g",
        text=text,
        client_msg_id=cmid,
    )


class Explode(Operation[None]):
    def apply(self, db: StorageBackend) -> None:
        assert isinstance(db, Database)
        db.writer.execute("INSERT INTO no_such_table VALUES (1)")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "chat.db")


def test_seq_starts_at_one_and_has_no_gaps(db: Database) -> None:
    row = db.add_guest("Ana")
    results = db.apply_batch([guest_message(row.conversation_id, f"m{i}") for i in range(5)])
    assert [r.message.seq for r in results] == [1, 2, 3, 4, 5]
    assert [m.seq for m in db.history(row.conversation_id, 0, 100)] == [1, 2, 3, 4, 5]
    assert db.conversation(row.conversation_id).last_seq == 5  # type: ignore[union-attr]


def test_a_repeated_client_msg_id_returns_the_original(db: Database) -> None:
    row = db.add_guest(None)
    cid = row.conversation_id
    first, again, same_batch = db.apply_batch(
        [
            guest_message(cid, "x", "first"),
            guest_message(cid, "x", "second"),
            guest_message(cid, "y"),
        ]
    )
    assert not first.duplicate and again.duplicate
    assert again.message == first.message
    assert same_batch.message.seq == 2
    # Another author may use the same client_msg_id.
    staff = AppendMessage(
        conversation_id=cid,
        sender="staff",
        author="Anna",
        author_key="s:1",
        text="hello",
        client_msg_id="x",
    )
    assert db.apply_batch([staff])[0].message.seq == 3


def test_a_large_batch_over_many_conversations_is_stored_exactly(db: Database) -> None:
    """More rows than one multi-row statement holds, conversations touched several
    times, a status change and a retry in the middle: the same outcome as one message
    at a time."""
    cids = [db.add_guest(None).conversation_id for _ in range(40)]
    ops: list[Operation[Any]] = [
        guest_message(cids[i % 40], f"m{i}", f"text {i}") for i in range(3 * ROWS_PER_STATEMENT)
    ]
    ops.append(guest_message(cids[0], "m0", "a retry of the first"))
    ops.append(
        AppendMessage(
            conversation_id=cids[1],
            sender="system",
            text="Staff joined.",
            status=("staff", "s_1", "Anna"),
        )
    )
    results = db.apply_batch(ops)
    retry = results[-2]
    assert isinstance(retry, Appended) and retry.duplicate and retry.message.seq == 1
    for i, cid in enumerate(cids):
        stored = db.history(cid, 0, 500)
        expected = [f"text {k}" for k in range(i, 3 * ROWS_PER_STATEMENT, 40)]
        if i == 1:
            expected.append("Staff joined.")
        assert [m.text for m in stored] == expected
        assert [m.seq for m in stored] == list(range(1, len(expected) + 1))
        row = db.conversation(cid)
        assert row is not None and row.last_seq == len(expected)
        assert row.preview == expected[-1]
        assert row.status == ("staff" if i == 1 else "ai")


def test_a_failed_batch_stores_nothing_and_leaves_no_gap(db: Database) -> None:
    cid = db.add_guest(None).conversation_id
    with pytest.raises(StorageError):
        db.apply_batch([guest_message(cid, "a"), Explode()])
    assert db.history(cid, 0, 10) == []
    (result,) = db.apply_batch([guest_message(cid, "a")])
    assert result.message.seq == 1 and not result.duplicate


def test_status_changes_commit_with_their_system_message(db: Database) -> None:
    cid = db.add_guest(None).conversation_id
    system = AppendMessage(
        conversation_id=cid, sender="system", text="Anna joined.", status=("staff", "s_1", "Anna")
    )
    db.apply_batch([system])
    row = db.conversation(cid)
    assert row is not None
    assert (row.status, row.assigned_staff_id, row.assigned_name) == ("staff", "s_1", "Anna")
    assert db.held_by("s_1") == [cid]
    assert [r.conversation_id for r in db.queue(now=row.updated_ts)] == [cid]


def test_read_marks_only_grow(db: Database) -> None:
    cid = db.add_guest(None).conversation_id
    db.apply_batch([SetRead(conversation_id=cid, reader="staff", seq=5)])
    db.apply_batch([SetRead(conversation_id=cid, reader="staff", seq=3)])
    assert db.conversation(cid).read_seq == 5  # type: ignore[union-attr]


def test_data_survives_reopening_and_the_secret_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    first = Database(path)
    cid = first.add_guest("Ana").conversation_id
    first.apply_batch([guest_message(cid, "a")])
    secret = first.secret()
    first.close()
    second = Database(path)
    assert second.secret() == secret
    assert [m.text for m in second.history(cid, 0, 10)] == ["hi"]
    assert second.apply_batch([guest_message(cid, "b")])[0].message.seq == 2
    mode = second.writer.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_staff_management(db: Database) -> None:
    anna = db.add_staff("Anna")
    with pytest.raises(ValueError, match="already exists"):
        db.add_staff("Anna")
    with pytest.raises(ValueError):
        db.add_staff("  ")
    assert db.list_staff() == [anna]
    assert db.staff_member(anna.staff_id) == anna
    assert db.remove_staff("Anna") and not db.remove_staff("Anna")
    assert db.staff_member(anna.staff_id) is None


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database" * 100)
    with pytest.raises(StorageError, match=r"notes\.db"):
        Database(path)
    assert "these are my notes" in path.read_text()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="schema 99"):
        Database(path)


async def test_concurrent_writes_share_commits_and_callbacks_run_in_seq_order(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "chat.db")
    cid = db.add_guest(None).conversation_id
    store = Store(db)
    committed: list[int] = []

    async def write(i: int) -> None:
        op = guest_message(cid, f"m{i}")
        op.on_commit = lambda result: committed.append(result.message.seq)
        appended: Appended = await store.submit(op)
        assert appended.message.seq in committed  # the callback ran before we resumed

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with trio.open_nursery() as writers:
            for i in range(200):
                writers.start_soon(write, i)
        store.close()
    assert committed == list(range(1, 201))
    assert store.operations == 200
    assert store.batches < 100  # most commits carried several messages
    db.close()


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    db = Database(tmp_path / "chat.db")
    cid = db.add_guest(None).conversation_id
    store = Store(db)
    results: list[int] = []

    async def write(i: int) -> None:
        results.append((await store.submit(guest_message(cid, f"m{i}"))).message.seq)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(write, i)
        await trio.testing.wait_all_tasks_blocked()
        store.close()
        nursery.start_soon(store.run)
    assert sorted(results) == list(range(1, 51))
    with pytest.raises(StorageError):
        await store.submit(guest_message(cid, "late"))
    db.close()


async def test_a_cancelled_writer_fails_queued_writes_without_storing_them(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "chat.db")
    cid = db.add_guest(None).conversation_id
    store = Store(db)
    errors: list[BaseException] = []

    async def write(i: int) -> None:
        try:
            await store.submit(guest_message(cid, f"m{i}"))
        except StorageError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(write, i)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.run()
    assert len(errors) == 10
    assert db.history(cid, 0, 100) == []
    db.close()


@pytest.mark.parametrize("checkpoint_every", [1, 10**9])
async def test_checkpoints_run_beside_the_writer_not_in_its_commits(
    tmp_path: Path, checkpoint_every: int
) -> None:
    """A checkpoint inside a commit held every ack behind it (up to 200 ms seen). The
    writer's own automatic checkpoint only backs up a checkpointer that falls far
    behind; the store's checkpointer copies the WAL into the database file."""
    db = Database(tmp_path / "chat.db")
    assert db.writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] >= 16_384
    cids = [db.add_guest(None).conversation_id for _ in range(20)]
    db.checkpoint()
    size_before = (tmp_path / "chat.db").stat().st_size
    store = Store(db, checkpoint_every=checkpoint_every)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(300):
            await store.submit(guest_message(cids[i % 20], f"m{i}", "x" * 200))
        store.close()
    grew = (tmp_path / "chat.db").stat().st_size > size_before
    if checkpoint_every == 1:
        assert store.checkpoints >= 1 and grew
    else:
        assert store.checkpoints == 0 and not grew  # everything still in the WAL
    assert sum(len(db.history(cid, 0, 500)) for cid in cids) == 300
    db.close()


async def test_the_wal_starts_over_under_a_load_that_never_pauses(tmp_path: Path) -> None:
    """The checkpoint thread copies the WAL while batches keep appending to it: under a
    load that never pauses it never copied the last frame, so the WAL never started
    over and grew to the backstop (64 MiB in 10 s of the steady benchmark), where every
    commit checkpoints. The writer finishes each pass between two batches."""
    db = Database(tmp_path / "chat.db")
    cids = [db.add_guest(None).conversation_id for _ in range(50)]
    store = Store(db, checkpoint_every=40)
    wal = tmp_path / "chat.db-wal"
    largest = 0

    async def writer(k: int) -> None:
        for i in range(60):
            await store.submit(guest_message(cids[(k + i) % 50], f"w{k}-{i}", "x" * 1000))

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with trio.open_nursery() as writers:
            for k in range(50):  # 50 guests who never stop: the writer always has a batch
                writers.start_soon(writer, k)
            while True:
                await trio.lowlevel.checkpoint()
                largest = max(largest, wal.stat().st_size if wal.exists() else 0)
                if not writers.child_tasks:
                    break
        store.close()
    assert store.checkpoints >= 10
    # 3,000 messages of 1 KB wrote well over 6 MB of WAL frames; started over, the WAL
    # never holds more than a few checkpoints' worth.
    assert largest < 3_000_000, largest
    assert sum(len(db.history(cid, 0, 500)) for cid in cids) == 3000
    db.close()
