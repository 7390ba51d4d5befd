"""The storage backends, each in turn, for the tests that hold every backend to one
contract (a test module with a ``db`` fixture of its own keeps its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_chat.server._backends import open_backend
from trio_chat.server._store_memory import MemoryBackend

BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        backend: Any = MemoryBackend()
    elif request.param == "sqlite":
        backend = open_backend(tmp_path / "chat.db")
    else:
        backend = open_backend(request.getfixturevalue("pg_url"))
    yield backend
    backend.close()
