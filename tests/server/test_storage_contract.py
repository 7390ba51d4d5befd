"""The storage seam's contract: the same assertions on every backend (memory, SQLite,
PostgreSQL). PostgreSQL runs on the session's throwaway server (tests/services.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trio_chat import StorageError
from trio_chat.core.storage import (
    AppendMessage,
    ConversationRow,
    ExpireSilentGuests,
    SetRead,
    StaffMember,
    TouchGuest,
)
from trio_chat.server._backends import open_backend
from trio_chat.server._store_postgres import PostgresBackend


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


def test_the_queue_holds_the_open_the_recent_and_the_recently_resolved(db: Any) -> None:
    def conversation(status: Any) -> str:
        cid: str = db.add_guest(None).conversation_id
        db.apply_batch([guest_message(cid, "m"), system_message(cid, (status, None, None), None)])
        return cid

    waiting, chatting, resolved = (
        conversation("waiting"),
        conversation("ai"),
        conversation("resolved"),
    )
    silent = db.add_guest(None).conversation_id  # never wrote: not active
    now = time.time()
    listed = {r.conversation_id for r in db.queue(now)}
    assert listed == {waiting, chatting, resolved} and silent not in listed
    # A day later only what is still open is listed.
    assert {r.conversation_id for r in db.queue(now + 86_400 + 60)} == {waiting}


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


# ------------------------------------------ the hardening's seam (same on every backend)


def test_a_guest_row_has_its_room_its_last_sign_in_and_its_read_mark(db: Any) -> None:
    before = time.time()
    row: ConversationRow = db.add_guest("Ana", "412")
    assert row.guest_room == "412" and row.last_seen_ts >= before
    cid = row.conversation_id
    db.apply_batch([guest_message(cid, f"m{i}") for i in range(3)])
    db.apply_batch([SetRead(conversation_id=cid, reader="guest", seq=2)])
    db.apply_batch([SetRead(conversation_id=cid, reader="guest", seq=1)])  # never lowers
    db.apply_batch([TouchGuest(guest_id=row.guest_id, at=row.last_seen_ts + 100)])
    db.apply_batch([TouchGuest(guest_id=row.guest_id, at=row.last_seen_ts + 50)])  # nor this
    for found in (
        db.conversation(cid),
        db.conversation_of_guest(row.guest_id),
        db.queue(time.time())[0],
    ):
        assert (found.guest_name, found.guest_room) == ("Ana", "412")
        assert (found.guest_read_seq, found.read_seq) == (2, 0)
        assert found.last_seen_ts == row.last_seen_ts + 100
    assert db.add_guest(None).guest_room is None


def test_staff_removal_revocation_and_rotation_are_recorded_in_order(db: Any) -> None:
    assert db.revocations_since(0) == []
    anna = db.add_staff("Anna")
    ben = db.add_staff("Ben")
    assert anna.generation == 0
    revoked = db.revoke_staff("Anna")
    assert revoked == StaffMember(anna.staff_id, "Anna", 1)
    assert db.revoke_staff(anna.staff_id).generation == 2  # by id too
    assert db.revoke_staff("Nobody") is None
    assert db.staff_member(anna.staff_id).generation == 2
    assert db.staff_sign_in(anna.staff_id).member.generation == 2
    assert [(m.name, m.generation) for m in db.list_staff()] == [("Anna", 2), ("Ben", 0)]
    secret = db.secret()
    db.rotate_secret()
    assert db.secret() != secret and len(db.secret()) == 32
    assert db.remove_staff(ben.staff_id) and not db.remove_staff("Ben")
    found = db.revocations_since(0)
    assert [(r.kind, r.staff_id, r.generation) for r in found] == [
        ("revoked", anna.staff_id, 1),
        ("revoked", anna.staff_id, 2),
        ("secret", None, 0),
        ("removed", ben.staff_id, 0),
    ]
    seqs = [r.seq for r in found]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert db.revocations_since(seqs[1]) == found[2:]
    assert db.revocations_since(seqs[-1]) == []


def test_held_conversations_are_those_in_staff_assigned_to_the_member(db: Any) -> None:
    anna = db.add_staff("Anna")
    held, waiting, other = (db.add_guest(None).conversation_id for _ in range(3))
    db.apply_batch(
        [
            system_message(held, ("staff", anna.staff_id, "Anna"), ("ai", None)),
            system_message(waiting, ("waiting", None, None), ("ai", None)),
            system_message(other, ("staff", "s-other", "Ben"), ("ai", None)),
        ]
    )
    assert [r.conversation_id for r in db.held_conversations(anna.staff_id)] == [held]
    db.apply_batch([system_message(held, ("resolved", None, None), ("staff", anna.staff_id))])
    assert db.held_conversations(anna.staff_id) == []


def test_only_silent_old_unheld_guests_expire(db: Any) -> None:
    silent, wrote, escalated, kept, staff_wrote, elsewhere = (db.add_guest(None) for _ in range(6))
    db.apply_batch(
        [
            guest_message(wrote.conversation_id, None),
            system_message(escalated.conversation_id, ("waiting", None, None), None),
            AppendMessage(conversation_id=staff_wrote.conversation_id, sender="staff", text="hi"),
        ]
    )
    later = time.time() + 1
    [expired] = db.apply_batch(
        [
            ExpireSilentGuests(
                before=later,
                keep=frozenset({kept.guest_id}),
                keep_conversations=frozenset({elsewhere.conversation_id}),
            )
        ]
    )
    assert sorted(expired) == sorted([silent.guest_id, staff_wrote.guest_id])
    assert db.conversation_of_guest(silent.guest_id) is None
    assert db.conversation(staff_wrote.conversation_id) is None
    assert db.history(staff_wrote.conversation_id, 0, 10) == []
    for survivor in (wrote, escalated, kept, elsewhere):
        assert db.conversation_of_guest(survivor.guest_id) is not None
    fresh = db.add_guest(None)  # registered after ``before``: never expires
    assert db.apply_batch([ExpireSilentGuests(before=later - 3600)])[0] == []
    assert db.conversation_of_guest(fresh.guest_id) is not None


def test_a_guest_who_writes_in_the_same_batch_does_not_expire(db: Any) -> None:
    row = db.add_guest(None)
    _, expired = db.apply_batch(
        [guest_message(row.conversation_id, "m"), ExpireSilentGuests(before=time.time() + 1)]
    )
    assert expired == [] and db.history(row.conversation_id, 0, 10)[0].text == "hi"


# ------------------------------------------------- PostgreSQL: several nodes, old schemas


def test_a_rotation_or_revocation_on_one_node_is_read_by_the_others(pg_url: str) -> None:
    """Nothing is cached per process: the revocation watcher of every node reads them."""
    admin, node = PostgresBackend(pg_url), PostgresBackend(pg_url)
    before = node.secret()
    anna = admin.add_staff("Anna")
    admin.rotate_secret()
    admin.remove_staff("Anna")
    assert node.secret() == admin.secret() != before
    assert [(r.kind, r.staff_id) for r in node.revocations_since(0)] == [
        ("secret", None),
        ("removed", anna.staff_id),
    ]
    admin.close()
    node.close()


def test_concurrent_revocations_get_distinct_seqs_in_commit_order(pg_url: str) -> None:
    nodes = [PostgresBackend(pg_url) for _ in range(3)]
    for i in range(3):
        nodes[0].add_staff(f"S{i}")

    def revoke(index: int) -> None:
        for _ in range(10):
            nodes[index].revoke_staff(f"S{index}")

    threads = [threading.Thread(target=revoke, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = nodes[0].revocations_since(0)
    assert len(found) == 30 and [r.seq for r in found] == sorted({r.seq for r in found})
    for i in range(3):
        mine = [r.generation for r in found if r.staff_id == nodes[0].list_staff()[i].staff_id]
        assert mine == list(range(1, 11))
    for node in nodes:
        node.close()


def test_a_database_of_the_first_cluster_schema_is_migrated_in_place(pg_url: str) -> None:
    """A database made by the first scale-out release (schema 1: no generations, rooms,
    last sign-ins or revocations) keeps its data and gains what the seam asks."""
    import psycopg

    from trio_chat.server._store_postgres import MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_ts DOUBLE PRECISION NOT NULL)"
        )
        conn.execute(MIGRATIONS[0])
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
        conn.execute("INSERT INTO meta VALUES ('secret', %s)", ("ab" * 32,))
        conn.execute("INSERT INTO staff VALUES ('s-old', 'Olga', 0)")
        conn.execute("INSERT INTO guests VALUES ('g-old', 'Ana', 0)")
        conn.execute(
            "INSERT INTO conversations(conversation_id, guest_id, guest_name, updated_ts) "
            "VALUES ('c-old', 'g-old', 'Ana', 0)"
        )
    backend = PostgresBackend(pg_url)
    assert backend.staff_member("s-old") == StaffMember("s-old", "Olga", 0)
    row = backend.conversation_of_guest("g-old")
    assert row is not None and (row.guest_room, row.last_seen_ts) == (None, 0.0)
    assert backend.secret() == bytes.fromhex("ab" * 32)
    assert backend.revoke_staff("Olga") == StaffMember("s-old", "Olga", 1)
    assert [r.kind for r in backend.revocations_since(0)] == ["revoked"]
    backend.close()
    from trio_chat.server._backends import init_db

    assert f"schema version {len(MIGRATIONS)}" in init_db(pg_url)  # again: nothing to do


def test_two_nodes_touching_the_same_guests_in_opposite_orders_never_deadlock(
    pg_url: str,
) -> None:
    """Guests sign in on two nodes at once (tabs on both): each node's batch touches
    the same guests in its own order; no batch may fail on a deadlock."""
    nodes = [PostgresBackend(pg_url), PostgresBackend(pg_url)]
    guests = [nodes[0].add_guest(None).guest_id for _ in range(8)]
    failures: list[BaseException] = []

    def sign_ins(index: int) -> None:
        order = guests if index == 0 else guests[::-1]
        try:
            for round_ in range(20):
                nodes[index].apply_batch(
                    [TouchGuest(guest_id=g, at=time.time() + round_) for g in order]
                )
        except StorageError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=sign_ins, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for node in nodes:
        node.close()


def test_expiry_never_waits_for_a_sign_in_in_flight_and_spares_that_guest(
    pg_url: str,
) -> None:
    """Another node is signing a silent guest in (its batch holds the guest's row): an
    expiry must neither wait for that batch (it would hold every row it has deleted
    meanwhile, in whatever order the plan visits them, while the sign-in batch locks
    guests in guest order: a deadlock, and one batch fails with ``internal``) nor
    forget the guest being signed in."""
    import psycopg

    expiring = PostgresBackend(pg_url)
    guests = [expiring.add_guest(None).guest_id for _ in range(6)]
    signing_in = guests[3]
    with psycopg.connect(pg_url) as other_node:
        with other_node.transaction():
            other_node.execute(
                "UPDATE guests SET last_seen_ts = %s WHERE guest_id = %s",
                (time.time(), signing_in),
            )
            done = threading.Event()
            forgotten: list[list[str]] = []

            def expire() -> None:
                forgotten.append(
                    expiring.apply_batch([ExpireSilentGuests(before=time.time() + 60)])[0]
                )
                done.set()

            thread = threading.Thread(target=expire)
            thread.start()
            waited = not done.wait(timeout=5)
        thread.join()
    assert not waited, "the expiry waited for the sign-in's batch"
    assert sorted(forgotten[0]) == sorted(g for g in guests if g != signing_in)
    assert expiring.conversation_of_guest(signing_in) is not None
    expiring.close()
