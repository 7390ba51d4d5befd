"""The PROXY protocol: behind a load balancer the per-address limits count guests, not
the balancer; a connection without the header is closed, never answered."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
import trio
import trio_websocket

from tests.helpers import RawClient
from tests.server.test_hardening_http import read_until_closed, serving, upgrade_request
from trio_chat.server._proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)
from trio_chat.testing._front import haproxy_binary, haproxy_front


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(block)) + block


def v2_inet(source: str, port: int = 40000) -> bytes:
    packed = bytes(int(part) for part in source.split("."))
    return v2(1, 0x11, packed + bytes([127, 0, 0, 1]) + struct.pack("!HH", port, 80))


# -------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("data", "header"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\nGET", ProxyHeader("203.0.113.7", 42)),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", ProxyHeader("2001:db8::1", 40)),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(None, 15)),
        (v2_inet("198.51.100.9") + b"GET", ProxyHeader("198.51.100.9", 28)),
        (
            v2(1, 0x21, bytes(15) + b"\x05" + bytes(16) + bytes(4)),
            ProxyHeader("::5", 52),
        ),
        (v2(0, 0x00, b""), ProxyHeader(None, 16)),  # LOCAL: the balancer's health check
        (v2(1, 0x11, bytes(12) + b"\x03\x00\x04tlv"), ProxyHeader("0.0.0.0", 34)),  # TLVs
    ],
)
def test_a_header_names_the_client_and_its_length(data: bytes, header: ProxyHeader) -> None:
    assert parse_proxy_header(data) == header


@pytest.mark.parametrize(
    "whole", [b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n", v2_inet("198.51.100.9")]
)
def test_any_cut_of_a_header_asks_for_more(whole: bytes) -> None:
    for cut in range(1, len(whole)):
        assert parse_proxy_header(whole[:cut]) is None, cut


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no header at all
        b"\x16\x03\x01\x02\x00",  # a TLS hello
        b"PROXY TCP4 203.0.113.7 10.0.0.1 40000\r\n",  # a field short
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 99999\r\n",
        b"PROXY TCP4 nonsense 10.0.0.1 1 2\r\n",
        b"PROXY SCTP 203.0.113.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 200,  # never ends
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB of addresses announced
        v2(1, 0x11, bytes(4)),  # an inet block too short
        b"\r\n\r\n\x00\r\nQUIT?" + bytes(4),  # a near-signature
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


# ------------------------------------------------------------------ the server


async def upgrade_from(port: int, source: str, header: bytes = b"") -> int:
    """The status a WebSocket upgrade from ``source`` is answered with."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        async with stream:
            await stream.send_all(header + upgrade_request(port))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                assert chunk, head
                head += chunk
    return int(head.split(b" ", 2)[1])


async def test_a_client_named_in_a_v1_header_is_counted_and_chats(tmp_path: Path) -> None:
    async with serving(tmp_path, proxy_protocol=True, max_connections_per_ip=1) as server:
        assert server.port
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        # Byte by byte: a header split over many reads is still one header.
        for byte in b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n":
            await stream.send_all(bytes([byte]))
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
            client = RawClient(ws)
            assert (await client.hello(None))["type"] == "welcome"
            assert dict(server.limits.per_address) == {"203.0.113.7": 1}
            # The cap counts the named client: another connection naming it is refused,
            # one naming someone else (from the same socket address) is not.
            assert await upgrade_from(server.port, "127.0.0.1", v2_inet("203.0.113.7")) == 503
            assert await upgrade_from(server.port, "127.0.0.1", v2_inet("203.0.113.8")) == 101
            await ws.aclose()


async def test_a_connection_without_a_header_is_closed_unanswered_and_untraced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, proxy_protocol=True, handshake_timeout=0.5) as server:
        assert server.port
        with trio.fail_after(10):
            for opening in (upgrade_request(server.port), b"PROXY TCP4 1.2.3.4\r\n", b""):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                async with stream:
                    if opening:
                        await stream.send_all(opening)
                    # Closed without a byte: the late one after the handshake timeout.
                    assert await read_until_closed(stream) == b""
        assert server.limits.active == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.mark.skipif(haproxy_binary() is None, reason="needs Debian's haproxy")
async def test_behind_haproxy_each_client_address_has_its_own_cap(tmp_path: Path) -> None:
    """The documented front (send-proxy-v2, health checks included) before a node run
    with --proxy-protocol: two guests from two addresses both connect under a cap of
    one connection per address; a second from the first address is refused. Without
    the header every connection would come from HAProxy's address."""
    async with serving(tmp_path, proxy_protocol=True, max_connections_per_ip=1) as server:
        assert server.port
        async with haproxy_front([("only", server.port)]) as front:
            await front.wait_states({"only": "UP"})
            streams = []
            async with trio.open_nursery() as nursery:
                for source in ("127.0.0.2", "127.0.0.3"):
                    stream = await trio.open_tcp_stream(
                        "127.0.0.1", front.port, local_address=source
                    )
                    streams.append(stream)
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, "127.0.0.1", "/ws"
                    )
                    assert (await RawClient(ws).hello(None))["type"] == "welcome"
                assert {"127.0.0.2", "127.0.0.3"} <= set(server.limits.per_address)
                assert await upgrade_from(front.port, "127.0.0.2") == 503
                assert server.limits.refused["max_connections_per_ip"] == 1
                # HAProxy's own health checks (LOCAL headers) keep the node UP.
                assert (await front.server_states())["only"] == "UP"
                nursery.cancel_scope.cancel()
