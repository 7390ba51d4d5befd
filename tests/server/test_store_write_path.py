"""The SQLite commit path (issue 17): what one group-commit batch costs, counted, and
what the cheaper path must still promise (protocol v1: nothing acknowledged lost,
doubled or reordered; ``seq`` contiguous; ``client_msg_id`` idempotent).

The costs are counted, not timed: statements handed to :mod:`sqlite3` per batch (each
gives up the GIL and must take it back from the event loop) and WAL frames per batch.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from tests.server.commit_path_probe import (
    concierge_reply,
    counted_statements,
    guest_message,
    measure_batches,
    populate,
    staff_joins,
)
from trio_chat.server._store import (
    MAX_BATCH,
    WRITER_SWITCH_INTERVAL,
    Appended,
    AppendMessage,
    Database,
    Operation,
    Store,
)
from trio_chat.server._store_memory import MemoryBackend


def stored(db: Database, cid: str) -> list[tuple[int, str]]:
    return [(m.seq, m.text) for m in db.history(cid, 0, 1000)]


def test_a_batch_of_new_messages_is_one_statement_and_stores_everything(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "chat.db")
    cids = populate(db, conversations=10, history=2)
    ops: list[Operation[Any]] = [
        guest_message(cid, f"new-{cid}", f"hello {i}") for i, cid in enumerate(cids)
    ]
    with counted_statements(db) as seen:
        results = db.apply_batch(ops)
    assert len(seen) == 1
    for i, (cid, result) in enumerate(zip(cids, results, strict=True)):
        assert isinstance(result, Appended) and not result.duplicate
        assert result.message.seq == 3
        assert stored(db, cid)[-1] == (3, f"hello {i}")
        row = db.conversation(cid)
        assert row is not None
        assert (row.last_seq, row.preview, row.updated_ts) == (3, f"hello {i}", result.at)


@pytest.mark.parametrize("parameter_limit", [None, 100])
def test_the_largest_batch_with_instant_answers_is_one_statement_where_sqlite_allows(
    tmp_path: Path, parameter_limit: int | None
) -> None:
    """A full batch of guest messages, each with its instant answer (twice the rows),
    is one statement; on an SQLite that takes fewer parameters it takes the transaction
    path (a statement per chunk) and stores exactly the same."""
    db = Database(tmp_path / "chat.db")
    if parameter_limit is not None:
        db.writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, parameter_limit)
    cids = populate(db, conversations=200, history=1)
    ops: list[Operation[Any]] = []
    for i in range(MAX_BATCH):
        op = guest_message(cids[i % len(cids)], f"big-{i}", f"question {i}")
        op.answer = AppendMessage(
            conversation_id=op.conversation_id,
            sender="ai",
            author="concierge",
            text=f"answer {i}",
            expect=("ai", None),
        )
        ops.append(op)
    with counted_statements(db) as seen:
        results = db.apply_batch(ops)
    assert len(seen) == 1 if parameter_limit is None else len(seen) > 2
    for result in results:
        assert isinstance(result, Appended) and result.answer is not None
        assert result.answer.message.seq == result.message.seq + 1
    for j, cid in enumerate(cids):
        # After its one message of history, each question right before its answer.
        expected = [
            text
            for i in range(j, MAX_BATCH, len(cids))
            for text in (f"question {i}", f"answer {i}")
        ]
        got = stored(db, cid)
        assert [seq for seq, _ in got] == list(range(1, len(expected) + 2))
        assert [text for _, text in got][1:] == expected


def test_a_batch_mixing_conversations_and_a_transition_is_one_statement_seqs_contiguous(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "chat.db")
    a, b, c = populate(db, conversations=3, history=1)
    ops: list[Operation[Any]] = [
        guest_message(a, "a1", "a one"),
        guest_message(b, "b1", "b one"),
        AppendMessage(
            conversation_id=a, sender="system", text="Anna joined.", status=("staff", "s_1", "Anna")
        ),
        guest_message(c, "c1", "c one"),
        guest_message(a, "a2", "a two" + "x" * 200),
        guest_message(b, "b2", "b two"),
    ]
    with counted_statements(db) as seen:
        db.apply_batch(ops)
    assert len(seen) == 1
    assert [s for s, _ in stored(db, a)] == [1, 2, 3, 4]
    assert [t for _, t in stored(db, a)][1:] == ["a one", "Anna joined.", "a two" + "x" * 200]
    assert stored(db, b)[1:] == [(2, "b one"), (3, "b two")]
    assert stored(db, c)[1:] == [(2, "c one")]
    row_a, row_b = db.conversation(a), db.conversation(b)
    assert row_a is not None and row_b is not None
    # The transition holds although a plain message of the same batch came after it.
    assert (row_a.status, row_a.assigned_staff_id, row_a.assigned_name) == ("staff", "s_1", "Anna")
    assert (row_a.last_seq, row_a.preview) == (4, ("a two" + "x" * 200)[:120])
    assert (row_b.status, row_b.assigned_staff_id, row_b.last_seq) == ("ai", None, 3)


def test_a_retry_inside_a_batch_is_exact_and_nothing_of_the_first_attempt_stays(
    tmp_path: Path,
) -> None:
    """The retry comes last, after rows the one-statement attempt had already
    inserted: that attempt is undone whole, and the batch stored once."""
    db = Database(tmp_path / "chat.db")
    a, b = populate(db, conversations=2, history=1)
    first, other, retry, after = db.apply_batch(
        [
            guest_message(a, "x", "first"),
            guest_message(b, "y", "other"),
            guest_message(a, "x", "first again"),
            guest_message(a, "z", "after"),
        ]
    )
    assert not first.duplicate and retry.duplicate and retry.message == first.message
    assert stored(db, a)[1:] == [(2, "first"), (3, "after")]
    assert stored(db, b)[1:] == [(2, "other")]
    assert after.message.seq == 3 and other.message.seq == 2
    row = db.conversation(a)
    assert row is not None and (row.last_seq, row.preview) == (3, "after")
    with counted_statements(db) as seen:
        (next_one,) = db.apply_batch([guest_message(a, "w", "next")])
    assert len(seen) == 1 and next_one.message.seq == 4


def test_a_retry_across_batches_is_exact_and_the_next_batch_is_one_statement_again(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "chat.db")
    a, b = populate(db, conversations=2, history=1)
    (original,) = db.apply_batch([guest_message(a, "x", "first")])
    new_b, retry = db.apply_batch([guest_message(b, "y", "b"), guest_message(a, "x", "again")])
    assert retry.duplicate and retry.message == original.message
    assert new_b.message.seq == 2 and stored(db, b)[1:] == [(2, "b")]
    with counted_statements(db) as seen:
        results = db.apply_batch([guest_message(a, "n1", "n1"), guest_message(b, "n2", "n2")])
    assert len(seen) == 1
    assert [r.message.seq for r in results] == [3, 3]
    assert [s for s, _ in stored(db, a)] == [1, 2, 3]


def test_a_batch_with_replies_and_transitions_is_one_statement_with_its_checks(
    tmp_path: Path,
) -> None:
    """The concierge's replies (a key each, an expected status) and a transition
    (an expected status) share the guests' statement: no transaction of their own."""
    db = Database(tmp_path / "chat.db")
    a, b = populate(db, conversations=2, history=1)
    asked_a, asked_b = db.apply_batch([guest_message(a, "a1", "a?"), guest_message(b, "b1", "b?")])
    ops: list[Operation[Any]] = [
        concierge_reply(a, asked_a.message.seq, "answer a"),
        guest_message(b, "b2", "b again"),
        concierge_reply(b, asked_b.message.seq, "answer b"),
        staff_joins(b),
    ]
    with counted_statements(db) as seen:
        reply_a, again_b, reply_b, joined = db.apply_batch(ops)
    assert len(seen) == 1
    assert not any(r.duplicate or r.conflict for r in (reply_a, again_b, reply_b, joined))
    assert stored(db, a)[1:] == [(2, "a?"), (3, "answer a")]
    assert stored(db, b)[1:] == [(2, "b?"), (3, "b again"), (4, "answer b"), (5, "Olga joined.")]
    row = db.conversation(b)
    assert row is not None and (row.status, row.assigned_staff_id, row.last_seq) == (
        "staff",
        "s_1",
        5,
    )
    # The keys were taken: a second reply to either guest message stores nothing.
    (again,) = db.apply_batch([concierge_reply(a, asked_a.message.seq, "twice")])
    assert again.duplicate and again.message.text == "answer a"


def test_a_failed_check_in_the_statement_undoes_it_and_the_batch_is_exact(
    tmp_path: Path,
) -> None:
    """A reply whose key is taken, and one decided against a status a transition of
    the same batch changed, come after rows the statement had inserted: it is undone
    whole, the batch applied one operation at a time, each result as if alone."""
    db = Database(tmp_path / "chat.db")
    a, b, c = populate(db, conversations=3, history=1)
    asked_a, asked_b = db.apply_batch([guest_message(a, "a1", "a?"), guest_message(b, "b1", "b?")])
    db.apply_batch([concierge_reply(a, asked_a.message.seq, "answer a")])
    ops: list[Operation[Any]] = [
        guest_message(c, "c1", "c first"),
        staff_joins(b),
        concierge_reply(a, asked_a.message.seq, "a second answer"),
        concierge_reply(b, asked_b.message.seq, "too late for b"),
        guest_message(c, "c2", "c second"),
    ]
    first_c, joined, twice, late, second_c = db.apply_batch(ops)
    assert not joined.conflict and joined.message.seq == 3
    assert twice.duplicate and twice.message.text == "answer a"
    assert late.conflict == ("staff", "s_1", "Olga")
    assert [first_c.message.seq, second_c.message.seq] == [2, 3]
    assert stored(db, a)[1:] == [(2, "a?"), (3, "answer a")]
    assert stored(db, b)[1:] == [(2, "b?"), (3, "Olga joined.")]
    assert stored(db, c)[1:] == [(2, "c first"), (3, "c second")]
    # b's reply key was not taken by the refused reply.
    released = AppendMessage(
        conversation_id=b,
        sender="system",
        text="Back to the concierge.",
        status=("ai", None, None),
        expect=("staff", "s_1"),
    )
    with counted_statements(db) as seen:
        (given,) = db.apply_batch([released])
        (answer,) = db.apply_batch([concierge_reply(b, asked_b.message.seq, "now b")])
    assert len(seen) == 2 and given.conflict is None
    assert not answer.duplicate and answer.message.seq == 5


def test_a_schema_2_file_is_used_as_it_is(tmp_path: Path) -> None:
    """The one-statement path lives in the writer connection's temporary schema: an
    existing file needs no migration and its stored schema does not change."""
    path = tmp_path / "chat.db"
    made = Database(path)
    cid = made.add_guest("Ana").conversation_id
    made.apply_batch([guest_message(cid, "old", "before")])
    made.close()

    def stored_schema() -> list[tuple[Any, ...]]:
        with sqlite3.connect(path) as conn:
            return sorted(conn.execute("SELECT type, name, sql FROM sqlite_schema").fetchall())

    before = stored_schema()
    for attempt in range(2):  # opened again and again: the temporary objects each time
        db = Database(path)
        with counted_statements(db) as seen:
            db.apply_batch([guest_message(cid, f"new{attempt}", "after")])
            (result,) = db.apply_batch([guest_message(cid, f"next{attempt}", "after")])
        # The conversation's last seq, read once by this writer, then one per batch.
        assert len(seen) == 1 + 2 and result.message.seq == 3 + 2 * attempt
        db.close()
    assert stored_schema() == before
    assert not any(name == "message_batch" for _, name, _ in before)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)


def test_wal_frames_per_batch_stay_bounded(tmp_path: Path) -> None:
    """A guard, not a change: one message in each of 10 conversations dirties about two
    leaf pages per conversation (the messages and the idempotency index; a split now
    and then), one of the conversations table and one of its status index. More means
    a new index or column on the write path: look at ``frames_by_btree``."""
    db = Database(tmp_path / "chat.db")
    cids = populate(db, conversations=10, history=40)
    cost = measure_batches(db, cids, batches=20)
    assert cost.statements_per_batch == 1
    assert cost.frames_per_batch <= 3 * len(cids) + 4, cost.frames_by_btree


async def test_a_running_store_shortens_the_gil_hand_offs_and_restores_them(
    tmp_path: Path,
) -> None:
    before = sys.getswitchinterval()
    assert before > WRITER_SWITCH_INTERVAL  # CPython's default, 5 ms
    in_loop = Store(MemoryBackend(), threaded=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(in_loop.run)
        assert sys.getswitchinterval() == before  # no writer thread: nothing waits
        in_loop.close()
    first = Store(Database(tmp_path / "a.db"))
    second = Store(Database(tmp_path / "b.db"))
    async with trio.open_nursery() as outer:
        await outer.start(second.run)
        assert sys.getswitchinterval() == WRITER_SWITCH_INTERVAL
        async with trio.open_nursery() as inner:
            await inner.start(first.run)
            first.close()
        # The first store stopped; the second still runs and still needs it short.
        assert sys.getswitchinterval() == WRITER_SWITCH_INTERVAL
        second.close()
    assert sys.getswitchinterval() == before


def test_none_parameters_skip_sqlite3s_adaptation_lookup_and_still_bind_as_null(
    tmp_path: Path,
) -> None:
    # Importing the store registers the adapter (see _store: the lookup it spares cost
    # 6 % of the server's instructions per message with the concierge on).
    assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)](None) is None
    db = Database(tmp_path / "nulls.db")
    try:
        [cid] = populate(db, 1, 0)
        op = guest_message(cid, "m1", "hello")
        op.answer = AppendMessage(
            conversation_id=cid, sender="ai", author="concierge", text="hi", expect=("ai", None)
        )
        db.apply_batch([op])
        rows = db.writer.execute(
            "SELECT sender, author_key IS NULL, client_msg_id IS NULL FROM messages "
            "WHERE conversation_id = ? ORDER BY seq",
            (cid,),
        ).fetchall()
    finally:
        db.close()
    assert rows[-2:] == [("guest", 0, 0), ("ai", 1, 1)]


def test_the_messages_of_one_commit_share_its_time_and_the_next_commit_reads_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clock is read once a batch (an answered guest message is two messages); a
    # batch must not keep the time of the one before.
    import trio_chat.server._store as store_module

    readings = iter([1_800_000_000.25, 1_800_000_007.5])
    db = Database(tmp_path / "clock.db")
    try:
        cids = populate(db, 2, 0)
        monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: next(readings)))
        answered = guest_message(cids[0], "m1", "hello")
        answered.answer = AppendMessage(
            conversation_id=cids[0], sender="ai", author="concierge", text="hi", expect=("ai", None)
        )
        one = db.apply_batch([answered, guest_message(cids[1], "m1", "hello")])
        [two] = db.apply_batch([guest_message(cids[1], "m2", "again")])
    finally:
        db.close()
    stamps = {(r.message.ts, r.at) for r in one} | {(one[0].answer.message.ts, one[0].answer.at)}
    assert stamps == {("2027-01-15T08:00:00.250Z", 1_800_000_000.25)}
    assert (two.message.ts, two.at) == ("2027-01-15T08:00:07.500Z", 1_800_000_007.5)
