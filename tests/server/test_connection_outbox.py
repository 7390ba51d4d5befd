"""A connection's outbox takes a run of frames at once (a commit's ack and pushes for one
session): each still its own WebSocket frame, in order, and whether the connection is
too far behind decided for the run as a whole, never half of it queued."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from trio_chat.core.protocol import CloseCode
from trio_chat.server._connection import Connection
from trio_chat.server._wire import text_frame


def corked_connection(limit_bytes: int = 1 << 20, limit_frames: int = 100) -> Connection:
    """A connection whose writes are held back, as inside a commit's callbacks (the
    server's ``corked`` list): the outbox can be looked at."""
    stream = SimpleNamespace(held_back=0)
    server: Any = SimpleNamespace(
        config=SimpleNamespace(outbox_limit_bytes=limit_bytes, outbox_limit=limit_frames),
        outbox_peak_bytes=0,
        corked=[],
    )
    return Connection(server, SimpleNamespace(stream=stream), None, 1)  # type: ignore[arg-type]


def queued(conn: Connection) -> list[bytes]:
    return list(conn._outbox or ())


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536])
def test_a_run_queues_each_frame_as_text_frame_would_in_order(size: int) -> None:
    conn = corked_connection(limit_bytes=1 << 30)
    frames = ["a" * size, "é", "z" * 3]
    conn.deliver_all(frames)
    assert queued(conn) == [text_frame(f) for f in frames]
    assert conn.queued_bytes == conn.enqueued_bytes == sum(len(text_frame(f)) for f in frames)
    assert conn.server.corked == [conn]  # written once, at the end of the callbacks
    conn.deliver("next")
    assert queued(conn)[-1] == text_frame("next") and conn.server.corked == [conn]


def test_a_run_that_does_not_fit_behind_what_waits_is_not_queued_at_all() -> None:
    first = text_frame("x" * 100)
    conn = corked_connection(limit_bytes=len(first) + 150)
    conn.deliver("x" * 100)
    conn.deliver_all(["y" * 60, "z" * 60, "w" * 60])  # 186 bytes: over by the third
    assert queued(conn) == [first]
    assert conn.close_code == CloseCode.TRY_LATER


def test_a_run_that_fits_behind_what_waits_is_queued_whole() -> None:
    conn = corked_connection(limit_bytes=400)
    conn.deliver("x" * 100)
    conn.deliver_all(["y" * 60, "z" * 60, "w" * 60])
    assert len(queued(conn)) == 4 and conn.close_code is None


def test_the_frame_count_limit_counts_each_frame_of_a_run() -> None:
    conn = corked_connection(limit_frames=3)
    conn.deliver("a")
    conn.deliver_all(["b", "c", "d"])  # would make four
    assert queued(conn) == [text_frame("a")] and conn.close_code == CloseCode.TRY_LATER
    conn = corked_connection(limit_frames=3)
    conn.deliver("a")
    conn.deliver_all(["b", "c"])
    assert len(queued(conn)) == 3 and conn.close_code is None


def test_an_empty_outbox_takes_a_run_whatever_its_size_and_a_closing_one_nothing() -> None:
    conn = corked_connection(limit_bytes=10)
    conn.deliver_all(["a" * 50, "b" * 50])
    assert len(queued(conn)) == 2 and conn.close_code is None
    conn.request_close(CloseCode.NORMAL, "bye")
    conn.deliver_all(["c"])
    conn.deliver_all([])
    assert len(queued(conn)) == 2
