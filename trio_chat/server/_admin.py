"""Administration: adding staff and guests and issuing their tokens.

The one place that does it; ``trio-chat staff``/``guest`` and the public
:func:`create_staff_token` / :func:`create_guest_token` all come here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.tokens import TokenSigner
from ._backends import open_backend
from ._store import ConversationRow, Database, StaffMember

__all__ = ["create_guest_token", "create_staff_token"]


@contextmanager
def opened(db_path: str | Path) -> Iterator[Database]:
    """The server's database (a SQLite path or a ``postgresql://`` URL), opened beside
    a running server and closed after use. Raises ``StorageError`` if it cannot be
    opened."""
    db: Database = open_backend(db_path)
    try:
        yield db
    finally:
        db.close()


def staff_token(db: Database, member: StaffMember) -> str:
    return TokenSigner(db.secret()).issue("s", member.staff_id)


def add_staff(db: Database, name: str) -> tuple[StaffMember, str]:
    """Add a staff member; returns them and their token. Raises ``ValueError`` if the
    name is empty or taken."""
    member = db.add_staff(name)
    return member, staff_token(db, member)


def add_guest(db: Database, name: str | None) -> tuple[ConversationRow, str]:
    """Create a guest and their conversation; returns the row and the guest's token."""
    row = db.add_guest(name)
    return row, TokenSigner(db.secret()).issue("g", row.guest_id)


def create_staff_token(db_path: str | Path, name: str) -> str:
    """Add a staff member to the server's database and return their token. Works while
    the server runs. Raises ``ValueError`` if the name is taken, ``StorageError`` if
    the database cannot be opened."""
    with opened(db_path) as db:
        return add_staff(db, name)[1]


def create_guest_token(db_path: str | Path, name: str | None = None) -> str:
    """Create a guest (for servers with open registration off) and return the token."""
    with opened(db_path) as db:
        return add_guest(db, name)[1]
