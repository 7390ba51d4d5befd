"""The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer's first bytes on
each connection name the client it came from.

Behind a balancer every connection comes from the balancer's address, so the limits
per address (connections, rate, registrations) would count the balancer, not guests.
With ``--proxy-protocol`` every connection must open with the header, and the address
in it is the connection's address from then on: for the caps taken at accept, the
rate limits, the logs. A connection without a valid header is closed; the port must
then be reachable from the balancer only (whoever can reach it can name any address).

:func:`parse_proxy_header` is pure (bytes in, a header or "need more" out);
:func:`read_proxy_header` is the shell that reads from a stream.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

import trio

__all__ = [
    "ProxyHeader",
    "ProxyHeaderError",
    "parse_proxy_header",
    "read_proxy_header",
]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX_BYTES: Final = 107  # the specification's longest v1 line, CRLF included
V2_MAX_BYTES: Final = 16 + 536  # the fixed part and the longest address block we accept
_V2_HEADER: Final = struct.Struct("!12sBBH")


class ProxyHeaderError(Exception):
    """The connection's first bytes are not a PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``client`` is the address the balancer received the connection from; ``None``
    when the header names none (v1 ``UNKNOWN``, v2 ``LOCAL``: the balancer's own health
    checks), so the connection keeps its socket's address. ``length`` is the header's
    size in bytes: what follows it belongs to the connection."""

    client: str | None
    length: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` if more bytes are needed. Raises
    :class:`ProxyHeaderError` for anything else."""
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection did not open with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(None, end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        ipaddress.ip_address(fields[3].decode("ascii"))
        ports = [int(fields[4]), int(fields[5])]
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if source.version != (4 if fields[1] == b"TCP4" else 6) or not all(
        0 <= port <= 65535 for port in ports
    ):
        raise ProxyHeaderError("malformed PROXY v1 addresses")
    return ProxyHeader(str(source), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_HEADER.size:
        return None
    signature, version_command, family, length = _V2_HEADER.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("malformed PROXY v2 signature")
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    total = _V2_HEADER.size + length
    if total > V2_MAX_BYTES:
        raise ProxyHeaderError("PROXY v2 header too long")
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return ProxyHeader(None, total)
    block = data[_V2_HEADER.size : total]
    if family >> 4 == 1 and len(block) >= 12:  # AF_INET
        return ProxyHeader(str(ipaddress.IPv4Address(block[:4])), total)
    if family >> 4 == 2 and len(block) >= 36:  # AF_INET6
        return ProxyHeader(str(ipaddress.IPv6Address(block[:16])), total)
    if family >> 4 in (0, 3):  # AF_UNSPEC, AF_UNIX: no address worth keeping
        return ProxyHeader(None, total)
    raise ProxyHeaderError("malformed PROXY v2 address block")


async def read_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyHeader, bytes]:
    """Read the header from ``stream``: the header and the bytes read past it. Raises
    :class:`ProxyHeaderError` (also when the peer closes first); the caller bounds the
    time."""
    data = b""
    while True:
        chunk = await stream.receive_some(V2_MAX_BYTES - len(data))
        if not chunk:
            raise ProxyHeaderError("closed before a complete PROXY header")
        data += chunk
        header = parse_proxy_header(data)
        if header is not None:
            return header, data[header.length :]
        if len(data) >= V2_MAX_BYTES:
            raise ProxyHeaderError("PROXY header too long")
