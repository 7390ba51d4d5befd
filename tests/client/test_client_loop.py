"""The client's reconnect loop in virtual time (MockClock), against scripted peers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
import trio_websocket

from trio_chat import AuthenticationFailed, Backoff, ChatClient, ClientEvent

from ..helpers import free_port

Behaviour = Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]


def welcome(heartbeat: float = 0) -> str:
    return json.dumps(
        {
            "type": "welcome",
            "role": "guest",
            "token": "g.x.y",
            "guest_id": "g_x",
            "conversation_id": "c_x",
            "status": "ai",
            "last_seq": 0,
            "read_seq": 0,
            "heartbeat_s": heartbeat,
            "server": "scripted",
        }
    )


class Script:
    """A WebSocket server whose n-th connection follows ``behaviours[n]`` (the last one
    repeats); :attr:`seen` holds the Trio time of every connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[float] = []
        self.arrived = trio.Event()

    async def connections(self, count: int) -> list[float]:
        """Wait until ``count`` connections have arrived; returns their times."""
        while len(self.seen) < count:
            self.arrived = trio.Event()
            await self.arrived.wait()
        return self.seen


async def serve_script(nursery: trio.Nursery, behaviours: list[Behaviour]) -> tuple[int, Script]:
    script = Script()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        script.seen.append(trio.current_time())
        script.arrived.set()
        behaviour = behaviours[min(len(script.seen), len(behaviours)) - 1]
        try:
            await ws.get_message()  # hello
            await behaviour(ws)
        except trio_websocket.ConnectionClosed:
            pass

    await nursery.start(
        lambda task_status: trio_websocket.serve_websocket(
            handler, "127.0.0.1", script.port, ssl_context=None, task_status=task_status
        )
    )
    return script.port, script


def closes_with(code: int, *frames: dict[str, Any]) -> Behaviour:
    async def behaviour(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome())
        for frame in frames:
            await ws.send_message(json.dumps(frame))
        await ws.aclose(code)

    return behaviour


async def stays(ws: trio_websocket.WebSocketConnection) -> None:
    await ws.send_message(welcome())
    await trio.sleep_forever()


def waits(events: list[ClientEvent]) -> list[float]:
    return [e.data["delay"] for e in events if e.kind == "state" and "delay" in e.data]


async def test_delays_are_actually_slept_against_a_refused_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    port = free_port()  # nothing listens here
    backoff = Backoff(initial=1, factor=2, max=60, jitter="none", max_attempts=6)
    async with ChatClient(f"ws://127.0.0.1:{port}/ws", backoff=backoff) as client:
        started = trio.current_time()
        await client.wait_for_state("closed")
    attempts = [
        e.at
        for e in client.event_log
        if e.kind == "state" and e.data["state"] == "connecting" and "delay" not in e.data
    ]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(attempts)]
    assert gaps == [1, 2, 4, 8, 16, 32]
    assert waits(list(client.event_log)) == [1, 2, 4, 8, 16, 32]
    assert client.close_reason == "gave up after 7 attempts"
    assert trio.current_time() - started == pytest.approx(63)


async def test_a_restart_hint_replaces_the_backoff(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port, script = await serve_script(
        nursery,
        [
            closes_with(1012, {"type": "reconnect", "after_ms": 60_000, "reason": "restart"}),
            stays,
        ],
    )
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws", backoff=Backoff(initial=0.1, jitter="none", seed=1)
    ) as client:
        with trio.fail_after(120):
            seen = await script.connections(2)
        # The hint, plus at most half a second: a server's own spread of hints over a
        # window is kept (20 % of a minute would be 12 s).
        assert 60.0 <= seen[1] - seen[0] <= 60.0 + 0.5 + 0.1
        assert client.last_close_code == 1012


def hints_then_closes_late(after_ms: int, closes_after: float) -> Behaviour:
    """A draining server: the hint goes out at once, the close ``closes_after`` later."""

    async def behaviour(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome())
        await ws.send_message(
            json.dumps({"type": "reconnect", "after_ms": after_ms, "reason": "restart"})
        )
        await trio.sleep(closes_after)
        await ws.aclose(1012)

    return behaviour


@pytest.mark.parametrize(
    ("after_ms", "closes_after", "back_after"),
    [
        (10_000, 6.0, 10.0),  # the wait counts from the hint, not from the close
        (2_000, 6.0, 6.0),  # a hint already over when the close comes: back at once
    ],
)
async def test_a_restart_hint_counts_from_its_arrival(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    after_ms: int,
    closes_after: float,
    back_after: float,
) -> None:
    port, script = await serve_script(
        nursery, [hints_then_closes_late(after_ms, closes_after), stays]
    )
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws", backoff=Backoff(initial=0.1, jitter="none", seed=1)
    ) as client:
        with trio.fail_after(60):
            seen = await script.connections(2)
        jitter = min(after_ms / 1000 * 0.2, 0.5)
        assert back_after <= seen[1] - seen[0] <= back_after + jitter + 0.1
        assert client.last_close_code == 1012


async def test_overload_sets_a_floor_under_the_backoff(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port, script = await serve_script(
        nursery,
        [
            closes_with(1013, {"type": "reconnect", "after_ms": 4000, "reason": "busy"}),
            closes_with(1011),
            stays,
        ],
    )
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws", backoff=Backoff(initial=0.5, jitter="none")
    ) as client:
        with trio.fail_after(60):
            seen = await script.connections(3)
        assert seen[1] - seen[0] >= 4.0  # at least after_ms, though the backoff said 0.5
        assert 1.0 <= seen[2] - seen[1] < 2.0  # 1011: plain backoff (second delay, 1 s)
        await client.wait_for_state("connected")


async def test_4401_stops_for_good_and_fails_waiting_sends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def refuse(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(
            json.dumps(
                {"type": "error", "code": "auth_failed", "message": "unknown guest", "ref": "hello"}
            )
        )
        await ws.aclose(4401)

    port, script = await serve_script(nursery, [refuse])
    async with ChatClient(f"ws://127.0.0.1:{port}/ws", token="g.a.b") as client:
        with pytest.raises(AuthenticationFailed):
            await client.send("hello")
        await trio.sleep(3600)  # an hour later: still no retry
        assert len(script.seen) == 1 and client.state == "closed"


async def test_backoff_resets_after_a_healthy_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def short_lived(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome())
        await ws.aclose(1011)

    async def long_lived(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome())
        await trio.sleep(30)
        await ws.aclose(1011)

    port, script = await serve_script(
        nursery, [short_lived, short_lived, short_lived, long_lived, short_lived, stays]
    )
    backoff = Backoff(initial=1, factor=2, jitter="none")
    async with ChatClient(f"ws://127.0.0.1:{port}/ws", backoff=backoff, healthy_after=10) as client:
        with trio.fail_after(300):
            await script.connections(6)
    delays = waits(list(client.event_log))
    # Growing while connections die at once; after a 30 s healthy one, back to 1 s.
    assert delays[:3] == [1, 2, 4]
    assert delays[3] == 1 and delays[4] == 2


async def test_reconnect_now_skips_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    port = free_port()
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws", backoff=Backoff(initial=100, max=100, jitter="none")
    ) as client:
        while not waits(list(client.event_log)):
            await client.wait_for_state("connecting")
            await trio.lowlevel.checkpoint()
        before = trio.current_time()
        client.reconnect_now()
        await trio.sleep(1)
        attempts = [
            e
            for e in client.event_log
            if e.kind == "state" and "delay" not in e.data and e.data["state"] == "connecting"
        ]
        assert len(attempts) == 2 and attempts[1].at - before < 1


async def test_silence_is_noticed_within_two_heartbeats(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome(heartbeat=20))
        await trio.sleep_forever()  # reads nothing, answers nothing: a dead link

    port, script = await serve_script(nursery, [silent, stays])
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws", backoff=Backoff(initial=1, jitter="none")
    ) as client:
        await client.wait_for_state("connected")
        connected = trio.current_time()
        await client.wait_for_state("reconnecting")
        assert trio.current_time() - connected <= 2 * 20
        assert client.last_close_code is None or client.last_close_code == 1006
        with trio.fail_after(10):
            await client.wait_for_state("connected")
        assert len(script.seen) == 2


async def test_a_connect_that_hangs_mid_handshake_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """trio-websocket's connect waits for ever if the peer stalls mid-handshake."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def stall(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, stall, listeners)
    async with ChatClient(
        f"ws://127.0.0.1:{port}/ws",
        connect_timeout=5,
        backoff=Backoff(initial=1, jitter="none", max_attempts=2),
    ) as client:
        await client.wait_for_state("closed")
    ended = [e for e in client.event_log if e.kind == "closed"]
    assert [e.data["reason"] for e in ended] == ["connect timed out"] * 3
    assert len(held) == 3


async def test_the_default_policy_spreads_the_first_retry_after_a_crash_over_5_s(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def crashes_after_a_while(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(welcome())
        await trio.sleep(30)
        await ws.aclose(1011)

    port, _ = await serve_script(nursery, [crashes_after_a_while])
    first_retries: list[float] = []
    for _ in range(20):
        async with ChatClient(f"ws://127.0.0.1:{port}/ws", healthy_after=10) as client:
            await client.wait_for_state("reconnecting")
        first_retries.append(waits(list(client.event_log))[0])
    # A crowd dropped at once comes back over 5 s, not within the 0.5 s of full jitter.
    assert all(0 <= delay <= 5 for delay in first_retries)
    assert max(first_retries) > 2.5
