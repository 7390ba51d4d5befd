"""trio_chat: live guest chat for hotels, on Trio.

The public surface. Everything else lives in private modules and may change.
"""

from ._admin import create_guest_token, create_staff_token
from ._client import ChatClient, ClientEvent, StaffClient
from ._concierge import (
    Concierge,
    ConciergeAnswer,
    ConciergeMemory,
    KnowledgeBase,
    Responder,
    ResponderReply,
    ResponderRequest,
    RulesResponder,
)
from ._jupyter import TrioInJupyter
from ._server import ChatServer, ServerConfig
from ._version import __version__
from .core.backoff import JITTER_MODES, Backoff
from .core.errors import (
    AuthenticationFailed,
    ClientClosed,
    ConnectionLost,
    MessageRejected,
    ProtocolError,
    StorageError,
    TrioChatError,
)
from .core.protocol import CloseCode, ErrorCode, Message

__all__ = [
    "JITTER_MODES",
    "AuthenticationFailed",
    "Backoff",
    "ChatClient",
    "ChatServer",
    "ClientClosed",
    "ClientEvent",
    "CloseCode",
    "Concierge",
    "ConciergeAnswer",
    "ConciergeMemory",
    "ConnectionLost",
    "ErrorCode",
    "KnowledgeBase",
    "Message",
    "MessageRejected",
    "ProtocolError",
    "Responder",
    "ResponderReply",
    "ResponderRequest",
    "RulesResponder",
    "ServerConfig",
    "StaffClient",
    "StorageError",
    "TrioChatError",
    "TrioInJupyter",
    "__version__",
    "create_guest_token",
    "create_staff_token",
]
