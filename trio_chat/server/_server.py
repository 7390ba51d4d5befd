"""The Trio guest-chat server: one port, protocol v1, durable history.

The server is a shell around the session core (:class:`~trio_chat.core.hub.Hub`): it
accepts connections, speaks HTTP and WebSocket, feeds each session's frames to the hub
and carries out what the hub answers (queue a frame, close a session, write or read
storage, ask the concierge). The rules of the protocol live in the hub, once.

Task tree (every task has an owner that outlives it)::

    ChatServer.run
    ├── Store.run                        the one database writer (group commit)
    └── work nursery
        ├── accept loop (trio.serve_listeners)
        ├── heartbeat sweeper            one task pings every connection
        ├── concierge replies            one task per answer, with its timeouts
        └── one nursery per TCP connection
            ├── HTTP front, then the session: the one reader of its socket
            ├── writer (only while the socket cannot take the outbox at once)
            └── a heartbeat ping (only while one is in flight)

Everything that must follow a commit (the ack, the pushes, the concierge) is the hub's
answer to :meth:`Hub.stored`, called from the store's commit callbacks in commit order,
so it happens exactly once and in ``seq`` order whatever becomes of the connection
that asked for it.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import h11
import trio

from .._version import __version__
from ..core import protocol as proto
from ..core.errors import ConnectionLost, ProtocolError, StorageError
from ..core.hub import (
    Action,
    Close,
    Fill,
    Hub,
    HubConfig,
    InstantAnswer,
    Read,
    Relay,
    RelayStaff,
    ReportWritten,
    Send,
    StartReply,
    Write,
)
from ..core.protocol import CloseCode, ErrorCode, Message
from ..core.storage import ConversationRow, ExpireSilentGuests, Revocation, StorageBackend
from ..core.tokens import TokenSigner
from . import _admin
from ._admission import (
    ConnectionLimits,
    OriginPolicy,
    default_max_connections,
    peer_address,
    serve_listeners_with_backoff,
)
from ._backends import open_backend
from ._cluster import Cluster
from ._concierge import KnowledgeBase, Responder, ResponderReply, ResponderRequest, RulesResponder
from ._connection import Connection
from ._http import HttpFront, PrefixStream, json_response, static_response, text_response
from ._llm import LlmResponder, LlmSettings
from ._proxy_protocol import ProxyHeaderError, read_proxy_header
from ._reply_lease import ReplyLeases
from ._secrets import token_secret
from ._staff_console import canned_response, staff_page
from ._store import Database, Store
from ._tls import TlsHttpFront, server_ssl_context
from ._wire import (
    DEFAULT_ENGINE,
    ENGINES,
    WebSocket,
    handshake_response,
)

__all__ = ["GC_THRESHOLDS", "ChatServer", "ServerConfig"]

log = logging.getLogger("trio_chat.server")


def _no_drafts(text: str) -> None:
    """An instant answer has no drafts to show."""


def _nothing_to_keep() -> None:
    """A failed responder's stand-in reply: nothing to remember."""


# What the guest reads when the responder raised: it hands over to staff.
RESPONDER_FAILED: Final = ResponderReply(
    "I'm sorry, I'm having trouble answering right now. I'm "
    "asking a member of our team to help you.",
    escalate=True,
)

# The collector thresholds of processes that hold thousands of long-lived objects: the
# server (``trio-chat serve``) and the load generators. CPython's defaults rescan them
# all again and again, in pauses of 60-200 ms (see docs/benchmarks.md).
GC_THRESHOLDS: Final = (50_000, 50, 1_000)

SERVER_NAME: Final = f"trio-chat/{__version__}"

T = TypeVar("T")


@dataclass
class ServerConfig:
    """Everything ``trio-chat serve`` can set. Times are in seconds."""

    db_path: str | Path = "trio-chat.db"  # or a postgresql:// URL (scale-out)
    host: str = "127.0.0.1"
    port: int = 8765
    hello_timeout: float = 10.0
    heartbeat: float = 20.0
    concierge: str = "rules"  # "rules", "llm" (needs ``llm``) or "off"
    rate_limit: float = 10.0  # tokens (a message: 1) per second per guest/staff; 0 = off
    rate_burst: int = 20
    open_registration: bool = True
    max_frame_bytes: int = proto.MAX_FRAME_BYTES
    outbox_limit: int = 256  # frames queued for one connection before it is cut off
    handshake_timeout: float = 10.0
    close_timeout: float = 2.0
    # A restart's reconnect.after_ms: the window opens once this process is likely gone
    # and its successor listening, then spreads the crowd at about the rate a server
    # takes reconnections. Storm benchmark, 10,000 guests on two cores: the drain took
    # 0.38 ms per connection (0.54 before writes stopped leaving reference cycles), and
    # a crowd spread over 5 s (the client's own crash spread) was taken in without a
    # queue; 0.75 + 1.5 ms each had them back only after 26 s, 0.4 + 0.5 after 13.8 s.
    restart_delay: float = 0.25  # a new process's start, after this one is gone
    drain_per_connection: float = 0.0004  # this process's shutdown, per connection
    shutdown_spread: float = 3.0  # the window is at least this long,
    shutdown_spread_per_connection: float = 0.0005  # and at least this much per connection
    shutdown_grace: float = 5.0  # how long shutdown waits for in-flight work
    typing_delay: float = 0.3  # how long the concierge "types" before answering
    responder_timeout: float = 30.0
    synchronous: str = "FULL"
    backlog: int = 4096
    frame_engine: str = DEFAULT_ENGINE  # decodes incoming frames: "wsproto" or "websockets"
    seed: int | None = None  # for the shutdown spread; None = random
    # -- memory and rate limits (docs/security.md) --
    # Bytes one connection may make the server hold (outbox, the write under way, what
    # the socket did not take) before it is cut off with 1013; one frame always fits.
    outbox_limit_bytes: int = 4 * 1024 * 1024
    # A second bucket per client address, shared by all its sessions (a hotel's NAT):
    # tokens per second and burst; 0 = off.
    rate_limit_per_ip: float = 300.0
    rate_burst_per_ip: int = 3000
    # Staff hardening: revocation, secrets and tokens (docs/security.md).
    secret_file: str | Path | None = None  # the token secret's own file; None = the database
    revocation_poll: float = 0.5  # how often to look for removed/revoked staff; 0 = never
    guest_token_idle_days: float = 30.0  # a guest token unused this long expires; 0 = never
    # http hardening: admission and abuse limits (each 0 = off; benchmarks turn them off)
    max_connections: int | None = None  # open TCP connections; None = open-file limit - 64
    max_connections_per_ip: int = 500  # generous: a hotel's guests share one NAT address
    allowed_origins: tuple[str, ...] = ()  # besides our own; () = also loopback pages
    registrations_per_minute: float = 30.0  # new guests per address (hello, token null)
    registration_burst: int = 60
    expire_silent_guests: float = 7 * 86400.0  # forget guests who never wrote after this
    # TLS (hardening: tls). With a context, or a certificate and key (PEM), the port
    # serves https:// and wss:// only; a handshake not done in time closes the connection.
    ssl_context: ssl.SSLContext | None = None
    certfile: str | Path | None = None
    keyfile: str | Path | None = None  # None: the key is in certfile
    tls_handshake_timeout: float = 10.0
    llm: LlmSettings | None = None  # the language-model concierge (concierge="llm")
    # -- scale-out: several processes on one PostgreSQL (db_path = postgresql://...) ----
    bus: str | None = None  # redis://... : fan-out between the processes; None = alone
    poll_interval: float = 1.0  # while the bus is down, read the database this often
    # Behind a load balancer: every connection opens with a PROXY header (v1 or v2)
    # naming the client, whose address the per-address limits count.
    proxy_protocol: bool = False
    # -- reply lease: the concierge's owed replies in a cluster (docs/deployment.md) ----
    # The answering node's lease on a guest message, renewed while it answers; once it
    # lapses (the node died) another node's recovery scan, run every half lease, answers.
    # 0 = no leases: only the start-up recovery, as on one node.
    reply_lease: float = 10.0


# -------------------------------------------------------------------------- server


class ChatServer:
    """The guest-chat server.

    ``responder`` replaces the concierge (anything implementing
    :class:`~trio_chat.Responder`); by default ``config.concierge`` picks the rules
    concierge or none. ``storage`` replaces the SQLite file (``config.db_path``) with
    another backend, such as the memory one the mock server runs on. Start it with
    ``port = await nursery.start(server.run)``; stop it gracefully with
    :meth:`shutdown`, or cancel it.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        responder: Responder | None = None,
        storage: StorageBackend | None = None,
    ):
        self.config = config if config is not None else ServerConfig()
        self._storage = storage
        if responder is None and self.config.concierge == "rules":
            responder = RulesResponder()
        elif responder is None and self.config.concierge == "llm":
            if self.config.llm is None:
                raise ValueError("concierge='llm' needs ServerConfig.llm (the model's address)")
            responder = LlmResponder(self.config.llm)
        elif self.config.concierge not in ("rules", "llm", "off"):
            raise ValueError(f"unknown concierge {self.config.concierge!r} (use rules, llm or off)")
        self._responder = responder
        self.port: int | None = None
        self.started_at = time.monotonic()
        self.connections: dict[int, Connection] = {}  # by session number
        # While commit callbacks run: connections with frames to write at the end.
        self.corked: list[Connection] | None = None
        self.closes: Counter[int] = Counter()  # connections closed, by close code
        self.outbox_peak_bytes = 0  # the most one connection has made us hold
        self._sessions = itertools.count(1)
        self._random = random.Random(self.config.seed)
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._accepting = trio.CancelScope()
        self._work: trio.Nursery | None = None
        self._store: Store | None = None
        self._hub: Hub | None = None
        self._handlers = 0
        self._background = 0
        self._idle = trio.Event()  # set whenever a handler or background task ends
        self._replies_done = trio.Event()  # set whenever a concierge reply ends
        self._froze_gc = False
        self._revocations = trio.CancelScope()  # the revocation watcher's
        self._revocation_kick = trio.Event()  # look now (a removal made in this process)
        max_connections = self.config.max_connections
        self.limits = ConnectionLimits(
            default_max_connections() if max_connections is None else max_connections,
            self.config.max_connections_per_ip,
        )
        self.origins = OriginPolicy(self.config.allowed_origins, self.config.host)
        self.expired_guests = 0
        self._front: HttpFront | None = None
        self._cluster: Cluster | None = None
        self._reply_leases: ReplyLeases | None = None  # a cluster's (reply lease)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def responder(self) -> Responder | None:
        return self._responder

    @responder.setter
    def responder(self, responder: Responder | None) -> None:
        self._responder = responder
        if self._hub is not None:
            self._hub.concierge = responder is not None
            self._hub.instant_answer = self._instant_answer()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the server is not running"
        return self._store

    @property
    def hub(self) -> Hub:
        assert self._hub is not None, "the server is not running"
        return self._hub

    @contextmanager
    def _corked(self) -> Iterator[None]:
        """Frames delivered inside go out together at the end, one write per
        connection: a committed batch's acks, messages and summaries."""
        corked: list[Connection] = []
        self.corked = corked
        try:
            yield
        finally:
            self.corked = None
            for conn in corked:
                try:
                    conn.flush()
                except Exception:
                    # This runs on the loop's own callback: a bug here must cost one
                    # connection, not every other write of the batch (or the server).
                    log.exception("writing to a connection failed")
                    conn._writer_done()
                    conn.request_close(CloseCode.SERVER_ERROR, "internal error")

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (graceful) or cancellation.

        Reports the bound port through ``task_status``. Raises :class:`StorageError`
        if the database cannot be opened and ``OSError`` if the port cannot be bound.
        """
        db: StorageBackend
        if self._storage is not None:
            db = self._storage
        else:
            db = await trio.to_thread.run_sync(
                lambda: open_backend(self.config.db_path, synchronous=self.config.synchronous)
            )
        try:
            self._hub = Hub(
                TokenSigner(token_secret(db, self.config.secret_file)),
                HubConfig(
                    heartbeat_s=self.config.heartbeat,
                    server_name=SERVER_NAME,
                    open_registration=self.config.open_registration,
                    rate_limit=self.config.rate_limit,
                    rate_burst=self.config.rate_burst,
                    rate_limit_per_ip=self.config.rate_limit_per_ip,
                    rate_burst_per_ip=self.config.rate_burst_per_ip,
                    guest_token_idle_s=self.config.guest_token_idle_days * 86400,
                    registrations_per_minute=self.config.registrations_per_minute,
                    registration_burst=self.config.registration_burst,
                ),
                concierge=self._responder is not None,
            )
            if self.config.bus:
                if not hasattr(db, "changes_since"):
                    raise StorageError("a cluster (--bus) needs a postgresql:// database")
                self._cluster = Cluster(
                    self, self.config.bus, poll_interval=self.config.poll_interval
                )
                self._hub.cluster = True
            self._store = Store(
                db,
                threaded=isinstance(db, Database) or getattr(db, "blocking", False),
                callbacks_context=self._corked,
            )
            # A node without a concierge takes no leases: it would hold owed replies
            # it never gives.
            leased = self._responder is not None and self.config.reply_lease > 0
            if self._cluster is not None and leased:
                self._reply_leases = ReplyLeases(
                    self._store, self._cluster.node, self.config.reply_lease
                )
            self._hub.instant_answer = self._instant_answer()
            async with trio.open_nursery() as storage:
                await storage.start(self._store.run)
                try:
                    await self._serve(task_status)
                finally:
                    # The writer commits what is queued, then returns.
                    self._store.close()
        finally:
            if self._froze_gc:
                gc.unfreeze()
            if self._storage is None:
                db.close()
            self._stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(
            self.config.port, host=self.config.host, backlog=self.config.backlog
        )
        self.port = listeners[0].socket.getsockname()[1]
        front = HttpFront(
            {
                "/": self._index,
                "/healthz": self._healthz,
                "/staff": staff_page,
                "/staff/canned.json": self._canned,
            },
            self._websocket,
            idle_timeout=self.config.handshake_timeout,
            server_header=SERVER_NAME,
            upgrade_allowed=lambda request: self.origins.allows(request, self.port),
        )
        self._front = front
        tls = self.config.ssl_context
        if tls is None and self.config.certfile is not None:
            tls = server_ssl_context(self.config.certfile, self.config.keyfile)
        if tls is not None:
            front = TlsHttpFront(front, tls, handshake_timeout=self.config.tls_handshake_timeout)
        async with trio.open_nursery() as work:
            self._work = work
            work.start_soon(self._accept, listeners, front)
            work.start_soon(self._heartbeat_sweeper)
            work.start_soon(self._expire_silent_guests)
            if self._cluster is not None:
                await work.start(self._cluster.run)
            if self._reply_leases is not None:
                await work.start(self._reply_leases.recover_forever, self._answer_owed)
            else:
                await self._answer_unanswered()
            await work.start(self._watch_revocations)
            task_status.started(self.port)
            await self._shutdown.wait()
            if self._cluster is not None:
                self._cluster.stop()
            await self._drain_for_shutdown()
            work.cancel_scope.cancel()

    async def _accept(self, listeners: list[trio.SocketListener], front: HttpFront) -> None:
        assert self._work is not None

        async def handle(stream: trio.SocketStream) -> None:
            await self._handle_stream(stream, front)

        # Cancelled at shutdown, serve_listeners closes the listeners: from then on
        # connection attempts are refused at once, not parked in the backlog.
        with self._accepting:
            await serve_listeners_with_backoff(handle, listeners, handler_nursery=self._work)

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, tell every client to come back
        later (``reconnect`` with spread-out ``after_ms``, close 1012), let writes in
        flight finish (bounded), then stop. :meth:`run` returns when it is done."""
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_idle(self) -> None:
        """Until no write is queued or committing and no concierge reply is under way
        (for scripted runs that step only once everything a step set off is done)."""
        while self._background or self.store.pending:
            if self.store.pending:
                await self.store.wait_settled()
            else:
                self._replies_done = trio.Event()
                await self._replies_done.wait()

    async def _answer_unanswered(self) -> None:
        """After a crash or restart, give the concierge's owed replies (the last hour)."""
        if self._responder is None:
            return
        owed = await self.store.read(self.store.db.unanswered, time.time() - 3600)
        for row, message in owed:
            await self._answer_owed(row, message)

    async def _answer_owed(self, row: ConversationRow, message: Message) -> None:
        await self._perform(self.hub.owed(row, message, *self._clock()), None)

    async def _drain_for_shutdown(self) -> None:
        self._accepting.cancel()
        self._revocations.cancel()
        # Thousands of connections end at once: the cycle collector would rescan every
        # live object of all of them again and again (half the shutdown time with
        # 4,000 guests). Frozen, they are left to reference counting; run() unfreezes,
        # unless the host process had frozen objects of its own.
        if gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze_gc = True
        crowd = len(self.connections)
        opens_ms = int(
            (self.config.restart_delay + crowd * self.config.drain_per_connection) * 1000
        )
        spread_ms = int(
            max(self.config.shutdown_spread, crowd * self.config.shutdown_spread_per_connection)
            * 1000
        )
        for conn in list(self.connections.values()):
            after_ms = opens_ms + self._random.randrange(max(1, spread_ms))
            conn.deliver(proto.reconnect_frame(after_ms, "server restarting"))
            conn.request_close(CloseCode.RESTARTING, "server restarting")
        with trio.move_on_after(self.config.shutdown_grace):
            while self._handlers or self._background:
                self._idle = trio.Event()
                await self._idle.wait()

    # -- plain HTTP ----------------------------------------------------------------

    def _index(self) -> Any:
        return static_response("index.html") or text_response(200, "trio-chat\n")

    def _canned(self) -> Any:
        """The staff console's canned replies: the concierge's own knowledge base, or
        the shipped hotel's when another responder (or none) answers guests."""
        responder = self._responder
        if isinstance(responder, RulesResponder):
            kb = responder.concierge.kb
        else:
            kb = KnowledgeBase.default()
        return canned_response(kb)

    def _healthz(self) -> Any:
        hub = self._hub
        roles = [hub.role(sid) if hub else None for sid in self.connections]
        cluster = self._cluster_health()
        # A node that cannot store is taken out of a load balancer's rotation.
        status = 503 if cluster.get("status") == "degraded" else 200
        return json_response(
            {
                "status": "ok",
                "server": SERVER_NAME,
                "version": __version__,
                "uptime_s": round(time.monotonic() - self.started_at, 3),
                "connections": len(self.connections),
                "guests_online": roles.count("guest"),
                "staff_online": roles.count("staff"),
                "conversations_loaded": len(hub.conversations) if hub else 0,
                "closes": {str(code): n for code, n in sorted(self.closes.items())},
                **self._memory_health(),
                "tcp_connections": self.limits.active,
                "refused": {
                    **self.limits.refused,
                    "origin": self._front.forbidden_origins if self._front else 0,
                },
                "expired_guests": self.expired_guests,
                **cluster,
            },
            status,
        )

    def outbox_bytes(self) -> tuple[int, int]:
        """Bytes queued for clients now: in total, and for the most behind connection."""
        queued = [conn.queued_bytes for conn in self.connections.values()]
        return sum(queued), max(queued, default=0)

    def _memory_health(self) -> dict[str, Any]:
        total, largest = self.outbox_bytes()
        buckets = self._hub.buckets_held() if self._hub else (0, 0)
        return {
            "outbox_bytes": total,
            "outbox_bytes_max": largest,
            "outbox_peak_bytes": self.outbox_peak_bytes,
            "outbox_limit_bytes": self.config.outbox_limit_bytes,
            "rate_buckets": {"identities": buckets[0], "addresses": buckets[1]},
        }

    def _cluster_health(self) -> dict[str, Any]:
        """Scale-out: the storage's and the bus's state (absent on a single process)."""
        if self._cluster is None:
            return {}
        db = self._store.db if self._store is not None else None
        storage_ok = self._cluster.storage_ok and bool(getattr(db, "healthy", True))
        bus = self._cluster.health()
        return {
            "storage": {"state": "ok" if storage_ok else "unreachable"},
            "bus": bus,
            "status": "ok" if storage_ok else "degraded",
        }

    # -- connections ---------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream, front: HttpFront) -> None:
        # The one place a connection's failure stops: nothing here reaches another
        # connection or the server.
        self._handlers += 1
        try:
            if self.config.proxy_protocol:
                named = await self._read_proxy_header(stream)
                if named is None:
                    return
                stream = named
            address = peer_address(stream)
            refused = self.limits.enter(address)
            try:
                await front.handle(stream, refused)
            except Exception:
                log.exception("connection handler failed")
            finally:
                if refused is None:
                    self.limits.leave(address)
        finally:
            self._handlers -= 1
            self._idle.set()
            with trio.move_on_after(self.config.close_timeout) as scope:
                scope.shield = True
                await trio.aclose_forcefully(stream)

    async def _read_proxy_header(self, stream: trio.abc.Stream) -> PrefixStream | None:
        """``stream`` carrying the client a load balancer's PROXY header names (with the
        bytes read past the header); None, logged, when the header is missing, broken
        or late: the connection is closed without an answer."""
        with trio.move_on_after(self.config.handshake_timeout):
            try:
                header, rest = await read_proxy_header(stream)
            except ProxyHeaderError as exc:
                log.info("connection from %s refused: %s", peer_address(stream), exc)
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            return PrefixStream(stream, rest, header.client)
        log.info("no PROXY header from %s in time: closed", peer_address(stream))
        return None

    async def _websocket(self, stream: PrefixStream, request: h11.Request) -> None:
        with trio.move_on_after(self.config.handshake_timeout) as handshake:
            try:
                await stream.send_all(handshake_response(request, SERVER_NAME.encode()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if handshake.cancelled_caught:
            return
        del request  # this frame stays suspended for the whole session
        ws = WebSocket(stream, ENGINES[self.config.frame_engine](self.config.max_frame_bytes))
        hub = self.hub
        async with trio.open_nursery() as nursery:
            conn = Connection(self, ws, nursery, next(self._sessions))
            self.connections[conn.session_id] = conn
            hub.opened(conn.session_id, peer_address(stream), trio.current_time())
            try:
                with conn.reader_scope:
                    if self._admit(conn):
                        await self._session(conn)
            except ConnectionLost:
                pass
            finally:
                del self.connections[conn.session_id]
                self._perform_now(hub.closed(conn.session_id, *self._clock()))
                await self._close(conn)
                nursery.cancel_scope.cancel()

    def _admit(self, conn: Connection) -> bool:
        """Whether to serve a new connection (the mock server refuses on demand)."""
        return True

    async def _close(self, conn: Connection) -> None:
        if conn.dropped:
            # As a network failure would: no close frame.
            await trio.aclose_forcefully(conn.ws.stream)
            return
        code = conn.close_code
        if code is None:
            conn.close_code = code = CloseCode.NORMAL
        elif code not in (CloseCode.TRY_LATER, CloseCode.ABNORMAL, CloseCode.SERVER_ERROR):
            # Let the last frames (reconnect, the auth error, ...) out first. A client
            # cut off for being slow or dead gets no such courtesy.
            with trio.move_on_after(self.config.close_timeout) as scope:
                scope.shield = True
                await conn.wait_drained()
        if code == CloseCode.ABNORMAL:
            code = CloseCode.NORMAL
        self.closes[code] += 1
        with trio.move_on_after(self.config.close_timeout) as scope:
            scope.shield = True
            # Thousands of close handshakes took seconds of a restart on two cores, and
            # the new process cannot listen until this one is gone: no waiting then.
            wait = 0.0 if self.shutting_down else self.config.close_timeout
            await conn.ws.close(code, conn.close_reason, wait_for_peer=wait)

    async def _session(self, conn: Connection) -> None:
        hub = self.hub
        sid = conn.session_id
        # The timeout bounds waiting for hello, not answering it: a slow disk must not
        # turn a valid hello into 4408.
        deadline = trio.current_time() + self.config.hello_timeout
        while not hub.signed_in(sid):
            raw: str | bytes | None = None
            with trio.move_on_at(deadline):
                raw = await conn.receive()
            if raw is None:
                conn.request_close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                raise ConnectionLost("no hello in time")
            await self._frame(conn, raw)
        while True:
            await self._frame(conn, await conn.receive())

    async def _frame(self, conn: Connection, raw: str | bytes) -> None:
        """Give one frame to the hub and carry out its answer before the next."""
        try:
            actions = self.hub.frame(conn.session_id, raw, *self._clock())
        except Exception:
            # A bug in the rules costs this frame an ``internal`` error, nothing more.
            log.exception("frame handler failed")
            conn.deliver(proto.error_frame(ErrorCode.INTERNAL, "internal error", None))
            return
        await self._perform(actions, conn)

    # -- carrying out the hub's actions --------------------------------------------------

    @staticmethod
    def _clock() -> tuple[float, float]:
        return trio.current_time(), time.time()

    async def _perform(self, actions: Sequence[Action], conn: Connection | None) -> None:
        """Carry out actions from a session's reader (``conn``) or a background task:
        reads, and writes the hub waits for, are awaited here, so the session's next
        frame comes after them."""
        hub = self.hub
        for action in actions:
            if isinstance(action, Read):
                try:
                    result = await self.store.read(
                        getattr(self.store.db, action.method), *action.args
                    )
                except StorageError as exc:
                    log.error("storage failed: %s", exc)
                    more = hub.read_failed(action, exc, *self._clock())
                else:
                    more = hub.loaded(action, result, *self._clock())
                await self._perform(more, conn)
            elif isinstance(action, Write):
                operation = self._operation(action)
                try:
                    if action.wait:
                        await self.store.submit(operation)
                    else:
                        await self.store.enqueue(operation)
                except StorageError:
                    pass  # the operation's on_error told the hub
            else:
                self._carry_out(action)

    def _perform_now(self, actions: Sequence[Action]) -> None:
        """Carry out actions where nothing may wait: in a commit's callback."""
        # Most of a commit's actions are frames, and they come in runs for one session
        # (an answered guest message: the ack, the message, typing, the answer, typing
        # off): each run is queued on its connection at once.
        session = 0
        frames: list[str] = []
        for action in actions:
            if type(action) is Send:
                if action.session == session:
                    frames.append(action.frame)
                    continue
                if frames:
                    self._deliver(session, frames)
                session = action.session
                frames = [action.frame]
                continue
            if frames:
                self._deliver(session, frames)
                frames = []
                session = 0
            if isinstance(action, Write):
                self.store.put(self._operation(action))
            elif isinstance(action, Read):
                raise AssertionError(f"the hub asked for a read outside a session: {action}")
            else:
                self._carry_out(action)
        if frames:
            self._deliver(session, frames)

    def _carry_out(
        self, action: Send | Close | ReportWritten | StartReply | Fill | Relay | RelayStaff
    ) -> None:
        if isinstance(action, Send):
            self._deliver(action.session, (action.frame,))
        elif isinstance(action, Close):
            conn = self.connections.get(action.session)
            if conn is not None:
                conn.request_close(action.code, action.reason)
        elif isinstance(action, ReportWritten):
            conn = self.connections.get(action.session)
            if conn is not None:
                conn.report_written()
        elif isinstance(action, StartReply):
            self._start_reply(action)
        elif self._cluster is not None:  # Fill, Relay, RelayStaff: only a cluster's hub asks
            if isinstance(action, Fill):
                self._cluster.fill(action.conversation_id)
            elif isinstance(action, RelayStaff):
                self._cluster.relay_staff(action.names)
            else:
                self._cluster.relay(action)

    def _deliver(self, session_id: int, frames: Sequence[str]) -> None:
        """Queue ``frames`` for a session, in order, if it is still connected."""
        conn = self.connections.get(session_id)
        if conn is not None:
            conn.deliver_all(frames)

    def written(self, session_id: int) -> None:
        """A connection wrote everything queued up to its :class:`ReportWritten`."""
        self._perform_now(self.hub.written(session_id, *self._clock()))

    def _operation(self, write: Write) -> Any:
        operation = write.operation
        hub = self.hub

        def committed(result: Any) -> None:
            self._perform_now(hub.stored(write, result, *self._clock()))
            if self._cluster is not None:
                self._cluster.committed(operation, result)

        def failed(error: StorageError) -> None:
            log.error("storage failed: %s", error)
            self._perform_now(hub.failed(write, error, *self._clock()))

        operation.on_commit = committed
        operation.on_error = failed
        return operation

    # -- the concierge --------------------------------------------------------------

    def _start_reply(self, start: StartReply) -> None:
        """Answer in the server's nursery (not the connection's: a reply must still come
        if the guest closes the tab); or here and now, when nothing is to be waited for."""
        if self._work is None or self._shutdown.is_set():
            return
        answer_now = self._answers_at_once()
        if answer_now is not None:
            # Most instant answers are stored with the guest message they answer (see
            # _instant_answer); one asked after the commit (a reopened conversation, a
            # claim that committed first) is given in the commit's callback that asked
            # for it: no task per reply, no trip through the scheduler. Its write
            # queues behind the guest's.
            given = self._answer_now(answer_now, self._request(start, []))
            try:
                actions = self.hub.replied(
                    start.conversation_id, given.text, given.escalate, *self._clock()
                )
                self._perform_now(actions)
            except ProtocolError as exc:
                log.warning("the reply for %s failed: %s", start.conversation_id, exc)
            except Exception:
                log.exception("the reply for %s failed", start.conversation_id)
            return
        self._background += 1

        async def answer() -> None:
            answer = await self._ask_responder(start)
            await trio.sleep(self.config.typing_delay)
            actions = self.hub.replied(
                start.conversation_id, answer.text, answer.escalate, *self._clock()
            )
            await self._perform(actions, None)

        async def reply() -> None:
            try:
                if self._reply_leases is None:
                    await answer()
                else:
                    leases = self._reply_leases
                    async with leases.holding(start.conversation_id, start.message.seq) as held:
                        if held:
                            await answer()
                        else:  # another node answers it
                            actions = self.hub.reply_abandoned(
                                start.conversation_id, *self._clock()
                            )
                            await self._perform(actions, None)
            except (StorageError, ProtocolError) as exc:
                log.warning("the reply for %s failed: %s", start.conversation_id, exc)
            except Exception:
                log.exception("the reply for %s failed", start.conversation_id)
            finally:
                self._background -= 1
                self._idle.set()
                self._replies_done.set()

        self._work.start_soon(reply)

    def _answers_at_once(self) -> Callable[[ResponderRequest], ResponderReply] | None:
        """The responder's ``respond_now`` when an answer has nothing to wait for: no
        typing pause, no reply lease to take (a cluster), no history to read."""
        responder = self._responder
        answer_now: Callable[[ResponderRequest], ResponderReply] | None = getattr(
            responder, "respond_now", None
        )
        if (
            answer_now is None
            or self.config.typing_delay > 0
            or self._reply_leases is not None
            or getattr(responder, "history_window", 0) > 0
        ):
            return None
        return answer_now

    def _instant_answer(self) -> InstantAnswer | None:
        """The hub's :attr:`Hub.instant_answer`: an answer that has nothing to wait for
        is asked before the guest message is stored and committed with it, in the
        same transaction, and pushed in the same write as its ack: one commit and one
        write for both. (Asked after the commit, it took a second commit, whose batch
        held replies alone about a third of the time under load, and a second write.)
        Only for a responder that offers ``respond_ahead``: its memory of the
        conversation must move on only for answers that are stored."""
        respond_ahead: (
            Callable[[ResponderRequest], tuple[ResponderReply, Callable[[], None]]] | None
        ) = getattr(self._responder, "respond_ahead", None)
        if respond_ahead is None or self._answers_at_once() is None:
            return None

        def instant_answer(
            conversation_id: str, guest_id: str, guest_name: str | None, text: str
        ) -> tuple[str, bool, Callable[[], None]]:
            request = ResponderRequest(conversation_id, guest_id, guest_name, text, (), _no_drafts)
            try:
                given, keep = respond_ahead(request)
            except Exception:
                log.exception("the responder failed; handing over to staff")
                given, keep = RESPONDER_FAILED, _nothing_to_keep
            return given.text, given.escalate, keep

        return instant_answer

    async def _ask_responder(self, start: StartReply) -> ResponderReply:
        responder = self._responder
        if responder is None:
            return ResponderReply("", escalate=False)
        window = getattr(responder, "history_window", 0)
        recent = []
        if window:
            # The window before the message being answered (which is stored already).
            stored = await self.store.read(self.store.db.recent, start.conversation_id, window + 1)
            recent = [m for m in stored if m.seq < start.message.seq][-window:]

        request = self._request(start, recent)
        answer_now: Callable[[ResponderRequest], ResponderReply] | None = getattr(
            responder, "respond_now", None
        )
        if answer_now is not None:
            # It answers without waiting (the rules): no timeout to arm, no coroutine.
            return self._answer_now(answer_now, request)
        try:
            # A responder that keeps its own deadline (the language model, which then
            # falls back to the rules) gets the time to do so, and a little more.
            own = getattr(responder, "answer_timeout", None)
            timeout = self.config.responder_timeout
            if own is not None:
                timeout = max(timeout, own + 5)
            with trio.fail_after(timeout):
                return await responder.respond(request)
        except Exception:
            log.exception("the responder failed; handing over to staff")
            return RESPONDER_FAILED

    def _request(self, start: StartReply, recent: list[Message]) -> ResponderRequest:
        def draft(text: str) -> None:
            for action in self.hub.drafted(start.conversation_id, text, *self._clock()):
                if isinstance(action, Send):
                    self._carry_out(action)

        return ResponderRequest(
            start.conversation_id,
            start.guest_id,
            start.guest_name,
            start.message.text,
            tuple(recent),
            draft,
        )

    @staticmethod
    def _answer_now(
        answer_now: Callable[[ResponderRequest], ResponderReply], request: ResponderRequest
    ) -> ResponderReply:
        try:
            return answer_now(request)
        except Exception:
            log.exception("the responder failed; handing over to staff")
            return RESPONDER_FAILED

    # -- revocation (staff hardening) ------------------------------------------------

    async def remove_staff(self, name_or_id: str) -> bool:
        """Remove a staff member, as ``trio-chat staff remove`` does, and act on it at
        once: their consoles close (4401), their conversations go back to waiting.
        False if there is no such member. Raises :class:`StorageError`."""
        removed = await self._administer(lambda db: db.remove_staff(name_or_id))
        self._revocation_kick.set()
        return bool(removed)

    async def revoke_staff(self, name_or_id: str) -> str | None:
        """Invalidate a staff member's tokens (their open consoles close with 4401)
        and return their new token; ``None`` if there is no such member."""
        member = await self._administer(lambda db: db.revoke_staff(name_or_id))
        self._revocation_kick.set()
        if member is None:
            return None
        return self.hub.signer.issue("s", member.staff_id, member.generation)

    async def rotate_secret(self) -> None:
        """Replace the token secret: every token stops working and every session is
        closed with 4401 (guests lose access to their conversations)."""
        secret_file = self.config.secret_file
        await self._administer(lambda db: _admin.rotate_secret(db, secret_file))
        self._revocation_kick.set()

    async def _administer(self, change: Callable[[Any], T]) -> T:
        """Run an administrative change where the command line would: on a connection
        of its own (the writer's belongs to the writer thread), or on the backend the
        server was given. The watcher then finds it like any other process's change."""
        if self._storage is not None:
            return change(self._storage)

        def in_own_connection() -> T:
            with _admin.opened(self.config.db_path) as db:
                return change(db)

        return await trio.to_thread.run_sync(in_own_connection)

    async def _watch_revocations(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Look for removed and revoked staff and a new secret, in storage, twice a
        second: the command line changes them from another process. First replays
        every removal recorded (conversations a member removed while the server was
        down held go back to waiting; a replay finds nothing more to do)."""
        with self._revocations:
            seen = await self._act_on_revocations(0, replay=True)
            task_status.started()
            if self.config.revocation_poll <= 0:
                return
            while True:
                with trio.move_on_after(self.config.revocation_poll):
                    await self._revocation_kick.wait()
                self._revocation_kick = trio.Event()
                seen = await self._act_on_revocations(seen)

    async def _act_on_revocations(self, after: int, *, replay: bool = False) -> int:
        """Tell the hub of every revocation recorded after ``after``; the last seen."""
        store = self.store
        try:
            found: list[Revocation] = await store.read(store.db.revocations_since, after)
        except StorageError as exc:
            log.warning("cannot look for revoked staff tokens: %s", exc)
            return after
        hub, clock = self.hub, self._clock
        for revocation in found:
            staff_id = revocation.staff_id
            actions: Sequence[Action] = ()
            try:
                if revocation.kind == "removed" and staff_id is not None:
                    actions = hub.staff_removed(staff_id, *clock())
                elif replay:
                    pass  # nobody is signed in yet, and the secret was just read
                elif revocation.kind == "revoked" and staff_id is not None:
                    actions = hub.staff_revoked(staff_id, revocation.generation, *clock())
                elif revocation.kind == "secret":
                    secret = await store.read(token_secret, store.db, self.config.secret_file)
                    actions = hub.secret_rotated(TokenSigner(secret), *clock())
            except StorageError as exc:
                log.error("the token secret changed but cannot be read: %s", exc)
                return after  # tried again at the next look
            except Exception:
                log.exception("acting on revocation %s failed", revocation)
            await self._perform(actions, None)
            after = revocation.seq
        return after

    # -- guests who never wrote -------------------------------------------------------

    async def _expire_silent_guests(self) -> None:
        """Forget, now and then, the guests registered long ago who never wrote: open
        registration must not mean keeping every passer-by forever."""
        after = self.config.expire_silent_guests
        if after <= 0:
            return
        # Often enough that nobody outlives the limit by much more than a tenth of it.
        interval = min(3600.0, max(1.0, after / 10))
        while True:
            # Guests signed in now are kept (their conversation is live in the hub).
            keep = frozenset(conv.guest_id for conv in self.hub.conversations.values())
            operation = ExpireSilentGuests(
                before=time.time() - after,
                keep=keep,
                # Scale-out: guests signed in on other nodes (their presence relays).
                keep_conversations=frozenset(self.hub.remote_guests),
            )
            operation.on_commit = self._guests_expired
            operation.on_error = self._expiry_failed
            with contextlib.suppress(StorageError):  # logged by _expiry_failed
                await self.store.submit(operation)
            await trio.sleep(interval)

    def _guests_expired(self, guest_ids: list[str]) -> None:
        self.expired_guests += len(guest_ids)
        # A guest who signed in while the write was queued: the rows are gone, so the
        # session goes too (the token now fails with 4401).
        hub = self.hub
        gone = set(guest_ids)
        for conv in hub.conversations.values():
            if conv.guest_id in gone:
                for sid in conv.subscribers:
                    connection = self.connections.get(sid)
                    if connection is not None and hub.role(sid) == "guest":
                        connection.request_close(CloseCode.AUTH_FAILED, "guest expired")

    @staticmethod
    def _expiry_failed(error: StorageError) -> None:
        log.error("expiring silent guests failed: %s", error)

    # -- heartbeat ----------------------------------------------------------------------

    async def _heartbeat_sweeper(self) -> None:
        interval = self.config.heartbeat
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            for conn in list(self.connections.values()):
                if not conn.ping_in_flight and conn.close_code is None:
                    conn.ping_in_flight = True
                    conn.nursery.start_soon(conn.heartbeat, interval)
