"""A message leaves no reference cycle behind: everything it allocates is freed by
reference counting the moment it is done, none of it waits for the cycle collector,
whose collections of thousands of such cycles at a time stalled every ack under load
(the steady benchmark: p99 157 ms with them, 5 ms with the collector off)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_chat import ChatServer
from trio_chat.core.hub import Write
from trio_chat.core.storage import Operation

from ..conftest import make_config
from ..helpers import connect


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """What the collector finds unreachable meanwhile, kept for the test to look at."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


@pytest.mark.parametrize("concierge", ["off", "rules"])
async def test_a_stored_message_leaves_no_cycle_for_the_collector(
    tmp_path: Path, saved_garbage: list[object], concierge: str
) -> None:
    async with trio.open_nursery() as nursery:
        server = ChatServer(make_config(tmp_path, concierge=concierge, typing_delay=0))
        await nursery.start(server.run)
        assert server.port
        async with connect(server.port) as guest:
            await guest.hello(None)
            gc.collect()
            saved_garbage.clear()
            for k in range(20):
                await guest.send(type="message", client_msg_id=f"m{k}", text=f"breakfast {k}?")
                await guest.expect("ack", client_msg_id=f"m{k}")
            await server.wait_idle()
            gc.collect()
        nursery.cancel_scope.cancel()
    left = [o for o in saved_garbage if isinstance(o, Write | Operation)]
    assert left == [], f"{len(left)} writes freed only by the cycle collector"
