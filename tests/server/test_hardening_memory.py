"""Memory and rate limits end to end: real sockets, a real SQLite file.

Each attack is a plain ``attack_<name>(port)`` that runs against any server on
127.0.0.1:``port`` with the default limits, and asserts the server's answer (close
code, error, its own ``/healthz`` accounting); the tests below run them against a
server in this process and check its counters too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import wsproto

from trio_chat import ChatServer
from trio_chat._cli import build_parser
from trio_chat.bench._peers import BENCH_SERVER_FLAGS

from ..conftest import make_config
from ..helpers import RawClient, SilentPeer, connect

BIG = "x" * 4000  # the longest message text


async def healthz(port: int) -> dict[str, Any]:
    """The server's ``/healthz``, over its own connection."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                data += chunk
    body: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return body


async def new_guest(client: RawClient) -> dict[str, Any]:
    welcome = await client.hello(None, name="Witness")
    assert welcome["type"] == "welcome", welcome
    return welcome


async def chat(client: RawClient, cmid: str, text: str = "still here?") -> None:
    """Say something and be acknowledged promptly, as if nothing else were going on."""
    with trio.fail_after(5):
        await client.send(type="message", client_msg_id=cmid, text=text)
        await client.expect("ack", client_msg_id=cmid)


# -------------------------------------------------------------------------- attacks


async def attack_history_never_read(port: int) -> None:
    """A guest asks for big history pages again and again on a connection that never
    reads (a small receive buffer, no receive at all). The server cuts it off with 1013
    without holding more than its byte limit for it, and a witness guest on another
    connection chats on undisturbed."""
    with trio.fail_after(60):
        before = await healthz(port)
        async with connect(port) as owner, connect(port) as witness:
            welcome = await new_guest(owner)
            await new_guest(witness)
            for n in range(20):  # a conversation of big messages: the default burst
                await chat(owner, f"big{n}", BIG)
            hostile = await SilentPeer.connect(port, receive_buffer=4096)
            await hostile.send(type="hello", token=welcome["token"])
            request = hostile.ws.send(
                wsproto.events.TextMessage(json.dumps({"type": "history", "after_seq": 0}))
            )
            cut = False
            for burst in range(200):
                try:
                    await hostile.stream.send_all(request * 500)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    cut = True
                await chat(witness, f"w{burst}")
                health = await healthz(port)
                if health["closes"].get("1013", 0) > before["closes"].get("1013", 0):
                    cut = True
                if cut:
                    break
            assert cut, "the connection that never reads was never cut off"
            health = await healthz(port)
            assert health["closes"].get("1013", 0) == before["closes"].get("1013", 0) + 1
            # One page (at most 1 MiB) always fits an empty outbox; past that, the limit.
            assert health["outbox_peak_bytes"] <= max(
                health["outbox_limit_bytes"], 1024 * 1024 + 64
            )
            await chat(witness, "after")
            await hostile.stream.aclose()


async def attack_tabs_share_a_bucket(port: int) -> None:
    """Thirteen tabs of one guest send twenty messages each at once: together they
    get the guest's burst (20) and the refill (10/s), not thirteen bursts; the rest is
    refused with ``rate_limited`` and a ``retry_after_ms``."""
    with trio.fail_after(60):
        async with connect(port) as first:
            welcome = await new_guest(first)
            tabs = [first]
            async with trio.open_nursery() as nursery:
                opened: list[RawClient] = []

                async def open_tab(*, task_status: trio.TaskStatus[None]) -> None:
                    async with connect(port) as tab:
                        assert (await tab.hello(welcome["token"]))["type"] == "welcome"
                        opened.append(tab)
                        task_status.started()
                        await done.wait()

                done = trio.Event()
                for _ in range(12):
                    await nursery.start(open_tab)
                tabs += opened
                started = trio.current_time()
                for t, tab in enumerate(tabs):
                    for n in range(20):
                        await tab.send(type="message", client_msg_id=f"t{t}m{n}", text="hi")
                acks = 0
                refused: list[dict[str, Any]] = []
                for tab in tabs:
                    for _ in range(20):
                        answer = await tab.next_of("ack", "error")
                        if answer["type"] == "ack":
                            acks += 1
                        else:
                            refused.append(answer)
                elapsed = trio.current_time() - started
                done.set()
            assert acks <= 20 + 10 * elapsed + 1, (acks, elapsed)
            assert refused and all(
                r["code"] == "rate_limited" and r["retry_after_ms"] > 0 for r in refused
            )


async def attack_typing_flood(port: int) -> None:
    """A thousand ``typing`` frames: each costs a tenth of a token, so past the burst
    they are refused with ``rate_limited``, and the guest's own messages then wait."""
    with trio.fail_after(60):
        async with connect(port) as guest:
            await new_guest(guest)
            for _ in range(1000):
                await guest.send(type="typing", active=True)
            refusal = await guest.expect("error", ref="typing")
            assert refusal["code"] == "rate_limited" and refusal["retry_after_ms"] > 0


# ---------------------------------------------------------------------------- tests


async def start(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> ChatServer:
    srv = ChatServer(make_config(tmp_path, concierge="off", **overrides))
    await nursery.start(srv.run)
    return srv


async def test_a_connection_that_never_reads_is_cut_off_within_the_byte_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limit = 512 * 1024
    srv = await start(nursery, tmp_path, outbox_limit_bytes=limit)
    assert srv.port
    await attack_history_never_read(srv.port)
    assert srv.closes[1013] == 1
    assert 0 < srv.outbox_peak_bytes <= limit
    assert srv.outbox_bytes() == (0, 0)  # nothing left held for anyone
    health = await healthz(srv.port)
    assert (health["outbox_bytes"], health["outbox_limit_bytes"]) == (0, limit)


async def test_big_frames_for_a_tab_that_never_reads_stop_at_the_byte_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Frames of 4 KB: the old bound (256 frames) would let this tab hold 1 MiB.
    limit = 256 * 1024
    srv = await start(nursery, tmp_path, rate_limit=0, outbox_limit_bytes=limit)
    assert srv.port
    async with connect(srv.port) as writer, connect(srv.port) as witness:
        welcome = await new_guest(writer)
        await new_guest(witness)
        hostile = await SilentPeer.connect(srv.port, receive_buffer=4096)
        await hostile.send(type="hello", token=welcome["token"])
        sent = 0
        while not srv.closes[1013]:
            assert sent < 1000, "the tab that never reads was never cut off"
            await chat(writer, f"m{sent}", BIG)
            await hostile.send(type="history", after_seq=0)
            await chat(witness, f"w{sent}")
            assert srv.outbox_bytes()[1] <= limit
            sent += 1
        assert sent > 32  # cut off for bytes, after the kernel's buffers filled
        await hostile.stream.aclose()
    assert 200 * 1024 < srv.outbox_peak_bytes <= limit


async def test_tabs_of_one_guest_share_one_bucket(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, tmp_path)
    assert srv.port
    await attack_tabs_share_a_bucket(srv.port)


async def test_typing_costs_tokens(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, tmp_path)
    assert srv.port
    await attack_typing_flood(srv.port)


async def test_guests_from_one_address_share_its_bucket_unless_it_is_off(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The per-guest limit off, the address's small: the second guest from loopback
    # finds the bucket the first one emptied.
    srv = await start(nursery, tmp_path, rate_limit=0, rate_limit_per_ip=1.0, rate_burst_per_ip=12)
    assert srv.port
    async with connect(srv.port) as first, connect(srv.port) as second:
        await new_guest(first)
        await new_guest(second)
        for n in range(10):
            await chat(first, f"m{n}")
        await second.send(type="message", client_msg_id="over", text="hi")
        refusal = await second.expect("error", ref="over")
        assert refusal["code"] == "rate_limited" and 0 < refusal["retry_after_ms"] <= 1000
    assert (await healthz(srv.port))["rate_buckets"]["addresses"] == 1


async def test_the_address_limit_off_lets_a_crowd_from_one_address_through(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start(nursery, tmp_path, rate_limit=0, rate_limit_per_ip=0, rate_burst_per_ip=1)
    assert srv.port
    async with connect(srv.port) as first, connect(srv.port) as second:
        await new_guest(first)
        await new_guest(second)
        for n in range(30):
            await chat(first, f"a{n}")
            await chat(second, f"b{n}")
    assert (await healthz(srv.port))["rate_buckets"] == {"identities": 0, "addresses": 0}


def test_benchmarks_turn_every_rate_limit_off() -> None:
    args = build_parser().parse_args(["serve", *BENCH_SERVER_FLAGS])
    assert (args.rate_limit, args.rate_limit_per_ip) == (0, 0)
