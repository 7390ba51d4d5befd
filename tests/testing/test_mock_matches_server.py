"""The mock server and the real one agree frame for frame on every shipped scenario.

Each scenario's steps are played in time order by raw protocol clients, against the
real server (SQLite) and against the mock (memory, the same rules concierge, no
scripted staff). After every step both servers are let settle (no write in flight,
no concierge answer under way, then a ping answered on every connection), so what
each participant received is deterministic. Every frame is compared, ids, tokens and
timestamps aside (replaced by their order of appearance).
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_chat import ChatServer, RulesResponder
from trio_chat.testing import MockServer, load_scenario, scenario_files

from ..conftest import make_config
from ..helpers import RawClient, connect, staff_token

pytestmark = pytest.mark.slow
GROUP_LIMIT = 2  # guests per group (a flood of 36 adds time, not coverage)

_ID = re.compile(r"^(?:[gcs]_[A-Za-z0-9_-]{16}|[gs]\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$")


class _Normalizer:
    """Ids and tokens become ``<id N>`` in order of first appearance; timestamps go."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def __call__(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {
                k: self(v, k) for k, v in value.items() if k not in ("ts", "updated_ts", "server")
            }
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str) and _ID.match(value):
            return self.ids.setdefault(value, f"<id {len(self.ids)}>")
        return value


class _Play:
    """One scenario played step by step against one server."""

    def __init__(self, port: int, settle: Any, tokens: dict[str, str]) -> None:
        self.port = port
        self.settle = settle
        self.tokens = tokens
        self.clients: dict[str, RawClient] = {}
        self.guest_tokens: dict[str, str] = {}
        self.offline_until: dict[str, float] = {}
        self.outbox: dict[str, list[str]] = {}
        self.current: dict[str, str] = {}  # staff member -> conversation in hand
        self.queues: dict[str, dict[str, dict[str, Any]]] = {}
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self.sent = 0

    async def open(self, stack: Any, actor: str) -> RawClient:
        client: RawClient = await stack.enter_async_context(connect(self.port))
        self.clients[actor] = client
        return client

    async def barrier(self) -> None:
        # A pong on every connection: the server has read the step's frames. Then
        # nothing in flight: everything they set off is committed. Then pongs again:
        # every push that followed has reached its connection.
        await self.pings()
        await self.settle()
        await self.pings()

    async def pings(self) -> None:
        for client in self.clients.values():
            self.sent += 1
            await client.send(type="ping", id=self.sent)
            await client.expect("pong", id=self.sent)

    async def guest_step(self, stack: Any, actor: str, step: dict[str, Any]) -> None:
        if "say" in step:
            if actor in self.offline_until:
                self.outbox.setdefault(actor, []).append(step["say"])
                return
            if actor not in self.clients:
                client = await self.open(stack, actor)
                welcome = await client.hello(None)
                self.guest_tokens[actor] = welcome["token"]
            self.sent += 1
            await self.clients[actor].send(
                type="message", client_msg_id=f"m{self.sent}", text=step["say"]
            )
        elif "escalate" in step:
            await self.clients[actor].send(type="escalate", reason=step["escalate"])
        elif "offline" in step or "leave" in step:
            client = self.clients.pop(actor)
            self.record(actor, client)
            await client.ws.aclose()
            if "offline" in step:
                self.offline_until[actor] = step["at"] + step["offline"]

    async def back_online(self, stack: Any, actor: str) -> None:
        del self.offline_until[actor]
        client = await self.open(stack, actor)
        await client.hello(self.guest_tokens[actor])
        await self.barrier()
        for text in self.outbox.pop(actor, []):
            # One at a time: sent together, a message and the answer to the one before
            # it race, in either server.
            self.sent += 1
            await client.send(type="message", client_msg_id=f"m{self.sent}", text=text)
            await self.barrier()

    async def staff_step(self, stack: Any, actor: str, step: dict[str, Any]) -> None:
        action = step["action"]
        if action == "start":
            client = await self.open(stack, actor)
            await client.hello(self.tokens[actor])
            return
        client = self.clients[actor]
        queue = self.view(actor)
        if action == "claim_next":
            waiting = sorted(
                (s for s in queue.values() if s["status"] == "waiting"),
                key=lambda s: s["updated_ts"],
            )
            if waiting:
                self.current[actor] = waiting[0]["conversation_id"]
                await client.send(type="claim", conversation_id=self.current[actor])
        elif action == "reply" and actor in self.current:
            self.sent += 1
            await client.send(
                type="message",
                conversation_id=self.current[actor],
                client_msg_id=f"m{self.sent}",
                text=step["text"],
            )
        elif action in ("release", "resolve") and actor in self.current:
            await client.send(type=action, conversation_id=self.current.pop(actor))
        elif action == "leave":
            for summary in queue.values():
                if summary["status"] == "staff" and summary["assigned_to"] == actor:
                    await client.send(type="release", conversation_id=summary["conversation_id"])
            await self.barrier()
            self.record(actor, self.clients.pop(actor))
            await client.ws.aclose()

    def view(self, actor: str) -> dict[str, dict[str, Any]]:
        """What the staff member's console shows: the queue, kept up to date."""
        queue = self.queues.setdefault(actor, {})
        for frame in self.clients[actor].seen:
            if frame["type"] == "queue":
                queue.update({s["conversation_id"]: s for s in frame["conversations"]})
            elif frame["type"] == "conversation":
                queue[frame["conversation_id"]] = frame
        return queue

    def record(self, actor: str, client: RawClient) -> None:
        self.frames.setdefault(actor, []).extend(f for f in client.seen if f["type"] != "pong")


async def _play(scenario_path: Path, port: int, settle: Any, tokens: dict[str, str]) -> Any:
    scenario = load_scenario(scenario_path)
    steps: list[tuple[float, int, str, str, dict[str, Any]]] = []
    for group in scenario.guests:
        for n in range(min(group.get("count", 1), GROUP_LIMIT)):
            actor = f"{group['name']} {n}"
            for step in group["steps"]:
                steps.append((step["at"], len(steps), "guest", actor, step))
    for member in scenario.staff:
        for step in member["steps"]:
            steps.append((step["at"], len(steps), "staff", member["name"], step))
    steps.sort()
    play = _Play(port, settle, tokens)
    async with AsyncExitStack() as stack:
        for at, _, kind, actor, step in steps:
            for offline, until in sorted(play.offline_until.items(), key=lambda kv: kv[1]):
                if until <= at:
                    await play.back_online(stack, offline)
            if kind == "guest":
                await play.guest_step(stack, actor, step)
            else:
                await play.staff_step(stack, actor, step)
            await play.barrier()
        for actor in list(play.offline_until):
            await play.back_online(stack, actor)
        await play.barrier()
        for actor, client in play.clients.items():
            play.record(actor, client)
    # Ids are numbered as the guests first see them (their welcomes, in step order), so
    # the numbering does not hang on the order of a staff console's queue.
    normalize = _Normalizer()
    staff = {m["name"] for m in scenario.staff}
    order = sorted(play.frames, key=lambda actor: (actor in staff, actor))
    return {actor: normalize(play.frames[actor]) for actor in order}


@pytest.mark.parametrize("scenario", scenario_files(), ids=lambda p: p.stem)
async def test_the_mock_and_the_server_send_the_same_frames(
    nursery: trio.Nursery, tmp_path: Path, scenario: Path
) -> None:
    names = [s["name"] for s in load_scenario(scenario).staff]
    real = ChatServer(make_config(tmp_path, concierge="rules"))
    await nursery.start(real.run)
    real_tokens = {name: staff_token(real.config.db_path, name) for name in names}
    mock = MockServer(concierge=RulesResponder(), scripted_staff=False)
    await nursery.start(mock.run)
    mock_tokens = {name: mock.add_staff(name) for name in names}
    assert real.port is not None and mock.port is not None
    with trio.fail_after(60):
        from_real = await _play(scenario, real.port, real.wait_idle, real_tokens)
        from_mock = await _play(scenario, mock.port, mock.server.wait_idle, mock_tokens)
    assert from_real.keys() == from_mock.keys()
    for actor in from_real:
        assert from_mock[actor] == from_real[actor], actor
    # Not trivially equal: every participant heard something.
    assert all(len(frames) >= 2 for frames in from_real.values())
