"""The benchmark's child processes: load generators, baselines and the null server.

Each is ``python -m trio_chat.bench COMMAND --option value ...``; the orchestrator
(``_scenarios``) talks to them through stdin and stdout, one JSON object or marker a
line. The load generators (``load``, ``hold``, ``steady``, ``staff``) and the null
server run on asyncio with the raw connections of ``_loadgen``; so do the storm's
guests, which follow ``ChatClient``'s reconnection rule (``core.backoff.retry_delay``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from ..core import client_protocol as wire
from ..core.backoff import Backoff
from ..server._server import GC_THRESHOLDS
from ._loadgen import DIALECTS, StormGuest, WsClient, field, open_client, serve_null

__all__ = ["main", "worker_args"]

CONNECT_CONCURRENCY: Final = 64
# The storm's load processes yield to the server: in production it has its cores to
# itself. At the server's priority, four of them (of ChatClients then) left it a fifth of
# the benchmark's two cores through the drain and the herd. How late yielding makes them
# act on their guests' timers is measured and reported with each storm (``late_p99``).
STORM_NICENESS: Final = 10


def worker_args(command: str, **options: object) -> list[str]:
    """The arguments of ``python -m trio_chat.bench COMMAND --option value ...``."""
    args = ["-m", "trio_chat.bench", command]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _print(obj: object) -> None:
    print(json.dumps(obj) if not isinstance(obj, str) else obj, flush=True)


async def _stdin_line() -> str:
    loop = asyncio.get_running_loop()
    line: str = await loop.run_in_executor(None, sys.stdin.readline)
    return line


async def _connect_many(
    count: int, url: str, dialect: str, source: str | None, **kwargs: Any
) -> list[WsClient]:
    """``count`` sessions, at most ``CONNECT_CONCURRENCY`` handshakes at a time."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int) -> WsClient:
        async with limit:
            client = await open_client(url, dialect, source=source, **kwargs)
            client.index = index
            return client

    return list(await asyncio.gather(*(one(i) for i in range(count))))


# -------------------------------------------------------------------------- load


async def closed_loop(
    url: str, dialect: str, count: int, duration: float, source: str | None, *, freeze: bool = False
) -> dict[str, Any]:
    """``count`` guests each keep one message in flight and send the next as soon as
    its answer arrives, for ``duration`` seconds; answers after that are not counted.
    ``freeze``: move the connections out of the collector's way once open (a load
    process's own; never in a process that has other work)."""
    latencies: list[float] = []
    done = 0
    deadline = float("inf")
    sent = [0] * count

    def answered(client: WsClient, payload: bytes, now: float) -> None:
        nonlocal done
        if now > deadline:
            return
        latencies.append(now - client.sent_at)
        done += 1
        sent[client.index] += 1
        client.sent_at = now
        number = sent[client.index]
        client.send_message(f"m{number}", f"msg {number % 10000:04d}")

    # Several URLs (comma-separated: the nodes of a cluster) share the guests evenly.
    urls = url.split(",")
    clients = []
    for i, node_url in enumerate(urls):
        share = count // len(urls) + (1 if i < count % len(urls) else 0)
        clients += await _connect_many(share, node_url, dialect, source, on_answer=answered)
    for index, client in enumerate(clients):
        client.index = index
    if freeze:
        gc.freeze()
    started = time.monotonic()
    deadline = started + duration
    for client in clients:
        client.sent_at = started
        client.send_message("m0", "msg 0000")
    await asyncio.sleep(duration)
    for client in clients:
        client.close()
    return {
        "done": done,
        "elapsed": duration,
        "latencies": latencies,
    }


async def hold(url: str, dialect: str, source: str | None) -> None:
    """Hold sessions open, adding ``N`` more on each ``add N`` line on stdin and
    reporting the total; ``stop`` (or end of input) closes them all."""
    clients: list[WsClient] = []
    while True:
        words = (await _stdin_line()).split()
        if len(words) != 2 or words[0] != "add":
            break
        try:
            clients += await _connect_many(int(words[1]), url, dialect, source)
        except (TimeoutError, OSError) as exc:
            _print({"connected": len(clients), "error": repr(exc)})
            continue
        gc.freeze()
        _print({"connected": len(clients)})
    for client in clients:
        client.close()


async def steady(
    url: str, dialect: str, count: int, rate: float, duration: float, source: str | None
) -> None:
    """Open loop: ``count`` guests connect and print their conversations; on ``go``
    they send ``rate`` messages per second in total, round robin, for ``duration``
    seconds, each stamped with its send time (``time.monotonic``, shared by every
    process on the machine), then report each message's ack (or echo) latency."""
    sent_at: dict[bytes, float] = {}
    samples: list[tuple[float, float]] = []
    drained = asyncio.Event()
    all_sent = False

    def answered(client: WsClient, payload: bytes, now: float) -> None:
        cmid = field(payload, b"client_msg_id")
        sent = sent_at.pop(cmid, None) if cmid is not None else None
        if sent is not None:
            samples.append((sent, now - sent))
        if all_sent and not sent_at:
            drained.set()

    clients = await _connect_many(count, url, dialect, source, on_answer=answered)
    conversations = [
        (field(c.welcome, b"conversation_id") or b"").decode() for c in clients if c.welcome
    ]
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    _print({"connected": len(clients), "conversations": conversations})
    await _stdin_line()  # "go"
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    t0 = loop.time()
    total = int(rate * duration)
    for k in range(total):
        # Open loop: each message leaves on its schedule, whatever happened to the ones
        # before it (a closed loop would hide queueing delay).
        delay = t0 + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        cmid = f"s{k}"
        sent_at[cmid.encode()] = now
        clients[k % len(clients)].send_message(cmid, f"steady t={now:.6f}")
    all_sent = True
    if sent_at:
        # What is still unanswered after ten seconds counts as lost.
        with_timeout = asyncio.wait_for(drained.wait(), 10)
        with contextlib.suppress(asyncio.TimeoutError):
            await with_timeout
    for client in clients:
        client.close()
    _print({"started": started, "sent": total, "lost": len(sent_at), "samples": samples})


async def staff(url: str, token: str, conversations: list[str]) -> None:
    """One staff connection watching every conversation in ``conversations``; prints
    ``ready`` once all are watched, then records, for every guest message pushed to it,
    the time since the guest sent it; a line on stdin reports them."""
    samples: list[tuple[float, float]] = []
    subscribed = asyncio.Semaphore(0)
    marker = b"steady t="

    def other(client: WsClient, payload: bytes, now: float) -> None:
        if b'"type":"subscribed"' in payload:
            subscribed.release()
        elif b'"type":"message"' in payload:
            at = payload.find(marker)
            if at >= 0:
                start = at + len(marker)
                sent = float(payload[start : payload.index(b'"', start)])
                samples.append((sent, now - sent))

    console = await open_client(url, "chat", token=token, on_other=other)
    # A bounded number of watches in flight: the server cuts off a connection that
    # lets its replies pile up, and a real console would not flood either.
    in_flight = CONNECT_CONCURRENCY
    for conversation_id in conversations:
        if in_flight == 0:
            await subscribed.acquire()
            in_flight += 1
        console.send_json(wire.staff_action_frame("watch", conversation_id).encode())
        in_flight -= 1
    for _ in range(CONNECT_CONCURRENCY - in_flight):
        await subscribed.acquire()
    _print("ready")
    await _stdin_line()
    console.close()
    _print({"samples": samples})


# ----------------------------------------------------------------------- cluster

RELAY_MARKER: Final = b"relay t="


async def relay(
    send_url: str, watch_url: str, count: int, rate: float, duration: float, source: str | None
) -> None:
    """Delivery latency between two sessions of each guest: ``count`` guests register
    on ``send_url`` and each opens a second session of itself (a second tab: the same
    token) on ``watch_url``; prints ``{"ready": ...}``. On ``go`` the senders send
    ``rate`` messages per second in total (open loop, round robin, each stamped with
    ``time.monotonic``) for ``duration`` seconds; prints every message's latency from
    its sending to its push reaching the watching session, and how many never did."""
    samples: list[tuple[float, float]] = []
    expected = int(rate * duration)
    drained = asyncio.Event()

    def pushed(client: WsClient, payload: bytes, now: float) -> None:
        at = payload.find(RELAY_MARKER)
        if at < 0 or b'"type":"message"' not in payload:
            return
        start = at + len(RELAY_MARKER)
        sent = float(payload[start : payload.index(b'"', start)])
        samples.append((sent, now - sent))
        if len(samples) >= expected:
            drained.set()

    senders = await _connect_many(count, send_url, "chat", source)
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def watcher(sender: WsClient) -> WsClient:
        token = (field(sender.welcome, b"token") or b"").decode()
        async with limit:
            return await open_client(watch_url, "chat", token=token, source=source, on_other=pushed)

    watchers = await asyncio.gather(*(watcher(s) for s in senders))
    resumed = sum(
        field(w.welcome, b"conversation_id") == field(s.welcome, b"conversation_id")
        for s, w in zip(senders, watchers, strict=True)
    )
    gc.freeze()
    _print({"ready": True, "guests": count, "resumed": resumed})
    await _stdin_line()  # "go"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k in range(expected):
        delay = t0 + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        senders[k % count].send_message(f"r{k}", f"relay t={now:.6f}")
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drained.wait(), 10)
    for client in (*senders, *watchers):
        client.close()
    _print({"sent": expected, "lost": expected - len(samples), "samples": samples})


async def failover(urls: list[str], count: int, source: str | None, within: float) -> None:
    """Recovery after a node dies: ``count`` guests, half on each of the two ``urls``,
    each registered and with one message acknowledged (the first half's time for that
    is printed: the baseline). Then, when a guest's connection drops, it goes to the
    other URL at once (at most ``CONNECT_CONCURRENCY`` handshakes at a time, as at the
    start), resumes with its token and sends one message; it is back when that is
    acknowledged. Prints, once as many guests are back as were on the first URL (or
    after ``within`` seconds), when each dropped guest lost its connection and was back
    (``time.monotonic``, shared by every process on the machine)."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    acked: dict[int, asyncio.Future[None]] = {}

    def answered(client: WsClient, payload: bytes, now: float) -> None:
        future = acked.get(client.index)
        if future is not None and not future.done():
            future.set_result(None)

    async def signed_in(url: str, index: int, token: str | None = None) -> WsClient:
        async with limit:
            client = await open_client(url, "chat", token=token, source=source, on_answer=answered)
        client.index = index
        acked[index] = asyncio.get_running_loop().create_future()
        client.send_message(f"f{index}.{time.monotonic_ns()}", "are you there?")
        await asyncio.wait_for(acked[index], within)
        return client

    first_half = count - count // 2
    started = time.monotonic()
    doomed = await asyncio.gather(*(signed_in(urls[0], i) for i in range(first_half)))
    first_sign_in = time.monotonic() - started
    survivors = await asyncio.gather(*(signed_in(urls[1], i) for i in range(first_half, count)))
    lost: list[float] = []
    back: list[float] = []
    moved_elsewhere = 0  # resumed into another conversation: must stay 0
    all_back = asyncio.Event()

    async def come_back(client: WsClient) -> None:
        nonlocal moved_elsewhere
        await client.closed
        lost_at = time.monotonic()
        token = (field(client.welcome, b"token") or b"").decode()
        again = await signed_in(urls[1], client.index, token)
        if field(again.welcome, b"conversation_id") != field(client.welcome, b"conversation_id"):
            moved_elsewhere += 1
        survivors.append(again)
        lost.append(lost_at)
        back.append(time.monotonic())
        if len(back) == len(doomed):
            all_back.set()

    gc.freeze()
    waiting = [asyncio.ensure_future(come_back(c)) for c in doomed]
    _print({"ready": True, "first_sign_in_s": first_sign_in, "on_doomed_node": len(doomed)})
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(all_back.wait(), within)
    for task in waiting:
        task.cancel()
    for client in (*doomed, *survivors):
        client.close()
    _print({"lost": lost, "back": back, "moved_elsewhere": moved_elsewhere,
            "missing": len(doomed) - len(back)})  # fmt: skip


async def null_server(dialect: str, port: int) -> None:
    server = await serve_null(dialect, "127.0.0.1", port)
    _print("listening")
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- the baselines


async def _trio_websocket_echo(port: int) -> None:
    import trio
    import trio_websocket

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler, "127.0.0.1", port, ssl_context=None, task_status=task_status
            )
        )
        _print("listening")


async def _websockets_echo(port: int) -> None:
    """The second baseline: an echo server on the ``websockets`` library (asyncio)."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass  # the load generator goes without a closing handshake

    async with serve(echo, "127.0.0.1", port, backlog=4096):
        _print("listening")
        await asyncio.Future()


# --------------------------------------------------------------------- the storm


async def _storm(url: str, count: int, jitter: str, spread: float, source: str | None) -> None:
    """Keep ``count`` reconnecting guests; print ``ready`` once all are connected, then
    ``back`` once every one of them has come back (reconnected and caught up) after it
    was last dropped; on ``report SINCE`` print their attempts, returns (wall clock)
    and how late the process woke them, after SINCE."""
    os.nice(STORM_NICENESS)
    guests = [
        StormGuest(
            url,
            Backoff(
                initial=0.5,
                max=10,
                jitter=jitter,  # type: ignore[arg-type]
                spread=spread,
                seed=i * 7919 + os.getpid(),
            ),
            source=source,
        )
        for i in range(count)
    ]
    everyone_back = asyncio.Event()
    waiting = {id(guest) for guest in guests}

    def on_back(guest: StormGuest) -> None:
        waiting.discard(id(guest))
        if not waiting:
            everyone_back.set()

    for guest in guests:
        guest.on_back = on_back
    pacing = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks = [asyncio.create_task(guest.run(pacing)) for guest in guests]
    while not all(guest.synced for guest in guests):
        done = [t for t in tasks if t.done()]
        if done:
            done[0].result()  # a guest gave up or failed: say why
            raise RuntimeError("a storm guest stopped")
        await asyncio.sleep(0.05)
    # A load process that pauses to collect garbage acts on its guests' timers late
    # and all at once: its own burst, not the policy's. A storm's process lives for one
    # restart, so it collects nothing (with ChatClients, young-generation collections
    # paused each load process for 90-300 ms about once a second through the herd).
    gc.freeze()
    gc.disable()
    _print("ready")
    await everyone_back.wait()
    _print("back")
    since = float((await _stdin_line()).split()[1])
    _print(
        {
            "attempts": [t for g in guests for t in g.attempts if t >= since],
            "back": [min((t for t in g.returns if t >= since), default=0.0) for g in guests],
            "late": [late for g in guests if (late := first_lateness(g, since)) is not None],
        }
    )
    for task in tasks:
        task.cancel()


def first_lateness(guest: StormGuest, since: float) -> float | None:
    """How much later than its backoff said the load process woke ``guest`` for its
    first attempt after ``since`` (None if it made none): the process's own delay."""
    return next((late for wall, late in guest.lateness if wall >= since), None)


# ---------------------------------------------------------------------------- CLI


def _run_asyncio(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop (libuv's loop: about half the generator's cost per frame
    of asyncio's own, measured in docs/benchmarks.md) where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _print_result(coro: Coroutine[Any, Any, dict[str, Any]]) -> None:
    _print(await coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_chat.bench")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, *, url: bool = True, dialect: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name)
        if url:
            sub.add_argument("--url", required=True)
        if dialect:
            sub.add_argument("--dialect", choices=DIALECTS, required=True)
        return sub

    load = command("load")
    load.add_argument("--count", type=int, required=True)
    load.add_argument("--duration", type=float, required=True)
    load.add_argument("--source", default=None, help="local address to connect from")
    held = command("hold")
    held.add_argument("--source", default=None)
    stead = command("steady")
    stead.add_argument("--count", type=int, required=True)
    stead.add_argument("--rate", type=float, required=True)
    stead.add_argument("--duration", type=float, required=True)
    stead.add_argument("--source", default=None)
    console = command("staff", dialect=False)
    console.add_argument("--token", required=True)
    console.add_argument("--conversations", required=True, help="file: one id per line")
    null = command("null-server", url=False)
    null.add_argument("--port", type=int, required=True)
    echo = command("echo-server", url=False, dialect=False)
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--engine", choices=["trio-websocket", "websockets"], required=True)
    relayed = command("relay", url=False, dialect=False)
    relayed.add_argument("--send-url", required=True)
    relayed.add_argument("--watch-url", required=True)
    relayed.add_argument("--count", type=int, required=True)
    relayed.add_argument("--rate", type=float, required=True)
    relayed.add_argument("--duration", type=float, required=True)
    relayed.add_argument("--source", default=None)
    failing = command("failover", dialect=False)
    failing.add_argument("--count", type=int, required=True)
    failing.add_argument("--within", type=float, default=120.0)
    failing.add_argument("--source", default=None)
    storm = command("storm", dialect=False)
    storm.add_argument("--count", type=int, required=True)
    storm.add_argument("--jitter", choices=["none", "full", "equal", "decorrelated"])
    storm.add_argument("--spread", type=float, default=0.0)
    storm.add_argument("--source", default=None, help="local address to connect from")
    args = parser.parse_args(argv)
    if args.command in ("null-server", "echo-server"):
        # The baselines run under trio-chat serve's collector policy: with thousands of
        # connections, CPython's defaults pause for up to a second (seen: the echo's
        # p99 at 1 s under the steady load), which would flatter every ratio.
        gc.set_threshold(*GC_THRESHOLDS)
    if args.command == "load":
        _run_asyncio(
            _print_result(
                closed_loop(
                    args.url, args.dialect, args.count, args.duration, args.source, freeze=True
                )
            )
        )
    elif args.command == "hold":
        _run_asyncio(hold(args.url, args.dialect, args.source))
    elif args.command == "steady":
        _run_asyncio(
            steady(args.url, args.dialect, args.count, args.rate, args.duration, args.source)
        )
    elif args.command == "staff":
        _run_asyncio(staff(args.url, args.token, Path(args.conversations).read_text().split()))
    elif args.command == "relay":
        _run_asyncio(
            relay(args.send_url, args.watch_url, args.count, args.rate, args.duration, args.source)
        )
    elif args.command == "failover":
        _run_asyncio(failover(args.url.split(","), args.count, args.source, args.within))
    elif args.command == "null-server":
        _run_asyncio(null_server(args.dialect, args.port))
    elif args.command == "echo-server" and args.engine == "websockets":
        _run_asyncio(_websockets_echo(args.port))
    elif args.command == "echo-server":
        import trio

        trio.run(_trio_websocket_echo, args.port)
    else:
        import trio

        _run_asyncio(_storm(args.url, args.count, args.jitter, args.spread, args.source))
    return 0
