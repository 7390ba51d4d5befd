from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_chat import ChatServer, ServerConfig


def make_config(tmp_path: Path, **overrides: object) -> ServerConfig:
    """A test server: any free port, a real SQLite file, no artificial delays."""
    settings: dict[str, object] = {
        "db_path": tmp_path / "chat.db",
        "port": 0,
        "typing_delay": 0.0,
        "heartbeat": 0,
        "close_timeout": 1.0,
        "shutdown_grace": 2.0,
        "seed": 1,
    }
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ChatServer]:
    srv = ChatServer(make_config(tmp_path))
    await nursery.start(srv.run)
    yield srv


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after the loop idled 0.1 s of real time.

    pytest-trio's ``autojump_clock`` jumps the moment the loop idles, which includes
    the moments a worker thread is committing to SQLite: timeouts would then fire in
    the middle of a database write. A short real-time threshold keeps minutes of
    virtual waiting in milliseconds without that artefact.
    """
    return trio.testing.MockClock(autojump_threshold=0.1)


# Scale-out: throwaway PostgreSQL and Redis (session-wide), a database per test.
from tests.services import pg_url, postgres, redis_server  # noqa: E402, F401
