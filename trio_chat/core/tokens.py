"""Guest and staff tokens: unguessable, and verifiable with one secret.

Pure code. A token is ``<kind>.<id>.<mac>``, where ``kind`` is ``g`` (guest) or ``s``
(staff), ``id`` is a random identifier and ``mac`` is an HMAC-SHA256 of
``kind:id`` under the server's secret (kept in its database, so every command that
knows ``--db`` can issue tokens, or in a secret file). Only the protocol's token
alphabet is used. A bare id is never enough: without the secret nobody can produce the
mac.

A staff token may carry a *generation*: ``s.<id>.<generation>.<mac>``, the mac over
``s:id:generation``. ``trio-chat staff revoke`` raises a staff member's generation, so
their older tokens stop verifying against the database while the secret stays the
same. Generation 0 is the three-part form, so tokens issued before generations existed
keep working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Final, Literal

__all__ = ["TokenSigner", "new_id"]

TokenKind = Literal["g", "s"]

# What an id and a generation may look like: a mac never covers a string that another
# split of the same token could also produce ("s:a:1" is only ever id a, generation 1).
_IDENT: Final = re.compile(r"[A-Za-z0-9_-]+")
_GENERATION: Final = re.compile(r"[1-9][0-9]{0,17}")


def new_id(prefix: str) -> str:
    """A random identifier such as ``g_3kq...``: 96 bits, URL- and protocol-safe."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


class TokenSigner:
    """Issues and verifies tokens under one secret (at least 16 bytes)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, kind: str, ident: str, generation: int = 0) -> str:
        signed = f"{kind}:{ident}" if generation == 0 else f"{kind}:{ident}:{generation}"
        digest = hmac.new(self._secret, signed.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")

    def issue(self, kind: TokenKind, ident: str, generation: int = 0) -> str:
        """The token for ``ident`` of the given kind (and, for staff, generation)."""
        if generation < 0 or (generation and kind != "s"):
            raise ValueError("only staff tokens carry a generation, and it is not negative")
        if generation == 0:
            return f"{kind}.{ident}.{self._mac(kind, ident)}"
        return f"{kind}.{ident}.{generation}.{self._mac(kind, ident, generation)}"

    def verify(self, token: str) -> tuple[TokenKind, str] | None:
        """``(kind, id)`` for a genuine token, else ``None`` (never raises)."""
        verified = self.verify_generation(token)
        return None if verified is None else verified[:2]

    def verify_generation(self, token: str) -> tuple[TokenKind, str, int] | None:
        """``(kind, id, generation)`` for a genuine token, else ``None`` (never
        raises). Whether the generation is still current is for the caller to check
        against storage."""
        # Tokens are ASCII; anything else (a lone surrogate included) is a forgery, and
        # would make compare_digest or the encoding raise.
        if not token.isascii():
            return None
        parts = token.split(".")
        if len(parts) == 3:
            kind, ident, mac = parts
            generation = 0
        elif len(parts) == 4 and parts[0] == "s" and _GENERATION.fullmatch(parts[2]):
            kind, ident, generation_text, mac = parts
            generation = int(generation_text)
        else:
            return None
        if kind not in ("g", "s") or not _IDENT.fullmatch(ident):
            return None
        if not hmac.compare_digest(mac, self._mac(kind, ident, generation)):
            return None
        return kind, ident, generation  # type: ignore[return-value]
