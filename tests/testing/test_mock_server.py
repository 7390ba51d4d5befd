"""The mock server, exercised by the real client."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_chat import AuthenticationFailed, Backoff, ChatClient
from trio_chat.testing import CannedReply, MockServer


@pytest.fixture
async def mock(nursery: trio.Nursery) -> MockServer:
    server = MockServer(staff_delay=0.5)
    await nursery.start(server.run)
    return server


def fast() -> Backoff:
    return Backoff(initial=0.05, max=0.2, seed=1)


async def test_canned_replies_by_content(mock: MockServer) -> None:
    async with ChatClient(mock.url) as client:
        await client.send("When is breakfast?")
        await client.wait_until(lambda: len(client.transcript) >= 2)
        assert client.transcript[1].text == "Breakfast is served from 6:30 to 10:30."
        assert client.transcript[1].sender == "ai"


async def test_the_escalation_flow_brings_in_mock_staff(
    mock: MockServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with ChatClient(mock.url) as client:
        await client.send("Can I talk to a human?")
        await client.wait_until(lambda: client.status == "staff")
        await client.wait_until(lambda: client.transcript[-1].sender == "staff")
        senders = [m.sender for m in client.transcript]
        assert senders == ["guest", "ai", "system", "system", "staff"]
        assert client.assigned_to == "Sam"


async def test_custom_replies(nursery: trio.Nursery) -> None:
    server = MockServer(replies=[CannedReply(".", "pong!")])
    await nursery.start(server.run)
    async with ChatClient(server.url) as client:
        await client.send("anything")
        await client.wait_until(lambda: len(client.transcript) >= 2)
        assert client.transcript[1].text == "pong!"


async def test_dropped_connections_recover_with_history(mock: MockServer) -> None:
    async with ChatClient(mock.url, backoff=fast()) as client:
        await client.send("check-in time?")
        mock.drop_all()
        stored = await client.send("and check-out?")
        await client.wait_until(lambda: len(client.transcript) >= 4)
        assert client.reconnects == 1
        assert stored.seq == 3
        assert client.token is not None
        assert [m.seq for m in client.transcript] == [m.seq for m in mock.history_of(client.token)]


async def test_withheld_acks_are_recovered_by_the_retry_after_reconnect(mock: MockServer) -> None:
    async with ChatClient(mock.url, backoff=fast()) as client:
        await client.send("first")
        mock.withhold_acks()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def send() -> None:
                await client.send("no ack for this one yet")
                done.set()

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert not done.is_set() and len(client.pending) == 1
            mock.withhold_acks(False)
            mock.close_all(1011)  # the reconnect retries with the same client_msg_id
            with trio.fail_after(5):
                await done.wait()
        assert client.token is not None
        texts = [m.text for m in mock.history_of(client.token) if m.sender == "guest"]
        assert texts == ["first", "no ack for this one yet"]  # stored once


async def test_reconnect_hint_and_refusal(
    mock: MockServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with ChatClient(mock.url, backoff=fast()) as client:
        await client.wait_for_state("connected")
        mock.refuse()
        mock.send_reconnect(3000)
        await client.wait_for_state("reconnecting")
        started = trio.current_time()
        await trio.sleep(10)
        assert client.state != "connected"  # refused (1013) and told to wait each time
        mock.refuse(False)
        await client.wait_for_state("connected")
        assert trio.current_time() - started >= 3
        assert len(mock.attempts) >= 3


async def test_delayed_acks(mock: MockServer, autojump_clock: trio.testing.MockClock) -> None:
    mock.delay_acks(5)
    async with ChatClient(mock.url) as client:
        await client.wait_for_state("connected")
        started = trio.current_time()
        await client.send("slow")
        assert trio.current_time() - started >= 5


async def test_unknown_tokens_are_refused(mock: MockServer) -> None:
    async with ChatClient(mock.url, token="g.nobody.x") as client:
        with pytest.raises(AuthenticationFailed):
            await client.send("hi")
