"""The client's control frames (ping, escalate, read marks...) when the connection ends
under them: they wait for the next connection, and never spin without yielding."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_chat import ChatClient

from .test_client import start_server, url


class EndedChannel:
    """A control channel whose connection has ended (its writer is gone), as the client
    sees it in the moment before it notices: every send fails at once."""

    def __init__(self) -> None:
        self.sends = 0

    async def send(self, frame: str | None) -> None:
        self.sends += 1
        if self.sends > 100:
            raise AssertionError("the client retried a dead channel without waiting")
        raise trio.BrokenResourceError

    def send_nowait(self, frame: str | None) -> None:
        raise trio.BrokenResourceError


async def test_a_control_frame_on_a_connection_that_just_ended_waits_instead_of_spinning(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The writer of a connection can end before the client's state leaves
    "connected". A control frame sent then used to retry at once, forever, without
    yielding: no other task ran (so the state never changed) and no timeout could
    fire (a deadline needs the scheduler): the soak hung in ``ping`` under load."""
    server = await start_server(nursery, tmp_path)
    async with ChatClient(url(server.port)) as client:
        with trio.fail_after(10):
            await client.wait_until(lambda: client.state == "connected")
        ended = EndedChannel()
        client._control = ended  # type: ignore[assignment]
        with trio.move_on_after(0.5) as waited:
            await client.ping()
        # It waited (for the next connection, or until the deadline) after one try.
        assert waited.cancelled_caught and ended.sends == 1
