"""The session core: protocol v1's rules as pure code, events in, actions out.

Modelled on h11's ``Connection``: the :class:`Hub` owns every session, every live
conversation, the subscriptions and the staff room; it is told what happened (a frame
from a session, a write committed, a read answered, a concierge reply ready, a session
gone) and the time, and answers with what to do (:class:`Send` a frame, :class:`Close`
a session, :class:`Write` or :class:`Read` storage, :class:`StartReply` for the
concierge). It never awaits, never touches a socket, a thread or a database, and never
reads a clock. The Trio server (``_server.py``) is one shell around it; tests are
another: feed events, assert on actions.

Ordering guarantees the shell must keep (the hub relies on them):

* a session's events come in order, and a :class:`Read` or a waited :class:`Write`
  that a session's frame caused is answered (:meth:`Hub.loaded`, :meth:`Hub.stored`)
  before that session's next frame is given;
* :meth:`Hub.stored` is called for writes in commit order, which is the order the hub
  issued them (one writer, batches committed whole);
* actions are carried out in the order returned.

Given those, ``seq`` order, exactly-once delivery and atomic subscription follow: the
hub pushes a message only when told it is committed, and subscribes a session and reads
``last_seq`` in one step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from . import protocol as proto
from .conversation import ConversationState, Event, apply_event
from .errors import ProtocolError, StorageError
from .protocol import CloseCode, ErrorCode, Message, Reader, Role
from .ratelimit import BucketTable, TokenBucket
from .registration import RegistrationLimiter
from .storage import (
    Appended,
    AppendMessage,
    ConversationRow,
    CreateGuest,
    Operation,
    SetRead,
    StaffSignIn,
    TouchGuest,
)
from .tokens import TokenSigner

__all__ = [
    "Action",
    "Close",
    "Fill",
    "Hub",
    "HubConfig",
    "InstantAnswer",
    "LiveConversation",
    "Read",
    "Relay",
    "RelayStaff",
    "ReportWritten",
    "Send",
    "StartReply",
    "Write",
]

BAD_FRAME_LIMIT: Final = 20
FLOOD_CLOSE_AFTER: Final = 10.0
FLOOD_QUIET: Final = 1.0  # seconds without a refusal that end a flood
QUEUE_LIMIT: Final = 500
DAY: Final = 86_400.0  # seconds: how far back a console's "resolved today" reaches
# A guest's sign-in is recorded (one small write) only when the last one recorded is
# older than this: reconnection storms write nothing, idle expiry stays exact to a day.
GUEST_SEEN_REFRESH: Final = 3600.0
PREVIEW_CHARS: Final = 120
# Rate-limit tokens per frame (a chat message, escalate or a staff action costs 1): a
# history page is a read and up to 1 MiB out; typing, read marks and pings are cheap.
FRAME_COSTS: Final[dict[type[proto.ClientFrame], float]] = {
    proto.HistoryRequest: 4.0,
    proto.Typing: 0.1,
    proto.Read: 0.1,
    proto.Ping: 0.1,
}
HELLO_COST: Final = 1.0  # from the address's bucket: a hello may create a guest
HISTORY_RETRY_MS: Final = 250  # told to a client asking for history before its last reply left
# What a staff console is told when it is closed (4401) or refused at hello.
STAFF_REMOVED: Final = "this staff member was removed"
STAFF_TOKEN_REVOKED: Final = "this staff token was revoked; ask for your new sign-in link"
SECRET_ROTATED: Final = "this token no longer works: the server's token secret was changed"


# ------------------------------------------------------------------------- actions


class Send(NamedTuple):
    """Queue ``frame`` on ``session``'s connection (never wait for it). (A tuple: five
    are made for an answered guest message, and a frozen dataclass costs three times
    as much to make.)"""

    session: int
    frame: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``session`` with ``code`` once what is queued for it has gone."""

    session: int
    code: int
    reason: str


@dataclass(eq=False, slots=True)
class Write:
    """Apply ``operation``; then call :meth:`Hub.stored` (or :meth:`Hub.failed`). With
    ``wait``, ``session``'s next frame waits until then."""

    operation: Operation[Any]
    session: int | None = None
    wait: bool = False
    ref: str | None = None  # named by an ``internal`` error if the write fails
    then: Callable[[Any], None] | None = field(default=None, repr=False)
    conversation: LiveConversation | None = field(default=None, repr=False)


@dataclass(eq=False, slots=True)
class Read:
    """Call the backend's read ``method`` with ``args``; then :meth:`Hub.loaded` with
    its result (or :meth:`Hub.read_failed`) before ``session``'s next frame."""

    method: str
    args: tuple[Any, ...]
    session: int | None = None
    ref: str | None = None
    then: Callable[[Any], None] | None = field(default=None, repr=False)
    conversation: LiveConversation | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class StartReply:
    """Ask the concierge to answer ``message``; report with :meth:`Hub.replied`."""

    conversation_id: str
    guest_id: str
    guest_name: str | None
    message: Message


# An answer the concierge gives at once (the rules), asked before the guest message is
# stored: (conversation_id, guest_id, guest_name, text) -> (answer, escalate, keep).
# ``keep`` is called once the answer is stored, and only then: a concierge that
# remembers the conversation (the rules' streak of unanswered questions) moves on
# only for answers the guest gets, not for a retry's or a failed write's. It must not
# raise (the shell turns a failure into a hand-over) and must not wait.
InstantAnswer = Callable[[str, str, str | None, str], tuple[str, bool, Callable[[], None]]]


@dataclass(frozen=True, slots=True)
class Fill:
    """Cluster only: read what ``conversation_id`` committed after what this server
    process has pushed (another process wrote it, and its notice was lost or has not
    come yet), then :meth:`Hub.remote_committed` with it. Duplicates are harmless."""

    conversation_id: str


@dataclass(frozen=True, slots=True)
class Relay:
    """Cluster only: tell the other server processes something nobody stores: a frame
    for the conversation's subscribers there (typing, read marks), or that this
    process's guests of the conversation came online or all left."""

    conversation_id: str
    frame: str | None = None
    guest_online: bool | None = None


@dataclass(frozen=True, slots=True)
class RelayStaff:
    """Cluster only: tell the other server processes who is on duty here (the names
    of the staff signed in to this process), since that changed or they asked."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReportWritten:
    """Call :meth:`Hub.written` once everything queued for ``session`` so far has been
    written to its socket (a history reply: the next one waits until then)."""

    session: int


Action = Send | Close | Write | Read | StartReply | ReportWritten | Fill | Relay | RelayStaff


@dataclass(frozen=True, slots=True)
class HubConfig:
    heartbeat_s: float = 20.0
    server_name: str = "trio-chat"
    open_registration: bool = True
    rate_limit: float = 10.0  # tokens per second per guest or staff member; 0 = off
    rate_burst: int = 20
    # Memory and rate limits: one more bucket per client address, shared by every
    # session from it (a hotel's guests may all come from one NAT address). 0 = off.
    rate_limit_per_ip: float = 300.0
    rate_burst_per_ip: int = 3000
    # staff hardening: a guest token unused (no sign-in, no message) this long no
    # longer signs in; 0 = never expires.
    guest_token_idle_s: float = 0.0
    # http hardening: new guest identities per network address (0 = unlimited)
    registrations_per_minute: float = 0.0
    registration_burst: int = 60


# ------------------------------------------------------------------------ state


class LiveConversation:
    """One conversation while anyone is subscribed to it or anything is in flight for
    it. ``status``, ``assigned_*`` and ``last_seq`` are the committed state; decisions
    (the status table) use :attr:`decided`, which includes transitions still being
    written, so two staff members racing to claim are decided by the first one's
    write, not by its commit."""

    __slots__ = (
        "answering",
        "assigned_name",
        "assigned_to",
        "busy",
        "conversation_id",
        "guest_id",
        "guest_name",
        "guest_read_seq",
        "guest_room",
        "guest_sessions",
        "guest_writes",
        "last_seq",
        "preview",
        "read_seq",
        "replies",
        "replying",
        "status",
        "subscribers",
        "transitions",
        "upcoming",
        "updated_ts",
    )

    def __init__(self, row: ConversationRow) -> None:
        self.conversation_id = row.conversation_id
        self.guest_id = row.guest_id
        self.guest_name = row.guest_name
        self.status = row.status
        self.assigned_to = row.assigned_staff_id
        self.assigned_name = row.assigned_name
        self.last_seq = row.last_seq
        self.read_seq = row.read_seq
        self.updated_ts = row.updated_ts
        self.preview = row.preview
        self.guest_room = row.guest_room
        self.guest_read_seq = row.guest_read_seq
        self.subscribers: set[int] = set()
        self.guest_sessions = 0
        self.busy = 0  # writes, reads and replies in flight that still need this object
        self.upcoming: ConversationState | None = None  # after the transitions in flight
        self.transitions = 0  # transitions written, not yet committed
        self.replying = False  # the concierge is answering
        self.answering = 0  # the seq of the guest message it is answering
        self.replies: deque[Message] | None = None  # guest messages waiting for an answer
        # Guest messages written and not yet committed. An instant answer is given only
        # when there are none: an earlier one may still ask for its answer after its
        # commit (which must come first), or hand over to staff with its own answer.
        self.guest_writes = 0

    @property
    def state(self) -> ConversationState:
        return ConversationState(self.status, self.assigned_to, self.assigned_name)

    @property
    def decided(self) -> ConversationState:
        return self.upcoming if self.upcoming is not None else self.state

    def summary(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "guest_id": self.guest_id,
            "guest_name": self.guest_name,
            "status": self.status,
            "assigned_to": self.assigned_name,
            "last_seq": self.last_seq,
            "read_seq": self.read_seq,
            "updated_ts": proto.format_ts(self.updated_ts),
            "guest_online": self.guest_sessions > 0,
            "preview": self.preview,
            "guest_room": self.guest_room,
        }


class Session:
    """One connection's identity and counters."""

    __slots__ = (
        "address",
        "address_bucket",
        "bad_frames",
        "bucket",
        "bucket_key",
        "conversation",
        "flood_since",
        "history_pending",
        "id",
        "last_limited",
        "name",
        "revoked",
        "role",
        "staff_id",
        "subscriptions",
        "token",
        "token_generation",
    )

    def __init__(self, session_id: int, address: str | None = None) -> None:
        self.id = session_id
        self.address = address  # the peer's network address, for per-address limits
        self.role: Role | None = None  # once hello succeeded
        self.staff_id: str | None = None
        self.name: str | None = None
        self.conversation: LiveConversation | None = None  # a guest's own
        self.subscriptions: set[LiveConversation] | None = None  # a staff member's
        # The guest's or staff member's bucket, shared by all their sessions, and the
        # client address's bucket, shared by everyone there (None: no limit).
        self.bucket: TokenBucket | None = None
        self.bucket_key = ""
        self.address_bucket: TokenBucket | None = None
        # From a history request until its reply has left the server.
        self.history_pending = False
        self.bad_frames = 0
        self.flood_since: float | None = None
        self.last_limited = 0.0
        self.token: str | None = None  # the token it signed in with (or was given)
        self.token_generation = 0  # a staff token's generation
        # Closed for a revocation: nothing more it sends, or that comes back for it, is
        # acted on (its Close is on its way).
        self.revoked = False


class _Deferred(Exception):
    """Internal: the frame's handling continues when a read or write comes back."""


# --------------------------------------------------------------------------- hub


class Hub:
    """Every session and live conversation of one server; see the module docstring.

    Each event method returns the actions it calls for, in order. ``now`` is the
    shell's monotonic clock (rate limits), ``wall`` the POSIX time (timestamps).
    ``concierge`` says whether guest messages in ``ai`` get a :class:`StartReply`.

    :attr:`instant_answer`, set by a shell whose concierge answers at once (the rules,
    no typing pause), is asked before a guest message in ``ai`` is stored: the answer
    is written with the message, in the same transaction (``AppendMessage.answer``),
    and pushed with its ack. Otherwise, and whenever the answer could not be stored
    there, the message gets a :class:`StartReply` after its commit.
    """

    def __init__(self, signer: TokenSigner, config: HubConfig, *, concierge: bool) -> None:
        self.signer = signer
        self.config = config
        self.concierge = concierge
        self.instant_answer: InstantAnswer | None = None
        self.sessions: dict[int, Session] = {}
        self.conversations: dict[str, LiveConversation] = {}
        self.staff_room: set[int] = set()
        # Staff sessions whose sign-in read is in flight, with every queue entry that
        # changed meanwhile: a conversation may change and leave memory before the read
        # returns, and the console is not in the staff room yet to hear of it.
        self._signing_in: dict[int, dict[str, dict[str, Any]]] = {}
        self._buckets = BucketTable(config.rate_limit, config.rate_burst)
        self._address_buckets = BucketTable(config.rate_limit_per_ip, config.rate_burst_per_ip)
        self.registrations = RegistrationLimiter(
            config.registrations_per_minute, config.registration_burst
        )
        self._out: list[Action] = []
        self._now = 0.0
        self._wall = 0.0
        # Scale-out: several server processes share the storage. Commits of the others
        # arrive through remote_committed; status changes are decided by the storage.
        self.cluster = False
        self.remote_guests: dict[str, set[str]] = {}  # conversation -> nodes with guests
        self.remote_staff: dict[str, frozenset[str]] = {}  # node -> names on duty there
        self._announced_staff: tuple[str, ...] = ()  # the names last relayed from here

    # -- events ------------------------------------------------------------------------

    def opened(self, session_id: int, address: str | None = None, now: float = 0.0) -> None:
        """A connection was accepted (its first frame must be ``hello``) from the client
        ``address`` (None: not a network peer, no per-address limit), at ``now``."""
        session = self.sessions[session_id] = Session(session_id, address)
        self._buckets.forget_idle(now)
        if address is not None and self.config.rate_limit_per_ip > 0:
            session.address_bucket = self._address_buckets.hold(address, now)

    def buckets_held(self) -> tuple[int, int]:
        """How many rate-limit buckets are in memory: per guest or staff member, and
        per address (for ``/healthz`` and tests: they must not pile up)."""
        return len(self._buckets), len(self._address_buckets)

    def signed_in(self, session_id: int) -> bool:
        session = self.sessions.get(session_id)
        return session is not None and session.role is not None

    def role(self, session_id: int) -> Role | None:
        session = self.sessions.get(session_id)
        return None if session is None else session.role

    def frame(self, session_id: int, raw: str | bytes, now: float, wall: float) -> list[Action]:
        """A WebSocket message from a session."""
        self._begin(now, wall)
        session = self.sessions.get(session_id)
        if session is not None and not session.revoked:
            if session.role is None:
                self._hello_phase(session, raw)
            else:
                self._signed_in_frame(session, raw)
        return self._end()

    def stored(self, write: Write, result: Any, now: float, wall: float) -> list[Action]:
        """``write`` committed with ``result`` (called in commit order). What a commit
        sets off happens whether or not the session that asked is still there."""
        self._begin(now, wall)
        try:
            if write.then is not None:
                write.then(result)
        finally:
            self._unpin(write.conversation)
        return self._end()

    def failed(self, write: Write, error: StorageError, now: float, wall: float) -> list[Action]:
        """``write`` was not stored (nothing of it was: no ack, no push)."""
        self._begin(now, wall)
        conv = write.conversation
        op = write.operation
        if isinstance(op, AppendMessage) and conv is not None:
            if op.sender == "guest":
                conv.guest_writes -= 1
            if op.status is not None:
                self._transition_done(conv)
            if op.sender == "ai":
                self._reply_done(conv, typing_off=True)
        self._internal(write.session, write.ref)
        self._unpin(conv)
        return self._end()

    def loaded(self, read: Read, result: Any, now: float, wall: float) -> list[Action]:
        """``read`` answered with ``result``."""
        self._begin(now, wall)
        try:
            if read.then is not None:
                self._continue(read.session, read.then, result)
        finally:
            self._unpin(read.conversation)
        return self._end()

    def read_failed(self, read: Read, error: StorageError, now: float, wall: float) -> list[Action]:
        self._begin(now, wall)
        if read.method == "history" and read.session in self.sessions:
            self.sessions[read.session].history_pending = False
        self._internal(read.session, read.ref)
        self._unpin(read.conversation)
        return self._end()

    def replied(
        self, conversation_id: str, text: str, escalate: bool, now: float, wall: float
    ) -> list[Action]:
        """The concierge's answer to the :class:`StartReply` of ``conversation_id``."""
        self._begin(now, wall)
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            self._concierge_answer(conv, text, escalate)
        return self._end()

    def reply_abandoned(self, conversation_id: str, now: float, wall: float) -> list[Action]:
        """The :class:`StartReply` of ``conversation_id`` will not be answered here:
        another server process holds the guest message's reply lease (its answer comes
        as any other commit does). The next owed message, if any, is asked for."""
        self._begin(now, wall)
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            self._reply_done(conv, typing_off=True)
        return self._end()

    def drafted(self, conversation_id: str, text: str, now: float, wall: float) -> list[Action]:
        """The concierge's answer to the :class:`StartReply` of ``conversation_id`` so
        far: shown to the conversation's subscribers while it is still the concierge's
        to give (a conversation staff took over gets no more drafts)."""
        self._begin(now, wall)
        conv = self.conversations.get(conversation_id)
        if conv is not None and conv.replying and conv.decided.status == "ai":
            draft = proto.draft_frame(conversation_id, text)
            self._broadcast(conv, draft)
            self._relay(conv, draft)  # staff watching on another server process
        return self._end()

    def owed(self, row: ConversationRow, message: Message, now: float, wall: float) -> list[Action]:
        """At start-up: ``message`` never got the concierge's answer (the server stopped
        first)."""
        self._begin(now, wall)
        conv = self._live(row)
        self._after_guest_message(conv, message)
        self._release(conv)  # unless an answer (or a reopening) now holds it
        return self._end()

    def written(self, session_id: int, now: float, wall: float) -> list[Action]:
        """What was queued for ``session_id`` up to its :class:`ReportWritten` has been
        written: its next history request is welcome."""
        self._begin(now, wall)
        session = self.sessions.get(session_id)
        if session is not None:
            session.history_pending = False
        return self._end()

    def closed(self, session_id: int, now: float, wall: float) -> list[Action]:
        """The connection is gone (for whatever reason)."""
        self._begin(now, wall)
        session = self.sessions.pop(session_id, None)
        self._signing_in.pop(session_id, None)
        if session is not None:
            self._detach(session)
            if session.bucket is not None:
                self._buckets.let_go(session.bucket_key, now)
            if session.address is not None:
                self._address_buckets.let_go(session.address, now)
        return self._end()

    # -- scale-out: what the other server processes did ---------------------------------

    def last_seq(self, conversation_id: str) -> int | None:
        """The newest seq pushed here for a live conversation (None: not live here)."""
        conv = self.conversations.get(conversation_id)
        return None if conv is None else conv.last_seq

    def remote_committed(
        self,
        conversation_id: str,
        messages: list[Message],
        row: ConversationRow | None,
        now: float,
        wall: float,
    ) -> list[Action]:
        """Another server process committed ``messages`` (in seq order; any already
        pushed here are skipped), leaving the conversation as ``row``. Subscribers here
        get each message once, in seq order; a gap asks for a :class:`Fill` first."""
        self._begin(now, wall)
        conv = self.conversations.get(conversation_id)
        if conv is None:
            if row is not None:
                self._remote_summary(row)
            return self._end()
        pushed = False
        for message in messages:
            if message.seq <= conv.last_seq:
                continue
            if message.seq != conv.last_seq + 1:
                self._out.append(Fill(conversation_id))
                return self._end()
            conv.last_seq = message.seq
            conv.preview = message.text[:PREVIEW_CHARS]
            self._broadcast(conv, proto.message_frame(message))
            pushed = True
        if row is not None and row.last_seq == conv.last_seq:
            conv.updated_ts = max(conv.updated_ts, row.updated_ts)
            conv.read_seq = max(conv.read_seq, row.read_seq)
            if (row.status, row.assigned_staff_id) != (conv.status, conv.assigned_to):
                conv.status = row.status
                conv.assigned_to = row.assigned_staff_id
                conv.assigned_name = row.assigned_name
                self._broadcast(
                    conv, proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name)
                )
                pushed = True
        elif row is not None and row.last_seq > conv.last_seq:
            self._out.append(Fill(conversation_id))
        if pushed:
            self._summary_changed(conv)
        return self._end()

    def relayed(
        self,
        conversation_id: str,
        node: str,
        frame: str | None,
        guest_online: bool | None,
        now: float,
        wall: float,
    ) -> list[Action]:
        """Another server process relayed an ephemeral frame for the conversation's
        subscribers, or its guests of the conversation came online or all left."""
        self._begin(now, wall)
        conv = self.conversations.get(conversation_id)
        if frame is not None and conv is not None:
            self._broadcast(conv, frame)
        if guest_online is not None:
            nodes = self.remote_guests.setdefault(conversation_id, set())
            was_online = bool(nodes)
            if guest_online:
                nodes.add(node)
            else:
                nodes.discard(node)
                if not nodes:
                    del self.remote_guests[conversation_id]
            if was_online != bool(nodes) and conv is not None:
                self._summary_changed(conv)
        return self._end()

    def staff_elsewhere(self, node: str, names: list[str], now: float, wall: float) -> list[Action]:
        """Another server process says who is on duty there: the staff room here
        hears of it if the hotel's set of names on duty changed."""
        self._begin(now, wall)
        before = self._on_duty()
        if names:
            self.remote_staff[node] = frozenset(names)
        else:
            self.remote_staff.pop(node, None)
        self._presence_changed(before)
        return self._end()

    def on_duty_here(self) -> tuple[str, ...]:
        """The names of the staff signed in to this process (what it relays)."""
        return tuple(self._local_on_duty())

    def node_gone(self, node: str, now: float, wall: float) -> list[Action]:
        """Another server process stopped (or fell silent): its guests are offline,
        its staff off duty."""
        self._begin(now, wall)
        if node in self.remote_staff:
            before = self._on_duty()
            del self.remote_staff[node]
            self._presence_changed(before)
        for conversation_id in [c for c, nodes in self.remote_guests.items() if node in nodes]:
            nodes = self.remote_guests[conversation_id]
            nodes.discard(node)
            if not nodes:
                del self.remote_guests[conversation_id]
                conv = self.conversations.get(conversation_id)
                if conv is not None:
                    self._summary_changed(conv)
        return self._end()

    def _remote_summary(self, row: ConversationRow) -> None:
        if self._signing_in or self.staff_room:
            summary = LiveConversation(row).summary()
            summary["guest_online"] = row.conversation_id in self.remote_guests
            for changed in self._signing_in.values():
                changed[row.conversation_id] = summary
            frame = proto.encode({"type": "conversation", **summary})
            for session_id in self.staff_room:
                self._send(session_id, frame)

    def _relay(self, conv: LiveConversation, frame: str) -> None:
        if self.cluster:
            self._out.append(Relay(conv.conversation_id, frame=frame))

    def _relay_presence(self, conv: LiveConversation, online: bool) -> None:
        if self.cluster:
            self._out.append(Relay(conv.conversation_id, guest_online=online))

    # -- revocation (staff hardening) ----------------------------------------------------

    def staff_removed(self, staff_id: str, now: float, wall: float) -> list[Action]:
        """The staff member ``staff_id`` was removed (found in storage: possibly by
        another process). Their consoles are closed (4401) and every conversation they
        hold goes back to ``waiting``, with a system message the guest reads."""
        self._begin(now, wall)
        self._revoke(lambda s: s.staff_id == staff_id, STAFF_REMOVED)
        self._hand_back(staff_id)
        return self._end()

    def staff_revoked(
        self, staff_id: str, generation: int, now: float, wall: float
    ) -> list[Action]:
        """``staff_id``'s tokens older than ``generation`` were revoked: consoles that
        signed in with one are closed (4401). What they hold stays theirs: the same
        person signs in again with the new token."""
        self._begin(now, wall)
        self._revoke(
            lambda s: s.staff_id == staff_id and s.token_generation < generation,
            STAFF_TOKEN_REVOKED,
        )
        return self._end()

    def secret_rotated(self, signer: TokenSigner, now: float, wall: float) -> list[Action]:
        """The token secret changed: from now on tokens verify under ``signer``, and
        every session whose token no longer does is closed (4401), guests included."""
        self._begin(now, wall)
        self.signer = signer
        self._revoke(
            lambda s: s.token is not None and signer.verify_generation(s.token) is None,
            SECRET_ROTATED,
        )
        return self._end()

    def _revoke(self, affected: Callable[[Session], bool], why: str) -> None:
        """Close every session ``affected`` picks, signed in or still signing in."""
        for session in self.sessions.values():
            if session.revoked or not affected(session):
                continue
            session.revoked = True
            self._signing_in.pop(session.id, None)
            self._send(session.id, proto.error_frame(ErrorCode.AUTH_FAILED, why, None))
            self._close(session.id, CloseCode.AUTH_FAILED, why)

    def _hand_back(self, staff_id: str) -> None:
        """Every conversation ``staff_id`` holds back to ``waiting``: those in memory
        as decided so far (a claim still being written included), then those only in
        storage; a conversation met twice changes once (the second finds it waiting)."""

        def hand_back(conv: LiveConversation) -> None:
            if not self._transition(conv, "staff_removed", staff_id=staff_id):
                self._release(conv)

        for conv in list(self.conversations.values()):
            hand_back(conv)

        def found(rows: list[ConversationRow]) -> None:
            for row in rows:
                hand_back(self._live(row))

        self._read(None, "held_conversations", (staff_id,), found, ref="staff_removed")

    # -- plumbing ----------------------------------------------------------------------

    def _begin(self, now: float, wall: float) -> None:
        self._out = []
        self._now = now
        self._wall = wall

    def _end(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, session_id: int, frame: str) -> None:
        self._out.append(Send(session_id, frame))

    def _close(self, session_id: int, code: int, reason: str) -> None:
        self._out.append(Close(session_id, code, reason))

    def _continue(self, session_id: int | None, then: Callable[[Any], None], result: Any) -> None:
        session = self.sessions.get(session_id) if session_id is not None else None
        if session_id is not None and (session is None or session.revoked):
            return  # the session is gone (or on its way out): nothing to answer
        if session is None:
            then(result)
            return
        self._guarded(session, lambda: then(result))

    def _guarded(self, session: Session, handle: Callable[[], None]) -> None:
        """Run a frame's handling: a protocol error is a bad frame; success resets the
        count (once the handling is complete, not while it waits for storage)."""
        try:
            handle()
        except _Deferred:
            return
        except ProtocolError as exc:
            self._bad_frame(session, exc)
            return
        session.bad_frames = 0

    def _read(
        self,
        session: Session | None,
        method: str,
        args: tuple[Any, ...],
        then: Callable[[Any], None],
        *,
        ref: str | None = None,
        conv: LiveConversation | None = None,
    ) -> None:
        self._pin(conv)
        self._out.append(Read(method, args, session.id if session else None, ref, then, conv))

    def _write(
        self,
        operation: Operation[Any],
        then: Callable[[Any], None] | None,
        *,
        session: Session | None = None,
        wait: bool = False,
        ref: str | None = None,
        conv: LiveConversation | None = None,
    ) -> None:
        self._pin(conv)
        self._out.append(Write(operation, session.id if session else None, wait, ref, then, conv))

    def _internal(self, session_id: int | None, ref: str | None) -> None:
        if session_id is not None and session_id in self.sessions:
            self._send(
                session_id,
                proto.error_frame(
                    ErrorCode.INTERNAL, "the server could not store that; please retry", ref
                ),
            )

    def _error(
        self, session: Session, exc: ProtocolError, retry_after_ms: int | None = None
    ) -> None:
        self._send(session.id, proto.error_frame(exc.code, exc.message, exc.ref, retry_after_ms))

    def _bad_frame(self, session: Session, exc: ProtocolError) -> None:
        self._error(session, exc)
        session.bad_frames += 1
        if session.bad_frames >= BAD_FRAME_LIMIT:
            self._close(session.id, CloseCode.POLICY, f"{BAD_FRAME_LIMIT} bad frames in a row")

    # -- conversations in memory -----------------------------------------------------------

    def _live(self, row: ConversationRow) -> LiveConversation:
        """The live conversation for ``row``; a loaded one wins over a fresh read."""
        conv = self.conversations.get(row.conversation_id)
        if conv is None:
            conv = self.conversations[row.conversation_id] = LiveConversation(row)
            if self.cluster:
                # Notices of commits between the read of ``row`` and now were not for
                # a live conversation here: catch up from the storage.
                self._out.append(Fill(row.conversation_id))
        return conv

    def _pin(self, conv: LiveConversation | None) -> None:
        if conv is not None:
            conv.busy += 1

    def _unpin(self, conv: LiveConversation | None) -> None:
        if conv is not None:
            conv.busy -= 1
            self._release(conv)

    def _release(self, conv: LiveConversation) -> None:
        if not conv.subscribers and conv.busy == 0:
            self.conversations.pop(conv.conversation_id, None)

    def _broadcast(self, conv: LiveConversation, frame: str, skip: int | None = None) -> None:
        out = self._out
        for session_id in conv.subscribers:
            if session_id != skip:
                out.append(Send(session_id, frame))

    def _summary_changed(self, conv: LiveConversation) -> None:
        if self._signing_in:
            summary = self._summary(conv)
            for changed in self._signing_in.values():
                changed[conv.conversation_id] = summary
        if self.staff_room:
            frame = proto.encode({"type": "conversation", **self._summary(conv)})
            for session_id in self.staff_room:
                self._send(session_id, frame)

    def _summary(self, conv: LiveConversation) -> dict[str, Any]:
        summary = conv.summary()
        if conv.conversation_id in self.remote_guests:
            summary["guest_online"] = True  # online on another server process
        return summary

    # -- presence (extension: who else is on duty) ---------------------------------------

    def _local_on_duty(self, also: Session | None = None) -> list[str]:
        """The names of the staff members signed in here (and ``also``'s), each once
        however many consoles they have open, sorted."""
        names = {self.sessions[sid].name for sid in self.staff_room if sid in self.sessions}
        if also is not None:
            names.add(also.name)
        return sorted(name for name in names if name is not None)

    def _on_duty(self, also: Session | None = None) -> list[str]:
        """Who is on duty: here, and (scale-out) on the other server processes."""
        names = self._local_on_duty(also)
        if not self.remote_staff:
            return names
        return sorted(set(names).union(*self.remote_staff.values()))

    def _presence_frame(self) -> str:
        return proto.encode({"type": "staff_presence", "staff": self._on_duty()})

    def _presence_changed(self, before: list[str], skip: int | None = None) -> None:
        """Tell the staff room who is on duty, when that changed (a second console of
        someone already on duty changes nothing)."""
        if self.cluster:
            here = tuple(self._local_on_duty())
            if here != self._announced_staff:
                self._announced_staff = here
                self._out.append(RelayStaff(here))
        if self._on_duty() == before or not self.staff_room:
            return
        frame = self._presence_frame()
        for session_id in self.staff_room:
            if session_id != skip:
                self._send(session_id, frame)

    def _subscribe(self, session: Session, conv: LiveConversation) -> None:
        assert session.subscriptions is not None
        conv.subscribers.add(session.id)
        session.subscriptions.add(conv)
        self._send(
            session.id,
            proto.encode(
                {
                    "type": "subscribed",
                    "conversation_id": conv.conversation_id,
                    "last_seq": conv.last_seq,
                    "status": conv.status,
                    "assigned_to": conv.assigned_name,
                    # Extension: where the guest's read mark stands (staff consoles
                    # draw it; later moves arrive as ``read`` frames).
                    "guest_read_seq": conv.guest_read_seq,
                }
            ),
        )

    def _detach(self, session: Session) -> None:
        if session.role == "guest" and session.conversation is not None:
            conv = session.conversation
            conv.subscribers.discard(session.id)
            conv.guest_sessions -= 1
            if conv.guest_sessions == 0:
                self._summary_changed(conv)
                self._relay_presence(conv, False)
            self._release(conv)
        elif session.role == "staff" and session.subscriptions is not None:
            # The session has already left ``sessions``: count it in by hand.
            was_on_duty = self._on_duty(also=session)
            self.staff_room.discard(session.id)
            for conv in session.subscriptions:
                conv.subscribers.discard(session.id)
                self._release(conv)
            session.subscriptions.clear()
            self._presence_changed(was_on_duty)

    # -- hello -----------------------------------------------------------------------

    def _hello_phase(self, session: Session, raw: str | bytes) -> None:
        bucket = session.address_bucket
        if bucket is not None:
            wait_ms = bucket.try_take(self._now, HELLO_COST)
            if wait_ms:
                # Not signed in, the client has nothing to retry on this connection.
                self._error(
                    session,
                    ProtocolError(
                        ErrorCode.RATE_LIMITED, "too many requests from your address", "hello"
                    ),
                    retry_after_ms=wait_ms,
                )
                self._close(session.id, CloseCode.RATE_LIMITED, "too many requests from address")
                return
        try:
            frame = proto.parse_client_frame(raw)
        except ProtocolError as exc:
            # A malformed hello is a bad hello; anything else is "not yet".
            if exc.code != ErrorCode.BAD_JSON and exc.ref != "hello":
                exc = ProtocolError(ErrorCode.AUTH_REQUIRED, "send hello first", exc.ref)
            self._bad_frame(session, exc)
            return
        if not isinstance(frame, proto.Hello):
            self._bad_frame(
                session, ProtocolError(ErrorCode.AUTH_REQUIRED, "send hello first", _ref(frame))
            )
            return
        self._hello(session, frame)

    def _hello(self, session: Session, hello: proto.Hello) -> None:
        if hello.token is None:
            if not self.config.open_registration:
                self._auth_failed(
                    session, "this server issues guest tokens at the desk; registration is closed"
                )
                return
            if session.address is not None:
                wait_ms = self.registrations.try_register(session.address, self._now)
                if wait_ms:
                    self._registration_limited(session, wait_ms)
                    return

            def created(row: ConversationRow) -> None:
                if session.id in self.sessions:
                    self._attach_guest(session, row, self.signer.issue("g", row.guest_id))

            self._write(CreateGuest(name=hello.name, room=hello.room), created, session=session,
                        wait=True, ref="hello")  # fmt: skip
            return
        verified = self.signer.verify_generation(hello.token)
        if verified is None:
            self._auth_failed(session, "unknown or invalid token")
            return
        kind, ident, generation = verified
        token = hello.token
        # Known before the read returns, so a revocation meanwhile finds this session.
        session.token = token
        if kind == "g":

            def found_guest(row: ConversationRow | None) -> None:
                if row is None:
                    self._auth_failed(session, "unknown guest")
                elif self._guest_token_expired(row):
                    self._auth_failed(
                        session,
                        f"this guest link was not used for "
                        f"{self.config.guest_token_idle_s / 86400:g} days and has expired",
                    )
                else:
                    self._attach_guest(session, row, token)
                    self._note_guest_seen(row)

            self._read(session, "conversation_of_guest", (ident,), found_guest, ref="hello")
        else:

            def found_staff(found: StaffSignIn) -> None:
                if session.id not in self._signing_in:
                    return  # the session closed while its read was in flight
                if found.member is None:
                    del self._signing_in[session.id]
                    self._auth_failed(session, STAFF_REMOVED)
                elif found.member.generation != generation:
                    del self._signing_in[session.id]
                    self._auth_failed(session, STAFF_TOKEN_REVOKED)
                else:
                    self._attach_staff(session, found, token, resolved=hello.resolved)

            session.staff_id = ident
            session.token_generation = generation
            self._signing_in[session.id] = {}
            self._read(session, "staff_sign_in", (ident,), found_staff, ref="hello")

    def _registration_limited(self, session: Session, wait_ms: int) -> None:
        """Too many new guests from this address: not a bad frame; the client comes
        back after ``retry_after_ms`` (close 4429, as the protocol says)."""
        exc = ProtocolError(
            ErrorCode.RATE_LIMITED, "too many new guests from this address; retry later", "hello"
        )
        self._error(session, exc, wait_ms)
        self._close(session.id, CloseCode.RATE_LIMITED, "too many registrations")

    def _auth_failed(self, session: Session, why: str) -> None:
        self._send(session.id, proto.error_frame(ErrorCode.AUTH_FAILED, why, "hello"))
        self._close(session.id, CloseCode.AUTH_FAILED, "authentication failed")

    def _guest_token_expired(self, row: ConversationRow) -> bool:
        idle = self.config.guest_token_idle_s
        return idle > 0 and self._wall - max(row.updated_ts, row.last_seen_ts) > idle

    def _note_guest_seen(self, row: ConversationRow) -> None:
        """Record the sign-in, if idle expiry is on and the record is old enough."""
        if self.config.guest_token_idle_s > 0 and (
            self._wall - row.last_seen_ts > GUEST_SEEN_REFRESH
        ):
            self._write(TouchGuest(guest_id=row.guest_id, at=self._wall), None)

    def _attach_guest(self, session: Session, row: ConversationRow, token: str) -> None:
        conv = self._live(row)
        session.token = token
        session.role = "guest"
        session.conversation = conv
        session.name = conv.guest_name
        self._hold_bucket(session, "g:" + conv.guest_id)
        # Subscribing and reading last_seq happen in one step: every later commit
        # reaches this session live.
        conv.subscribers.add(session.id)
        conv.guest_sessions += 1
        self._send(
            session.id,
            proto.encode(
                {
                    "type": "welcome",
                    "role": "guest",
                    "token": token,
                    "guest_id": conv.guest_id,
                    "conversation_id": conv.conversation_id,
                    "status": conv.status,
                    "last_seq": conv.last_seq,
                    "read_seq": conv.read_seq,
                    "heartbeat_s": self.config.heartbeat_s,
                    "server": self.config.server_name,
                }
            ),
        )
        if conv.status != "ai":
            self._send(
                session.id,
                proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name),
            )
        if conv.guest_sessions == 1:
            self._summary_changed(conv)
            self._relay_presence(conv, True)

    def _attach_staff(
        self, session: Session, found: StaffSignIn, token: str, *, resolved: bool = False
    ) -> None:
        member = found.member
        assert member is not None
        session.token = token
        session.role = "staff"
        session.staff_id = member.staff_id
        session.name = member.name
        session.subscriptions = set()
        self._hold_bucket(session, "s:" + member.staff_id)
        self._send(
            session.id,
            proto.encode(
                {
                    "type": "welcome",
                    "role": "staff",
                    "token": token,
                    "staff_id": member.staff_id,
                    "name": member.name,
                    "heartbeat_s": self.config.heartbeat_s,
                    "server": self.config.server_name,
                }
            ),
        )
        # One step: the queue, the staff room and re-subscription, so no summary change
        # falls between the queue and the live pushes.
        held = [self._live(row) for row in found.held]
        # Storage lists conversations resolved in the last day too; only a console that
        # asked for them (hello's "resolved") gets them: the contract's queue has none.
        summaries = {
            r.conversation_id: LiveConversation(r).summary()
            for r in found.queue
            if resolved or r.status != "resolved"
        }
        # Changed since the read began: just updated, so active by any measure.
        summaries.update(self._signing_in.pop(session.id, {}))
        for conv in self.conversations.values():
            # A guest online right now counts as active, even before writing.
            if (
                conv.status in ("waiting", "staff")
                or conv.guest_sessions
                or conv.conversation_id in summaries
                or (resolved and conv.status == "resolved" and conv.updated_ts > self._wall - DAY)
            ):
                summaries[conv.conversation_id] = conv.summary()
        for conversation_id in self.remote_guests.keys() & summaries.keys():
            summaries[conversation_id]["guest_online"] = True  # on another server process
        ordered = sorted(summaries.values(), key=lambda s: s["updated_ts"], reverse=True)
        self._send(
            session.id, proto.encode({"type": "queue", "conversations": ordered[:QUEUE_LIMIT]})
        )
        was_on_duty = self._on_duty()
        self.staff_room.add(session.id)
        self._send(session.id, self._presence_frame())
        self._presence_changed(was_on_duty, skip=session.id)
        for conv in held:
            if conv.status == "staff" and conv.assigned_to == member.staff_id:
                self._subscribe(session, conv)
            else:
                self._release(conv)

    # -- frames after hello ------------------------------------------------------------

    def _signed_in_frame(self, session: Session, raw: str | bytes) -> None:
        try:
            frame = proto.parse_client_frame(raw)
        except ProtocolError as exc:
            self._bad_frame(session, exc)
            return
        if session.bucket is not None or session.address_bucket is not None:
            wait_ms = self._charge(session, FRAME_COSTS.get(type(frame), 1.0))
            if wait_ms:
                self._over_limit(session, frame, wait_ms)
                return
        if session.role == "guest":
            self._guarded(session, lambda: self._guest_frame(session, frame))
        else:
            self._guarded(session, lambda: self._staff_frame(session, frame))

    def _common_frame(self, session: Session, frame: proto.ClientFrame) -> bool:
        if isinstance(frame, proto.Ping):
            self._send(session.id, proto.pong_frame(frame.id, self._wall))
            return True
        if isinstance(frame, proto.Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already received", "hello")
        return False

    def _guest_frame(self, session: Session, frame: proto.ClientFrame) -> None:
        conv = session.conversation
        assert conv is not None
        if self._common_frame(session, frame):
            return
        if isinstance(frame, proto.SendMessage):
            self._guest_message(session, conv, frame)
        elif isinstance(frame, proto.HistoryRequest):
            self._history(session, conv, frame)
        elif isinstance(frame, proto.Escalate):
            if not self._transition(conv, "escalate", session=session, ref="escalate"):
                self._send(
                    session.id,
                    proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name),
                )
        elif isinstance(frame, proto.Typing):
            typing = proto.typing_frame(conv.conversation_id, "guest", frame.active)
            self._broadcast(conv, typing, session.id)
            self._relay(conv, typing)
        elif isinstance(frame, proto.Read):
            self._read_mark(session, conv, "guest", frame.seq)
        elif isinstance(frame, proto.StaffAction):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"{frame.action} is for staff only", frame.action
            )

    def _guest_message(
        self, session: Session, conv: LiveConversation, frame: proto.SendMessage
    ) -> None:
        author_key = "g:" + conv.guest_id
        op = AppendMessage(
            conversation_id=conv.conversation_id,
            sender="guest",
            author=conv.guest_id,
            author_key=author_key,
            text=frame.text,
            client_msg_id=frame.client_msg_id,
        )
        instant = self._answer_at_once(conv, op)
        conv.guest_writes += 1
        self._post(
            session,
            conv,
            op,
            after=lambda result: self._after_guest_message(conv, result.message, result, instant),
        )

    # -- rate limits -------------------------------------------------------------------

    def _hold_bucket(self, session: Session, key: str) -> None:
        """Share the bucket of ``key`` (a guest, a staff member) with their other
        sessions: a second tab does not bring a second allowance."""
        if self.config.rate_limit > 0:
            session.bucket_key = key
            session.bucket = self._buckets.hold(key, self._now)

    def _charge(self, session: Session, cost: float) -> int:
        """Take ``cost`` from the session's buckets if both have it; else take nothing
        and return the wait in ms."""
        now = self._now
        bucket = session.bucket
        address_bucket = session.address_bucket
        wait_ms = bucket.wait_ms(now, cost) if bucket is not None else 0
        if address_bucket is not None:
            wait_ms = max(wait_ms, address_bucket.wait_ms(now, cost))
        if wait_ms:
            return wait_ms
        if bucket is not None:
            bucket.take(cost)
        if address_bucket is not None:
            address_bucket.take(cost)
        return 0

    def _over_limit(self, session: Session, frame: proto.ClientFrame, wait_ms: int) -> None:
        """Refuse a frame over the limit (``rate_limited``, not a bad frame)."""
        if isinstance(frame, proto.SendMessage):
            if session.role == "guest":
                conv = session.conversation
                assert conv is not None
                self._message_over_limit(
                    session, conv.conversation_id, "g:" + conv.guest_id, frame, wait_ms
                )
                return
            if frame.conversation_id is not None and session.staff_id is not None:
                self._message_over_limit(
                    session, frame.conversation_id, "s:" + session.staff_id, frame, wait_ms
                )
                return
        self._refuse(
            session,
            ProtocolError(ErrorCode.RATE_LIMITED, "slow down: too many requests", _ref(frame)),
            wait_ms,
        )

    def _refuse(
        self, session: Session, exc: ProtocolError, wait_ms: int, now: float | None = None
    ) -> None:
        """Answer ``rate_limited``; a session still refused 10 s into a flood is closed.
        ``now``: when the refused frame came (default: now)."""
        if now is None:
            now = self._now
        # A flood ends only after a quiet spell; frames that squeeze through at the
        # refill rate do not end it.
        if session.flood_since is None or now - session.last_limited > FLOOD_QUIET:
            session.flood_since = now
        session.last_limited = now
        if now - session.flood_since >= FLOOD_CLOSE_AFTER:
            self._close(session.id, CloseCode.RATE_LIMITED, "still flooding after being told")
        self._error(session, exc, retry_after_ms=wait_ms)

    def _message_over_limit(
        self,
        session: Session,
        conversation_id: str,
        author_key: str,
        frame: proto.SendMessage,
        wait_ms: int,
    ) -> None:
        now = self._now

        def looked_up(stored: Message | None) -> None:
            # A retry of a stored message is answered before the limit applies.
            if stored is not None:
                self._send(session.id, proto.ack_frame(stored))
                return
            self._refuse(
                session,
                ProtocolError(
                    ErrorCode.RATE_LIMITED, "slow down: too many messages", frame.client_msg_id
                ),
                wait_ms,
                now,
            )

        self._read(
            session,
            "message_by_client_id",
            (conversation_id, author_key, frame.client_msg_id),
            looked_up,
            ref=frame.client_msg_id,
            conv=self.conversations.get(conversation_id),
        )

    def _post(
        self,
        session: Session,
        conv: LiveConversation,
        op: AppendMessage,
        after: Callable[[Appended], None] | None = None,
    ) -> None:
        """Store a client's message without holding up its next frame: the ack (or an
        ``internal`` error) follows the commit."""

        def committed(result: Appended) -> None:
            message = result.message
            if op.sender == "guest":
                conv.guest_writes -= 1
            if session.id in self.sessions:
                self._send(session.id, proto.ack_frame(message))
            if not result.duplicate:
                self._committed(conv, result)
                if after is not None:
                    after(result)
                self._summary_changed(conv)

        self._write(op, committed, session=session, ref=op.client_msg_id, conv=conv)

    def _committed(self, conv: LiveConversation, result: Appended) -> None:
        """A new message is stored: the live state follows, then every subscriber."""
        frame = self._advance(conv, result)
        if frame is not None:
            self._broadcast(conv, frame)

    def _advance(self, conv: LiveConversation, result: Appended) -> str | None:
        """The live state follows a new message; returns the frame that pushes it, or
        None when a fill will."""
        message = result.message
        if self.cluster and message.seq != conv.last_seq + 1:
            # Another process committed in between and we have not pushed it yet (or a
            # fill already pushed this one): the fill pushes everything in seq order.
            if message.seq > conv.last_seq:
                self._out.append(Fill(conv.conversation_id))
            return None
        conv.last_seq = message.seq
        conv.preview = message.text[:PREVIEW_CHARS]
        conv.updated_ts = result.at or self._wall
        return proto.message_frame(message)

    def _append(
        self,
        conv: LiveConversation,
        op: AppendMessage,
        after: Callable[[Appended], None] | None = None,
        *,
        session: Session | None = None,
        ref: str | None = None,
    ) -> None:
        """Store a message nobody acknowledges (system, ai), pushing it on commit. With
        ``session``, that session's next frame waits for the commit."""

        def committed(result: Appended) -> None:
            if op.reply_to is not None and (result.conflict or result.duplicate):
                if after is not None:  # the concierge's reply, refused: it decides
                    after(result)
                return
            if result.conflict is not None:
                self._transition_lost(conv, session, ref)
                return
            if result.duplicate:  # pragma: no cover - these carry no client_msg_id
                return
            self._committed(conv, result)
            if op.status is not None:
                conv.status, conv.assigned_to, conv.assigned_name = op.status
                self._broadcast(
                    conv, proto.status_frame(conv.conversation_id, conv.status, conv.assigned_name)
                )
                self._transition_done(conv)
            if after is not None:
                after(result)
            self._summary_changed(conv)

        self._write(op, committed, session=session, wait=session is not None, ref=ref, conv=conv)

    # -- the status table ---------------------------------------------------------------

    def _transition(
        self,
        conv: LiveConversation,
        event: Event,
        *,
        session: Session | None = None,
        ref: str | None = None,
        staff_id: str | None = None,
        staff_name: str | None = None,
        after: Callable[[Appended], None] | None = None,
    ) -> bool:
        """Apply a status-table event to the state as decided so far; store its system
        message and new status in one write. False when nothing changes. Raises
        ProtocolError (conflict, forbidden) from the table."""
        before = conv.decided
        transition = apply_event(before, event, staff_id=staff_id, staff_name=staff_name)
        if transition is None:
            return False
        new = transition.state
        conv.upcoming = new
        conv.transitions += 1
        self._append(
            conv,
            AppendMessage(
                conversation_id=conv.conversation_id,
                sender="system",
                author=None,
                text=transition.system_text,
                status=(new.status, new.assigned_to, new.assigned_name),
                # The storage applies it only to the state it was decided against.
                expect=(before.status, before.assigned_to),
            ),
            after,
            session=session,
            ref=ref,
        )
        return True

    def _transition_done(self, conv: LiveConversation) -> None:
        conv.transitions -= 1
        if conv.transitions == 0:
            conv.upcoming = None

    def _transition_lost(
        self, conv: LiveConversation, session: Session | None, ref: str | None
    ) -> None:
        """The storage refused a transition: another server process changed the status
        first. Nothing was written; the asker hears ``conflict`` and this process
        catches up with what the other one committed."""
        self._transition_done(conv)
        if session is not None and session.id in self.sessions:
            self._send(
                session.id,
                proto.error_frame(
                    ErrorCode.CONFLICT, "someone else changed this conversation first", ref
                ),
            )
        self._out.append(Fill(conv.conversation_id))

    # -- the concierge ----------------------------------------------------------------

    def _answer_at_once(
        self, conv: LiveConversation, op: AppendMessage
    ) -> tuple[bool, Callable[[], None]] | None:
        """Give the guest message ``op`` its instant answer to store with it, when the
        concierge answers at once and nothing earlier decides otherwise: the
        conversation is the concierge's, with no change of status in flight, no
        answer under way and no other guest message being written (so answers stay in
        the order of the messages). Returns whether the answer hands over to staff,
        and what to call once it is stored; None when there is no instant answer."""
        answer_now = self.instant_answer
        if (
            answer_now is None
            or not self.concierge
            or self.cluster  # another process may answer first: a reply lease decides
            or conv.status != "ai"
            or conv.upcoming is not None
            or conv.replying
            or conv.replies
            or conv.guest_writes
        ):
            return None
        text, escalate, keep = answer_now(
            conv.conversation_id, conv.guest_id, conv.guest_name, op.text
        )
        op.answer = AppendMessage(
            conversation_id=conv.conversation_id,
            sender="ai",
            author="concierge",
            text=text,
            # Still the concierge's when stored (the storage checks what the hub
            # decided): else the guest message is stored alone and asks again after
            # its commit.
            expect=("ai", None),
        )
        return escalate, keep

    def _after_guest_message(
        self,
        conv: LiveConversation,
        message: Message,
        stored: Appended | None = None,
        instant: tuple[bool, Callable[[], None]] | None = None,
    ) -> None:
        """A guest message is stored: reopen a resolved conversation, then let the
        concierge answer (only when there is work: most messages in a busy hotel go to
        conversations with staff, or to a server without a concierge). ``stored``: its
        commit, which may hold its ``instant`` answer (see :meth:`_answer_at_once`)."""
        answer = stored.answer if stored is not None else None
        if instant is not None and answer is not None and answer.conflict is None:
            escalate, keep = instant
            keep()
            # Typing, then the answer, then typing's end: the order of any reply, in
            # the same write as the ack (each subscriber's three together: the shell
            # queues a session's run of frames at once).
            cid = conv.conversation_id
            frame = self._advance(conv, answer)
            frames = [proto.typing_frame(cid, "ai", True), proto.typing_frame(cid, "ai", False)]
            if frame is not None:
                frames.insert(1, frame)
            out = self._out
            for session_id in conv.subscribers:
                out += [Send(session_id, f) for f in frames]
            if escalate:
                self._transition(conv, "concierge_escalate")
            return
        status = conv.decided.status
        if status == "resolved":
            self._transition(
                conv, "guest_message", after=lambda _: self._ask_concierge(conv, message)
            )
        elif status == "ai":
            self._ask_concierge(conv, message)

    def _ask_concierge(self, conv: LiveConversation, message: Message) -> None:
        if not self.concierge:
            return
        if conv.replying:
            # One answer at a time per conversation, in the order asked.
            if conv.replies is None:
                conv.replies = deque()
            conv.replies.append(message)
            return
        if conv.decided.status != "ai":
            return
        conv.replying = True
        conv.answering = message.seq
        self._pin(conv)
        self._broadcast(conv, proto.typing_frame(conv.conversation_id, "ai", True))
        self._out.append(StartReply(conv.conversation_id, conv.guest_id, conv.guest_name, message))

    def _concierge_answer(self, conv: LiveConversation, text: str, escalate: bool) -> None:
        if not conv.replying:
            return
        if conv.decided.status != "ai":
            # Staff took over while the concierge was thinking.
            self._reply_done(conv, typing_off=True)
            return

        def answered(result: Appended) -> None:
            if result.duplicate or result.conflict is not None:
                # Stored nothing: the guest message was answered already (by another
                # server process, or before a restart), or the conversation left the
                # concierge on another process. Catch up with what it committed.
                if self.cluster:
                    self._out.append(Fill(conv.conversation_id))
                self._reply_done(conv, typing_off=True)
                return
            # Typing ends with the answer, in the same write.
            self._broadcast(conv, proto.typing_frame(conv.conversation_id, "ai", False))
            if escalate:
                self._transition(conv, "concierge_escalate")
            self._reply_done(conv, typing_off=False)

        self._append(
            conv,
            AppendMessage(
                conversation_id=conv.conversation_id,
                sender="ai",
                author="concierge",
                text=text,
                # At most one reply per guest message, and only while it is the
                # concierge's: both decided by the storage, for every server process.
                expect=("ai", None),
                reply_to=conv.answering,
            ),
            answered,
        )

    def _reply_done(self, conv: LiveConversation, *, typing_off: bool) -> None:
        if not conv.replying:
            return
        if typing_off:
            self._broadcast(conv, proto.typing_frame(conv.conversation_id, "ai", False))
        conv.replying = False
        conv.answering = 0
        self._unpin(conv)
        while conv.replies:
            self._ask_concierge(conv, conv.replies.popleft())
            if conv.replying:
                break

    # -- history and read marks --------------------------------------------------------

    def _history(
        self, session: Session, conv: LiveConversation, frame: proto.HistoryRequest
    ) -> None:
        if session.history_pending:
            # One page of up to 1 MiB at a time per connection: a client that does
            # not read its replies must not make the server hold more of them.
            self._refuse(
                session,
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    "one history request at a time: wait for the reply",
                    "history",
                ),
                HISTORY_RETRY_MS,
            )
            return
        session.history_pending = True

        def found(messages: list[Message]) -> None:
            last_seq = max(conv.last_seq, messages[-1].seq if messages else 0)
            full_page = len(messages) >= frame.limit
            self._send(
                session.id,
                proto.history_frame(conv.conversation_id, messages, last_seq, full_page=full_page),
            )
            self._out.append(ReportWritten(session.id))

        self._read(
            session,
            "history",
            (conv.conversation_id, frame.after_seq, frame.limit),
            found,
            ref="history",
            conv=conv,
        )
        raise _Deferred

    def _read_mark(
        self, session: Session, conv: LiveConversation, reader: Reader, seq: int
    ) -> None:
        seq = min(seq, conv.last_seq)
        if reader == "staff" and seq > conv.read_seq:
            conv.read_seq = seq
            self._summary_changed(conv)
        elif reader == "guest":
            conv.guest_read_seq = max(conv.guest_read_seq, seq)
        read = proto.read_frame(conv.conversation_id, reader, seq)
        self._broadcast(conv, read, session.id)
        self._relay(conv, read)
        self._write(
            SetRead(conversation_id=conv.conversation_id, reader=reader, seq=seq),
            None,
            session=session,
            wait=True,
            ref="read",
            conv=conv,
        )

    # -- staff -------------------------------------------------------------------------

    def _staff_frame(self, session: Session, frame: proto.ClientFrame) -> None:
        if self._common_frame(session, frame):
            return
        if isinstance(frame, proto.Escalate):
            raise ProtocolError(ErrorCode.FORBIDDEN, "escalate is for guests", "escalate")
        conversation_id = getattr(frame, "conversation_id", None)
        if conversation_id is None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"staff must name the conversation_id in {_ref(frame)}",
                _ref(frame),
            )
        conv = self.conversations.get(conversation_id)
        if conv is not None:
            self._pin(conv)
            try:
                self._staff_conversation_frame(session, conv, frame)
            finally:
                self._unpin(conv)
            return

        def found(row: ConversationRow | None) -> None:
            if row is None:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND, f"no conversation {conversation_id}", conversation_id
                )
            live = self._live(row)
            self._pin(live)
            try:
                self._staff_conversation_frame(session, live, frame)
            finally:
                self._unpin(live)

        self._read(session, "conversation", (conversation_id,), found, ref=_ref(frame))
        raise _Deferred

    def _staff_conversation_frame(
        self, session: Session, conv: LiveConversation, frame: proto.ClientFrame
    ) -> None:
        assert session.staff_id is not None and session.name is not None
        assert session.subscriptions is not None
        holds = conv.status == "staff" and conv.assigned_to == session.staff_id
        if isinstance(frame, proto.StaffAction):
            self._staff_action(session, conv, frame.action)
        elif isinstance(frame, proto.SendMessage):
            if not holds:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    "claim the conversation before writing",
                    frame.client_msg_id,
                )
            self._post(
                session,
                conv,
                AppendMessage(
                    conversation_id=conv.conversation_id,
                    sender="staff",
                    author=session.name,
                    author_key="s:" + session.staff_id,
                    text=frame.text,
                    client_msg_id=frame.client_msg_id,
                ),
            )
        elif isinstance(frame, proto.HistoryRequest):
            self._history(session, conv, frame)
        elif isinstance(frame, proto.Typing):
            if not holds:
                raise ProtocolError(ErrorCode.FORBIDDEN, "only the holder may type", "typing")
            typing = proto.typing_frame(conv.conversation_id, "staff", frame.active)
            self._broadcast(conv, typing, session.id)
            self._relay(conv, typing)
        elif isinstance(frame, proto.Read):
            if not holds and conv not in session.subscriptions:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, "claim or watch the conversation first", "read"
                )
            self._read_mark(session, conv, "staff", frame.seq)

    def _staff_action(self, session: Session, conv: LiveConversation, action: str) -> None:
        assert session.staff_id is not None and session.subscriptions is not None
        if action == "watch":
            self._subscribe(session, conv)
        elif action == "unwatch":
            conv.subscribers.discard(session.id)
            session.subscriptions.discard(conv)
            self._release(conv)
        elif action == "claim":

            def subscribe_claimer(_: Appended) -> None:
                # Runs right after the system message and status reached the existing
                # subscribers, so the claimer's last_seq includes that message.
                if session.id in self.sessions and not session.revoked:
                    self._subscribe(session, conv)

            changed = self._transition(
                conv,
                "claim",
                session=session,
                ref="claim",
                staff_id=session.staff_id,
                staff_name=session.name,
                after=subscribe_claimer,
            )
            if not changed:
                self._subscribe(session, conv)
        else:
            self._transition(
                conv,
                action,  # type: ignore[arg-type]
                session=session,
                ref=action,
                staff_id=session.staff_id,
                staff_name=session.name,
            )


def _ref(frame: proto.ClientFrame) -> str:
    if isinstance(frame, proto.SendMessage):
        return frame.client_msg_id
    if isinstance(frame, proto.StaffAction):
        return frame.action
    return {
        proto.Hello: "hello",
        proto.HistoryRequest: "history",
        proto.Escalate: "escalate",
        proto.Typing: "typing",
        proto.Read: "read",
        proto.Ping: "ping",
    }.get(type(frame), "unknown")
