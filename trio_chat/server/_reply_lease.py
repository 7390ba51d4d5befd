"""The concierge's owed replies in a cluster: at least one answer per guest message,
also when the node that should answer dies.

The node that stores a guest message answers it, holding a lease on it in PostgreSQL
(owner and expiry, by the database's clock) that it renews while its responder works.
Every node scans for owed replies whose lease expired (or that never got one: their
node died first) at start and every half lease, takes them over (the database lets one
node take each) and answers them. At most one answer is the reply key's job
(``AppendMessage.reply_to``): a node that answers late stores nothing.

Timing lives here, with cancel scopes; the rules (which message is owed, whether the
conversation is still the concierge's) are the hub's and the database's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from ..core.errors import StorageError
from ..core.protocol import Message
from ..core.storage import ConversationRow
from ..core.tokens import new_id

__all__ = ["ReplyLeases"]

log = logging.getLogger("trio_chat.reply_lease")

OWED_FOR: Final = 3600.0  # a guest message older than this is not answered any more


class ReplyLeases:
    """The leases of one node. ``store`` is the server's :class:`Store` on a PostgreSQL
    backend; ``node`` names the node (each process adds its own suffix: two processes
    given the same name never share leases)."""

    def __init__(self, store: Any, node: str, seconds: float) -> None:
        self._store = store
        self.owner = f"{node}/{new_id('p')}"
        self.seconds = seconds
        self.taken_over = 0  # owed replies this node's recovery took (for tests, healthz)

    async def _take(self, conversation_id: str, guest_seq: int) -> bool:
        db = self._store.db
        held: bool = await self._store.read(
            db.take_reply_lease, conversation_id, guest_seq, self.owner, self.seconds
        )
        return held

    @asynccontextmanager
    async def holding(self, conversation_id: str, guest_seq: int) -> AsyncIterator[bool]:
        """Take the lease of answering one guest message and renew it until the block
        ends. Yields False (and holds nothing) if another node holds it."""
        try:
            held = await self._take(conversation_id, guest_seq)
        except StorageError as exc:
            # Unknown who holds it: answer anyway, the reply key keeps it to one.
            log.warning("cannot take the reply lease of %s: %s", conversation_id, exc)
            held = True
        if not held:
            yield False
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew, conversation_id, guest_seq)
            try:
                yield True
            finally:
                nursery.cancel_scope.cancel()

    async def _renew(self, conversation_id: str, guest_seq: int) -> None:
        # A third of the lease: two renewals may fail (a slow database) before it lapses.
        while True:
            await trio.sleep(self.seconds / 3)
            try:
                if not await self._take(conversation_id, guest_seq):
                    # Renewed too late: another node took it over. Its answer or ours,
                    # whichever is stored first, is the one (the reply key).
                    log.warning("lost the reply lease of %s#%d", conversation_id, guest_seq)
                    return
            except StorageError as exc:
                log.warning("cannot renew the reply lease of %s: %s", conversation_id, exc)

    async def recover(self, answer: Callable[[ConversationRow, Message], Awaitable[None]]) -> int:
        """One recovery scan: take over the owed replies nobody answers and ``answer``
        each. Returns how many were taken."""
        db = self._store.db
        owed: list[tuple[ConversationRow, Message]] = await self._store.read(
            db.take_owed_replies, time.time() - OWED_FOR, self.owner, self.seconds
        )
        for row, message in owed:
            log.info("taking over the reply to %s#%d", row.conversation_id, message.seq)
            await answer(row, message)
        self.taken_over += len(owed)
        return len(owed)

    async def recover_forever(
        self,
        answer: Callable[[ConversationRow, Message], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Scan at start, then every half lease, until cancelled."""
        started = False
        while True:
            try:
                await self.recover(answer)
            except StorageError as exc:
                log.warning("the reply recovery scan failed: %s", exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.seconds / 2)
