"""Benchmarks: every figure beside a baseline measured in the same run.

The orchestrator starts the server under test and a bare trio-websocket server as
subprocesses, drives them from separate load-generator processes (loopback only), and
reports each figure with its baseline as a ratio. Run ``trio-chat bench --help``.

Scenarios:

* ``idle``: N authenticated guests connected and idle; server RSS per connection above
  its own baseline, beside a bare trio-websocket server holding N connections.
* ``throughput``: G guests sending as fast as acks allow (concierge off and on, no rate
  limit), then 4 G (saturating both servers); acknowledged messages per second and ack
  latency, beside the same clients doing round trips against a bare trio-websocket
  echo server (and a ``websockets`` one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio
import trio_websocket

from ._admin import create_staff_token
from ._cli import SERVER_GC_THRESHOLDS
from ._client import CRASH_SPREAD
from ._processes import ServerProcess, free_port, python_process, wait_for_marker
from ._stats import per_interval, percentile

__all__ = ["main"]

CONNECT_CONCURRENCY = 64


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _worker_args(command: str, **options: object) -> list[str]:
    """The arguments of ``python -m trio_chat._bench COMMAND --option value ...``."""
    args = ["-m", "trio_chat._bench", command]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    return args


@asynccontextmanager
async def _chat_server(tmp: Path, port: int, concierge: str = "off") -> AsyncIterator[trio.Process]:
    args = [
        "-m",
        "trio_chat",
        "serve",
        "--port",
        str(port),
        "--db",
        str(tmp / "bench.db"),
        "--concierge",
        concierge,
        "--typing-delay",
        "0",
        "--rate-limit",
        "0",
        "--heartbeat",
        "0",
    ]
    async with python_process(args, f":{port}/ws".encode()) as proc:
        yield proc


@asynccontextmanager
async def _bare_server(port: int, engine: str = "trio-websocket") -> AsyncIterator[trio.Process]:
    args = _worker_args("bare-server", port=port, engine=engine)
    async with python_process(args, b"listening") as proc:
        yield proc


async def _read_json_line(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    buffer = b""
    # Skip blank lines: a marker's newline can trail behind it in the pipe.
    while b"\n" not in buffer.lstrip(b"\n"):
        chunk = await proc.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"load generator exited: {buffer.decode(errors='replace')}")
        buffer += chunk
    line = buffer.lstrip(b"\n").split(b"\n", 1)[0]
    try:
        result: dict[str, Any] = json.loads(line)
    except ValueError:
        raise RuntimeError(f"expected JSON from a worker, got {line[:300]!r}") from None
    return result


# ------------------------------------------------------------------ load workers


async def _open(
    url: str, nursery: trio.Nursery, source: str | None = None
) -> trio_websocket.WebSocketConnection:
    """A client WebSocket to ``url``, from the local address ``source`` if given (one
    address has only about 28,000 ephemeral ports towards one server port)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    resource = parts.path or "/"
    # trio-websocket's connect can hang if the peer closes mid-handshake: bound it.
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(host, parts.port or 80, local_address=source)
        try:
            return await trio_websocket.wrap_client_stream(nursery, stream, host, resource)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise


def _source_address(index: int) -> str:
    """The loopback source address of load process ``index``: 127.0.0.2, .3, ..."""
    return f"127.0.0.{2 + index % 250}"


async def _storm_worker(url: str, count: int, jitter: str, spread: float) -> None:
    """Keep ``count`` reconnecting guests; print ``ready`` once all are connected, then
    ``back`` once every one of them has come back (connected and resynced) after it was
    last dropped; on ``report SINCE`` print their attempts (wall clock) and return
    times after SINCE."""
    from ._backoff import Backoff
    from ._client import ChatClient

    clients = [
        ChatClient(
            url,
            heartbeat=0,
            connect_timeout=10,
            backoff=Backoff(
                initial=0.5,
                max=10,
                jitter=jitter,  # type: ignore[arg-type]
                spread=spread,
                seed=i * 7919 + os.getpid(),
            ),
        )
        for i in range(count)
    ]
    connecting = trio.Semaphore(CONNECT_CONCURRENCY)

    async def run(client: ChatClient, task_status: trio.TaskStatus[None]) -> None:
        await connecting.acquire()
        async with client:
            try:
                await client.wait_for_state("connected")
            finally:
                connecting.release()
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for client in clients:
                starting.start_soon(nursery.start, run, client)
        # A load process that pauses to collect garbage acts on its clients' timers late
        # and all at once: its own burst, not the policy's. The thousands of clients set
        # up so far are long-lived: out of the collector's way.
        gc.freeze()
        gc.set_threshold(*SERVER_GC_THRESHOLDS)
        print("ready", flush=True)
        await _wait_all_back(clients)
        print("back", flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        since = float(line.split()[1])
        attempts = [
            e.wall
            for c in clients
            for e in c.event_log
            if e.kind == "state"
            and e.data["state"] in ("connecting", "reconnecting")
            and "delay" not in e.data
            and e.wall >= since
        ]
        back = [
            min(
                (
                    e.wall
                    for e in c.event_log
                    if e.kind == "state" and e.data["state"] == "connected" and e.wall >= since
                ),
                default=0.0,
            )
            for c in clients
        ]
        print(json.dumps({"attempts": attempts, "back": back}), flush=True)
        nursery.cancel_scope.cancel()


async def _wait_all_back(clients: list[Any]) -> None:
    for client in clients:
        await client.wait_until(lambda c=client: c.reconnects >= 1 and c.synced)


async def _stdin_line() -> str:
    line: str = await trio.to_thread.run_sync(sys.stdin.readline)
    return line


async def _hello(
    ws: trio_websocket.WebSocketConnection, token: str | None = None
) -> dict[str, Any]:
    """Say hello; returns the ``welcome`` frame."""
    await ws.send_message(json.dumps({"type": "hello", "token": token}))
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame.get("type") == "welcome":
            return frame
        if frame.get("type") == "error":
            raise RuntimeError(f"hello refused: {frame}")


async def _hold_worker(url: str, protocol: str, source: str | None) -> None:
    """Hold connections open, adding ``N`` more on each ``add N`` line on stdin and
    reporting the total; ``stop`` (or end of input) closes them all."""
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    connected = 0

    async def one(nursery: trio.Nursery) -> None:
        nonlocal connected
        async with limiter:
            ws = await _open(url, nursery, source)
            if protocol == "chat":
                await _hello(ws)
            connected += 1

    async with trio.open_nursery() as nursery:
        while True:
            words = (await _stdin_line()).split()
            if len(words) != 2 or words[0] != "add":
                break
            async with trio.open_nursery() as connecting:
                for _ in range(int(words[1])):
                    connecting.start_soon(one, nursery)
            print(json.dumps({"connected": connected}), flush=True)
        nursery.cancel_scope.cancel()


async def _steady_worker(
    url: str, count: int, protocol: str, rate: float, duration: float, source: str | None
) -> None:
    """Open-loop load: ``count`` guests connect and print their conversations; on
    ``go`` they send ``rate`` messages per second in total, round robin, for
    ``duration`` seconds, each stamped with its send time (``time.monotonic``, shared
    by every process on the machine), then report each message's ack (or echo)
    latency."""
    sent_at: dict[str, float] = {}
    samples: list[tuple[float, float]] = []  # (sent, latency)
    all_sent = trio.Event()
    drained = trio.Event()

    async def read(ws: trio_websocket.WebSocketConnection) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                raw = await ws.get_message()
                now = time.monotonic()
                if protocol == "echo" or '"type":"ack"' in raw:
                    cmid = json.loads(raw)["client_msg_id"]
                else:
                    continue
                sent = sent_at.pop(cmid, None)
                if sent is not None:
                    samples.append((sent, now - sent))
                if all_sent.is_set() and not sent_at:
                    drained.set()

    connections: list[trio_websocket.WebSocketConnection] = []
    conversations: list[str] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def connect(nursery: trio.Nursery) -> None:
        async with limiter:
            ws = await _open(url, nursery, source)
            if protocol == "chat":
                conversations.append((await _hello(ws))["conversation_id"])
            connections.append(ws)
            nursery.start_soon(read, ws)

    async def send(ws: trio_websocket.WebSocketConnection, cmid: str) -> None:
        sent = time.monotonic()
        sent_at[cmid] = sent
        text = json.dumps(
            {"type": "message", "client_msg_id": cmid, "text": f"steady t={sent:.6f}"}
        )
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.send_message(text)

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as connecting:
            for _ in range(count):
                connecting.start_soon(connect, nursery)
        print(json.dumps({"connected": len(connections), "conversations": conversations}))
        sys.stdout.flush()
        await _stdin_line()  # "go"
        started = time.monotonic()
        t0 = trio.current_time()
        total = int(rate * duration)
        async with trio.open_nursery() as sending:
            for k in range(total):
                # Open loop: each message leaves on its schedule, whatever happened to
                # the ones before it (a closed loop would hide queueing delay).
                await trio.sleep_until(t0 + k / rate)
                sending.start_soon(send, connections[k % len(connections)], f"s{k}")
        all_sent.set()
        if sent_at:
            with trio.move_on_after(10):  # what is still unanswered then counts as lost
                await drained.wait()
        nursery.cancel_scope.cancel()
    print(
        json.dumps({"started": started, "sent": total, "lost": len(sent_at), "samples": samples}),
        flush=True,
    )


async def _staff_worker(url: str, token: str, conversations: list[str]) -> None:
    """One staff connection watching every conversation in ``conversations``; prints
    ``ready`` once all are watched, then records, for every guest message pushed to it,
    the time since the guest sent it; ``stop`` on stdin reports them."""
    samples: list[tuple[float, float]] = []
    subscribed = trio.Semaphore(0)

    async with trio.open_nursery() as nursery:
        ws = await _open(url, nursery)
        await _hello(ws, token)

        async def read() -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    raw = await ws.get_message()
                    now = time.monotonic()
                    if '"type":"subscribed"' in raw:
                        subscribed.release()
                    elif '"type":"message"' in raw and "steady t=" in raw:
                        sent = float(json.loads(raw)["text"].rsplit("t=", 1)[1])
                        samples.append((sent, now - sent))

        nursery.start_soon(read)
        # A bounded number of watches in flight: the server cuts off a connection that
        # lets its replies pile up, and a real console would not flood either.
        in_flight = trio.Semaphore(CONNECT_CONCURRENCY)
        for conversation_id in conversations:
            await in_flight.acquire()
            await ws.send_message(json.dumps({"type": "watch", "conversation_id": conversation_id}))
            nursery.start_soon(_release_after, subscribed, in_flight)
        for _ in range(CONNECT_CONCURRENCY):
            await in_flight.acquire()
        print("ready", flush=True)
        await _stdin_line()
        nursery.cancel_scope.cancel()
    print(json.dumps({"samples": samples}), flush=True)


async def _release_after(event: trio.Semaphore, slot: trio.Semaphore) -> None:
    await event.acquire()
    slot.release()


async def _load_worker(url: str, count: int, protocol: str, duration: float) -> None:
    """``count`` clients each send, wait for the ack (or echo), repeat; report totals."""
    latencies: list[float] = []
    done = 0
    start = trio.Event()

    async def one(nursery: trio.Nursery, index: int) -> None:
        nonlocal done
        ws = await _open(url, nursery)
        if protocol == "chat":
            await ws.send_message(json.dumps({"type": "hello", "token": None}))
            await ws.get_message()
        ready.release()
        await start.wait()
        deadline = trio.current_time() + duration
        i = 0
        while trio.current_time() < deadline:
            cmid = f"b{index}-{i}"
            frame = json.dumps({"type": "message", "client_msg_id": cmid, "text": f"msg {i}"})
            sent = time.perf_counter()
            await ws.send_message(frame)
            if protocol == "chat":
                # The echo clients parse nothing; the chat clients only spot their ack,
                # so the load generator costs the same on both sides.
                ack = f'"type":"ack","client_msg_id":"{cmid}"'
                while ack not in await ws.get_message():
                    pass
            else:
                await ws.get_message()
            latencies.append(time.perf_counter() - sent)
            done += 1
            i += 1

    ready = trio.Semaphore(0, max_value=count)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as clients:
            for index in range(count):
                clients.start_soon(one, nursery, index)
            for _ in range(count):
                await ready.acquire()
            started = time.perf_counter()
            start.set()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    print(json.dumps({"done": done, "elapsed": elapsed, "latencies": latencies}), flush=True)


async def _bare_echo_server(port: int) -> None:
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
        print("listening", flush=True)


def _asyncio_echo_server(port: int) -> None:
    """The second baseline: an echo server on the ``websockets`` library (asyncio)."""
    import asyncio

    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: Any) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass  # the load generator is cancelled without a closing handshake

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port):
            print("listening", flush=True)
            await asyncio.Future()

    asyncio.run(main())


def _websockets_available() -> bool:
    try:
        import websockets.asyncio.server  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------- scenarios


@dataclass
class Figure:
    name: str
    value: float
    baseline: float
    unit: str
    better: str  # "lower" or "higher"
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else math.inf


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` nearly equal whole shares."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class _HoldWorker:
    """A ``hold`` load process, told to add connections step by step."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.connected = 0

    async def add(self, count: int) -> None:
        """Open ``count`` more connections. Raises ``RuntimeError`` if any failed."""
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(f"add {count}\n".encode())
        report = await _read_json_line(self.proc)
        self.connected += count
        if report["connected"] != self.connected:
            raise RuntimeError(f"only {report['connected']} of {self.connected} connections")

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(b"stop\n")
        await self.proc.wait()


async def _held_rss(
    server: trio.Process, url: str, steps: Sequence[int], protocol: str, workers: int
) -> list[tuple[int, int]]:
    """Server RSS growth, in bytes, with each number of connections in ``steps`` held
    open (ascending), from ``workers`` processes on distinct source addresses."""
    async with AsyncExitStack() as stack:
        holders = [
            _HoldWorker(
                await stack.enter_async_context(
                    python_process(
                        _worker_args("hold", url=url, protocol=protocol, source=_source_address(i))
                    )
                )
            )
            for i in range(workers)
        ]
        # One warm-up connection first, so one-off allocations are not counted per guest.
        await holders[0].add(1)
        await trio.sleep(0.5)
        before = _rss_bytes(server.pid)
        points: list[tuple[int, int]] = []
        held = 0
        for step in steps:
            async with trio.open_nursery() as nursery:
                for holder, n in zip(holders, _shares(step - held, workers), strict=True):
                    nursery.start_soon(holder.add, n)
            held = step
            await trio.sleep(1.0)  # let the server settle before reading its memory
            points.append((step, _rss_bytes(server.pid) - before))
        for holder in holders:
            await holder.stop()
    return points


@dataclass
class StormRun:
    all_back: float  # seconds from the signal until every guest was back and resynced
    peak: int  # the most connection attempts in any 100 ms
    attempts: list[int]  # connection attempts in each 100 ms since the signal
    old_gone: float  # seconds until the old process had exited
    new_listening: float  # seconds until the new one listened


async def _storm_once(
    server: ServerProcess,
    nursery: trio.Nursery,
    guests: int,
    workers: int,
    jitter: str,
    spread: float,
    how: signal.Signals,
) -> StormRun:
    """One restart with ``guests`` connected, measured by the clients."""
    share = _shares(guests, workers)
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                python_process(
                    _worker_args("storm", url=server.url, count=n, jitter=jitter, spread=spread),
                    b"ready",
                )
            )
            for n in share
        ]
        restart = time.time()
        await server.stop(how)
        down = time.time() - restart
        await server.start(nursery)
        up = time.time() - restart
        for proc in procs:
            await wait_for_marker(proc, b"back", within=120)
        results = []
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(f"report {restart}\n".encode())
            results.append(await _read_json_line(proc))
    attempts = [a for r in results for a in r["attempts"]]
    back = [b for r in results for b in r["back"]]
    # Attempts per 100 ms since the restart began, for the peak and the plots.
    histogram = per_interval(attempts, restart)
    return StormRun(max(back) - restart, max(histogram, default=0), histogram, down, up)


async def scenario_storm(guests: int, workers: int) -> tuple[list[Figure], dict[str, Any]]:
    """A reconnect storm: ``guests`` connected, the server killed (SIGKILL) or restarted
    gracefully (SIGINT: it spreads its ``reconnect.after_ms`` hints); how long until
    all are back and resynced, and the peak attempts per 100 ms the clients made,
    beside the same storm with no jitter."""
    runs: dict[str, StormRun] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            Path(tmp) / "storm.db",
            free_port(),
            "--concierge",
            "off",
            "--rate-limit",
            "0",
            "--heartbeat",
            "0",
        )
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            for name, jitter, spread, how in (
                ("no jitter, kill -9", "none", 0.0, signal.SIGKILL),
                ("full jitter, kill -9", "full", 0.0, signal.SIGKILL),
                # ChatClient's default policy.
                ("full jitter, spread, kill -9", "full", CRASH_SPREAD, signal.SIGKILL),
                ("server-spread hints, SIGINT", "full", CRASH_SPREAD, signal.SIGINT),
            ):
                runs[name] = await _storm_once(
                    server, nursery, guests, workers, jitter, spread, how
                )
            await server.aclose()
            nursery.cancel_scope.cancel()
    herd = runs["no jitter, kill -9"]
    herd_time, herd_peak = herd.all_back, herd.peak
    figures = []
    for name, run in runs.items():
        seconds, peak = run.all_back, run.peak
        figures.append(
            Figure(
                f"storm ({guests} guests), {name}: all back after",
                seconds,
                herd_time,
                "s",
                "lower",
                "<= 15 s",
            )
        )
        figures.append(
            Figure(
                f"storm ({guests} guests), {name}: peak attempts per 100 ms",
                peak,
                herd_peak,
                "attempts",
                "lower",
                "<= 0.2 x",
            )
        )
    series = {"storm": {name: asdict(run) for name, run in runs.items()}}
    return figures, series


IDLE_STEPS: Final = 4  # memory is read at 1/4, 2/4, 3/4 and all of the guests


async def scenario_idle(guests: int, workers: int) -> tuple[list[Figure], dict[str, Any]]:
    """``guests`` idle authenticated guests; server RSS per guest above its own
    baseline, beside a bare trio-websocket server holding as many connections."""
    steps = [max(1, guests * (i + 1) // IDLE_STEPS) for i in range(IDLE_STEPS)]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        async with _chat_server(Path(tmp), port) as server:
            ours = await _held_rss(server, f"ws://127.0.0.1:{port}/ws", steps, "chat", workers)
    port = free_port()
    async with _bare_server(port) as bare:
        base = await _held_rss(bare, f"ws://127.0.0.1:{port}/", steps, "echo", workers)
    figure = Figure(
        f"idle RSS per connected guest ({guests} guests)",
        ours[-1][1] / guests,
        base[-1][1] / guests,
        "bytes",
        "lower",
        "<= 1.3 x",
    )
    return [figure], {"idle_rss": {"trio-chat": ours, "bare trio-websocket": base}}


async def _steady_run(
    url: str,
    guests: int,
    rate: float,
    duration: float,
    workers: int,
    protocol: str,
    staff_token: str | None = None,
) -> tuple[list[float], list[float], int]:
    """One steady-load run: (ack or echo latencies, delivery-to-staff latencies, lost).
    The first second of sending (a fifth of a short run) is left out as warm-up."""
    async with AsyncExitStack() as stack:
        guests_procs = [
            await stack.enter_async_context(
                python_process(
                    _worker_args(
                        "steady",
                        url=url,
                        count=n,
                        protocol=protocol,
                        rate=rate / workers,
                        duration=duration,
                        source=_source_address(i),
                    )
                )
            )
            for i, n in enumerate(_shares(guests, workers))
        ]
        conversations = [
            c for p in guests_procs for c in (await _read_json_line(p))["conversations"]
        ]
        staff_procs = []
        if staff_token is not None:
            # Two staff members on the night shift, each watching half the hotel.
            for i, half in enumerate((conversations[0::2], conversations[1::2])):
                listing = Path(stack.enter_context(tempfile.TemporaryDirectory())) / f"c{i}"
                listing.write_text("\n".join(half))
                staff_procs.append(
                    await stack.enter_async_context(
                        python_process(
                            _worker_args(
                                "staff", url=url, token=staff_token, conversations=listing
                            ),
                            b"ready",
                        )
                    )
                )
        for proc in guests_procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b"go\n")
        reports = [await _read_json_line(proc) for proc in guests_procs]
        staff_reports = []
        for proc in staff_procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(b"stop\n")
            staff_reports.append(await _read_json_line(proc))
    warm = min(r["started"] for r in reports) + min(1.0, duration / 5)
    acks = sorted(lat for r in reports for sent, lat in r["samples"] if sent >= warm)
    delivered = sorted(lat for r in staff_reports for sent, lat in r["samples"] if sent >= warm)
    return acks, delivered, sum(r["lost"] for r in reports)


async def scenario_steady(
    guests: int, rate: float, duration: float, workers: int
) -> tuple[list[Figure], dict[str, Any]]:
    """``guests`` connected guests sending ``rate`` messages per second in total (open
    loop) while two staff consoles watch every conversation: ack latency and
    delivery-to-staff latency, beside the round-trip latency of a bare trio-websocket
    echo server under the same load."""
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "steady.db"
        token = create_staff_token(db_path, "night shift")
        server = ServerProcess(
            db_path, free_port(), "--concierge", "off", "--rate-limit", "0", "--heartbeat", "0"
        )
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            try:
                acks, delivered, lost = await _steady_run(
                    server.url, guests, rate, duration, workers, "chat", token
                )
            finally:
                await server.stop()
    port = free_port()
    async with _bare_server(port):
        echo, _, _ = await _steady_run(
            f"ws://127.0.0.1:{port}/", guests, rate, duration, workers, "echo"
        )
    if lost:
        raise RuntimeError(f"{lost} messages were never acknowledged under steady load")
    figures = []
    load = f"{guests} guests, {rate:g} msg/s"
    for q in (0.5, 0.99, 0.999):
        target = "< 20 ms" if q == 0.99 else ""
        for what, values in (("ack", acks), ("delivery to staff", delivered)):
            figures.append(
                Figure(
                    f"{what} latency p{q * 100:g} ({load})",
                    percentile(values, q) * 1000,
                    percentile(echo, q) * 1000,
                    "ms",
                    "lower",
                    target,
                )
            )
    series = {
        "steady_latency_ms": {
            name: _quantiles(values)
            for name, values in (
                ("trio-chat ack", acks),
                ("trio-chat delivery to staff", delivered),
                ("bare trio-websocket echo", echo),
            )
        }
    }
    return figures, series


def _quantiles(sorted_values: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """A latency distribution in milliseconds, compressed for the JSON and the plots:
    (quantile, latency) at ``points`` quantiles, denser in the tail."""
    if not sorted_values:
        return []
    qs = [1 - 10 ** (-4 * i / points) for i in range(points)]
    return [(q, percentile(sorted_values, q) * 1000) for q in qs] + [
        (1.0, sorted_values[-1] * 1000)
    ]


async def _run_load(
    url: str, guests: int, protocol: str, duration: float, workers: int
) -> tuple[float, list[float]]:
    share = _shares(guests, workers)
    results: list[dict[str, Any]] = []

    async def run(n: int) -> None:
        async with python_process(
            _worker_args("load", url=url, count=n, protocol=protocol, duration=duration),
            None,
        ) as p:
            results.append(await _read_json_line(p))

    async with trio.open_nursery() as nursery:
        for n in share:
            nursery.start_soon(run, n)
    done = sum(r["done"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    return done / elapsed, latencies


SATURATING: Final = 4  # the second crowd, in multiples of ``guests``


async def scenario_throughput(
    guests: int, duration: float, workers: int, rounds: int = 3
) -> tuple[list[Figure], dict[str, Any]]:
    """Acked messages per second: the concierge off and on, beside a bare trio-websocket
    echo server and (when installed) a ``websockets`` asyncio echo server; then the
    concierge off and the trio-websocket echo again with ``SATURATING`` times the guests.

    With ``guests`` messages in flight every ack waits for its commit's fsync, and the
    rate measures that latency as much as the server's work; with four times as many,
    both servers are saturated and the rate is their capacity.

    The setups are measured in turn, ``rounds`` times over; each figure is the median of
    its rounds. This machine drifts by more than the effects worth measuring from one
    minute to the next; interleaving puts the drift on both sides of each ratio."""
    engines = ["trio-websocket"] + (["websockets"] if _websockets_available() else [])
    crowd = guests * SATURATING
    setups = [(s, guests) for s in ("off", "rules", *engines)]
    setups += [("off", crowd), ("trio-websocket", crowd)]
    per_round: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {}
    for _ in range(rounds):
        for setup, count in setups:
            if setup in ("off", "rules"):
                with tempfile.TemporaryDirectory() as tmp:
                    port = free_port()
                    async with _chat_server(Path(tmp), port, setup):
                        rate, lat = await _run_load(
                            f"ws://127.0.0.1:{port}/ws", count, "chat", duration, workers
                        )
            else:
                port = free_port()
                async with _bare_server(port, setup):
                    rate, lat = await _run_load(
                        f"ws://127.0.0.1:{port}/", count, "echo", duration, workers
                    )
            key = setup if count == guests else f"{setup}, {count}"
            per_round.setdefault(key, []).append(rate)
            latencies.setdefault(key, []).extend(lat)
    rates = {setup: statistics.median(values) for setup, values in per_round.items()}
    latencies = {setup: sorted(values) for setup, values in latencies.items()}
    base = rates["trio-websocket"]
    name = f"acknowledged messages per second ({guests} guests"
    figures = [
        Figure(f"{name}, concierge off)", rates["off"], base, "msg/s", "higher", ">= 0.5 x"),
        Figure(f"{name}, concierge on)", rates["rules"], base, "msg/s", "higher"),
    ]
    if "websockets" in rates:
        figures.append(
            Figure(
                f"{name}, concierge off) vs websockets echo",
                rates["off"],
                rates["websockets"],
                "msg/s",
                "higher",
            )
        )
    figures.append(
        Figure(
            f"acknowledged messages per second ({crowd} guests, concierge off)",
            rates[f"off, {crowd}"],
            rates[f"trio-websocket, {crowd}"],
            "msg/s",
            "higher",
            ">= 0.5 x",
        )
    )
    for q in (0.5, 0.99, 0.999):
        figures.append(
            Figure(
                f"ack latency p{q * 100:g}",
                percentile(latencies["off"], q) * 1000,
                percentile(latencies["trio-websocket"], q) * 1000,
                "ms",
                "lower",
            )
        )
    names = {
        "off": "trio-chat, concierge off",
        "rules": "trio-chat, concierge on",
        "trio-websocket": "bare trio-websocket echo",
        "websockets": "websockets (asyncio) echo",
        f"off, {crowd}": f"trio-chat, concierge off, {crowd} guests",
        f"trio-websocket, {crowd}": f"bare trio-websocket echo, {crowd} guests",
    }
    series = {
        "throughput_latency_ms": {names.get(k, k): _quantiles(v) for k, v in latencies.items()},
        "throughput_rounds": {names.get(k, k): v for k, v in per_round.items()},
    }
    return figures, series


# ---------------------------------------------------------------------------- CLI


SCENARIOS: Final = ("idle", "throughput", "steady", "storm")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trio-chat bench")
    parser.add_argument("scenario", nargs="?", default="all", choices=["all", *SCENARIOS])
    parser.add_argument(
        "--guests",
        type=int,
        default=None,
        help="connections (idle: 10000, throughput: 50, steady: 2000, storm: 4000)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument(
        "--rate", type=float, default=500.0, help="steady: messages per second in total"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="load-generator processes (idle, steady and storm use at least 4)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput: measure each setup this many times"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--out", metavar="PATH", help="also write the JSON results here")
    parser.add_argument("--plots", metavar="DIR", help="also draw the results as PNGs here")
    parser.add_argument(
        "--from",
        dest="from_json",
        metavar="PATH",
        help="run nothing: report (and draw) the results saved by an earlier --out",
    )
    return parser


async def run_benchmarks(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    """Run the chosen scenarios; returns their figures and the series for plots."""
    figures: list[Figure] = []
    series: dict[str, Any] = {}
    wanted = SCENARIOS if args.scenario == "all" else (args.scenario,)
    many = max(args.workers, 4)
    for name in wanted:
        if name == "idle":
            result = await scenario_idle(args.guests or 10_000, many)
        elif name == "throughput":
            result = await scenario_throughput(
                args.guests or 50, args.duration, args.workers, args.rounds
            )
        elif name == "steady":
            result = await scenario_steady(args.guests or 2000, args.rate, args.duration, many)
        else:
            result = await scenario_storm(args.guests or 4000, many)
        figures += result[0]
        series.update(result[1])
    return figures, series


def _results(figures: list[Figure], series: dict[str, Any]) -> dict[str, Any]:
    return {
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
        "series": series,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report(
    figures: list[Figure],
    series: dict[str, Any],
    as_json: bool,
    out: str | None = None,
    plots: str | None = None,
) -> None:
    """Print the figures (a table, or JSON), and write the JSON and the plots if asked."""
    results = _results(figures, series)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if plots:
        write_plots(results, Path(plots))
    if as_json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trio-chat benchmarks (each beside its baseline, same run)")
    for column in ("figure", "trio-chat", "baseline", "ratio", "target"):
        table.add_column(column)
    for f in figures:
        table.add_row(
            f.name,
            f"{f.value:,.1f} {f.unit}",
            f"{f.baseline:,.1f} {f.unit}",
            f"{f.ratio:.2f} x",
            f.target,
        )
    Console().print(table)


def write_plots(results: dict[str, Any], directory: Path) -> list[Path]:
    """Draw each series of ``results`` (as written by ``--out``) as a PNG in
    ``directory``; returns the files written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    series = results.get("series", {})
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "idle_rss" in series:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, points in series["idle_rss"].items():
            ax.plot([n for n, _ in points], [b / 2**20 for _, b in points], "o-", label=name)
        ax.set_xlabel("idle guests connected")
        ax.set_ylabel("server RSS growth (MiB)")
        ax.set_title("Idle capacity: memory held per connection")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "bench-idle.png")
    for key, title, name in (
        ("throughput_latency_ms", "Closed loop, as fast as acks allow", "bench-throughput.png"),
        ("steady_latency_ms", "Steady open-loop load", "bench-steady.png"),
    ):
        if key not in series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for label, points in series[key].items():
            # x: how many messages were slower, on a log scale: the tail is the story.
            tail = [(1 - q, ms) for q, ms in points if q < 1 and ms > 0]
            if not tail:
                continue
            ax.plot([ms for _, ms in tail], [t for t, _ in tail], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of messages slower")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        save(fig, name)
    if "storm" in series:
        runs = series["storm"]
        fig, axes = plt.subplots(len(runs), 1, figsize=(6.4, 1.6 + 1.4 * len(runs)), sharex=True)
        for ax, (label, run) in zip(list(axes), runs.items(), strict=True):
            histogram = run["attempts"]
            ax.bar([i / 10 for i in range(len(histogram))], histogram, width=0.1, align="edge")
            ax.axvspan(run["old_gone"], run["new_listening"], color="red", alpha=0.12)
            ax.axvline(run["all_back"], color="green", linestyle="--", linewidth=1)
            ax.set_title(
                f"{label}: all back after {run['all_back']:.1f} s, peak {run['peak']}", fontsize=9
            )
            ax.set_ylabel("attempts\n/100 ms", fontsize=8)
        axes[-1].set_xlabel("seconds since the signal (red: no server listening)")
        fig.suptitle("Reconnect storm: connection attempts", fontsize=10)
        save(fig, "bench-storm.png")
    return written


def bench_command(args: argparse.Namespace) -> int:
    if getattr(args, "from_json", None):
        saved = json.loads(Path(args.from_json).read_text())
        saved["figures"] = [
            Figure(**{k: v for k, v in f.items() if k != "ratio"}) for f in saved["figures"]
        ]
        report(saved["figures"], saved.get("series", {}), args.json, None, args.plots)
        return 0
    figures, series = trio.run(run_benchmarks, args)
    report(figures, series, args.json, getattr(args, "out", None), getattr(args, "plots", None))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the worker subprocesses (``python -m trio_chat._bench``)."""
    parser = argparse.ArgumentParser(prog="python -m trio_chat._bench")
    commands = parser.add_subparsers(dest="command", required=True)
    bare = commands.add_parser("bare-server")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument(
        "--engine", choices=["trio-websocket", "websockets"], default="trio-websocket"
    )
    storm = commands.add_parser("storm")
    storm.add_argument("--url", required=True)
    storm.add_argument("--count", type=int, required=True)
    storm.add_argument(
        "--jitter", choices=["none", "full", "equal", "decorrelated"], default="full"
    )
    storm.add_argument("--spread", type=float, default=0.0)
    hold = commands.add_parser("hold")
    hold.add_argument("--url", required=True)
    hold.add_argument("--protocol", choices=["chat", "echo"], required=True)
    hold.add_argument("--source", default=None, help="local address to connect from")
    load = commands.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--count", type=int, required=True)
    load.add_argument("--protocol", choices=["chat", "echo"], required=True)
    load.add_argument("--duration", type=float, default=10.0)
    steady = commands.add_parser("steady")
    steady.add_argument("--url", required=True)
    steady.add_argument("--count", type=int, required=True)
    steady.add_argument("--protocol", choices=["chat", "echo"], required=True)
    steady.add_argument("--rate", type=float, required=True)
    steady.add_argument("--duration", type=float, required=True)
    steady.add_argument("--source", default=None)
    staff = commands.add_parser("staff")
    staff.add_argument("--url", required=True)
    staff.add_argument("--token", required=True)
    staff.add_argument("--conversations", required=True, help="file: one id per line")
    args = parser.parse_args(argv)
    if args.command == "storm":
        trio.run(_storm_worker, args.url, args.count, args.jitter, args.spread)
    elif args.command == "bare-server" and args.engine == "websockets":
        _asyncio_echo_server(args.port)
    elif args.command == "bare-server":
        trio.run(_bare_echo_server, args.port)
    elif args.command == "hold":
        trio.run(_hold_worker, args.url, args.protocol, args.source)
    elif args.command == "steady":
        trio.run(
            _steady_worker,
            args.url,
            args.count,
            args.protocol,
            args.rate,
            args.duration,
            args.source,
        )
    elif args.command == "staff":
        trio.run(_staff_worker, args.url, args.token, Path(args.conversations).read_text().split())
    else:
        trio.run(_load_worker, args.url, args.count, args.protocol, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
