"""trio_chat: live guest chat for hotels, on Trio.

The public surface. Everything else lives in private modules and may change.
"""

from ._version import __version__
from .client._client import ChatClient, ClientEvent, StaffClient
from .core.backoff import JITTER_MODES, Backoff
from .core.client_protocol import ConversationSummary
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
from .server._admin import create_guest_token, create_staff_token
from .server._concierge import (
    Concierge,
    ConciergeAnswer,
    ConciergeMemory,
    KnowledgeBase,
    Responder,
    ResponderReply,
    ResponderRequest,
    RulesResponder,
)
from .server._server import ChatServer, ServerConfig
from .ui._jupyter import TrioInJupyter

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
    "ConversationSummary",
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
