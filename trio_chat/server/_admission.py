"""Who gets a connection: caps per address and in total, the Origin check, and an
accept loop that survives running out of file descriptors.

A connection costs a file descriptor from the moment it is accepted, whatever it later
turns out to be (a page load, a WebSocket, a client that never says anything). So
connections are counted at accept, per peer address and in total, and each cap has a
value that turns it off (0): benchmarks run thousands of guests from loopback.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

__all__ = [
    "FD_RESERVE",
    "ConnectionLimits",
    "OriginPolicy",
    "default_max_connections",
    "peer_address",
    "serve_listeners_with_backoff",
]

log = logging.getLogger("trio_chat.server")

# What the process needs besides connections: the database (three connections and
# their WAL files), the listeners, logs, worker threads' pipes, a refused connection.
FD_RESERVE: Final = 64

# accept() errors meaning "no resources now, maybe later" (as trio's serve_listeners).
CAPACITY_ERRNOS: Final = frozenset(
    code
    for code in (
        getattr(errno, "EMFILE", None),
        getattr(errno, "ENFILE", None),
        getattr(errno, "ENOMEM", None),
        getattr(errno, "ENOBUFS", None),
    )
    if code is not None
)


def default_max_connections() -> int:
    """The open-file limit less :data:`FD_RESERVE` (0, i.e. off, when unlimited): with
    the cap below the limit, accept keeps working and the excess is refused politely."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every POSIX system has it
        return 0
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, soft - FD_RESERVE)


def peer_address(stream: trio.abc.Stream) -> str | None:
    """The peer's IP address, through any wrapping (TLS) stream; ``None`` if unknown.
    A PROXY header's client (a stream's ``client_address``) comes before the socket's."""
    seen = 0
    current: object = stream
    while seen < 8:
        named = getattr(current, "client_address", None)
        if isinstance(named, str):
            return named
        if isinstance(current, trio.SocketStream):
            try:
                peer = current.socket.getpeername()
            except OSError:
                return None
            if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
                return peer[0]
            return None
        current = getattr(current, "transport_stream", None)
        if current is None:
            return None
        seen += 1
    return None


class ConnectionLimits:
    """Counts open connections per address and in total (0: no cap). ``refused``
    counts refusals by reason, for /healthz."""

    __slots__ = ("active", "max_per_address", "max_total", "per_address", "refused")

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.active = 0
        self.per_address: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def enter(self, address: str | None) -> str | None:
        """Count a new connection from ``address``; returns why it is refused
        (``"max_connections"`` or ``"max_connections_per_ip"``), or ``None`` when
        admitted, and then :meth:`leave` must follow."""
        if self.max_total and self.active >= self.max_total:
            self.refused["max_connections"] += 1
            return "max_connections"
        if (
            address is not None
            and self.max_per_address
            and self.per_address[address] >= self.max_per_address
        ):
            self.refused["max_connections_per_ip"] += 1
            return "max_connections_per_ip"
        self.active += 1
        if address is not None:
            self.per_address[address] += 1
        return None

    def leave(self, address: str | None) -> None:
        self.active -= 1
        if address is not None:
            left = self.per_address[address] - 1
            if left > 0:
                self.per_address[address] = left
            else:
                del self.per_address[address]


# ------------------------------------------------------------------------ origins

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "*"})


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin (default ports filled in), or ``None``
    when it is not one (``null``, garbage, a path)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def _host_header(value: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + value.strip())
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host:
        return None
    return host, port if port is not None else default_port


class OriginPolicy:
    """Which browser pages may open a WebSocket here (cross-site WebSocket hijacking).

    A request without ``Origin`` comes from a program, not a page: allowed. Otherwise
    the origin must be in ``allowed`` (``--allowed-origin``); or, when none is
    configured, any loopback origin (a developer's page); or, always, the server's
    own: the ``Host`` the request was sent to, when that ``Host`` names the listening
    host and port (so a rebound DNS name does not pass for us on a loopback server).
    """

    def __init__(self, allowed: Iterable[str], listen_host: str) -> None:
        self.allowed: frozenset[tuple[str, str, int]] = frozenset(
            o for o in (normalize_origin(a) for a in allowed) if o is not None
        )
        self.loopback_default = not self.allowed
        self.listen_host = listen_host.strip("[]").lower()

    def allows(self, request: h11.Request, listen_port: int | None) -> bool:
        origin_value: bytes | None = None
        host_value: bytes | None = None
        for name, value in request.headers:
            if name == b"origin":
                origin_value = value
            elif name == b"host":
                host_value = value
        if origin_value is None:
            return True
        origin = normalize_origin(origin_value.decode("latin-1"))
        if origin is None:
            return False  # "null" (sandboxed frames, files) or garbage
        if origin in self.allowed:
            return True
        scheme, host, port = origin
        if self.loopback_default and _is_loopback(host):
            return True
        if host_value is None:
            return False
        target = _host_header(host_value.decode("latin-1"), _DEFAULT_PORTS[scheme])
        return target == (host, port) and self._is_listening_address(host, port, listen_port)

    def _is_listening_address(self, host: str, port: int, listen_port: int | None) -> bool:
        if listen_port is not None and port != listen_port:
            return False
        if self.listen_host in _WILDCARDS:
            return True
        if host == self.listen_host:
            return True
        return _is_loopback(self.listen_host) and _is_loopback(host)


# -------------------------------------------------------------------- accept loop

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class _Complaints:
    """Logs a repeated accept failure once per ``interval`` (no traceback), saying how
    many were not logged in between."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: float | None = None
        self.unlogged = 0

    def failed(self, exc: OSError, retry_s: float) -> None:
        now = trio.current_time()
        if self.last is not None and now - self.last < self.interval:
            self.unlogged += 1
            return
        more = f" ({self.unlogged} more since the last report)" if self.unlogged else ""
        log.warning(
            "cannot accept connections: %s; retrying in %.2g s, then less often%s",
            exc.strerror or exc,
            retry_s,
            more,
        )
        self.last, self.unlogged = now, 0


async def _accept_forever(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: Handler,
    nursery: trio.Nursery,
    complaints: _Complaints,
    backoff: Sequence[float],
) -> None:
    async with listener:
        failures = 0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                # Out of descriptors (or memory): the connections waiting in the
                # backlog stay there; accepting again at once would spin.
                retry_s = backoff[min(failures, len(backoff) - 1)]
                failures += 1
                complaints.failed(exc, retry_s)
                await trio.sleep(retry_s)
                continue
            failures = 0
            nursery.start_soon(handler, stream)


async def serve_listeners_with_backoff(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    handler_nursery: trio.Nursery,
    backoff: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5),
    log_interval: float = 10.0,
) -> None:
    """Like :func:`trio.serve_listeners` (closes the listeners when cancelled), but
    when accept runs out of resources (``EMFILE``...) it waits a little longer each
    time, up to the last of ``backoff``, and logs that once per ``log_interval``
    seconds instead of a traceback per attempt."""
    complaints = _Complaints(log_interval)
    async with trio.open_nursery() as accepters:
        for listener in listeners:
            accepters.start_soon(
                _accept_forever, listener, handler, handler_nursery, complaints, backoff
            )
