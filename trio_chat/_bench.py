"""Benchmarks: every figure beside a baseline measured in the same run.

The orchestrator starts the server under test and a bare trio-websocket server as
subprocesses, drives them from separate load-generator processes (loopback only), and
reports each figure with its baseline as a ratio. Run ``trio-chat bench --help``.

Scenarios:

* ``idle``: N authenticated guests connected and idle; server RSS per connection above
  its own baseline, beside a bare trio-websocket server holding N connections.
* ``throughput``: G guests sending as fast as acks allow (concierge off, no rate
  limit); acknowledged messages per second and ack latency, beside the same clients
  doing round trips against a bare trio-websocket echo server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from ._processes import ServerProcess, free_port, python_process

__all__ = ["main"]

CONNECT_CONCURRENCY = 64


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


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
    args = ["-m", "trio_chat._bench", "bare-server", "--port", str(port), "--engine", engine]
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


async def _open(url: str, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
    # trio-websocket's connect can hang if the peer closes mid-handshake: bound it.
    with trio.fail_after(30):
        return await trio_websocket.connect_websocket_url(nursery, url)


async def _storm_worker(url: str, count: int, jitter: str) -> None:
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
                seed=i * 7919 + os.getpid(),
            ),
        )
        for i in range(count)
    ]
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def run(client: ChatClient, task_status: trio.TaskStatus[None]) -> None:
        async with limiter:
            await client.__aenter__()
            await client.wait_for_state("connected")
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await client.__aexit__(None, None, None)

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for client in clients:
                starting.start_soon(nursery.start, run, client)
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


async def _hold_worker(url: str, count: int, protocol: str) -> None:
    """Connect ``count`` clients (saying hello for the chat protocol), report, then
    hold them until told to stop on stdin."""
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    connected = 0

    async def one(nursery: trio.Nursery) -> None:
        nonlocal connected
        async with limiter:
            ws = await _open(url, nursery)
            if protocol == "chat":
                await ws.send_message(json.dumps({"type": "hello", "token": None}))
                await ws.get_message()
            connected += 1

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as connecting:
            for _ in range(count):
                connecting.start_soon(one, nursery)
        print(json.dumps({"connected": connected}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


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

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

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


async def _held_rss(
    server: trio.Process, url: str, count: int, protocol: str, workers: int
) -> float:
    """Server RSS growth per connection when ``count`` clients are held open."""
    # One warm-up connection first, so one-off allocations are not counted per guest.
    async with python_process(
        ["-m", "trio_chat._bench", "hold", "--url", url, "--count", "1", "--protocol", protocol],
        None,
    ) as warm:
        await _read_json_line(warm)
        await trio.sleep(0.5)
        before = _rss_bytes(server.pid)
        share = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
        async with trio.open_nursery() as nursery:
            procs: list[trio.Process] = []
            for n in share:
                procs.append(await nursery.start(_start_hold, url, n, protocol))
            total = 0
            for proc in procs:
                total += (await _read_json_line(proc))["connected"]
            if total != count:
                raise RuntimeError(f"only {total} of {count} connections were made")
            await trio.sleep(1.0)  # let the server settle before reading its memory
            after = _rss_bytes(server.pid)
            for proc in procs:
                assert proc.stdin is not None
                await proc.stdin.send_all(b"stop\n")
        assert warm.stdin is not None
        await warm.stdin.send_all(b"stop\n")
    return (after - before) / count


async def _start_hold(
    url: str,
    count: int,
    protocol: str,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with python_process(
        [
            "-m",
            "trio_chat._bench",
            "hold",
            "--url",
            url,
            "--count",
            str(count),
            "--protocol",
            protocol,
        ],
        None,
    ) as proc:
        task_status.started(proc)
        await proc.wait()


async def _storm_once(
    server: ServerProcess,
    nursery: trio.Nursery,
    guests: int,
    workers: int,
    jitter: str,
    how: signal.Signals,
) -> tuple[float, int]:
    """One restart with ``guests`` connected: (seconds until all were back and
    resynced, peak connection attempts per 100 ms counted by the clients)."""
    share = [guests // workers + (1 if i < guests % workers else 0) for i in range(workers)]
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                python_process(
                    [
                        "-m",
                        "trio_chat._bench",
                        "storm",
                        "--url",
                        server.url,
                        "--count",
                        str(n),
                        "--jitter",
                        jitter,
                    ],
                    b"ready",
                )
            )
            for n in share
        ]
        restart = time.time()
        await server.stop(how)
        await server.start(nursery)
        with trio.fail_after(120):
            for proc in procs:
                await _wait_line(proc, b"back")
        results = []
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.send_all(f"report {restart}\n".encode())
            results.append(await _read_json_line(proc))
    attempts = [a for r in results for a in r["attempts"]]
    back = [b for r in results for b in r["back"]]
    buckets: dict[int, int] = {}
    for at in attempts:
        buckets[int(at * 10)] = buckets.get(int(at * 10), 0) + 1
    return max(back) - restart, max(buckets.values(), default=0)


async def _wait_line(proc: trio.Process, marker: bytes) -> None:
    assert proc.stdout is not None
    seen = b""
    while marker not in seen:
        chunk = await proc.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"storm worker exited: {seen.decode(errors='replace')}")
        seen += chunk


async def scenario_storm(guests: int, workers: int) -> list[Figure]:
    """A reconnect storm: ``guests`` connected, the server killed (SIGKILL) or restarted
    gracefully (SIGINT: it spreads its ``reconnect.after_ms`` hints); how long until
    all are back and resynced, and the peak attempts per 100 ms the clients made,
    beside the same storm with no jitter."""
    runs: dict[str, tuple[float, int]] = {}
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
            for name, jitter, how in (
                ("no jitter, kill -9", "none", signal.SIGKILL),
                ("full jitter, kill -9", "full", signal.SIGKILL),
                ("server-spread hints, SIGINT", "full", signal.SIGINT),
            ):
                runs[name] = await _storm_once(server, nursery, guests, workers, jitter, how)
            await server.aclose()
            nursery.cancel_scope.cancel()
    herd_time, herd_peak = runs["no jitter, kill -9"]
    figures = []
    for name, (seconds, peak) in runs.items():
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
    return figures


async def scenario_idle(guests: int, workers: int) -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        async with _chat_server(Path(tmp), port) as server:
            ours = await _held_rss(server, f"ws://127.0.0.1:{port}/ws", guests, "chat", workers)
    port = free_port()
    async with _bare_server(port) as bare:
        base = await _held_rss(bare, f"ws://127.0.0.1:{port}/", guests, "echo", workers)
    return [
        Figure(
            f"idle RSS per connected guest ({guests} guests)",
            ours,
            base,
            "bytes",
            "lower",
            "<= 1.3 x",
        )
    ]


async def _run_load(
    url: str, guests: int, protocol: str, duration: float, workers: int
) -> tuple[float, list[float]]:
    share = [guests // workers + (1 if i < guests % workers else 0) for i in range(workers)]
    results: list[dict[str, Any]] = []

    async def run(n: int) -> None:
        async with python_process(
            [
                "-m",
                "trio_chat._bench",
                "load",
                "--url",
                url,
                "--count",
                str(n),
                "--protocol",
                protocol,
                "--duration",
                str(duration),
            ],
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


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def scenario_throughput(guests: int, duration: float, workers: int) -> list[Figure]:
    """Acked messages per second: the concierge off and on, beside a bare trio-websocket
    echo server and (when installed) a ``websockets`` asyncio echo server."""
    rates: dict[str, float] = {}
    latencies: dict[str, list[float]] = {}
    for concierge in ("off", "rules"):
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            async with _chat_server(Path(tmp), port, concierge):
                rates[concierge], latencies[concierge] = await _run_load(
                    f"ws://127.0.0.1:{port}/ws", guests, "chat", duration, workers
                )
    engines = ["trio-websocket"] + (["websockets"] if _websockets_available() else [])
    for engine in engines:
        port = free_port()
        async with _bare_server(port, engine):
            rates[engine], latencies[engine] = await _run_load(
                f"ws://127.0.0.1:{port}/", guests, "echo", duration, workers
            )
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
    for q in (0.5, 0.99, 0.999):
        figures.append(
            Figure(
                f"ack latency p{q * 100:g}",
                _percentile(latencies["off"], q) * 1000,
                _percentile(latencies["trio-websocket"], q) * 1000,
                "ms",
                "lower",
            )
        )
    return figures


# ---------------------------------------------------------------------------- CLI


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trio-chat bench")
    parser.add_argument(
        "scenario", nargs="?", default="all", choices=["all", "idle", "throughput", "storm"]
    )
    parser.add_argument(
        "--guests", type=int, default=None, help="connections (idle: 2000, throughput: 50)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--out", metavar="PATH", help="also write the JSON results here")
    return parser


async def run_benchmarks(args: argparse.Namespace) -> list[Figure]:
    figures: list[Figure] = []
    if args.scenario in ("all", "idle"):
        figures += await scenario_idle(args.guests or 2000, args.workers)
    if args.scenario in ("all", "throughput"):
        figures += await scenario_throughput(args.guests or 50, args.duration, args.workers)
    if args.scenario in ("all", "storm"):
        figures += await scenario_storm(args.guests or 4000, max(args.workers, 4))
    return figures


def _results(figures: list[Figure]) -> dict[str, Any]:
    return {
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report(figures: list[Figure], as_json: bool, out: str | None = None) -> None:
    if out:
        Path(out).write_text(json.dumps(_results(figures), indent=2) + "\n")
    if as_json:
        print(json.dumps(_results(figures)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trio-chat benchmarks (baseline: bare trio-websocket, same run)")
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


def bench_command(args: argparse.Namespace) -> int:
    figures = trio.run(run_benchmarks, args)
    report(figures, args.json, getattr(args, "out", None))
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
    for name in ("hold", "load"):
        worker = commands.add_parser(name)
        worker.add_argument("--url", required=True)
        worker.add_argument("--count", type=int, required=True)
        worker.add_argument("--protocol", choices=["chat", "echo"], required=True)
        worker.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "storm":
        trio.run(_storm_worker, args.url, args.count, args.jitter)
    elif args.command == "bare-server" and args.engine == "websockets":
        _asyncio_echo_server(args.port)
    elif args.command == "bare-server":
        trio.run(_bare_echo_server, args.port)
    elif args.command == "hold":
        trio.run(_hold_worker, args.url, args.count, args.protocol)
    else:
        trio.run(_load_worker, args.url, args.count, args.protocol, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
