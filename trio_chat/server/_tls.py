"""TLS on the server's one port: ``https://`` and ``wss://`` from the same listener.

TLS is put around each connection inside its handler (:class:`TlsHttpFront`), not
around the listener: the accept loop and anything it checks per connection (the peer's
address) still see the TCP stream, and a slow handshake holds only its own task, under
its own deadline. Trio's :class:`trio.SSLStream` does the TLS.

What a client can do wrong here costs it its connection and a one-line log entry at
INFO (never a traceback):

* it sends plain HTTP to the TLS port: it is answered ``400`` in plain text, naming
  the scheme to use;
* its handshake fails (no shared protocol or cipher, an untrusted certificate on the
  client's side, garbage): the connection is closed;
* it does not finish the handshake within the deadline: the connection is closed.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Final

import trio

from ._http import HttpFront, PrefixStream

__all__ = ["PLAIN_HTTP_ON_TLS_PORT", "TlsHttpFront", "server_ssl_context"]

log = logging.getLogger("trio_chat.server.tls")

# The first byte of every TLS connection: a handshake record (RFC 8446, 5.1).
TLS_HANDSHAKE_RECORD: Final = 0x16
RECEIVE_BYTES: Final = 16 * 1024

_PLAIN_BODY: Final = b"this port speaks HTTPS: use https:// (and wss:// for /ws)\n"
PLAIN_HTTP_ON_TLS_PORT: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_PLAIN_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _PLAIN_BODY
)


def server_ssl_context(certfile: str | Path, keyfile: str | Path | None = None) -> ssl.SSLContext:
    """A server context for ``certfile`` (PEM: the certificate, then any intermediates)
    and ``keyfile`` (PEM; ``None`` if the key is in ``certfile``): TLS 1.2 or later,
    HTTP/1.1 over ALPN. Raises ``OSError`` for a missing file and ``ssl.SSLError`` for
    one that does not hold a certificate and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _peer(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "a client"
        return f"{host}:{port}"
    return "a client"


class TlsHttpFront(HttpFront):
    """``plain`` (the server's :class:`HttpFront`) behind TLS: each TCP connection
    first completes a TLS handshake within ``handshake_timeout`` seconds, then is
    served by ``plain`` as if it were a plain one."""

    def __init__(
        self, plain: HttpFront, ssl_context: ssl.SSLContext, *, handshake_timeout: float
    ) -> None:
        super().__init__(
            plain.routes,
            plain.on_websocket,
            idle_timeout=plain.idle_timeout,
            server_header=plain.server_header.decode(),
        )
        self._plain = plain
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout

    async def handle(self, stream: trio.abc.Stream, refused: str | None = None) -> None:
        """Serve one TCP connection over TLS. Never raises for anything the peer does.
        ``refused`` (a connection cap) is answered by the plain front, inside TLS."""
        tls = await self._handshake(stream)
        if tls is not None:
            await self._plain.handle(tls, refused)

    async def _handshake(self, stream: trio.abc.Stream) -> trio.SSLStream[PrefixStream] | None:
        """The TLS stream once its handshake is done; None (logged) when it cannot be."""
        with trio.move_on_after(self.handshake_timeout):
            try:
                first = await stream.receive_some(RECEIVE_BYTES)
                if not first:
                    return None
                if first[0] != TLS_HANDSHAKE_RECORD:
                    log.info("plain HTTP from %s on the TLS port: answered 400", _peer(stream))
                    await stream.send_all(PLAIN_HTTP_ON_TLS_PORT)
                    return None
                # The bytes read to look at the first one go to the TLS engine first.
                tls = trio.SSLStream(
                    PrefixStream(stream, bytes(first)),
                    self.ssl_context,
                    server_side=True,
                    https_compatible=True,
                )
                await tls.do_handshake()
                return tls
            except trio.BrokenResourceError as exc:
                # Trio puts the ssl module's error (or the socket's) in __cause__.
                why = exc.__cause__ if exc.__cause__ is not None else exc
                log.info("TLS handshake with %s failed: %s", _peer(stream), why)
                return None
            except trio.ClosedResourceError:
                return None
        log.info(
            "TLS handshake with %s not done within %g s: closed",
            _peer(stream),
            self.handshake_timeout,
        )
        return None
