"""Guest and staff tokens: unguessable, and verifiable with one secret.

Pure code. A token is ``<kind>.<id>.<mac>``, where ``kind`` is ``g`` (guest) or ``s``
(staff), ``id`` is a random identifier and ``mac`` is an HMAC-SHA256 of
``kind:id`` under the server's secret (kept in its database, so every command that
knows ``--db`` can issue tokens). Only the protocol's token alphabet is used. A bare
id is never enough: without the secret nobody can produce the mac.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Literal

__all__ = ["TokenSigner", "new_id"]

TokenKind = Literal["g", "s"]


def new_id(prefix: str) -> str:
    """A random identifier such as ``g_3kq...``: 96 bits, URL- and protocol-safe."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


class TokenSigner:
    """Issues and verifies tokens under one secret (at least 16 bytes)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, kind: str, ident: str) -> str:
        digest = hmac.new(self._secret, f"{kind}:{ident}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")

    def issue(self, kind: TokenKind, ident: str) -> str:
        """The token for ``ident`` of the given kind."""
        return f"{kind}.{ident}.{self._mac(kind, ident)}"

    def verify(self, token: str) -> tuple[TokenKind, str] | None:
        """``(kind, id)`` for a genuine token, else ``None`` (never raises)."""
        # Tokens are ASCII; anything else (a lone surrogate included) is a forgery, and
        # would make compare_digest or the encoding raise.
        if not token.isascii():
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] not in ("g", "s"):
            return None
        kind, ident, mac = parts
        if not hmac.compare_digest(mac, self._mac(kind, ident)):
            return None
        return kind, ident  # type: ignore[return-value]
