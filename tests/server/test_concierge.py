"""The concierge, as pure code, over the shipped knowledge base."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_chat import Concierge, ConciergeMemory, KnowledgeBase, ResponderRequest, RulesResponder
from trio_chat.server._concierge import MIN_COVERAGE, SMALLTALK_WEIGHT, default_kb_path

KB_FILE = Path(__file__).resolve().parents[2] / "data" / "hotel.toml"


@pytest.fixture(scope="module")
def concierge() -> Concierge:
    return Concierge(KnowledgeBase.load(KB_FILE))


def test_the_shipped_knowledge_base_covers_what_guests_ask() -> None:
    data = tomllib.loads(KB_FILE.read_text())
    topics = [t for t in data["topic"] if not t.get("smalltalk")]
    assert len(topics) >= 25
    ids = {t["id"] for t in topics}
    for needed in [
        "checkin",
        "checkout",
        "breakfast",
        "wifi",
        "parking",
        "spa",
        "gym",
        "roomservice",
        "housekeeping",
        "late-checkout",
        "taxi",
        "local-tips",
    ]:
        assert needed in ids
    for topic in topics:
        assert len(topic["questions"]) >= 3, topic["id"]


def test_default_path_finds_the_knowledge_base() -> None:
    assert default_kb_path().is_file()


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("What time is check-in?", "checkin"),
        ("when can we get into our room", "checkin"),
        ("Can I check in early? Our flight lands at 7", "early-checkin"),
        ("what time do we have to leave the room?", "checkout"),
        ("Could we get a late checkout tomorrow?", "late-checkout"),
        ("is breakfast included in my rate", "breakfast"),
        ("whats the wifi password", "wifi"),
        ("the internet isn't working", "wifi"),
        ("Where can I park my car?", "parking"),
        ("Can I book a massage?", "spa"),
        ("is the gym open at night", "gym"),
        ("Can I order food to my room?", "roomservice"),
        ("room service menu?", "roomservice"),
        ("Could I get some fresh towels please", "housekeeping"),
        ("can you call me a cab", "taxi"),
        ("any tips for things to see nearby?", "local-tips"),
        ("Can I bring my dog?", "pets"),
        ("my key card doesn't work", "keycard"),
        ("Do you have an extra pillow?", "amenities"),
        ("good morning", "greeting"),
        ("thanks!", "thanks"),
    ],
)
def test_answers_questions_phrased_as_guests_ask(
    concierge: Concierge, question: str, topic: str
) -> None:
    answer, memory = concierge.reply(question, ConciergeMemory())
    assert answer.topic == topic, answer
    assert not answer.escalate and memory == ConciergeMemory()


@pytest.mark.parametrize(
    "text",
    [
        "I want to speak to a person",
        "Can I talk to someone please?",
        "get me a real person",
        "I'd like to speak to the manager",
    ],
)
def test_asking_for_a_person_escalates(concierge: Concierge, text: str) -> None:
    answer, _ = concierge.reply(text, ConciergeMemory())
    assert answer.escalate and answer.kind == "escalate"


@pytest.mark.parametrize(
    "text",
    [
        "This is unacceptable",
        "The room is filthy and I want a refund",
        "WHY IS NOBODY ANSWERING THE PHONE",
        "Still no hot water!!!",
    ],
)
def test_a_plainly_upset_guest_is_handed_over(concierge: Concierge, text: str) -> None:
    answer, _ = concierge.reply(text, ConciergeMemory())
    assert answer.escalate


def test_offers_a_person_after_two_unanswered_in_a_row(concierge: Concierge) -> None:
    first, memory = concierge.reply("Who won the football last night?", ConciergeMemory())
    assert first.kind == "unknown" and not first.escalate
    second, memory = concierge.reply("What's the meaning of life?", memory)
    assert second.kind == "offer" and "member of our team" in second.text
    assert not second.escalate
    accepted, memory = concierge.reply("yes please", memory)
    assert accepted.escalate
    assert memory == ConciergeMemory()


def test_an_answer_resets_the_streak(concierge: Concierge) -> None:
    _, memory = concierge.reply("Who won the football?", ConciergeMemory())
    _, memory = concierge.reply("What time is breakfast?", memory)
    again, _ = concierge.reply("Who won the tennis?", memory)
    assert again.kind == "unknown"


def test_yes_without_an_offer_is_not_an_escalation(concierge: Concierge) -> None:
    answer, _ = concierge.reply("yes", ConciergeMemory())
    assert not answer.escalate


def test_replies_are_deterministic(concierge: Concierge) -> None:
    other = Concierge(KnowledgeBase.load(KB_FILE))
    for text in ["wifi?", "spa hours", "nonsense words here"]:
        assert concierge.reply(text, ConciergeMemory()) == other.reply(text, ConciergeMemory())


def test_a_broken_knowledge_base_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "kb.toml"
    bad.write_text('[[topic]]\nid = "x"\n')
    with pytest.raises(ValueError, match="missing"):
        KnowledgeBase.load(bad)
    bad.write_text("not = [toml")
    with pytest.raises(ValueError, match=r"kb\.toml"):
        KnowledgeBase.load(bad)


async def test_rules_responder_remembers_per_conversation() -> None:
    responder = RulesResponder(Concierge(KnowledgeBase.load(KB_FILE)))

    def ask(conversation: str, text: str) -> ResponderRequest:
        return ResponderRequest(conversation, "g", None, text)

    await responder.respond(ask("c1", "blah blah"))
    await responder.respond(ask("c2", "blah blah"))
    offer = await responder.respond(ask("c1", "more blah"))
    assert "member of our team" in offer.text
    accepted = await responder.respond(ask("c1", "yes"))
    assert accepted.escalate
    not_offered = await responder.respond(ask("c3", "yes"))
    assert not not_offered.escalate


_SHIPPED = Concierge()
_VOCABULARY = sorted({word for topic in _SHIPPED.kb.topics for word in topic.title.lower().split()})


def scored_against_every_topic(concierge: Concierge, text: str) -> tuple[str | None, float]:
    """The scoring rule written plainly: every topic, in the knowledge base's order."""
    kb = concierge.kb
    tokens = set(concierge._tokenize(text))
    unknown = max(kb.idf.values())
    information = sum(kb.idf.get(t, unknown) for t in tokens)
    best, best_score = None, 0.0
    for topic in kb.topics:
        score = sum(
            kb.idf[t]
            * (1.5 if t in topic.keywords else 1.0)
            * (2.0 if t in concierge._phrase_tokens else 1.0)
            for t in tokens & topic.tokens
        )
        if topic.smalltalk:
            score *= SMALLTALK_WEIGHT
        if score > best_score:
            best, best_score = topic.id, score
    if best is None or best_score < MIN_COVERAGE * information:
        return None, 0.0
    return best, best_score


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(_VOCABULARY), st.text("abcdefghij", min_size=1, max_size=6)),
        max_size=12,
    )
)
def test_scoring_only_the_topics_that_share_a_word_picks_what_scoring_all_would(
    words: list[str],
) -> None:
    text = " ".join(words)
    topic, score = _SHIPPED.best_topic(text)
    assert ((topic.id if topic else None), score) == scored_against_every_topic(_SHIPPED, text)
