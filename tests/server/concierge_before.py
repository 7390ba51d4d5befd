"""The rules concierge as main had it at fafca9f, frozen: the golden tests compare the
faster one against it (same answers, same ranking, same scores), in one process.

Do not edit: it is the reference. Only the class name changed."""

from __future__ import annotations

import re
from typing import Final, Literal

from trio_chat.server._concierge import (
    ConciergeAnswer,
    ConciergeMemory,
    KnowledgeBase,
    Topic,
)

_WORD_RE: Final = re.compile(r"[a-z0-9]+")
_STOPWORDS: Final = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "so",
        "to",
        "of",
        "in",
        "on",
        "at",
        "by",
        "for",
        "from",
        "with",
        "about",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "have",
        "has",
        "had",
        "i",
        "me",
        "my",
        "we",
        "our",
        "us",
        "you",
        "your",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "how",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "am",
        "get",
        "got",
        "any",
        "some",
        "please",
        "just",
        "also",
        "too",
        "very",
        "much",
        "many",
        "not",
        "no",
        "let",
        "lets",
        "want",
        "wanted",
        "need",
        "like",
        "know",
        "tell",
        "is",
        "it's",
        "im",
        "i'm",
        "we're",
        "don't",
        "dont",
        "one",
        "more",
        "another",
        "thing",
        "question",
        "quick",
        "still",
        "sorry",
    ]
)
MIN_SCORE: Final = 2.0
# The share of the message's information a topic must explain: one generic word
# ("night") in a sentence about something else is not an answer.
MIN_COVERAGE: Final = 0.4
SMALLTALK_WEIGHT: Final = 0.5


def _stem(word: str) -> str:
    # Just enough to fold plurals: "towels" -> "towel", not "glass" -> "glas".
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class _Tokenizer:
    __slots__ = ("normalize",)

    def __init__(self, normalize: tuple[tuple[str, str], ...]) -> None:
        self.normalize = normalize

    def __call__(self, text: str) -> list[str]:
        text = " " + " ".join(text.lower().replace("’", "'").split()) + " "
        for phrase, replacement in self.normalize:
            if phrase in text:
                text = text.replace(phrase, f" {replacement} ")
        return [_stem(w) for w in _WORD_RE.findall(text) if len(w) > 1 and w not in _STOPWORDS]


class ConciergeBefore:
    """Answers guest messages from a :class:`KnowledgeBase`, deterministically."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self._tokenize = _Tokenizer(self.kb.normalize)
        self._phrase_tokens = frozenset(_stem(r) for _, r in self.kb.normalize)
        # Built once: a message is scored only against the topics sharing a token with
        # it (scoring every topic took most of a reply's time).
        self._unknown_weight = max(self.kb.idf.values(), default=1.0)
        topics_of: dict[str, list[int]] = {}
        for index, topic in enumerate(self.kb.topics):
            for token in topic.tokens:
                topics_of.setdefault(token, []).append(index)
        self._topics_of = {token: tuple(indices) for token, indices in topics_of.items()}
        self._upset_re = re.compile(
            r"\b(?:" + "|".join(re.escape(w) for w in self.kb.upset_words) + r")\b"
            if self.kb.upset_words
            else r"(?!)"
        )

    def wants_person(self, text: str) -> bool:
        """True when the guest asks for a human."""
        folded = " ".join(text.lower().split())
        return any(p in folded for p in self.kb.person_phrases)

    def is_upset(self, text: str) -> bool:
        """True when the guest is plainly unhappy (strong words, shouting, !!!)."""
        if self._upset_re.search(text.lower()):
            return True
        letters = [c for c in text if c.isalpha()]
        shouting = len(letters) >= 12 and sum(c.isupper() for c in letters) / len(letters) > 0.8
        return shouting or "!!!" in text

    def best_topic(self, text: str) -> tuple[Topic | None, float]:
        """The best-matching topic and its score, or ``(None, 0.0)`` when no topic
        explains enough of the message (see ``MIN_COVERAGE``)."""
        ranked = self._ranked(text)
        return ranked[0] if ranked else (None, 0.0)

    def topics_for(self, text: str, limit: int = 3) -> list[Topic]:
        """The topics that explain ``text`` best, best first (what a language model is
        given to ground its answer), at most ``limit``; smalltalk is left out."""
        return [topic for topic, _ in self._ranked(text) if not topic.smalltalk][:limit]

    def _ranked(self, text: str) -> list[tuple[Topic, float]]:
        """Every topic that explains enough of ``text`` (``MIN_COVERAGE``), best first;
        ties keep the knowledge base's order."""
        tokens = set(self._tokenize(text))
        information = sum(self.kb.idf.get(t, self._unknown_weight) for t in tokens)
        scored: list[tuple[Topic, float]] = []
        for index in sorted({i for t in tokens for i in self._topics_of.get(t, ())}):
            topic = self.kb.topics[index]
            score = sum(
                self.kb.idf[t]
                * (1.5 if t in topic.keywords else 1.0)
                # A phrase folded by [normalize] ("room service") is the most specific cue.
                * (2.0 if t in self._phrase_tokens else 1.0)
                for t in tokens & topic.tokens
            )
            if topic.smalltalk:
                score *= SMALLTALK_WEIGHT
            if score > 0 and score >= MIN_COVERAGE * information:
                scored.append((topic, score))
        scored.sort(key=lambda ts: -ts[1])  # stable: ties stay in the base's order
        return scored

    def reply(self, text: str, memory: ConciergeMemory) -> tuple[ConciergeAnswer, ConciergeMemory]:
        """Answer ``text``; returns the answer and the memory to keep for next time."""
        folded = " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())
        if self.wants_person(text) or (memory.offered_person and folded in self.kb.yes_words):
            return (
                ConciergeAnswer(
                    "Of course. I'm bringing in a member of our team now; they will see "
                    "everything we've said so far.",
                    "escalate",
                    escalate=True,
                ),
                ConciergeMemory(),
            )
        if self.is_upset(text):
            return (
                ConciergeAnswer(
                    "I'm so sorry about this. I'm asking a member of our team to help you "
                    "personally, right now.",
                    "escalate",
                    escalate=True,
                ),
                ConciergeMemory(),
            )
        topic, score = self.best_topic(text)
        if topic is not None and score >= MIN_SCORE * (SMALLTALK_WEIGHT if topic.smalltalk else 1):
            kind: Literal["answer", "smalltalk"] = "smalltalk" if topic.smalltalk else "answer"
            return ConciergeAnswer(topic.answer, kind, topic.id), ConciergeMemory()
        streak = memory.unanswered_streak + 1
        if streak >= 2:
            return (
                ConciergeAnswer(
                    "I'm sorry, I don't have an answer for that either. Would you like me to "
                    "bring in a member of our team? Just say yes, or use 'talk to a person'.",
                    "offer",
                ),
                ConciergeMemory(unanswered_streak=streak, offered_person=True),
            )
        return (
            ConciergeAnswer(
                "I'm sorry, I'm not sure about that one. Could you put it another way? I can "
                "help with check-in and check-out, breakfast, Wi-Fi, parking, the spa, room "
                "service, housekeeping, taxis and tips for the area.",
                "unknown",
            ),
            ConciergeMemory(unanswered_streak=streak, offered_person=memory.offered_person),
        )
