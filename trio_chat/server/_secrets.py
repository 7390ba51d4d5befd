"""Where the token secret lives: in the database, or in a file of its own.

Whoever reads the secret can mint a staff token, so both places are readable by their
owner only (the database: ``_store.make_private``; the file: created ``0600`` here). A
separate file (``--secret-file`` or ``TRIO_CHAT_SECRET_FILE``) lets a deployment keep
the secret away from the data: backups of the database then hold no key.

The file holds the secret as 64 hex digits on one line (as this module writes it); any
other content of at least 16 bytes is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from ..core.errors import StorageError
from ..core.storage import StorageBackend

__all__ = ["SECRET_FILE_ENV", "rotate_secret_file", "token_secret"]

log = logging.getLogger("trio_chat.secrets")

SECRET_FILE_ENV: Final = "TRIO_CHAT_SECRET_FILE"


def token_secret(db: StorageBackend, secret_file: str | Path | None) -> bytes:
    """The secret tokens are signed with: the file's (created if missing), else the
    database's. Raises :class:`StorageError` if the file cannot be read or is too short."""
    if secret_file is None:
        return db.secret()
    return _read_or_create(Path(secret_file))


def rotate_secret_file(path: str | Path) -> None:
    """Write a new secret to ``path`` (atomically: a reader sees the old or the new
    one, never half of one). Raises :class:`StorageError`."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.new")
    try:
        staged.unlink(missing_ok=True)
        _write_new(staged)
        os.replace(staged, path)
    except OSError as exc:
        raise StorageError(f"cannot write the secret file {path}: {exc}") from exc


def _read_or_create(path: Path) -> bytes:
    try:
        with contextlib.suppress(FileExistsError):
            _write_new(path)
        if path.stat().st_mode & 0o077:
            log.warning(
                "the secret file %s is readable by other users; anyone who reads it can "
                "sign in as staff (chmod 600 it)",
                path,
            )
        content = path.read_bytes().strip()
    except OSError as exc:
        raise StorageError(f"cannot read the secret file {path}: {exc}") from exc
    try:
        secret = bytes.fromhex(content.decode("ascii"))
    except ValueError:
        secret = content
    if len(secret) < 16:
        raise StorageError(f"the secret file {path} holds less than 16 bytes")
    return secret


def _write_new(path: Path) -> None:
    """Create ``path`` (``0600``, its directory ``0700`` if created) with a new secret;
    ``FileExistsError`` if it exists."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")
        file.flush()
        os.fsync(file.fileno())
