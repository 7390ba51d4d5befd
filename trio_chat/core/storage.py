"""The storage seam: what the session core asks of a store, as plain data.

The hub (``hub.py``) decides *what* to write and read; a backend (SQLite in
``_store.py``, memory in ``testing``, PostgreSQL next) decides *how*. Writes are
:class:`Operation` objects applied in batches, one transaction per batch, by the
backend's :meth:`StorageBackend.apply_batch`; reads are named queries
(:class:`StorageBackend` lists them) that any backend answers with the same rows.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from .errors import StorageError
from .protocol import Message, Reader, Sender, Status

__all__ = [
    "AppendMessage",
    "Appended",
    "ConversationRow",
    "CreateGuest",
    "ExpireSilentGuests",
    "Operation",
    "Revocation",
    "SetRead",
    "StaffMember",
    "StaffSignIn",
    "StorageBackend",
    "TouchGuest",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StaffMember:
    staff_id: str
    name: str
    generation: int = 0  # tokens of an older generation were revoked (tokens.py)


@dataclass(slots=True)
class ConversationRow:
    """A conversation as stored (the hub keeps a live copy of loaded ones)."""

    conversation_id: str
    guest_id: str
    guest_name: str | None
    status: Status
    assigned_staff_id: str | None
    assigned_name: str | None
    last_seq: int
    read_seq: int
    updated_ts: float
    preview: str
    last_seen_ts: float = 0.0  # the guest's last sign-in that was recorded (TouchGuest)
    # The staff console (extension): the room the guest gave, and how far they read.
    guest_room: str | None = None
    guest_read_seq: int = 0


@dataclass(frozen=True, slots=True)
class StaffSignIn:
    """What a staff member's hello needs, read in one go: who they are (``None`` once
    removed), the queue, and the conversations they hold."""

    member: StaffMember | None
    queue: list[ConversationRow]
    held: list[ConversationRow]


class Appended(NamedTuple):
    """What storing an :class:`AppendMessage` came to. (A tuple, not a frozen
    dataclass: one or two are made per message on the commit path, and a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``, three
    times the work.)"""

    message: Message
    duplicate: bool  # True: the client_msg_id was already stored; nothing new was written
    at: float = 0.0  # when it was committed (POSIX time); 0 for a duplicate
    # A status change whose ``expect`` was no longer the stored state: nothing was
    # written (``message`` is what would have been) and this is the stored state
    # (status, assigned staff id, assigned name).
    conflict: tuple[Status, str | None, str | None] | None = None
    # The conversation as this commit left it, from backends that have it at hand
    # (PostgreSQL: a cluster's notifications carry it); None otherwise.
    row: ConversationRow | None = None
    # The outcome of the operation's ``answer`` (None: it had none, or this message was
    # not stored).
    answer: Appended | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    """A fact about tokens, recorded by whoever changed them (the command line in
    another process, or the server's own API) and found by the server's poll.

    ``kind`` is ``removed`` (the staff member is gone), ``revoked`` (their tokens
    older than ``generation`` no longer count) or ``secret`` (the token secret was
    replaced: no token signed before verifies). ``seq`` only grows."""

    seq: int
    kind: str
    staff_id: str | None = None
    generation: int = 0


# ---------------------------------------------------------------------- operations


@dataclass(eq=False)
class Operation(Generic[T]):
    """A write. ``apply`` runs inside the batch's transaction, in the backend's writer;
    exactly one of ``on_commit`` and ``on_error`` runs afterwards (set by the shell)."""

    on_commit: Callable[[T], None] | None = field(default=None, kw_only=True)
    on_error: Callable[[StorageError], None] | None = field(default=None, kw_only=True)

    def apply(self, db: StorageBackend) -> T:
        raise NotImplementedError


@dataclass(eq=False)
class AppendMessage(Operation[Appended]):
    """Store one message with the next ``seq``; optionally change the conversation's
    status in the same commit (``status`` is ``(status, assigned_staff_id,
    assigned_name)``, for a transition's system message). A ``client_msg_id`` the same
    ``author_key`` already used in the conversation stores nothing: the result is the
    original, marked ``duplicate``. With ``expect`` (``(status, assigned_staff_id)``,
    the state a transition was decided against), the write happens only if that is
    still the stored state; otherwise nothing is stored and the result's ``conflict``
    is the stored state (another server process changed it first).

    With ``reply_to`` (the concierge's reply: the ``seq`` of the guest message it
    answers), the store keeps a key unique per guest message: a second reply to the same
    guest message stores nothing and its result is ``duplicate`` (at most one reply per
    guest message, whichever node or restart gives it)."""

    conversation_id: str = ""
    sender: Sender = "guest"
    author: str | None = None
    author_key: str | None = None
    text: str = ""
    client_msg_id: str | None = None
    status: tuple[Status, str | None, str | None] | None = None
    expect: tuple[Status, str | None] | None = None
    reply_to: int | None = None  # reply once: the guest message's seq this answers
    # The concierge's answer, given before the commit (an instant answer): stored right
    # after this message, in the same transaction, only if this message is new (its
    # ``expect`` still checked). Its outcome is the result's ``answer``. It takes no
    # reply key: nothing can answer a guest message again whose answer committed with
    # it (the owed replies are guest messages stored last, and a cluster, whose nodes
    # could race, does not answer at once).
    answer: AppendMessage | None = None

    def apply(self, db: StorageBackend) -> Appended:
        stored = db.append(self)
        if self.answer is None or stored.duplicate or stored.conflict is not None:
            return stored
        answer = db.append(self.answer)
        # Not _replace: on the writer's path for every instant answer, and generic (a
        # Python call per field) at twice the cost.
        return Appended(
            stored.message, stored.duplicate, stored.at, stored.conflict, stored.row, answer
        )


@dataclass(eq=False)
class SetRead(Operation[None]):
    """Raise a read mark (``reader``: ``guest`` or ``staff``); never lowers it."""

    conversation_id: str = ""
    reader: Reader = "guest"
    seq: int = 0

    def apply(self, db: StorageBackend) -> None:
        db.set_read(self)


@dataclass(eq=False)
class CreateGuest(Operation[ConversationRow]):
    name: str | None = None
    room: str | None = None

    def apply(self, db: StorageBackend) -> ConversationRow:
        return db.create_guest(self.name, self.room)


@dataclass(eq=False)
class TouchGuest(Operation[None]):
    """Record that a guest signed in at ``at`` (POSIX time): a guest token expires
    after a long enough time without a sign-in or a message."""

    guest_id: str = ""
    at: float = 0.0

    def apply(self, db: StorageBackend) -> None:
        db.touch_guest(self)


@dataclass(eq=False)
class ExpireSilentGuests(Operation[list[str]]):
    """Forget the guests created before ``before`` (POSIX time) who never wrote a
    message, with their conversations, unless their conversation is waiting for or
    held by staff, or the guest is in ``keep`` (signed in now), or their conversation
    is in ``keep_conversations`` (scale-out: a guest signed in on another server
    process, known here only by the conversation). The result is the guest ids
    forgotten: their tokens fail from then on."""

    before: float = 0.0
    keep: frozenset[str] = frozenset()
    keep_conversations: frozenset[str] = frozenset()

    def apply(self, db: StorageBackend) -> list[str]:
        return db.expire_silent_guests(self.before, self.keep, self.keep_conversations)


class StorageBackend(Protocol):
    """What every store implements. Writes run in one writer, in batches; reads may run
    beside it. Every method raises :class:`StorageError` when the storage fails."""

    # -- writes (inside a batch) ------------------------------------------------------
    def apply_batch(self, operations: list[Operation[Any]]) -> list[Any]:
        """Apply every operation in one transaction; one result per operation. On
        failure nothing of the batch is stored."""
        ...

    def append(self, op: AppendMessage) -> Appended: ...

    def set_read(self, op: SetRead) -> None: ...

    def create_guest(self, name: str | None, room: str | None = None) -> ConversationRow: ...

    def touch_guest(self, op: TouchGuest) -> None: ...
    def expire_silent_guests(
        self,
        before: float,
        keep: frozenset[str],
        keep_conversations: frozenset[str] = frozenset(),
    ) -> list[str]:
        """See :class:`ExpireSilentGuests` (inside a batch, like every write)."""
        ...

    # -- reads --------------------------------------------------------------------------
    def secret(self) -> bytes: ...

    def conversation_of_guest(self, guest_id: str) -> ConversationRow | None: ...

    def conversation(self, conversation_id: str) -> ConversationRow | None: ...

    def staff_sign_in(self, staff_id: str) -> StaffSignIn: ...

    def history(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]: ...

    def recent(self, conversation_id: str, count: int) -> list[Message]: ...

    def message_by_client_id(
        self, conversation_id: str, author_key: str, client_msg_id: str
    ) -> Message | None: ...

    def unanswered(self, since: float) -> list[tuple[ConversationRow, Message]]: ...

    def held_conversations(self, staff_id: str) -> list[ConversationRow]:
        """Every conversation in ``staff`` assigned to ``staff_id``."""
        ...

    def revocations_since(self, after_seq: int) -> list[Revocation]:
        """Every revocation recorded with a ``seq`` above ``after_seq``, oldest first
        (cheap: the server asks twice a second)."""
        ...

    def close(self) -> None: ...
