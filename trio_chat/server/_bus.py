"""The cluster's notification bus: Redis pub/sub, from two threads.

Redis carries only notifications; PostgreSQL is the truth. Pub/sub is at-most-once (a
subscriber that is disconnected, or too slow, loses what was published meanwhile), so
nothing relies on a notification arriving: each carries its conversation and ``seq``,
a node that sees a gap reads the gap from the database, and a node whose subscription
was lost reads everything it may have missed once it is back (the ``connected``
callback), and polls the database while it is gone.

Why threads and the synchronous ``redis`` client rather than a Trio-native one
(coredis): measured here, one awaited publish cost about the same either way (258 µs
with coredis under Trio, 232 µs through ``trio.to_thread``), so the event loop must not
wait for Redis per message at all. The loop only appends to a deque (no await); one
publisher thread sends whatever is queued in one pipeline. The subscriber thread
blocks in ``get_message`` and hands the loop whatever arrived in one callback. And the
failure that matters is the subscription's: redis-py's ``PubSub`` silently reconnects
and re-subscribes after a dropped connection (the deaf or lossy listener of
python-socketio #1411 and #1581); with retries off, every drop surfaces here as an
error, and the bus reports it, rebuilds the subscription and says so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import trio

__all__ = ["RedisBus"]

log = logging.getLogger("trio_chat.bus")

CHANNEL: Final = "trio-chat:v1"
RECONNECT_DELAYS: Final = (0.05, 0.2, 0.5, 1.0, 2.0)
SOCKET_TIMEOUT: Final = 5.0


class RedisBus:
    """Publish and receive notifications (bytes) on one Redis channel.

    :meth:`run` (in a nursery, ``await nursery.start(bus.run, deliver, connected,
    lost)``) starts both threads; ``deliver(batch)`` runs on the event loop with every
    notification received since the last call, in order; ``connected()`` runs each time
    the subscription is (re)established, after Redis confirmed it, so anything
    published afterwards will be delivered; ``lost()`` runs when it is lost.
    """

    def __init__(self, url: str, *, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.connected = False
        self.published = 0
        self.dropped = 0  # notifications not published (Redis unreachable)
        self.received = 0
        self.subscriptions = 0  # times the subscription was (re)established
        self.last_error: str | None = None
        self._queue: deque[bytes] = deque()
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._rebuild = threading.Event()

    def publish(self, payload: bytes) -> None:
        """Queue a notification (never waits; dropped if Redis is unreachable)."""
        self._queue.append(payload)
        self._kick.set()

    def resubscribe(self) -> None:
        """Drop the subscription and build a new one (it seems deaf)."""
        self._rebuild.set()

    async def run(
        self,
        deliver: Callable[[list[bytes]], None],
        connected: Callable[[], None],
        lost: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        self._stop.clear()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._thread, self._publisher)
                nursery.start_soon(
                    self._thread, lambda: self._subscriber(token, deliver, connected, lost)
                )
                task_status.started()
        finally:
            self._stop.set()
            self._kick.set()

    async def _thread(self, fn: Callable[[], None]) -> None:
        # The thread notices _stop within a fraction of a second; nobody waits for it.
        await trio.to_thread.run_sync(fn, abandon_on_cancel=True)

    def _client(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(
            self.url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # No silent reconnects: a dropped connection must be seen (see above).
            retry=Retry(NoBackoff(), 0),
        )

    def _publisher(self) -> None:
        import redis

        client = self._client()
        while not self._stop.is_set():
            self._kick.wait(0.5)
            self._kick.clear()
            batch = [self._queue.popleft() for _ in range(len(self._queue))]
            if not batch:
                continue
            try:
                pipe = client.pipeline(transaction=False)
                for payload in batch:
                    pipe.publish(self.channel, payload)
                pipe.execute()
                self.published += len(batch)
            except (redis.RedisError, OSError) as exc:
                # At most once anyway: the other nodes catch up from the database.
                self.dropped += len(batch)
                self.last_error = f"publish: {exc}"
                client = self._client()
        client.close()

    def _subscriber(
        self,
        token: trio.lowlevel.TrioToken,
        deliver: Callable[[list[bytes]], None],
        connected: Callable[[], None],
        lost: Callable[[], None],
    ) -> None:
        import redis

        failures = 0
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client().pubsub()
                pubsub.subscribe(self.channel)
                # Wait for Redis to confirm: from then on every publish reaches us.
                while not self._stop.is_set():
                    reply = pubsub.get_message(timeout=0.5)
                    if reply is not None and reply["type"] == "subscribe":
                        break
                self._rebuild.clear()
                self.connected = True
                self.subscriptions += 1
                failures = 0
                token.run_sync_soon(connected)
                while not (self._stop.is_set() or self._rebuild.is_set()):
                    reply = pubsub.get_message(timeout=0.2)
                    batch: list[bytes] = []
                    while reply is not None:
                        if reply["type"] == "message":
                            batch.append(reply["data"])
                        reply = pubsub.get_message(timeout=0.0)
                    if batch:
                        self.received += len(batch)
                        token.run_sync_soon(deliver, batch)
            except (redis.RedisError, OSError, trio.RunFinishedError) as exc:
                self.last_error = f"subscribe: {exc}"
            except Exception as exc:  # a listener that dies must not leave us deaf
                log.exception("the bus subscriber failed")
                self.last_error = f"subscribe: {exc!r}"
            finally:
                was = self.connected
                self.connected = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # it is gone either way
                        pubsub.close()
                if was and not self._stop.is_set():
                    try:
                        token.run_sync_soon(lost)
                    except trio.RunFinishedError:
                        return
            if not self._stop.is_set():
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                self._stop.wait(delay)
                log.warning("the bus reconnects (%s)", self.last_error)
