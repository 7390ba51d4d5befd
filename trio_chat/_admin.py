"""Administration from Python: what ``trio-chat staff add`` and ``guest add`` do."""

from __future__ import annotations

from pathlib import Path

from ._store import Database
from ._tokens import TokenSigner

__all__ = ["create_guest_token", "create_staff_token"]


def create_staff_token(db_path: str | Path, name: str) -> str:
    """Add a staff member to the server's database and return their token. Works while
    the server runs. Raises ``ValueError`` if the name is taken, ``StorageError`` if
    the database cannot be opened."""
    db = Database(db_path)
    try:
        member = db.add_staff(name)
        return TokenSigner(db.secret()).issue("s", member.staff_id)
    finally:
        db.close()


def create_guest_token(db_path: str | Path, name: str | None = None) -> str:
    """Create a guest (for servers with open registration off) and return the token."""
    db = Database(db_path)
    try:
        row = db.add_guest(name)
        return TokenSigner(db.secret()).issue("g", row.guest_id)
    finally:
        db.close()
