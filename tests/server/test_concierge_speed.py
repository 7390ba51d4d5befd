"""The rules concierge's cost per message, cut without changing one answer.

The faster concierge is checked against main's, frozen in ``concierge_before.py``:
the same reply, memory, ranking and scores for a broad corpus of phrasings built from
the shipped ``data/hotel.toml`` (every topic's title, questions and keywords, dressed
in the ways guests write them; every spelling ``[normalize]`` folds; every hand-over
and upset phrase; messages that match nothing), and for random word salads. The
answers main gave are also recorded as data (``concierge_golden.json``), so the
frozen copy itself cannot drift.
"""

from __future__ import annotations

import itertools
import json
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_chat import ChatServer
from trio_chat.bench._cost import _guest_messages
from trio_chat.core.protocol import typing_frame
from trio_chat.server._concierge import (
    Concierge,
    ConciergeMemory,
    KnowledgeBase,
    ResponderReply,
    ResponderRequest,
    RulesResponder,
    _any_of,
    default_kb_path,
)

from ..conftest import make_config
from ..helpers import connect
from .concierge_before import ConciergeBefore

GOLDEN = Path(__file__).with_name("concierge_golden.json")
_KB = KnowledgeBase.default()
_NEW = Concierge(_KB)
_OLD = ConciergeBefore(_KB)

# Where a conversation can be when a message arrives: fresh, after one unanswered
# message, after the offer of a person.
MEMORIES = (
    ConciergeMemory(),
    ConciergeMemory(unanswered_streak=1),
    ConciergeMemory(unanswered_streak=2, offered_person=True),
)

_UNMATCHED = [
    "message 7",
    "blah blah",
    "",
    "   ",
    "?!",
    "...",
    "12345",
    "asdf qwerty zxcv",
    "the",
    "is it",
    "what about the thing",
    "my cat likes fish",
    "can you sing a song",
    "night",
    "one night please",
    "Ça va? Très bien, merci",
    "İstanbul ŞEHİR",
    "ß straße STRASSE",
    "emoji 🙂 👍 only",
    "tab\tseparated\nnew lines\r\n",
    "glass glasses grass bus buses",
    "it's i'm we're don't dont im",
    "x y z a b c",
    "no",
    "yes no maybe",
    "not",
]
_DRESSINGS = (
    "{}",
    "{}?",
    "{}!",
    "{}!!!",
    "hi, {}",
    "Hello there! {}",
    "{} please",
    "quick question: {}",
    "{} thanks",
    "  {}  ",
    "{}\n{}",
    "sorry, {} and also where is the lift",
    "I'd like to know: {}",
)


def _variants(phrase: str, index: int) -> Iterator[str]:
    """The phrase as is, and dressed two ways (which two turns with ``index``)."""
    yield phrase
    for k in (index, index + 5):
        text = _DRESSINGS[k % len(_DRESSINGS)].format(phrase, phrase)
        casing = (str.upper, str.lower, lambda t: t.replace("'", "’"), lambda t: t)[k % 4]
        yield casing(text)


def corpus() -> list[str]:
    """Every phrasing the golden tests ask about, deterministically, without repeats."""
    kb = _KB
    phrases: list[str] = []
    for topic in kb.topics:
        phrases += [topic.title, topic.id, topic.id.replace("-", " ")]
    raw = tomllib_load()
    for topic in raw["topic"]:
        phrases += topic.get("questions", [])
        phrases += topic.get("keywords", [])
        phrases += [k + "s" for k in topic.get("keywords", [])]
    for spelling, folded in raw.get("normalize", {}).items():
        phrases += [spelling, folded, f"is there {spelling} here?", f"{spelling} times"]
    escalation = raw.get("escalation", {})
    phrases += [f"I want to {p}" for p in escalation.get("person", [])]
    phrases += escalation.get("person", [])
    phrases += [f"this is {w}" for w in escalation.get("upset", [])]
    phrases += escalation.get("yes", [])
    phrases += _UNMATCHED
    texts = [v for i, p in enumerate(phrases) for v in _variants(p, i)]
    # Two topics in one message: which one wins, and whether either explains enough.
    questions = [q for topic in raw["topic"] for q in topic.get("questions", [])[:1]]
    texts += [f"{a} {b}" for a, b in itertools.pairwise(questions + questions[:1])]
    texts += [f"{b}, and {a}" for a, b in itertools.pairwise(questions[::3])]
    return list(dict.fromkeys(texts))


def tomllib_load() -> dict[str, Any]:
    with open(default_kb_path(), "rb") as f:
        return tomllib.load(f)


def _outcome(concierge: Any, text: str) -> str:
    """What a guest is answered and what is remembered, from each memory; then the
    topics a language model is given. One line: ``kind:topic:escalate:streak:offered``
    per memory, then ``|`` and the topic ids."""
    out = []
    for memory in MEMORIES:
        answer, after = concierge.reply(text, memory)
        out.append(
            f"{answer.kind}:{answer.topic or ''}:{answer.escalate:d}"
            f":{after.unanswered_streak}:{after.offered_person:d}"
        )
    return " ".join(out) + "|" + ",".join(t.id for t in concierge.topics_for(text))


def test_the_corpus_is_broad() -> None:
    kinds = {_OLD.reply(text, memory)[0].kind for text in corpus() for memory in MEMORIES}
    topics = {_OLD.best_topic(text)[0] for text in corpus()}
    assert len(corpus()) > 2500
    assert kinds == {"answer", "smalltalk", "unknown", "offer", "escalate"}
    assert {t.id for t in _KB.topics} <= {t.id for t in topics if t is not None}


def test_answers_as_main_gave_them() -> None:
    """The recorded answers of main's concierge (``python -m tests.server.
    test_concierge_speed`` on main wrote them)."""
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) == len(corpus())
    mismatches = [
        (text, recorded, _outcome(_NEW, text))
        for text, recorded in zip(corpus(), golden, strict=True)
        if _outcome(_NEW, text) != recorded
    ]
    assert mismatches == []


def test_the_frozen_copy_is_main() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert [_outcome(_OLD, text) for text in corpus()] == golden


def _same_as_before(text: str) -> None:
    for memory in MEMORIES:
        assert _NEW.reply(text, memory) == _OLD.reply(text, memory), (text, memory)
    # Same topics, same scores to the last bit, same order (ties in the base's order).
    assert _NEW._ranked(text) == _OLD._ranked(text), text
    assert _NEW.topics_for(text) == _OLD.topics_for(text)
    assert _NEW.topics_for(text, limit=10) == _OLD.topics_for(text, limit=10)
    assert _NEW.best_topic(text) == _OLD.best_topic(text)
    assert _NEW.wants_person(text) == _OLD.wants_person(text)
    assert _NEW.is_upset(text) == _OLD.is_upset(text)


def test_every_phrasing_answered_as_before_scores_and_all() -> None:
    for text in corpus():
        _same_as_before(text)


_WORDS = sorted(
    {w for text in corpus()[:2000] for w in text.split()}
    | {p for p, _ in _KB.normalize}
    | set(_KB.person_phrases)
    | set(_KB.upset_words)
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_WORDS),
            st.text("abcdefgsS '’!?-.", min_size=1, max_size=8),
            st.text(min_size=1, max_size=4),
        ),
        max_size=14,
    ),
    st.sampled_from(["", "!", "!!!", "?", " please"]),
)
def test_random_messages_answered_as_before(words: list[str], end: str) -> None:
    _same_as_before(" ".join(words) + end)


async def test_the_responder_remembers_as_before() -> None:
    """A conversation's run of replies, through the responder the server calls."""
    responder = RulesResponder(_NEW)
    memory = ConciergeMemory()
    for text in ["blah", "more blah", "yes", "wifi?", "hmm", "ok", "asdf", "what", "sure"]:
        reply = await responder.respond(ResponderRequest("c", "g", None, text))
        answer, memory = _OLD.reply(text, memory)
        assert (reply.text, reply.escalate) == (answer.text, answer.escalate)


def _python_calls(run: Any) -> int:
    """Python frames entered (generator resumptions included) while ``run`` runs."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def test_a_message_costs_a_handful_of_python_calls_not_one_per_phrase_or_letter() -> None:
    """Main's concierge entered ~80 Python frames to answer "message 7" (a generator
    step per hand-over phrase, a call per word and per letter); the cost of a reply
    is mostly such frames. Now it is a few, whatever the phrase lists' length."""
    long_text = "Could you tell me whether the rooftop terrace is open this evening " * 3
    for text in ["message 7", "What time is breakfast?", long_text]:
        calls = _python_calls(lambda text=text: _NEW.reply(text, ConciergeMemory()))
        assert calls <= 12, (text, calls)


def _write_golden() -> None:
    """Record the answers of the concierge in this checkout (run it on main only)."""
    before = Concierge(_KB)
    golden = [_outcome(before, text) for text in corpus()]
    GOLDEN.write_text(json.dumps(golden, indent=0) + "\n")


if __name__ == "__main__":
    _write_golden()


# ------------------------------------------------ the server's half of a reply


class AnswersAtOnce:
    """A responder that answers without waiting, as the rules concierge does."""

    history_window = 0

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.asked: list[str] = []

    async def respond(self, request: ResponderRequest) -> ResponderReply:
        raise AssertionError("the server awaited a responder that answers at once")

    def respond_now(self, request: ResponderRequest) -> ResponderReply:
        self.asked.append(request.text)
        if self.broken:
            raise RuntimeError("the rules broke")
        return ResponderReply(f"at once: {request.text}")


class AnswersAhead(AnswersAtOnce):
    """Also answers before the guest message is stored (``respond_ahead``)."""

    def __init__(self, *, broken: bool = False) -> None:
        super().__init__(broken=broken)
        self.kept: list[str] = []

    def respond_ahead(self, request: ResponderRequest) -> tuple[ResponderReply, Callable[[], None]]:
        return self.respond_now(request), lambda: self.kept.append(request.text)


async def test_a_responder_that_answers_at_once_is_called_directly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """No coroutine to run and no timeout to arm for the rules concierge: the server
    calls ``respond_now``. (Before, it awaited ``respond`` under ``fail_after``.)"""
    responder = AnswersAtOnce()
    srv = ChatServer(make_config(tmp_path), responder=responder)
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        await guest.hello(None, name="Maria")
        await guest.send(type="message", client_msg_id="m1", text="hello?")
        assert (await guest.expect("message", sender="ai"))["text"] == "at once: hello?"
    assert responder.asked == ["hello?"]


async def test_an_instant_answer_takes_no_task_a_typing_pause_one_each(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no typing pause the answer is given in the commit's callback that asked for
    it (a task per reply cost the concierge-on server a tenth of its CPU a message);
    with a pause, each reply waits in a task of its own, typing shown meanwhile."""
    spawned: list[str] = []

    for pause in (0.0, 0.2):
        config = make_config(tmp_path / str(pause), typing_delay=pause)
        srv = ChatServer(config, responder=AnswersAtOnce())
        await nursery.start(srv.run)
        assert srv.port and srv._work is not None
        work = srv._work

        def counted(fn: Any, *args: Any, original: Any = work.start_soon, **kw: Any) -> None:
            spawned.append(fn.__qualname__)
            original(fn, *args, **kw)

        monkeypatch.setattr(work, "start_soon", counted)
        spawned.clear()
        async with connect(srv.port) as guest:
            await guest.hello(None, name="Maria")
            for k in range(3):
                await guest.send(type="message", client_msg_id=f"m{k}", text=f"q{k}")
                await guest.expect("ack")
                acked = trio.current_time()
                await guest.expect("typing", sender="ai", active=True)
                reply = await guest.expect("message", sender="ai")
                assert reply["text"] == f"at once: q{k}"
                assert trio.current_time() - acked >= pause * 0.9
                await guest.expect("typing", sender="ai", active=False)
        replies = [name for name in spawned if "_start_reply" in name]
        assert len(replies) == (0 if pause == 0 else 3), spawned
        srv.shutdown()


async def test_an_instant_answer_is_committed_with_its_guest_message(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """One commit for a guest message and its answer (a second commit per message held
    replies alone in a third of the batches under load), the answer's frames right
    behind the ack; after a restart nothing is owed and nothing is answered twice."""
    config = make_config(tmp_path)
    responder = AnswersAhead()
    srv = ChatServer(config, responder=responder)
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        welcome = await guest.hello(None, name="Maria")
        for k in range(3):
            before = srv.store.batches
            await guest.send(type="message", client_msg_id=f"m{k}", text=f"q{k}")
            frames = [await guest.recv() for _ in range(5)]
            assert [f["type"] for f in frames] == ["ack", "message", "typing", "message", "typing"]
            assert frames[3]["seq"] == frames[0]["seq"] + 1 == 2 * k + 2
            assert frames[3]["text"] == f"at once: q{k}"
            await srv.store.wait_settled()
            assert srv.store.batches == before + 1
        # A retry is asked (nobody knows it is one before the storage does), but its
        # answer is neither stored nor kept.
        await guest.send(type="message", client_msg_id="m0", text="q0")
        assert (await guest.expect("ack"))["seq"] == 1
        await srv.store.wait_settled()
        assert responder.asked == ["q0", "q1", "q2", "q0"]
        assert responder.kept == ["q0", "q1", "q2"]
    srv.shutdown()
    await srv.wait_stopped()
    again = AnswersAhead()
    srv = ChatServer(config, responder=again)
    await nursery.start(srv.run)
    assert srv.port
    await srv.wait_idle()
    assert again.asked == []
    async with connect(srv.port) as guest:
        await guest.hello(welcome["token"])
        await guest.send(type="history", after_seq=0)
        stored = (await guest.expect("history"))["messages"]
        assert [m["sender"] for m in stored] == ["guest", "ai"] * 3


async def test_a_responder_that_fails_at_once_still_hands_over(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = ChatServer(make_config(tmp_path), responder=AnswersAtOnce(broken=True))
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        await guest.hello(None, name="Maria")
        await guest.send(type="message", client_msg_id="m1", text="hello?")
        assert "trouble" in (await guest.expect("message", sender="ai"))["text"]
        assert (await guest.expect("status"))["status"] == "waiting"


async def test_the_rules_concierge_answers_through_the_server_as_before(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = ChatServer(make_config(tmp_path, concierge="rules"))
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        await guest.hello(None, name="Maria")
        said = ["What time is breakfast?", "blah", "more blah", "yes"]
        for k, text in enumerate(said):
            await guest.send(type="message", client_msg_id=f"m{k}", text=text)
            reply = await guest.expect("message", sender="ai")
            answer, _ = _OLD.reply(text, _memory_after(said[:k]))
            assert reply["text"] == answer.text


async def test_the_rules_concierge_does_not_count_a_retry(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The rules answer before the guest message is stored; what they remember (two
    unanswered questions in a row, then the offer of a person) moves on only for the
    answers stored. A retry of an unanswered question is not a second one: "yes"
    afterwards is not taken as accepting an offer the guest never saw."""
    srv = ChatServer(make_config(tmp_path, concierge="rules"))
    await nursery.start(srv.run)
    assert srv.port
    async with connect(srv.port) as guest:
        await guest.hello(None, name="Maria")
        await guest.send(type="message", client_msg_id="m1", text="zxqv blorf wibble")
        first = await guest.expect("message", sender="ai")
        await guest.send(type="message", client_msg_id="m1", text="zxqv blorf wibble")
        await guest.expect("ack")
        await guest.send(type="message", client_msg_id="m2", text="yes")
        second = await guest.expect("message", sender="ai")
    said = ["zxqv blorf wibble", "yes"]
    expected = [_OLD.reply(text, _memory_after(said[:k]))[0] for k, text in enumerate(said)]
    assert [first["text"], second["text"]] == [answer.text for answer in expected]
    assert not expected[1].escalate


def _memory_after(texts: list[str]) -> ConciergeMemory:
    memory = ConciergeMemory()
    for text in texts:
        _, memory = _OLD.reply(text, memory)
    return memory


def test_the_concierges_typing_frames_are_encoded_once() -> None:
    first = typing_frame("c-typing-test", "ai", True)
    assert typing_frame("c-typing-test", "ai", True) is first
    assert json.loads(first) == {
        "type": "typing",
        "conversation_id": "c-typing-test",
        "sender": "ai",
        "active": True,
    }
    assert json.loads(typing_frame("c-typing-test", "ai", False))["active"] is False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab c-", max_size=5), max_size=8), st.text("ab c-", max_size=12))
def test_the_factored_phrase_pattern_finds_what_in_finds(phrases: list[str], text: str) -> None:
    """The hand-over and [normalize] lists as one factored pattern: found in ``text``
    exactly when one of the phrases is (prefixes of each other, repeats, "")."""
    found = _any_of(phrases).search(text) is not None
    assert found == any(p in text for p in phrases)


# ------------------------------------------- the bench's paced guests (bench cost --paced)


async def test_a_paced_guest_sends_only_once_its_message_is_answered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``bench cost --paced``: when a guest's turn ends, the concierge's answer to its
    last message is stored and delivered, so no reply spills into the next round."""
    srv = ChatServer(make_config(tmp_path, concierge="rules"))
    await nursery.start(srv.run)
    assert srv.port
    with trio.fail_after(20):
        ws = await trio_websocket.connect_websocket_url(nursery, f"ws://127.0.0.1:{srv.port}/ws")
        await ws.send_message(json.dumps({"type": "hello", "token": None}))
        welcome = json.loads(await ws.get_message())
        await _guest_messages(ws, "g", 3, answered=True)
        stored = await srv.store.read(srv.store.db.recent, welcome["conversation_id"], 10)
        await ws.aclose()
    assert [m.sender for m in stored] == ["guest", "ai"] * 3
