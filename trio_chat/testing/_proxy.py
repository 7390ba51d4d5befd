"""A fault-injecting TCP proxy for tests and experiments (loopback only)."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["FaultProxy"]

CHUNK = 65536
SLICE = 4096  # bytes paced at a time under a bandwidth cap


@dataclass(eq=False)
class _Link:
    scope: trio.CancelScope
    client: trio.SocketStream
    upstream: trio.SocketStream | None = None


def _reset(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN: an abrupt connection loss."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """Sits between clients and a server and breaks the network on demand.

    Faults can be switched at any time, from any task, or run from a schedule
    (:meth:`run_schedule`): :meth:`passthrough`, :meth:`add_latency`,
    :meth:`cap_bandwidth`, :meth:`reset_all`, :meth:`refuse`, :meth:`blackhole`.
    :attr:`attempts` records the Trio time of every connection attempt, so the load a
    server would see (attempts per 100 ms) can be charted.

    Run it with ``port = await nursery.start(proxy.run)``.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen = (listen_host, listen_port)
        self.port: int | None = None
        self.attempts: list[float] = []
        self.links: set[_Link] = set()
        self.latency = 0.0
        self.jitter = 0.0
        self.bandwidth: float | None = None  # bytes per second per direction
        self.refusing = False
        self.blackholed = False
        self.accept_limit: int | None = None
        self._window = -1
        self._accepted_in_window = 0
        self._unblocked = trio.Event()
        self._unblocked.set()
        self._random = random.Random(seed)

    # -- faults ---------------------------------------------------------------------

    def passthrough(self) -> None:
        """Clear every fault: traffic flows as it came."""
        self.latency = self.jitter = 0.0
        self.bandwidth = None
        self.refusing = False
        self.accept_limit = None
        self.blackhole(False)

    def add_latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay every chunk by ``seconds`` plus up to ``jitter`` (order is kept)."""
        self.latency, self.jitter = seconds, jitter

    def cap_bandwidth(self, bytes_per_second: float | None) -> None:
        self.bandwidth = bytes_per_second

    def refuse(self, refusing: bool = True) -> None:
        """New connections are reset as soon as they arrive."""
        self.refusing = refusing

    def blackhole(self, on: bool = True) -> None:
        """Keep every socket open but forward nothing (new connections too): the
        half-dead link that only heartbeats notice. Held data flows when lifted."""
        self.blackholed = on
        if on:
            self._unblocked = trio.Event()
        else:
            self._unblocked.set()

    def limit_accepts(self, per_100ms: int | None) -> None:
        """Model a server with limited capacity: past ``per_100ms`` new connections in a
        100 ms window, further ones are reset (``None``: no limit)."""
        self.accept_limit = per_100ms

    def reset_all(self) -> None:
        """Abort every open connection, both sides, with a TCP reset."""
        for link in list(self.links):
            _reset(link.client)
            if link.upstream is not None:
                _reset(link.upstream)
            link.scope.cancel()

    async def run_schedule(self, schedule: Sequence[tuple[float, str, tuple[Any, ...]]]) -> None:
        """Apply ``(at_seconds, method_name, args)`` steps, ``at`` counted from now."""
        start = trio.current_time()
        for at, method, args in sorted(schedule, key=lambda step: step[0]):
            await trio.sleep_until(start + at)
            getattr(self, method)(*args)

    # -- plumbing -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        now = trio.current_time()
        self.attempts.append(now)
        window = int(now * 10)
        if window != self._window:
            self._window, self._accepted_in_window = window, 0
        over_capacity = (
            self.accept_limit is not None and self._accepted_in_window >= self.accept_limit
        )
        if self.refusing or over_capacity:
            _reset(client)
            await trio.aclose_forcefully(client)
            return
        self._accepted_in_window += 1
        with trio.CancelScope() as scope:
            link = _Link(scope, client)
            self.links.add(link)
            try:
                await self._unblocked.wait()
                try:
                    upstream = await trio.open_tcp_stream(*self.upstream)
                except OSError:
                    _reset(client)
                    return
                link.upstream = upstream
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self.links.discard(link)
        await trio.aclose_forcefully(client)
        if link.upstream is not None:
            await trio.aclose_forcefully(link.upstream)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, receive, sink, done)
            async with send:
                last_due = 0.0
                while True:
                    await self._unblocked.wait()
                    try:
                        data = await source.receive_some(CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    delay = self.latency + (
                        self._random.uniform(0, self.jitter) if self.jitter else 0.0
                    )
                    due = max(last_due, trio.current_time() + delay)
                    last_due = due
                    try:
                        await send.send((due, data))
                    except trio.BrokenResourceError:
                        # The sink failed and the deliverer is gone; the link is being
                        # torn down (``done``), but this send came first: it was a reset.
                        break

    async def _deliver(
        self,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
        done: trio.CancelScope,
    ) -> None:
        free_at = 0.0  # with a bandwidth cap: when the link can carry the next byte
        try:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await self._unblocked.wait()
                    if not self.bandwidth:
                        await sink.send_all(data)
                        continue
                    # Pace before sending, in slices, so the cap holds from the first byte.
                    for start in range(0, len(data), SLICE):
                        piece = data[start : start + SLICE]
                        free_at = max(free_at, trio.current_time()) + len(piece) / self.bandwidth
                        await trio.sleep_until(free_at)
                        await sink.send_all(piece)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            done.cancel()
