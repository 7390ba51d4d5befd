"""The exception tree of trio_chat.

Every error the library raises on purpose derives from :class:`TrioChatError`, so a
caller can catch the whole family with one clause::

    TrioChatError
    ├── ProtocolError          a frame breaks protocol v1 (carries the wire error code)
    ├── AuthenticationFailed   the server refused the token (close 4401); do not retry
    ├── MessageRejected        the server refused one message (error frame, or close 1009)
    ├── ConnectionLost         the connection ended while an operation needed it
    ├── ClientClosed           the client was closed while an operation waited on it
    └── StorageError           the database could not do what was asked

Errors from Trio and trio-websocket are translated into these in one place each
(``_server`` for the server side, ``_client`` for the client side), so nothing above
those layers ever sees a ``trio_websocket.ConnectionClosed``.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ClientClosed",
    "ConnectionLost",
    "MessageRejected",
    "ProtocolError",
    "StorageError",
    "TrioChatError",
]


class TrioChatError(Exception):
    """Base class of every error trio_chat raises on purpose."""


class ProtocolError(TrioChatError):
    """A frame that breaks protocol v1.

    ``code`` is the wire error code (``bad_json``, ``bad_message``, ``unknown_type``,
    ``too_large``, ...); ``ref`` is the offending ``client_msg_id`` or request type,
    or ``None`` when the frame could not be read far enough to know.
    """

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, ref={self.ref!r})"


class AuthenticationFailed(TrioChatError):
    """The server refused the token (``auth_failed``, close 4401).

    The protocol forbids retrying with the same token, so clients stop for good.
    """


class MessageRejected(TrioChatError):
    """The server refused a message: an ``error`` frame for it, or a 1009 close.

    ``code`` is the wire error code (``too_large`` for a 1009 close).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(TrioChatError):
    """The connection ended while an operation needed it."""


class ClientClosed(TrioChatError):
    """The client was closed (or stopped after 4401) while an operation waited."""


class StorageError(TrioChatError):
    """The database failed; nothing from the failed batch was acknowledged."""
