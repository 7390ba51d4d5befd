"""FaultProxy's fault modes, proven on raw TCP streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_chat.testing import FaultProxy


async def echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> FaultProxy:
    proxy = FaultProxy(await echo_server(nursery), seed=7)
    await nursery.start(proxy.run)
    return proxy


async def open_client(proxy: FaultProxy) -> trio.SocketStream:
    assert proxy.port
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def round_trip(stream: trio.SocketStream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def test_passes_traffic_and_counts_attempts(proxy: FaultProxy) -> None:
    stream = await open_client(proxy)
    assert await round_trip(stream, b"hello") == b"hello"
    assert len(proxy.attempts) == 1
    await stream.aclose()


async def test_latency_delays_in_order(
    proxy: FaultProxy, autojump_clock: trio.testing.MockClock
) -> None:
    proxy.add_latency(0.5, jitter=0.2)
    stream = await open_client(proxy)
    start = trio.current_time()
    payload = b"".join(bytes([i]) * 10 for i in range(50))
    assert await round_trip(stream, payload) == payload  # order kept despite jitter
    elapsed = trio.current_time() - start
    assert 1.0 <= elapsed <= 1.0 + 2 * 0.2 + 0.01  # both directions
    await stream.aclose()


async def test_bandwidth_cap(proxy: FaultProxy, autojump_clock: trio.testing.MockClock) -> None:
    proxy.cap_bandwidth(10_000)
    stream = await open_client(proxy)
    start = trio.current_time()
    assert await round_trip(stream, b"x" * 50_000) == b"x" * 50_000
    # Both directions are paced and overlap: about 50 kB / 10 kB/s.
    assert 5.0 <= trio.current_time() - start < 6.0


async def test_reset_all_aborts_open_connections(proxy: FaultProxy) -> None:
    stream = await open_client(proxy)
    await round_trip(stream, b"ok")
    proxy.reset_all()
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(5):
            while await stream.receive_some():
                pass
            raise trio.BrokenResourceError("closed")  # a FIN would also end it: count it
    assert not proxy.links


async def test_refuse_resets_new_connections_only(proxy: FaultProxy) -> None:
    kept = await open_client(proxy)
    await round_trip(kept, b"before")
    proxy.refuse()
    refused = await open_client(proxy)  # the TCP connect itself succeeds...
    with trio.fail_after(5):
        with pytest.raises(trio.BrokenResourceError):
            await refused.send_all(b"x")
            await refused.receive_some()  # ...then it is reset
            await refused.send_all(b"x")
    assert await round_trip(kept, b"still") == b"still"
    proxy.refuse(False)
    again = await open_client(proxy)
    assert await round_trip(again, b"back") == b"back"


async def test_blackhole_holds_traffic_and_keeps_sockets_open(
    proxy: FaultProxy, autojump_clock: trio.testing.MockClock
) -> None:
    stream = await open_client(proxy)
    await round_trip(stream, b"warm")
    proxy.blackhole()
    await stream.send_all(b"into the void")
    with trio.move_on_after(60) as scope:
        await stream.receive_some()
    assert scope.cancelled_caught  # nothing came back, and nothing closed either
    proxy.blackhole(False)
    with trio.fail_after(5):
        assert await stream.receive_some() == b"into the void"


async def test_schedule_applies_faults_over_time(
    proxy: FaultProxy, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            proxy.run_schedule,
            [(10, "refuse", (True,)), (5, "add_latency", (0.2,)), (20, "passthrough", ())],
        )
        await trio.sleep(6)
        assert proxy.latency == 0.2 and not proxy.refusing
        await trio.sleep(5)
        assert proxy.refusing
        await trio.sleep(10)
        assert not proxy.refusing and proxy.latency == 0
