"""The SQLite commit path, measured: what one group-commit batch costs.

Deterministic figures (the same on any machine, whatever else runs):

* statements per batch: every statement the writer connection runs (SQLite's trace
  callback), ``BEGIN`` and ``COMMIT`` included;
* WAL frames per batch, and which B-tree (table or index) each frame belongs to, read
  from the ``-wal`` file's frame headers and SQLite's ``dbstat`` table.

A timed figure beside them (noisy on a shared machine): commit latency per batch in a
writer thread while the main thread keeps the GIL busy as a loaded event loop does.

    python -m tests.server.commit_path_probe [--conversations 10] [--batches 200]

The test ``tests/server/test_store_write_path.py`` asserts bounds on the deterministic
figures with the same helpers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trio_chat.server._store import AppendMessage, Database, Operation

WAL_HEADER = 32
FRAME_HEADER = 24


def guest_message(cid: str, cmid: str, text: str) -> AppendMessage:
    return AppendMessage(
        conversation_id=cid,
        sender="guest",
        author="Guest",
        author_key=f"g:{cid}",
        text=text,
        client_msg_id=cmid,
    )


def concierge_reply(cid: str, answers: int, text: str = "On the first floor.") -> AppendMessage:
    """The concierge's reply to the guest message ``answers`` (its seq)."""
    return AppendMessage(
        conversation_id=cid,
        sender="ai",
        author="concierge",
        text=text,
        expect=("ai", None),
        reply_to=answers,
    )


def staff_joins(cid: str) -> AppendMessage:
    """Olga claims ``cid`` from the concierge (a transition: status and its check)."""
    return AppendMessage(
        conversation_id=cid,
        sender="system",
        text="Olga joined.",
        status=("staff", "s_1", "Olga"),
        expect=("ai", None),
    )


_SQLITE_CALLS = frozenset(
    {"Connection.execute", "Connection.executemany", "Connection.executescript"}
    | {"Cursor.execute", "Cursor.executemany", "Cursor.executescript"}
)


@contextmanager
def counted_statements(db: Database) -> Iterator[list[str]]:
    """Every statement the code run in this thread inside the block hands to
    :mod:`sqlite3` (its ``execute`` calls, by the SQL's first words): each one gives up
    the GIL at least twice (step and reset) and must take it back. Not SQLite's trace
    callback, which also reports each trigger program a statement runs."""
    seen: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__qualname__", "") in _SQLITE_CALLS:
            seen.append(arg.__qualname__)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


def wal_pages(db: Database) -> list[int]:
    """The page number of every frame in the WAL file, in file order (after a
    ``TRUNCATE`` checkpoint, the frames written since)."""
    data = Path(f"{db.path}-wal").read_bytes()
    if len(data) < WAL_HEADER:
        return []
    (page_size,) = struct.unpack(">I", data[8:12])
    pages = []
    for offset in range(WAL_HEADER, len(data), FRAME_HEADER + page_size):
        header = data[offset : offset + FRAME_HEADER]
        if len(header) < FRAME_HEADER:
            break
        pages.append(struct.unpack(">I", header[:4])[0])
    return pages


def reset_wal(db: Database) -> None:
    db.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def page_owners(db: Database) -> dict[int, str]:
    """Which table or index each page of the file belongs to (page 1: the header)."""
    owners = {1: "header"}
    for name, pageno in db.writer.execute("SELECT name, pageno FROM dbstat"):
        owners[pageno] = name
    return owners


@dataclass
class BatchCost:
    batches: int
    messages_per_batch: int
    statements_per_batch: float
    frames_per_batch: float
    frames_by_btree: dict[str, float]


def populate(db: Database, conversations: int, history: int) -> list[str]:
    """Conversations with ``history`` messages each, so that the B-trees have many
    leaves (as in a hotel's file after a while), and every conversation's row and
    sequence already known to the writer."""
    cids = [db.add_guest(f"Guest {i}").conversation_id for i in range(conversations)]
    for round_ in range(history):
        db.apply_batch([guest_message(cid, f"h{round_}-{cid}", "x" * 100) for cid in cids])
    return cids


def measure_batches(
    db: Database, cids: list[str], batches: int, per_conversation: int = 1, tag: str = "b"
) -> BatchCost:
    """``batches`` batches, each one message (100 bytes) per conversation, counted."""
    reset_wal(db)
    with counted_statements(db) as seen:
        for b in range(batches):
            db.apply_batch(
                [
                    guest_message(cid, f"{tag}{b}-{k}-{cid}", "y" * 100)
                    for k in range(per_conversation)
                    for cid in cids
                ]
            )
    pages = wal_pages(db)
    owners = page_owners(db)
    by_btree = Counter(owners.get(p, "free or new") for p in pages)
    return BatchCost(
        batches=batches,
        messages_per_batch=len(cids) * per_conversation,
        statements_per_batch=len(seen) / batches,
        frames_per_batch=len(pages) / batches,
        frames_by_btree={k: v / batches for k, v in sorted(by_btree.items())},
    )


def busy_loop_latencies(
    db: Database, cids: list[str], batches: int, switch_interval: float | None
) -> list[float]:
    """Commit latency of each batch (its ``apply_batch``) in a writer thread while the
    main thread runs Python code and now and then a system call, as a loaded event
    loop does."""
    previous = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    latencies: list[float] = []
    done = threading.Event()

    def writer() -> None:
        for b in range(batches):
            ops: list[Operation[Any]] = [
                guest_message(cid, f"t{switch_interval}-{b}-{cid}", "z" * 100) for cid in cids
            ]
            start = time.perf_counter()
            db.apply_batch(ops)
            latencies.append(time.perf_counter() - start)
        done.set()

    read_end, write_end = os.pipe()
    try:
        thread = threading.Thread(target=writer)
        thread.start()
        spin = 0
        while not done.is_set():
            for _ in range(2_000):  # ~100 µs of bytecode between system calls
                spin += 1
            os.write(write_end, b"x")
            os.read(read_end, 1)
        thread.join()
    finally:
        os.close(read_end)
        os.close(write_end)
        sys.setswitchinterval(previous)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--counts-only", action="store_true", help="leave out the timings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "probe.db", synchronous=args.synchronous)
        cids = populate(db, args.conversations, args.history)
        cost = measure_batches(db, cids, args.batches)
        print(
            f"{cost.messages_per_batch} messages per batch over {args.conversations} "
            f"conversations: {cost.statements_per_batch:.2f} statements, "
            f"{cost.frames_per_batch:.2f} WAL frames per batch"
        )
        for name, frames in cost.frames_by_btree.items():
            print(f"  {name:28} {frames:6.2f} frames per batch")
        if args.counts_only:
            db.close()
            return
        for interval in (None, 0.001, 0.0002):
            lat = busy_loop_latencies(db, cids, args.batches, interval)
            label = f"{sys.getswitchinterval() if interval is None else interval:g} s"
            print(
                f"busy loop, switch interval {label}: commit p50 "
                f"{statistics.median(lat) * 1e3:.2f} ms, mean {statistics.fmean(lat) * 1e3:.2f} "
                f"ms, p90 {statistics.quantiles(lat, n=10)[-1] * 1e3:.2f} ms"
            )
        idle = []
        for b in range(args.batches):
            ops: list[Operation[Any]] = [
                guest_message(cid, f"i{b}-{cid}", "z" * 100) for cid in cids
            ]
            start = time.perf_counter()
            db.apply_batch(ops)
            idle.append(time.perf_counter() - start)
        print(f"idle main thread: commit p50 {statistics.median(idle) * 1e3:.2f} ms")
        db.close()


if __name__ == "__main__":
    main()
