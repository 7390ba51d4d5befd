"""Every server the bench measures, started the same way: trio-chat, the null server,
and the peers a user would pick instead (a bare trio-websocket echo, a ``websockets``
echo, python-socketio under uvicorn).

python-socketio and uvicorn are not trio-chat's dependencies: the bench installs them
into a virtual environment of their own, once (``peer_python``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import trio

from ..testing._processes import ServerProcess, free_port
from ._workers import worker_args

__all__ = [
    "FRESH_SQLITE",
    "PEER_REQUIREMENTS",
    "Storage",
    "Target",
    "on_storage",
    "peer_python",
    "serving",
]

# What a Python user would install for a Socket.IO server today.
PEER_REQUIREMENTS: Final = ("python-socketio>=5,<6", "uvicorn[standard]>=0.30")


@dataclass(frozen=True)
class Storage:
    """Where a trio-chat server under test keeps its data. ``db`` "" is a fresh SQLite
    file in the run's directory (the default); otherwise a ``postgresql://`` URL. With
    ``bus`` (``redis://``) the server runs as a cluster node."""

    db: str = ""
    bus: str = ""

    def db_for(self, workdir: Path, name: str = "bench.db") -> str:
        return self.db or str(workdir / name)

    @property
    def flags(self) -> list[str]:
        return ["--bus", self.bus] if self.bus else []

    @property
    def label(self) -> str:
        if "://" not in self.db:
            return ""  # SQLite, the default
        return " on PostgreSQL + Redis" if self.bus else " on PostgreSQL"


FRESH_SQLITE: Final = Storage()  # the default: a new SQLite file for every server


@dataclass(frozen=True)
class Target:
    """A server to measure: ``kind`` is ``chat`` (with ``concierge``), ``null``,
    ``trio-websocket``, ``websockets`` or ``socketio``; ``dialect`` is how the load
    generator speaks to it."""

    kind: str
    dialect: str
    concierge: str = "off"
    engine: str = ""  # trio-chat's frame engine; "" for its default
    code: str = ""  # another trio-chat source tree to run (its PYTHONPATH); "" for this one
    storage: Storage = FRESH_SQLITE  # trio-chat's database (and bus); SQLite by default

    @property
    def label(self) -> str:
        engine = f", frames decoded by {self.engine}" if self.engine else ""
        old = " (old code)" if self.code else ""
        concierge = "off" if self.concierge == "off" else "on"
        return {
            "chat": f"trio-chat{old}{self.storage.label}, concierge {concierge}{engine}",
            "null": f"null server ({self.dialect})",
            "trio-websocket": "bare trio-websocket echo",
            "websockets": "websockets (asyncio) echo",
            "socketio": "python-socketio 5 + uvicorn",
        }[self.kind]


def on_storage(targets: Sequence[Target], storage: Storage) -> list[Target]:
    """``targets`` with every trio-chat server among them on ``storage`` (``bench --db``)."""
    return [replace(t, storage=storage) if t.kind == "chat" else t for t in targets]


def peer_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "trio-chat" / f"bench-peers-py{sys.version_info[0]}.{sys.version_info[1]}"


async def peer_python(venv: Path | None = None) -> Path:
    """The interpreter of the peers' virtual environment, created and filled with
    ``PEER_REQUIREMENTS`` the first time (from the package index: about 20 s)."""
    venv = venv or peer_venv()
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import socketio, uvicorn, uvloop"]
    if python.exists():
        done = await trio.run_process(check, check=False, capture_stderr=True)
        if done.returncode == 0:
            return python
    await trio.run_process([sys.executable, "-m", "venv", "--clear", str(venv)])
    await trio.run_process(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *PEER_REQUIREMENTS,
        ],
        capture_stdout=True,
    )
    await trio.run_process(check)
    return python


async def _wait_listening(port: int, proc: trio.Process, within: float = 30) -> None:
    """Until ``port`` on loopback accepts a connection (a server's own "ready" line can
    come before its socket listens)."""
    with trio.fail_after(within):
        while True:
            if proc.returncode is not None or proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before listening")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            await trio.sleep(0.05)


def code_env(code: str) -> dict[str, str]:
    """The environment that runs the trio-chat source tree at ``code`` ("": this one).

    ``python -m`` puts the working directory first on the import path: run from a
    checkout, it imported that checkout's ``trio_chat`` ahead of ``PYTHONPATH``, and an
    A/B run from the repository compared the code with itself. ``PYTHONSAFEPATH``
    (Python 3.11) leaves the working directory out."""
    env = {"PYTHONSAFEPATH": "1"}
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve())
    return env


def tree_problem(code: str) -> str | None:
    """Why ``code`` cannot be compared (``--compare-with``): it holds no ``trio_chat``
    package, or another one is imported in its place; None when it is the one that
    runs."""
    package = Path(code).resolve() / "trio_chat"
    if not (package / "__init__.py").is_file():
        return f"{code} holds no trio_chat package (a checkout of trio-chat, please)"
    done = subprocess.run(
        [sys.executable, "-c", "import trio_chat; print(trio_chat.__file__)"],
        env={**os.environ, **code_env(code)},
        capture_output=True,
        text=True,
        check=False,
    )
    found = Path(done.stdout.strip()).resolve().parent if done.returncode == 0 else None
    if found != package:
        return f"--compare-with {code}: its server would run {found or done.stderr.strip()}"
    return None


@asynccontextmanager
async def _process(
    argv: Sequence[str], port: int, env: dict[str, str] | None = None, within: float = 30
) -> AsyncIterator[trio.Process]:
    proc = await trio.lowlevel.open_process(
        list(argv),
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        await _wait_listening(port, proc, within)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# How the benchmarks run trio-chat serve: no rate limit, no heartbeat, the concierge
# answering at once.
BENCH_SERVER_FLAGS: Final = (
    "--typing-delay", "0", "--rate-limit", "0", "--rate-limit-per-ip", "0", "--heartbeat", "0",
    # thousands of guests from loopback: no per-address or total caps
    "--max-connections", "0", "--max-connections-per-ip", "0",
    "--registrations-per-minute", "0",
)  # fmt: skip


def chat_server_args(
    port: int,
    db: Path | str,
    concierge: str = "off",
    engine: str = "",
    bus: str = "",
    code: str = "",
) -> list[str]:
    """``trio-chat serve`` as benchmarks run it (``BENCH_SERVER_FLAGS``, less those the
    server of the tree ``code`` does not know)."""
    engine_flags = ["--frame-engine", engine] if engine else []
    bus_flags = ["--bus", bus] if bus else []
    return [
        "-m", "trio_chat", "serve", "--port", str(port), "--db", str(db),
        "--concierge", concierge, *bench_flags(code), *engine_flags, *bus_flags,
    ]  # fmt: skip


_KNOWN_FLAGS: dict[str, frozenset[str]] = {}


def serve_flags(code: str) -> frozenset[str]:
    """The benchmark flags the source tree ``code`` mentions (its ``--help`` leaves out
    the hidden ones, such as ``--typing-delay``)."""
    if code not in _KNOWN_FLAGS:
        source = "\n".join(
            path.read_text(errors="replace") for path in (Path(code) / "trio_chat").rglob("*.py")
        )
        flags = BENCH_SERVER_FLAGS[::2]
        _KNOWN_FLAGS[code] = frozenset(f for f in flags if f'"{f}"' in source)
    return _KNOWN_FLAGS[code]


def bench_flags(code: str = "") -> list[str]:
    """``BENCH_SERVER_FLAGS`` that the server of ``code`` takes: an earlier tree may
    predate some (the limits each came with their issue); what it lacks it does not
    have, so there is nothing to turn off. Except the typing pause: see
    :func:`missing_flags`."""
    if not code:
        return list(BENCH_SERVER_FLAGS)
    known = serve_flags(code)
    pairs = zip(BENCH_SERVER_FLAGS[::2], BENCH_SERVER_FLAGS[1::2], strict=True)
    return [item for flag, value in pairs if flag in known for item in (flag, value)]


def missing_flags(code: str) -> list[str]:
    """The benchmark flags the server of ``code`` does not take."""
    known = serve_flags(code)
    return [flag for flag in BENCH_SERVER_FLAGS[::2] if flag not in known]


def chat_server_process(db: Path, code: str = "", storage: Storage = FRESH_SQLITE) -> ServerProcess:
    """A restartable ``trio-chat serve`` (concierge off) for the steady load and the
    storms, from the source tree ``code`` ("": this one), on ``storage`` (the SQLite
    file ``db`` by default)."""
    # ServerProcess passes its own ``--db`` (a path) first; a URL goes after it, and
    # argparse keeps the last ``--db`` given.
    url_flags = ["--db", storage.db] if storage.db else []
    return ServerProcess(
        db,
        free_port(),
        "--concierge",
        "off",
        *bench_flags(code),
        *url_flags,
        *storage.flags,
        env=code_env(code),
    )


@asynccontextmanager
async def serving(
    target: Target,
    workdir: Path,
    peer: Path | None = None,
    *,
    wrap: Sequence[str] = (),
    within: float = 30,
) -> AsyncIterator[tuple[str, trio.Process]]:
    """Start ``target``; yields the URL to load it at and its process. ``workdir`` holds
    trio-chat's database; ``peer`` is the peers' interpreter (for ``socketio``); ``wrap``
    goes before the command (a profiler such as valgrind), ``within`` is how long it
    may take to listen."""
    port = free_port()
    if target.kind == "chat":
        argv = [
            sys.executable,
            *chat_server_args(
                port,
                target.storage.db_for(workdir),
                target.concierge,
                target.engine,
                target.storage.bus,
                target.code,
            ),
        ]
        path = "/ws"
    elif target.kind == "null":
        argv = [sys.executable, *worker_args("null-server", dialect=target.dialect, port=port)]
        path = "/"
    elif target.kind == "socketio":
        if peer is None:
            raise ValueError("the socketio peer needs the peers' interpreter")
        argv = [str(peer), str(Path(__file__).with_name("socketio_peer.py")), str(port)]
        path = "/"
    else:
        argv = [sys.executable, *worker_args("echo-server", engine=target.kind, port=port)]
        path = "/"
    async with _process([*wrap, *argv], port, code_env(target.code), within) as proc:
        yield f"ws://127.0.0.1:{port}{path}", proc
