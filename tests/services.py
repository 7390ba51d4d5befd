"""Session-wide throwaway PostgreSQL and Redis servers for the scale-out tests.

They start on first use (once per test session) from Debian's binaries, which
``.ci/run`` installs: the tests that use them run, never skip. Each test gets a new,
empty PostgreSQL database of its own (``pg_url``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from trio_chat.testing._services import (
    PostgresInstance,
    RedisInstance,
    postgres_instance,
    redis_instance,
)

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresInstance]:
    with postgres_instance() as instance:
        yield instance


@pytest.fixture
def pg_url(postgres: PostgresInstance) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres.create_database(f"t{next(_databases)}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisInstance]:
    with redis_instance() as instance:
        yield instance
