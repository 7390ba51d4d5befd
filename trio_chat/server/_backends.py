"""Which storage a ``--db`` value names: the one place it is decided.

A ``postgresql://`` (or ``postgres://``) URL is a PostgreSQL database shared by any
number of server processes; anything else is the path of a SQLite file (created if
missing), the single-process default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._store import Database

__all__ = ["describe_db", "init_db", "is_postgres_url", "open_backend"]


def is_postgres_url(db: object) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_backend(db: str | Path, *, synchronous: str = "FULL") -> Any:
    """The storage backend ``db`` names, opened (its schema created or migrated).
    Raises :class:`~trio_chat.core.errors.StorageError` if it cannot be opened."""
    if is_postgres_url(db):
        from ._store_postgres import PostgresBackend

        return PostgresBackend(str(db))
    return Database(db, synchronous=synchronous)


def init_db(db: str | Path) -> str:
    """Create or migrate the schema (idempotent); returns what was done, for people."""
    if is_postgres_url(db):
        from ._store_postgres import migrate

        version = migrate(str(db))
        return f"schema version {version} in {describe_db(db)}"
    Database(db).close()
    return f"schema ready in {Path(db).resolve()}"


def describe_db(db: str | Path) -> str:
    """``db`` for a log or a banner: a URL without its password, a file's full path."""
    if is_postgres_url(db):
        parts = urlsplit(str(db))
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit((parts.scheme, user + host, parts.path, "", ""))
    return str(Path(db).resolve())
