"""Throwaway PostgreSQL and Redis servers, for tests, the cluster soak and benchmarks.

Each runs from Debian's binaries in a temporary directory on a free loopback port and
is removed when its context ends. PostgreSQL's ``initdb``/``pg_ctl`` refuse to run as
root, so as root they run as the ``postgres`` user (``runuser``). Durability is
relaxed for the machine (``fsync=off``), not for the server: a killed PostgreSQL
loses no commit.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._processes import free_port

__all__ = [
    "PostgresInstance",
    "RedisInstance",
    "postgres_bin",
    "postgres_instance",
    "redis_instance",
]


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), if any."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@dataclass
class PostgresInstance:
    bindir: Path
    datadir: Path
    port: int
    durable: bool = False  # fsync on: for benchmarks set beside SQLite's synchronous=FULL

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]),
            check=check,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
            # No fsync (nothing survives the machine anyway), but commits are written
            # to the WAL before they return, so a killed server loses no commit.
            f"-c fsync={'on' if self.durable else 'off'} "
            "-c max_connections=200"
        )
        self._ctl("-o", options, "-l", str(self.datadir / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (clean) or ``immediate`` (as a crash would)."""
        self._ctl("-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)


@contextmanager
def postgres_instance(*, durable: bool = False) -> Iterator[PostgresInstance]:
    """A fresh PostgreSQL cluster on a free port, gone afterwards; ``durable``: with
    fsync (a benchmark's, measured beside SQLite's synchronous=FULL). Raises
    ``RuntimeError`` if PostgreSQL's binaries are not installed."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    top = Path(tempfile.mkdtemp(prefix="trio-chat-pg-"))
    datadir = top / "data"
    try:
        datadir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(top, "postgres")
            shutil.chown(datadir, "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=120,
        )
        instance = PostgresInstance(bindir, datadir, free_port(), durable)
        instance.start()
        try:
            yield instance
        finally:
            instance.stop("immediate")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class RedisInstance:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        import redis

        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@contextmanager
def redis_instance() -> Iterator[RedisInstance]:
    """A fresh Redis without persistence on a free port, gone afterwards."""
    instance = RedisInstance(free_port())
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
