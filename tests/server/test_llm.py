"""The language-model concierge against a local OpenAI-compatible server whose answers
are scripted per prompt: streamed drafts, grounding, hand-off, and exactly one answer
whatever the model does (slow, hung, 429, 500s, malformed, a restart mid-answer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_chat import ChatServer
from trio_chat.server._llm import CircuitBreaker, LlmResponder, LlmSettings

from ..conftest import make_config
from ..helpers import RawClient, connect, free_port, wait_for_port
from .fake_llm import FakeLlm, Malformed, Status, Stream

BREAKFAST = "When is breakfast served?"
RULES_BREAKFAST = "Breakfast is served"  # how the rules concierge's answer begins


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeLlm:
    llm = FakeLlm()
    await nursery.start(llm.run)
    return llm


def settings(fake: FakeLlm, **overrides: Any) -> LlmSettings:
    base = LlmSettings(url=fake.url, model="fake", api_key="sk-test-secret", retry_backoff=0.05)
    return replace(base, **overrides)


@pytest.fixture
async def serve(nursery: trio.Nursery, tmp_path: Path, fake: FakeLlm) -> AsyncIterator[Any]:
    async def start(**overrides: Any) -> ChatServer:
        server = ChatServer(make_config(tmp_path, concierge="llm", llm=settings(fake, **overrides)))
        await nursery.start(server.run)
        return server

    yield start


async def ask(port: int, text: str) -> tuple[RawClient, list[dict[str, Any]]]:
    """A new guest asks ``text``; returns the client and the frames up to the answer
    (the concierge's typing indicator going off)."""
    async with connect(port) as guest:
        await guest.hello()
        await guest.send(type="message", client_msg_id="m1", text=text)
        await guest.expect("ack", client_msg_id="m1")
        await guest.expect("typing", sender="ai", active=False)
        return guest, guest.seen


def answers(frames: list[dict[str, Any]]) -> list[str]:
    return [f["text"] for f in frames if f["type"] == "message" and f["sender"] == "ai"]


def drafts(frames: list[dict[str, Any]]) -> list[str]:
    return [f["text"] for f in frames if f["type"] == "draft"]


async def test_the_answer_grows_in_drafts_and_is_stored_once(serve: Any, fake: FakeLlm) -> None:
    fake.script[BREAKFAST] = [Stream(["Breakfast ", "is from seven ", "to ten."], gap=0.15)]
    server = await serve(draft_interval=0.1)
    _, frames = await ask(server.port, BREAKFAST)
    assert answers(frames) == ["Breakfast is from seven to ten."]
    grown = drafts(frames)
    assert grown[0] == "Breakfast" and grown[-1] == "Breakfast is from seven to ten."
    assert grown == sorted(grown, key=len)  # each draft is the answer so far
    order = [f["type"] for f in frames if f["type"] == "draft" or f.get("sender") == "ai"]
    assert order[-2:] == ["message", "typing"]  # every draft before the stored answer
    history = server.store.db.history(frames[0]["conversation_id"], 0, 50)
    assert [m.sender for m in history] == ["guest", "ai"]  # drafts are never stored


async def test_the_model_is_grounded_in_the_hotel_and_the_conversation(
    serve: Any, fake: FakeLlm
) -> None:
    server = await serve()
    async with connect(server.port) as guest:
        await guest.hello()
        await guest.send(type="message", client_msg_id="m1", text="Hello there")
        await guest.expect("typing", sender="ai", active=False)
        await guest.send(type="message", client_msg_id="m2", text=BREAKFAST)
        await guest.expect("ack", client_msg_id="m2")
        await guest.expect("typing", sender="ai", active=False)
    request = fake.requests[-1]
    system, *conversation = request["messages"]
    assert system["role"] == "system"
    assert "Harbourview Hotel" in system["content"]
    assert RULES_BREAKFAST in system["content"]  # the matching topic's answer
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert conversation[0]["content"] == "Hello there"
    assert conversation[-1]["content"] == BREAKFAST
    assert request["stream"] is True and request["max_tokens"] == 300
    assert [t["function"]["name"] for t in request["tools"]] == ["hand_to_staff"]
    assert fake.headers[-1]["authorization"] == "Bearer sk-test-secret"


async def test_a_tool_call_hands_the_guest_to_staff(serve: Any, fake: FakeLlm) -> None:
    fake.script["My card was charged twice"] = [
        Stream(["Let me bring in a colleague."], hand_over=True)
    ]
    server = await serve()
    async with connect(server.port) as guest:
        await guest.hello()
        await guest.send(type="message", client_msg_id="m1", text="My card was charged twice")
        status = await guest.expect("status")
        assert status["status"] == "waiting"
    assert answers(guest.seen) == ["Let me bring in a colleague."]


async def test_asking_for_a_person_hands_over_without_asking_the_model(
    serve: Any, fake: FakeLlm
) -> None:
    server = await serve()
    async with connect(server.port) as guest:
        await guest.hello()
        await guest.send(type="message", client_msg_id="m1", text="I want to talk to a person")
        status = await guest.expect("status")
        assert status["status"] == "waiting"
    assert fake.requests == []


async def test_no_first_token_in_time_and_the_rules_answer(
    serve: Any, fake: FakeLlm, idle_clock: trio.testing.MockClock
) -> None:
    fake.script[BREAKFAST] = [Stream(["Too late."], first_after=60)]
    server = await serve(first_token_timeout=10, answer_timeout=25, retries=0)
    _, frames = await ask(server.port, BREAKFAST)
    [answer] = answers(frames)
    assert answer.startswith(RULES_BREAKFAST)
    assert fake.asked(BREAKFAST) == 1


async def test_a_stream_that_hangs_midway_gives_one_answer_from_the_rules(
    serve: Any, fake: FakeLlm, idle_clock: trio.testing.MockClock
) -> None:
    fake.script[BREAKFAST] = [Stream(["Breakfast ", "is from"], hang_after=1)]
    server = await serve(answer_timeout=25)
    _, frames = await ask(server.port, BREAKFAST)
    assert drafts(frames) == ["Breakfast"]
    [answer] = answers(frames)
    assert answer.startswith(RULES_BREAKFAST)


async def test_429_then_an_answer(serve: Any, fake: FakeLlm) -> None:
    fake.script[BREAKFAST] = [Status(429, retry_after=0.05), Stream(["From seven."])]
    server = await serve()
    _, frames = await ask(server.port, BREAKFAST)
    assert answers(frames) == ["From seven."]
    assert fake.asked(BREAKFAST) == 2


async def test_500s_open_the_breaker_and_the_rules_answer_meanwhile(
    serve: Any, fake: FakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    fake.default = Status(500)
    server = await serve(retries=1, breaker_failures=2, breaker_cooldown=300)
    for text in ("Is there parking?", "Is there a gym?", BREAKFAST):
        _, frames = await ask(server.port, text)
        assert len(answers(frames)) == 1
    # Two answers' worth of tries (a retry each), then the open circuit asks nobody.
    assert len(fake.requests) == 4
    assert fake.asked(BREAKFAST) == 0
    assert "circuit breaker is open" in caplog.text
    assert "sk-test-secret" not in caplog.text


async def test_a_malformed_chunk_and_the_rules_answer(serve: Any, fake: FakeLlm) -> None:
    fake.script[BREAKFAST] = [Malformed()]
    server = await serve()
    _, frames = await ask(server.port, BREAKFAST)
    [answer] = answers(frames)
    assert answer.startswith(RULES_BREAKFAST)


async def test_a_guest_over_their_budget_gets_the_rules(serve: Any, fake: FakeLlm) -> None:
    server = await serve(guest_per_minute=1)
    async with connect(server.port) as guest:
        await guest.hello()
        for i, text in enumerate(("Is there parking?", BREAKFAST)):
            await guest.send(type="message", client_msg_id=f"m{i}", text=text)
            await guest.expect("typing", sender="ai", active=False)
    assert len(fake.requests) == 1
    assert answers(guest.seen)[1].startswith(RULES_BREAKFAST)


def test_the_breaker_lets_one_trial_through_after_its_cooldown() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=30)
    breaker.failed(0)
    assert breaker.allows(1)
    breaker.failed(1)
    assert not breaker.allows(2) and not breaker.allows(30.9)
    assert breaker.allows(31)  # the trial
    assert not breaker.allows(31.5)  # only one
    breaker.failed(32)  # the trial failed: open again, at once
    assert not breaker.allows(61)
    assert breaker.allows(62)
    breaker.succeeded()
    assert breaker.allows(63) and breaker.allows(63)


def test_the_api_key_is_never_printed() -> None:
    secret = LlmSettings(url="http://x/v1", model="m", api_key="sk-do-not-print")
    assert "sk-do-not-print" not in repr(secret)
    assert "sk-do-not-print" not in repr(LlmResponder(secret).settings)


async def test_a_restart_mid_answer_yields_one_answer(tmp_path: Path, fake: FakeLlm) -> None:
    fake.script[BREAKFAST] = [Stream(["Breakfast ", "is"], hang_after=1), Stream(["From seven."])]
    db, port = tmp_path / "chat.db", free_port()
    argv = [
        sys.executable, "-m", "trio_chat", "serve", "--db", str(db), "--port", str(port),
        "--typing-delay", "0", "--concierge", "llm", "--llm-url", fake.url,
        "--llm-model", "fake",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "sk-test-secret"}

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        wait_for_port(port, proc)
        return proc

    first = await trio.to_thread.run_sync(start)
    try:
        async with connect(port) as guest:
            welcome = await guest.hello()
            await guest.send(type="message", client_msg_id="m1", text=BREAKFAST)
            await guest.expect("draft")  # the model is mid-answer...
    finally:
        first.send_signal(signal.SIGKILL)  # ...when the server dies
        first.wait()
    second = await trio.to_thread.run_sync(start)
    try:
        async with connect(port) as guest:
            again = await guest.hello(welcome["token"])
            if again["last_seq"] < 2:  # not answered yet: it comes live
                await guest.expect("message", sender="ai")
            history = await guest.fetch_history(2)
    finally:
        second.terminate()
        second.wait()
    assert [(m["sender"], m["text"]) for m in history] == [
        ("guest", BREAKFAST),
        ("ai", "From seven."),
    ]
    assert fake.asked(BREAKFAST) == 2


async def test_the_python_client_shows_drafts(serve: Any, fake: FakeLlm) -> None:
    from trio_chat import ChatClient

    fake.script[BREAKFAST] = [Stream(["From ", "seven."], gap=0.15)]
    server = await serve(draft_interval=0.1)
    seen: list[str | None] = []
    async with ChatClient(f"ws://127.0.0.1:{server.port}/ws") as client:
        client.add_listener(lambda e: seen.append(e.data["text"]) if e.kind == "draft" else None)
        await client.send(BREAKFAST)
        await client.wait_until(lambda: any(m.sender == "ai" for m in client.transcript))
    assert seen[0] == "From" and seen[-1] is None  # grew, then gave way to the message
    assert client.drafts == {}
    assert [m.text for m in client.transcript if m.sender == "ai"] == ["From seven."]
