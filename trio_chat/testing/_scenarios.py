"""Scripted guests and staff: scenarios read from TOML, run against any server.

A scenario file (see ``data/scenarios/``) names guest groups and staff members, each
with timed steps::

    name = "A simple FAQ stay"

    [[guests]]
    name = "Maria"
    count = 1            # guests following this script
    spread = 0           # their starts are spread over this many seconds
    steps = [
      { at = 0, say = "What time is check-in?" },
      { at = 5, offline = 4 },        # the network goes away for 4 s
      { at = 6, say = "Written while offline" },
      { at = 12, escalate = "I'd like a person" },
    ]

    [[staff]]
    name = "Anna"
    steps = [
      { at = 0, action = "start" },
      { at = 8, action = "claim_next" },   # the longest-waiting conversation
      { at = 9, action = "reply", text = "Hello, Anna here." },
      { at = 20, action = "resolve" },
      { at = 30, action = "leave" },       # end of shift: release what is held
    ]

:func:`run_scenario` runs it (``speed`` scales time) and returns a
:class:`ScenarioResult` whose ``events`` record everything with timestamps;
:func:`summarize` turns those into the figures researchers chart.
"""

from __future__ import annotations

import random
import statistics
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..client._client import ChatClient, ClientEvent, StaffClient
from ..core.backoff import Backoff
from ..core.errors import ProtocolError, TrioChatError
from ..core.protocol import ErrorCode

__all__ = ["Scenario", "ScenarioResult", "load_scenario", "run_scenario", "summarize"]

GUEST_STEPS = frozenset({"say", "offline", "escalate", "leave"})
STAFF_ACTIONS = frozenset({"start", "claim_next", "reply", "release", "resolve", "leave"})


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    guests: tuple[dict[str, Any], ...]
    staff: tuple[dict[str, Any], ...]
    path: Path | None = None

    @property
    def duration(self) -> float:
        """The time of the last step (plus start spreads), in scenario seconds."""
        ends = [
            g.get("spread", 0) + max((s["at"] for s in g["steps"]), default=0) for g in self.guests
        ]
        ends += [max((s["at"] for s in st["steps"]), default=0) for st in self.staff]
        return float(max(ends, default=0))


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; raises ``ValueError`` saying what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    guests = tuple(data.get("guests", []))
    staff = tuple(data.get("staff", []))
    for group in guests:
        for step in group.get("steps", []):
            kinds = GUEST_STEPS & step.keys()
            if "at" not in step or len(kinds) != 1:
                raise ValueError(
                    f"{path}: guest step {step} needs 'at' and one of {sorted(GUEST_STEPS)}"
                )
    for member in staff:
        for step in member.get("steps", []):
            if "at" not in step or step.get("action") not in STAFF_ACTIONS:
                raise ValueError(
                    f"{path}: staff step {step} needs 'at' and an action in {sorted(STAFF_ACTIONS)}"
                )
    if "name" not in data:
        raise ValueError(f"{path}: a scenario needs a name")
    return Scenario(data["name"], data.get("description", ""), guests, staff, path)


def scenario_files(directory: str | Path | None = None) -> list[Path]:
    """The shipped scenarios (``data/scenarios/*.toml``), sorted by name."""
    if directory is None:
        packaged = Path(__file__).resolve().parents[1] / "_data" / "scenarios"
        source = Path(__file__).resolve().parents[2] / "data" / "scenarios"
        directory = packaged if packaged.is_dir() else source
    return sorted(Path(directory).glob("*.toml"))


@dataclass
class ScenarioResult:
    """What happened. Each event: ``t`` (seconds since the start, scenario time),
    ``actor``, ``kind`` and details."""

    scenario: str
    events: list[dict[str, Any]] = field(default_factory=list)
    transcripts: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _Recorder:
    def __init__(self, result: ScenarioResult, speed: float) -> None:
        self.result = result
        self.speed = speed
        self.start = trio.current_time()

    def now(self) -> float:
        return (trio.current_time() - self.start) * self.speed

    def record(self, actor: str, kind: str, **detail: Any) -> None:
        self.result.events.append(
            {"t": round(self.now(), 4), "actor": actor, "kind": kind, **detail}
        )

    def listen(self, actor: str, client: ChatClient) -> None:
        def on_event(event: ClientEvent) -> None:
            if event.kind == "message":
                m = event.data["message"]
                self.record(
                    actor,
                    "message",
                    seq=m.seq,
                    sender=m.sender,
                    author=m.author,
                    conversation_id=m.conversation_id,
                    text=m.text,
                )
            elif event.kind == "state":
                self.record(
                    actor,
                    "state",
                    state=event.data["state"],
                    attempt=event.data.get("attempt"),
                    delay=event.data.get("delay"),
                )
            elif event.kind == "status":
                self.record(
                    actor,
                    "status",
                    status=event.data.get("status"),
                    conversation_id=event.data.get("conversation_id"),
                    assigned_to=event.data.get("assigned_to"),
                )
            elif event.kind == "ack":
                self.record(actor, "ack", seq=event.data.get("seq"))

        client.add_listener(on_event)


async def run_scenario(
    url: str,
    scenario: Scenario,
    *,
    staff_tokens: dict[str, str] | None = None,
    speed: float = 1.0,
    seed: int = 0,
    settle: float = 5.0,
) -> ScenarioResult:
    """Run ``scenario`` against the server at ``url``.

    ``staff_tokens`` maps each staff member's name to a token. ``speed`` > 1 runs the
    timeline faster (step times are divided by it). After the last step, waits up to
    ``settle`` seconds for every message to be delivered.
    """
    result = ScenarioResult(scenario.name)
    recorder = _Recorder(result, speed)
    rng = random.Random(seed)
    staff_tokens = staff_tokens or {}
    missing = [s["name"] for s in scenario.staff if s["name"] not in staff_tokens]
    if missing:
        raise ValueError(f"no staff token for {', '.join(missing)}")
    async with trio.open_nursery() as nursery:
        for group in scenario.guests:
            for index in range(int(group.get("count", 1))):
                offset = rng.uniform(0, float(group.get("spread", 0)))
                actor = f"guest:{group['name']}#{index + 1}"
                nursery.start_soon(
                    _guest, url, actor, group, offset, recorder, settle, seed, scenario.duration
                )
        for member in scenario.staff:
            nursery.start_soon(_staff, url, member, staff_tokens[member["name"]], recorder, settle)
    return result


async def _at(recorder: _Recorder, at: float) -> None:
    await trio.sleep_until(recorder.start + at / recorder.speed)


async def _guest(
    url: str,
    actor: str,
    group: dict[str, Any],
    offset: float,
    recorder: _Recorder,
    settle: float,
    seed: int,
    end: float,
) -> None:
    await _at(recorder, offset)
    client = ChatClient(
        url,
        name=group["name"],
        backoff=Backoff(initial=0.2, max=5, seed=seed + zlib.crc32(actor.encode())),
    )
    recorder.listen(actor, client)
    recorder.record(actor, "arrive")
    # A guest gives up on deliveries when the scenario (plus ``settle``) is over, so a
    # dead server cannot hang the run.
    give_up = recorder.start + end / recorder.speed + settle
    tally = _Tally()
    async with client, trio.open_nursery() as sends:
        sends.cancel_scope.deadline = give_up
        for step in group["steps"]:
            await _at(recorder, offset + step["at"])
            if "say" in step:
                recorder.record(actor, "say", text=step["say"])
                tally.start()
                sends.start_soon(_send, client, step["say"], actor, recorder, tally)
            elif "offline" in step:
                client.set_online(False)
                recorder.record(actor, "offline", seconds=step["offline"])
                sends.start_soon(_back_online, client, float(step["offline"]) / recorder.speed)
            elif "escalate" in step:
                recorder.record(actor, "escalate")
                await client.escalate(str(step["escalate"]) if step["escalate"] else None)
            elif "leave" in step:
                break
        else:
            # Guests stay in the chat until the scenario ends: staff may still come.
            await _at(recorder, end)
        try:
            await tally.wait()  # this guest's own messages are all acknowledged
            with trio.move_on_after(settle):
                await _settle(client)
        finally:
            recorder.result.transcripts[actor] = list(client.transcript)
    recorder.record(actor, "leave")


class _Tally:
    """Sends still waiting for their ack; :meth:`wait` returns when there are none."""

    def __init__(self) -> None:
        self.outstanding = 0
        self._none = trio.Event()
        self._none.set()

    def start(self) -> None:
        if self.outstanding == 0:
            self._none = trio.Event()
        self.outstanding += 1

    def finish(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self._none.set()

    async def wait(self) -> None:
        await self._none.wait()


async def _settle(client: ChatClient) -> None:
    """Everything sent is delivered and the concierge has had its say."""
    await client.wait_until(lambda: not client.pending and client.synced)
    await client.wait_until(
        lambda: (
            client.status != "ai"
            or (
                bool(client.transcript)
                and client.transcript[-1].sender != "guest"
                and not client.typing.get("ai")
            )
        )
    )
    await client.ping()  # whatever the server sent before this has arrived


async def _send(
    client: ChatClient, text: str, actor: str, recorder: _Recorder, tally: _Tally
) -> None:
    try:
        await client.send(text)
    except TrioChatError as exc:
        recorder.result.errors.append(f"{actor}: {exc}")
    finally:
        tally.finish()


async def _back_online(client: ChatClient, after: float) -> None:
    await trio.sleep(after)
    client.set_online(True)


async def _staff(
    url: str, member: dict[str, Any], token: str, recorder: _Recorder, settle: float
) -> None:
    actor = f"staff:{member['name']}"
    steps = sorted(member["steps"], key=lambda s: s["at"])
    await _at(recorder, steps[0]["at"] if steps else 0)
    desk = StaffClient(url, token=token)
    recorder.listen(actor, desk)
    current: str | None = None
    held: list[str] = []
    async with desk:
        await desk.wait_until(lambda: desk.queue_ready)
        recorder.record(actor, "shift_start")
        for step in steps:
            await _at(recorder, step["at"])
            action = step["action"]
            try:
                if action == "claim_next":
                    wait = float(step.get("wait", 30)) / recorder.speed
                    claimed = await _claim_next(desk, wait)
                    if claimed is None:
                        recorder.record(actor, "idle")
                        continue
                    current = claimed
                    held.append(current)
                    recorder.record(actor, "claim", conversation_id=current)
                elif action == "reply" and current is not None:
                    await desk.reply(current, step["text"])
                    recorder.record(actor, "reply", conversation_id=current)
                elif action in ("release", "resolve") and current is not None:
                    await (desk.release if action == "release" else desk.resolve)(current)
                    recorder.record(actor, action, conversation_id=current)
                    held.remove(current)
                    current = held[-1] if held else None
                elif action == "leave":
                    for conversation_id in held:
                        await desk.release(conversation_id)
                        recorder.record(actor, "release", conversation_id=conversation_id)
                    held.clear()
                    break
            except TrioChatError as exc:
                recorder.result.errors.append(f"{actor} {action}: {exc}")
    recorder.record(actor, "shift_end")


async def _claim_next(desk: StaffClient, wait: float) -> str | None:
    """Claim the longest-waiting conversation; when a colleague got there first
    (``conflict``), move on to the next one, as a person at the desk would."""
    tried: set[str] = set()
    with trio.move_on_after(wait):
        while True:
            await desk.wait_until(lambda: _next_waiting(desk, tried) is not None)
            candidate = _next_waiting(desk, tried)
            assert candidate is not None
            try:
                await desk.claim(candidate)
            except ProtocolError as exc:
                if exc.code != ErrorCode.CONFLICT:
                    raise
                tried.add(candidate)
                continue
            return candidate
    return None


def _next_waiting(desk: StaffClient, skip: set[str] | None = None) -> str | None:
    waiting = [
        s
        for s in desk.queue.values()
        if s.status == "waiting" and s.conversation_id not in (skip or ())
    ]
    if not waiting:
        return None
    return min(waiting, key=lambda s: s.updated_ts).conversation_id


# ----------------------------------------------------------------------- analysis


def summarize(result: ScenarioResult) -> dict[str, Any]:
    """The figures of a run, from its events alone (pure).

    * ``concierge_answer_rate``: concierge replies per guest message written while the
      conversation was with the concierge (at most 1);
    * ``escalations`` and ``time_to_staff_s``: from the status becoming ``waiting`` to
      ``staff``, per conversation;
    * ``response_s``: by responder (``ai``, ``staff``), the time from a guest message
      to the next message from that responder;
    * ``longest_waits``: the guests who waited longest for any answer.
    """
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for event in result.events:
        by_actor.setdefault(event["actor"], []).append(event)
    asked = answered = 0
    response: dict[str, list[float]] = {"ai": [], "staff": []}
    time_to_staff: list[float] = []
    waits: list[tuple[float, str]] = []
    for actor, events in by_actor.items():
        if not actor.startswith("guest:"):
            continue
        status = "ai"
        waiting_since: float | None = None
        unanswered: list[float] = []
        seen: set[int] = set()
        for event in events:
            if event["kind"] == "status":
                if event["status"] == "waiting" and waiting_since is None:
                    waiting_since = event["t"]
                elif event["status"] == "staff" and waiting_since is not None:
                    time_to_staff.append(event["t"] - waiting_since)
                    waiting_since = None
                status = event["status"]
            if event["kind"] != "message" or event["seq"] in seen:
                continue
            seen.add(event["seq"])
            if event["sender"] == "ai":
                answered += 1
            if event["sender"] == "guest":
                if status == "ai":
                    asked += 1
                unanswered.append(event["t"])
            elif event["sender"] in ("ai", "staff") and unanswered:
                delay = event["t"] - unanswered[0]
                response[event["sender"]].append(delay)
                waits.append((delay, actor))
                unanswered.clear()
    return {
        "scenario": result.scenario,
        "guests": sum(1 for a in by_actor if a.startswith("guest:")),
        "guest_messages": asked,
        "concierge_answer_rate": min(1.0, answered / asked) if asked else 0.0,
        "escalations": len(time_to_staff),
        "time_to_staff_s": _stats(time_to_staff),
        "response_s": {sender: _stats(values) for sender, values in response.items()},
        "longest_waits": [
            {"guest": who, "seconds": round(s, 3)} for s, who in sorted(waits, reverse=True)[:5]
        ],
        "errors": list(result.errors),
    }


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "max": round(ordered[-1], 4),
    }
