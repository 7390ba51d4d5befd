"""Child processes for benchmarks and soak runs: servers and load generators."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

__all__ = ["ServerProcess", "free_port", "python_process", "wait_for_marker"]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_marker(proc: trio.Process, marker: bytes, within: float = 60) -> None:
    """Read ``proc``'s stdout until ``marker`` appears. Raises ``RuntimeError`` if the
    process exits first, ``trio.TooSlowError`` after ``within`` seconds."""
    assert proc.stdout is not None
    seen = b""
    with trio.fail_after(within):
        while marker not in seen:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"process exited early: {seen.decode(errors='replace')}")
            seen += chunk


async def _spawn(args: Sequence[str], env: dict[str, str] | None = None) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})},
        # No PR_SET_PDEATHSIG: it fires when the *thread* that forked exits, and Trio
        # spawns from worker threads that retire after a few idle seconds. Children
        # are killed in the `finally` of whoever started them instead.
    )


@asynccontextmanager
async def python_process(
    args: Sequence[str], ready_marker: bytes | None = None
) -> AsyncIterator[trio.Process]:
    """``python ARGS`` as a child; waits for ``ready_marker`` on its stdout; killed
    on exit if still running."""
    proc = await _spawn(args)
    try:
        if ready_marker is not None:
            await wait_for_marker(proc, ready_marker)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class ServerProcess:
    """``trio-chat serve`` in a child process that can be stopped and started again
    on the same port and database (a graceful restart, or a ``kill -9``). ``db_path``
    is a SQLite file or a ``postgresql://`` URL (passed on as it is)."""

    def __init__(
        self, db_path: str | Path, port: int, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.env = env  # added to the child's environment (PYTHONPATH: other code)
        self.db_path = db_path  # not a Path: that would fold a URL's "//"
        self.port = port
        self.extra = extra
        self.proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, nursery: trio.Nursery) -> None:
        """Start and wait until it listens. Its output is drained in ``nursery``."""
        self.proc = await _spawn(
            [
                "-m",
                "trio_chat",
                "serve",
                "--port",
                str(self.port),
                "--db",
                str(self.db_path),
                *self.extra,
            ],
            self.env,
        )
        await wait_for_marker(self.proc, f":{self.port}/ws".encode())
        nursery.start_soon(_drain, self.proc)

    async def stop(self, how: signal.Signals = signal.SIGINT, grace: float = 15.0) -> None:
        """Stop with ``how`` (SIGINT: graceful; SIGKILL: a crash) and wait for the exit;
        killed after ``grace`` seconds if it is still there."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(how)
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def aclose(self) -> None:
        await self.stop(signal.SIGKILL)


async def _drain(proc: trio.Process) -> None:
    # A child whose pipe is never read blocks once the pipe fills.
    assert proc.stdout is not None
    while await proc.stdout.receive_some():
        pass
