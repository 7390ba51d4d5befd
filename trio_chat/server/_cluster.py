"""One server process's part in a cluster: what it tells the others, what it hears.

The hub decides; this is shell. After each local commit the node publishes a notice on
the bus (the message and the conversation's row as the commit left it); ephemeral
frames (typing, read marks, the concierge's drafts), guest presence and who is on duty
are relayed the same way (Redis only, never stored). A notice from another node goes
to :meth:`Hub.remote_committed`, which pushes it to this node's subscribers if it is
the next ``seq`` and otherwise asks for a :class:`~trio_chat.core.hub.Fill`: a read of
everything after what this node has pushed, from the database, in one snapshot. So
every subscriber on every node gets every committed message once, in ``seq`` order,
whatever the bus loses.

While the subscription is down (Redis restarting, a killed connection) the node polls
the database: every live conversation is filled and the staff queue refreshed each
``poll_interval``; when the subscription is back, once more. Each node also publishes
a heartbeat and expects to hear its own: a subscription that delivers nothing (the
silently deaf listener of python-socketio #1581) is rebuilt, and polling covers the
meantime. A node whose heartbeats stop is taken as gone: its guests are offline.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Final

import trio

from ..core.errors import StorageError
from ..core.hub import Relay
from ..core.protocol import Message
from ..core.storage import Appended, AppendMessage, ConversationRow
from ..core.tokens import new_id
from ._bus import RedisBus

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["Cluster"]

log = logging.getLogger("trio_chat.cluster")

FILL_LIMIT: Final = 500
HEARTBEAT_S: Final = 1.0
DEAF_AFTER_S: Final = 5.0  # no echo of our own heartbeat for this long: rebuild
NODE_GONE_S: Final = 10.0  # no heartbeat from a node for this long: it is gone


def _row_fields(row: ConversationRow) -> list[Any]:
    """Every field, in order (``ConversationRow(*fields)`` on the other side): the
    staff console's guest room and read mark travel too."""
    return [getattr(row, field.name) for field in fields(row)]


class Cluster:
    """The cluster side of one :class:`ChatServer` (``serve --bus redis://...``)."""

    def __init__(self, server: ChatServer, bus_url: str, *, poll_interval: float = 1.0) -> None:
        self.server = server
        self.node = os.environ.get("TRIO_CHAT_NODE") or new_id("n")
        self.bus = RedisBus(bus_url)
        self.poll_interval = poll_interval
        self._filling: dict[str, bool] = {}  # conversation -> another fill was asked
        self._nursery: trio.Nursery | None = None
        self._peers: dict[str, float] = {}  # node -> when last heard (monotonic)
        self._own_echo = time.monotonic()
        self._queue_since = 0.0  # the staff queue was refreshed up to this updated_ts
        self.polling = False
        self.fills = 0
        self.storage_ok = True

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        bus = self.bus
        return {
            "node": self.node,
            "state": "ok" if bus.connected and not self.polling else "polling",
            "connected": bus.connected,
            "subscriptions": bus.subscriptions,
            "published": bus.published,
            "dropped": bus.dropped,
            "received": bus.received,
            "fills": self.fills,
            "peers": sorted(self._peers),
            "last_error": bus.last_error,
        }

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.bus.run, self._delivered, self._connected, self._lost)
            nursery.start_soon(self._beat)
            task_status.started()

    def stop(self) -> None:
        """Tell the others this node is going (its guests are then offline there)."""
        self._publish({"k": "bye"})

    async def _beat(self) -> None:
        polled = 0.0
        while True:
            await trio.sleep(min(HEARTBEAT_S, self.poll_interval))
            now = time.monotonic()
            self._publish({"k": "beat"})
            if self.bus.connected and now - self._own_echo > DEAF_AFTER_S:
                log.warning("no echo from the bus for %.1f s: resubscribing", DEAF_AFTER_S)
                self._own_echo = now
                self.polling = True
                self.bus.resubscribe()
            for node, seen in list(self._peers.items()):
                if now - seen > NODE_GONE_S:
                    del self._peers[node]
                    self._perform(self.server.hub.node_gone(node, *self.server._clock()))
            if (not self.bus.connected or self.polling) and now - polled >= self.poll_interval:
                polled = now
                self.resync()
            await self._check_storage()

    async def _check_storage(self) -> None:
        """Ask the database, so /healthz knows even while nobody writes; once it is
        back, catch up with whatever the others committed meanwhile."""
        store = self.server.store
        was = self.storage_ok
        try:
            await store.read(store.db.ping)
        except StorageError as exc:
            if was:
                log.warning("the database is unreachable: %s", exc)
            self.storage_ok = False
            return
        self.storage_ok = True
        if not was:
            log.warning("the database is back")
            self.resync()

    # -- what this node tells the others -------------------------------------------------

    def _publish(self, note: dict[str, Any]) -> None:
        note["n"] = self.node
        self.bus.publish(json.dumps(note, separators=(",", ":")).encode())

    def committed(self, operation: object, result: object) -> None:
        """A local commit (called after the hub heard of it)."""
        if (
            isinstance(operation, AppendMessage)
            and isinstance(result, Appended)
            and not result.duplicate
            and result.conflict is None
            and result.row is not None
        ):
            m = result.message
            self._publish(
                {
                    "k": "m",
                    "m": [
                        m.seq,
                        m.conversation_id,
                        m.sender,
                        m.author,
                        m.text,
                        m.ts,
                        m.client_msg_id,
                    ],
                    "r": _row_fields(result.row),
                }
            )

    def relay(self, action: Relay) -> None:
        self._publish(
            {"k": "r", "c": action.conversation_id, "f": action.frame, "o": action.guest_online}
        )

    def relay_staff(self, names: tuple[str, ...]) -> None:
        """Who is on duty on this node (all of them, each time: a lost notice is
        made good by the next one, or by the answer to a ``hello``)."""
        self._publish({"k": "s", "s": list(names)})

    # -- what this node hears -------------------------------------------------------------

    def _delivered(self, batch: list[bytes]) -> None:
        hub = self.server.hub
        clock = self.server._clock
        for payload in batch:
            try:
                note = json.loads(payload)
                node = note["n"]
                kind = note["k"]
            except (ValueError, KeyError, TypeError):
                log.warning("a notice that is not ours on the bus: %r", payload[:80])
                continue
            if node == self.node:
                if kind == "beat":
                    self._own_echo = time.monotonic()
                continue
            self._peers[node] = time.monotonic()
            try:
                if kind == "m":
                    message = Message(*note["m"])
                    row = ConversationRow(*note["r"])
                    self._perform(
                        hub.remote_committed(message.conversation_id, [message], row, *clock())
                    )
                elif kind == "r":
                    self._perform(hub.relayed(note["c"], node, note["f"], note["o"], *clock()))
                elif kind == "s":
                    self._perform(hub.staff_elsewhere(node, list(note["s"]), *clock()))
                elif kind == "hello":
                    self._announce_presence()
                elif kind == "bye":
                    self._peers.pop(node, None)
                    self._perform(hub.node_gone(node, *clock()))
            except Exception:
                log.exception("a notice from %s could not be handled", node)

    def _connected(self) -> None:
        """Subscribed (again): whatever was published while we were not is read from
        the database; the others re-announce their guests."""
        self._own_echo = time.monotonic()
        self.polling = False
        self._publish({"k": "hello"})
        self._announce_presence()
        self.resync()

    def _lost(self) -> None:
        log.warning("the bus subscription is lost: polling the database meanwhile")
        self.polling = True

    def _announce_presence(self) -> None:
        self.relay_staff(self.server.hub.on_duty_here())
        for conv in list(self.server.hub.conversations.values()):
            if conv.guest_sessions:
                self.relay(Relay(conv.conversation_id, guest_online=True))

    # -- catching up from the database ----------------------------------------------------

    def resync(self) -> None:
        """Fill every live conversation and refresh the staff queue from the database."""
        for conversation_id in list(self.server.hub.conversations):
            self.fill(conversation_id)
        if self._nursery is not None and self.server.hub.staff_room:
            self._nursery.start_soon(self._refresh_queue)

    def fill(self, conversation_id: str) -> None:
        """Read and push what ``conversation_id`` committed after what was pushed here
        (one fill at a time per conversation; asked again meanwhile, it runs again)."""
        if conversation_id in self._filling:
            self._filling[conversation_id] = True
            return
        if self._nursery is None:
            return
        self._filling[conversation_id] = False
        self._nursery.start_soon(self._fill, conversation_id)

    async def _fill(self, conversation_id: str) -> None:
        store = self.server.store
        hub = self.server.hub
        try:
            while True:
                after = hub.last_seq(conversation_id)
                if after is None:
                    return  # not live here any more: nothing to push
                row, messages = await store.read(
                    store.db.changes_since, conversation_id, after, FILL_LIMIT
                )
                self.fills += 1
                self._perform(
                    hub.remote_committed(conversation_id, messages, row, *self.server._clock())
                )
                if len(messages) >= FILL_LIMIT:
                    continue
                if not self._filling.get(conversation_id):
                    return
                self._filling[conversation_id] = False
        except StorageError as exc:
            # The next poll or notice tries again.
            log.warning("cannot catch up %s: %s", conversation_id, exc)
            self.polling = True
        finally:
            self._filling.pop(conversation_id, None)

    async def _refresh_queue(self) -> None:
        store = self.server.store
        try:
            rows: list[ConversationRow] = await store.read(store.db.queue, time.time())
        except StorageError as exc:
            log.warning("cannot refresh the staff queue: %s", exc)
            return
        since = self._queue_since
        hub = self.server.hub
        for row in rows:
            self._queue_since = max(self._queue_since, row.updated_ts)
            if row.updated_ts > since and row.conversation_id not in hub.conversations:
                self._perform(
                    hub.remote_committed(row.conversation_id, [], row, *self.server._clock())
                )

    def _perform(self, actions: list[Any]) -> None:
        with self.server._corked():
            self.server._perform_now(actions)
