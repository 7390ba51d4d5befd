"""Trio inside a running Jupyter kernel, in guest mode.

The kernel runs an asyncio loop and executes cells on it. :class:`TrioInJupyter`
starts Trio as a guest of that loop (``trio.lowlevel.start_guest_run``): Trio's tasks
run on the kernel's thread between and during cells, a cell never blocks on them, and
widget callbacks (which fire outside Trio, on the same thread) hand work to Trio with
``run_sync_soon``. ``trio.from_thread`` must not be used here: the kernel's thread *is*
Trio's thread, so it would deadlock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import outcome
import trio

from ..client._client import ChatClient

__all__ = ["TrioInJupyter"]

C = TypeVar("C", bound=ChatClient)
T = TypeVar("T")


class TrioInJupyter:
    """One Trio guest run on the current asyncio loop (one per kernel).

    Use :meth:`start` in a cell; it returns at once. Then :meth:`connect` a client,
    :meth:`start_soon` background work, or ``await runner.run(fn, ...)`` in a cell to
    get a Trio function's result without blocking the kernel.
    """

    _current: ClassVar[TrioInJupyter | None] = None

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop() if _loop_running() else asyncio.get_event_loop()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._queued: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._stop = False
        self.done: asyncio.Future[Any] = self.loop.create_future()

    @classmethod
    def start(cls) -> TrioInJupyter:
        """Start Trio as a guest of the running loop, or return the one already running."""
        if cls._current is not None and not cls._current.done.done():
            return cls._current
        runner = cls()
        cls._current = runner
        trio.lowlevel.start_guest_run(
            runner._main,
            run_sync_soon_threadsafe=runner.loop.call_soon_threadsafe,
            done_callback=runner._finished,
            host_uses_signal_set_wakeup_fd=True,
        )
        return runner

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fn, args in self._queued:
                nursery.start_soon(fn, *args)
            self._queued.clear()
            if self._stop:
                nursery.cancel_scope.cancel()
            await trio.sleep_forever()

    def _finished(self, result: outcome.Outcome[Any]) -> None:
        if not self.done.done():
            if isinstance(result, outcome.Error):
                self.done.set_exception(result.error)
            else:
                self.done.set_result(None)
        if TrioInJupyter._current is self:
            TrioInJupyter._current = None

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery Trio work runs in (for code already inside Trio)."""
        if self._nursery is None:
            raise RuntimeError("Trio has not started yet: await runner.run(...) first")
        return self._nursery

    @property
    def running(self) -> bool:
        return not self.done.done()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` as a Trio task. Safe from cells and widget callbacks."""
        if self._token is None or self._nursery is None:
            self._queued.append((fn, args))  # before Trio's first tick
            return
        self._token.run_sync_soon(self._nursery.start_soon, fn, *args)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in Trio; await the returned future in a cell for its result."""
        future: asyncio.Future[T] = self.loop.create_future()

        async def task() -> None:
            try:
                result = await fn(*args)
            except trio.Cancelled:
                self.loop.call_soon_threadsafe(future.cancel)
                raise
            except Exception as exc:
                self.loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self.loop.call_soon_threadsafe(_set_result, future, result)

        self.start_soon(task)
        return future

    def start_service(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future[Any]:
        """Start a long-running service (``ChatServer.run``, ``FaultProxy.run``) the way
        ``nursery.start`` does; await the future for what it reports (its port)."""

        async def starter() -> Any:
            assert self._nursery is not None
            return await self._nursery.start(fn, *args)

        return self.run(starter)

    def connect(self, client: C) -> C:
        """Run ``client`` (a :class:`ChatClient` or :class:`StaffClient`) until it is
        closed or the runner stops; returns it at once, still ``connecting``."""

        async def keep(client: C) -> None:
            async with client:
                await client.wait_for_state("closed")

        self.start_soon(keep, client)
        return client

    def stop(self) -> None:
        """Cancel everything Trio runs here; :attr:`done` resolves when it has ended."""
        self._stop = True
        if self._token is not None and self._nursery is not None:
            self._token.run_sync_soon(self._nursery.cancel_scope.cancel)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
