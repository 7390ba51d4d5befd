"""Administration: adding staff and guests, issuing and revoking their tokens.

The one place that does it; ``trio-chat staff``/``guest``/``secret`` and the public
:func:`create_staff_token` / :func:`create_guest_token` all come here. Every change to
tokens is a fact in the database (``revocations``) that a running server finds within
half a second, whichever process made it.

``secret_file`` everywhere: the token secret's file, if the server uses one
(``--secret-file``); ``None`` means the secret in the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.tokens import TokenSigner
from ._backends import open_backend
from ._secrets import rotate_secret_file, token_secret
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


def _signer(db: Database, secret_file: str | Path | None) -> TokenSigner:
    return TokenSigner(token_secret(db, secret_file))


def staff_token(db: Database, member: StaffMember, secret_file: str | Path | None = None) -> str:
    """The staff member's current token (their generation, the current secret)."""
    return _signer(db, secret_file).issue("s", member.staff_id, member.generation)


def add_staff(
    db: Database, name: str, secret_file: str | Path | None = None
) -> tuple[StaffMember, str]:
    """Add a staff member; returns them and their token. Raises ``ValueError`` if the
    name is empty or taken."""
    member = db.add_staff(name)
    return member, staff_token(db, member, secret_file)


def revoke_staff(
    db: Database, name_or_id: str, secret_file: str | Path | None = None
) -> tuple[StaffMember, str] | None:
    """Invalidate every token of a staff member and issue a new one; ``None`` if there
    is no such member. A running server closes their consoles (4401)."""
    member = db.revoke_staff(name_or_id)
    return None if member is None else (member, staff_token(db, member, secret_file))


def rotate_secret(db: Database, secret_file: str | Path | None = None) -> None:
    """A new token secret: every staff and guest token stops working, and a running
    server closes every session signed in with one (4401). With ``secret_file`` the
    file gets the new secret (the database's is replaced too, and records the change
    for the server)."""
    if secret_file is not None:
        rotate_secret_file(secret_file)
    db.rotate_secret()


def add_guest(
    db: Database, name: str | None, secret_file: str | Path | None = None
) -> tuple[ConversationRow, str]:
    """Create a guest and their conversation; returns the row and the guest's token."""
    row = db.add_guest(name)
    return row, _signer(db, secret_file).issue("g", row.guest_id)


def create_staff_token(
    db_path: str | Path, name: str, *, secret_file: str | Path | None = None
) -> str:
    """Add a staff member to the server's database and return their token. Works while
    the server runs. Raises ``ValueError`` if the name is taken, ``StorageError`` if
    the database cannot be opened."""
    with opened(db_path) as db:
        return add_staff(db, name, secret_file)[1]


def create_guest_token(
    db_path: str | Path, name: str | None = None, *, secret_file: str | Path | None = None
) -> str:
    """Create a guest (for servers with open registration off) and return the token."""
    with opened(db_path) as db:
        return add_guest(db, name, secret_file)[1]
