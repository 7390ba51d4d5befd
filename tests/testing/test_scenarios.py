"""The shipped scenarios, run against the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_chat import ChatServer
from trio_chat.testing import (
    ScenarioResult,
    load_scenario,
    run_scenario,
    scenario_files,
    summarize,
)
from trio_chat.testing._front import haproxy_binary, haproxy_front

from ..conftest import make_config
from ..helpers import staff_token

pytestmark = pytest.mark.slow
SPEED = 8.0


@pytest.fixture(params=["one node", "two nodes behind HAProxy"])
def cluster(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """The protocol's scenarios on one node (SQLite), and on a cluster: two nodes on
    PostgreSQL and Redis behind HAProxy, which spreads every guest and staff member
    over both (so a guest and the staff answering them are often on different nodes,
    and a reconnecting guest may come back on the other one)."""
    if request.param == "one node":
        return None
    if haproxy_binary() is None:
        pytest.skip("needs Debian's haproxy")
    return request.getfixturevalue("pg_url"), request.getfixturevalue("redis_server").url


@asynccontextmanager
async def serving(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> AsyncIterator[tuple[str, str | Path]]:
    """The URL to connect to, and the database (for staff tokens)."""
    if cluster is None:
        server = ChatServer(make_config(tmp_path, rate_limit=0))
        await nursery.start(server.run)
        yield f"ws://127.0.0.1:{server.port}/ws", server.config.db_path
        return
    db, bus = cluster
    nodes = []
    for _ in range(2):
        node = ChatServer(
            make_config(tmp_path, db_path=db, bus=bus, rate_limit=0, proxy_protocol=True)
        )
        await nursery.start(node.run)
        nodes.append(node)
    async with haproxy_front([(f"n{i}", node.port or 0) for i, node in enumerate(nodes)]) as front:
        await front.wait_states({"n0": "UP", "n1": "UP"})
        yield front.url, db


async def run(
    nursery: trio.Nursery, tmp_path: Path, name: str, cluster: tuple[str, str] | None
) -> tuple[ScenarioResult, dict[str, Any]]:
    async with serving(nursery, tmp_path, cluster) as (url, db):
        scenario = load_scenario(next(p for p in scenario_files() if p.stem == name))
        tokens = {s["name"]: staff_token(db, s["name"]) for s in scenario.staff}
        with trio.fail_after(60):
            result = await run_scenario(url, scenario, staff_tokens=tokens, speed=SPEED)
    return result, summarize(result)


def test_five_scenarios_ship_and_parse() -> None:
    names = {p.stem for p in scenario_files()}
    assert {
        "faq_stay",
        "complaint_escalated",
        "offline_guest",
        "checkin_flood",
        "staff_shift_change",
    } <= names
    for path in scenario_files():
        scenario = load_scenario(path)
        assert scenario.name and scenario.duration > 0


def test_bad_scenarios_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[guests]]\nname = "g"\nsteps = [{ at = 0, shout = "hi" }]\n')
    with pytest.raises(ValueError, match="needs 'at' and one of"):
        load_scenario(bad)
    bad.write_text('name = "x"\n[[staff]]\nname = "s"\nsteps = [{ at = 0, action = "nap" }]\n')
    with pytest.raises(ValueError, match="action"):
        load_scenario(bad)


async def test_faq_stay_is_answered_by_the_concierge(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> None:
    result, summary = await run(nursery, tmp_path, "faq_stay", cluster)
    assert summary["guest_messages"] == 6
    assert summary["concierge_answer_rate"] == 1.0
    assert summary["escalations"] == 0 and not summary["errors"]
    (transcript,) = result.transcripts.values()
    assert [m.sender for m in transcript] == ["guest", "ai"] * 6
    assert all(e["t"] >= 0 for e in result.events)


async def test_a_complaint_reaches_staff_and_reopens_later(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> None:
    result, summary = await run(nursery, tmp_path, "complaint_escalated", cluster)
    assert summary["escalations"] == 1 and not summary["errors"]
    assert summary["response_s"]["staff"]["count"] >= 1
    (transcript,) = result.transcripts.values()
    senders = [m.sender for m in transcript]
    assert "staff" in senders
    assert transcript[-1].sender == "ai" and "Breakfast" in transcript[-1].text  # reopened


async def test_an_offline_guest_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> None:
    result, summary = await run(nursery, tmp_path, "offline_guest", cluster)
    (transcript,) = result.transcripts.values()
    guest_texts = [m.text for m in transcript if m.sender == "guest"]
    assert guest_texts == [
        "Is the spa open this evening?",
        "Can I book a massage for 7pm?",
        "Also, do you have a gym?",
        "Great, thanks!",
    ]
    states = [e["state"] for e in result.events if e["kind"] == "state"]
    assert "offline" in states and not summary["errors"]


async def test_a_checkin_flood_is_served(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> None:
    result, summary = await run(nursery, tmp_path, "checkin_flood", cluster)
    assert summary["guests"] == 40 and not summary["errors"]
    assert summary["escalations"] == 4  # every tour leader reached a person
    assert summary["guest_messages"] >= 36 * 3
    assert all(len(t) >= 4 for t in result.transcripts.values())


async def test_a_shift_change_hands_guests_to_the_night_shift(
    nursery: trio.Nursery, tmp_path: Path, cluster: tuple[str, str] | None
) -> None:
    result, summary = await run(nursery, tmp_path, "staff_shift_change", cluster)
    assert not summary["errors"]
    claims = [(e["actor"], e["conversation_id"]) for e in result.events if e["kind"] == "claim"]
    assert [actor for actor, _ in claims] == ["staff:Anna"] * 2 + ["staff:Ben"] * 2
    assert {c for _, c in claims[:2]} == {c for _, c in claims[2:]}  # the same two guests
    assert summary["escalations"] == 4
