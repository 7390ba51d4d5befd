"""The storage seam's contract: the same assertions on every backend (memory, SQLite,
PostgreSQL). PostgreSQL runs on the session's throwaway server (tests/services.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_chat import StorageError
from trio_chat.core.storage import AppendMessage, ConversationRow, SetRead
from trio_chat.server._backends import open_backend
from trio_chat.server._store_memory import MemoryBackend
from trio_chat.server._store_postgres import PostgresBackend

BACKENDS = ["memory", "sqlite", "postgres"]


def guest_message(cid: str, cmid: str | None, text: str = "hi", key: str = "g:g") -> AppendMessage:
    return AppendMessage(
        conversation_id=cid,
        sender="guest",
        author="g",
        author_key=key,
        text=text,
        client_msg_id=cmid,
    )


def system_message(
    cid: str, status: tuple[Any, str | None, str | None], expect: tuple[Any, str | None] | None
) -> AppendMessage:
    return AppendMessage(
        conversation_id=cid, sender="system", text="changed", status=status, expect=expect
    )


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        backend: Any = MemoryBackend()
    elif request.param == "sqlite":
        backend = open_backend(tmp_path / "chat.db")
    else:
        backend = open_backend(request.getfixturevalue("pg_url"))
    yield backend
    backend.close()


def test_seq_is_contiguous_from_one(db: Any) -> None:
    cid = db.add_guest("Ana").conversation_id
    first = db.apply_batch([guest_message(cid, f"m{i}") for i in range(3)])
    second = db.apply_batch([guest_message(cid, f"n{i}") for i in range(2)])
    assert [r.message.seq for r in first + second] == [1, 2, 3, 4, 5]
    assert [m.seq for m in db.history(cid, 0, 100)] == [1, 2, 3, 4, 5]
    assert [m.seq for m in db.history(cid, 2, 2)] == [3, 4]
    assert [m.seq for m in db.recent(cid, 2)] == [4, 5]
    row = db.conversation(cid)
    assert row.last_seq == 5 and row.preview == "hi"


def test_a_retry_returns_the_original_even_in_the_same_batch(db: Any) -> None:
    cid = db.add_guest(None).conversation_id
    first, again, other = db.apply_batch(
        [
            guest_message(cid, "x", "first"),
            guest_message(cid, "x", "second"),
            guest_message(cid, "y"),
        ]
    )
    assert not first.duplicate and again.duplicate
    assert again.message.seq == first.message.seq == 1
    assert again.message.text == "first"
    assert other.message.seq == 2  # the retry used no seq
    (later,) = db.apply_batch([guest_message(cid, "x", "third")])
    assert later.duplicate and later.message.text == "first"
    # Another author may use the same client_msg_id.
    (staff,) = db.apply_batch([guest_message(cid, "x", key="s:1")])
    assert not staff.duplicate and staff.message.seq == 3
    found = db.message_by_client_id(cid, "g:g", "x")
    assert found is not None and found.seq == 1
    assert db.message_by_client_id(cid, "g:g", "nope") is None


def test_a_failed_batch_stores_nothing(db: Any) -> None:
    cid = db.add_guest(None).conversation_id
    with pytest.raises(StorageError):
        db.apply_batch([guest_message(cid, "a"), guest_message("c-missing", "b")])
    assert db.history(cid, 0, 10) == []
    (ok,) = db.apply_batch([guest_message(cid, "a")])
    assert ok.message.seq == 1 and not ok.duplicate


def test_a_status_change_applies_only_to_the_state_it_expects(db: Any) -> None:
    cid = db.add_guest(None).conversation_id
    (claimed,) = db.apply_batch([system_message(cid, ("staff", "s1", "Anna"), ("ai", None))])
    assert claimed.conflict is None and claimed.message.seq == 1
    # A second claim decided against the old state loses, and nothing is written.
    (lost,) = db.apply_batch([system_message(cid, ("staff", "s2", "Ben"), ("ai", None))])
    assert lost.conflict == ("staff", "s1", "Anna")
    row = db.conversation(cid)
    assert (row.status, row.assigned_staff_id, row.last_seq) == ("staff", "s1", 1)
    # Within one batch, the second change sees the first.
    results = db.apply_batch(
        [
            system_message(cid, ("waiting", None, None), ("staff", "s1")),
            system_message(cid, ("staff", "s2", "Ben"), ("waiting", None)),
        ]
    )
    assert [r.conflict for r in results] == [None, None]
    assert [r.message.seq for r in results] == [2, 3]
    # Without expect, a change applies whatever the state (single-node callers).
    (forced,) = db.apply_batch([system_message(cid, ("resolved", None, None), None)])
    assert forced.conflict is None and db.conversation(cid).status == "resolved"


def test_read_marks_only_rise(db: Any) -> None:
    cid = db.add_guest(None).conversation_id
    db.apply_batch([guest_message(cid, f"m{i}") for i in range(3)])
    db.apply_batch([SetRead(conversation_id=cid, reader="staff", seq=2)])
    db.apply_batch([SetRead(conversation_id=cid, reader="staff", seq=1)])
    assert db.conversation(cid).read_seq == 2


def test_guests_staff_and_sign_in(db: Any) -> None:
    row: ConversationRow = db.add_guest("Ana")
    assert db.conversation_of_guest(row.guest_id).conversation_id == row.conversation_id
    assert db.conversation_of_guest("g-nobody") is None
    assert db.conversation("c-nothing") is None
    anna = db.add_staff("Anna")
    with pytest.raises(ValueError):
        db.add_staff("Anna")
    assert [m.name for m in db.list_staff()] == ["Anna"]
    cid = row.conversation_id
    db.apply_batch(
        [guest_message(cid, "m"), system_message(cid, ("staff", anna.staff_id, "Anna"), None)]
    )
    signed = db.staff_sign_in(anna.staff_id)
    assert signed.member == anna
    assert [r.conversation_id for r in signed.held] == [cid]
    assert [r.conversation_id for r in signed.queue] == [cid]
    assert signed.held[0].guest_name == "Ana"
    assert db.remove_staff("Anna") and not db.remove_staff("Anna")
    assert db.staff_sign_in(anna.staff_id).member is None
    assert len(db.secret()) == 32


def test_unanswered_lists_conversations_whose_last_word_is_a_guests(db: Any) -> None:
    asked = db.add_guest(None).conversation_id
    answered = db.add_guest(None).conversation_id
    db.apply_batch([guest_message(asked, "q"), guest_message(answered, "q")])
    db.apply_batch(
        [AppendMessage(conversation_id=answered, sender="ai", author="concierge", text="a")]
    )
    owed = db.unanswered(0.0)
    assert [(row.conversation_id, m.seq) for row, m in owed] == [(asked, 1)]


def test_the_secret_survives_reopening(tmp_path: Path, pg_url: str) -> None:
    for target in (tmp_path / "chat.db", pg_url):
        first = open_backend(target)
        secret = first.secret()
        first.close()
        again = open_backend(target)
        assert again.secret() == secret
        again.close()


def test_two_nodes_writing_one_conversation_share_one_seq(pg_url: str) -> None:
    """Two backends (two server processes) append to the same conversation at once,
    with retries of each other's messages: seq stays contiguous, each message once."""
    nodes = [PostgresBackend(pg_url), PostgresBackend(pg_url)]
    cid = nodes[0].add_guest(None).conversation_id
    results: list[list[Any]] = [[], []]

    def write(index: int) -> None:
        for i in range(40):
            # Both nodes send the same client_msg_ids: the second of each pair is a retry.
            results[index] += nodes[index].apply_batch([guest_message(cid, f"m{i}")])

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = nodes[0].history(cid, 0, 1000)
    assert [m.seq for m in stored] == list(range(1, 41))
    assert [m.client_msg_id for m in stored] == [f"m{i}" for i in range(40)]
    for i in range(40):
        a, b = results[0][i], results[1][i]
        assert a.message.seq == b.message.seq
        assert a.duplicate != b.duplicate
    for node in nodes:
        node.close()


def test_migration_is_idempotent_and_init_works_on_a_live_database(pg_url: str) -> None:
    from trio_chat.server._backends import init_db

    init_db(pg_url)
    backend = PostgresBackend(pg_url)
    cid = backend.add_guest(None).conversation_id
    init_db(pg_url)  # again: nothing lost
    assert backend.conversation(cid) is not None
    backend.close()


def test_an_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(StorageError):
        open_backend("postgresql://nobody@127.0.0.1:1/none")
