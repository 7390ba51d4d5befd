"""The concierge: a deterministic rule-and-retrieval responder over a hotel knowledge base.

Pure code, no Trio. Two layers:

* :class:`Concierge` answers one guest message from a :class:`KnowledgeBase`, given
  a small per-conversation :class:`ConciergeMemory`, and returns the answer and the
  new memory. Same input, same output: tests and research runs are reproducible.
* :class:`Responder` is the interface the server's session code calls. Anything that
  can turn a guest message into a reply (this concierge, an LLM endpoint, a scripted
  test double) implements it; the session code never changes.
  :class:`RulesResponder` adapts :class:`Concierge` to it.
"""

from __future__ import annotations

import importlib.resources
import math
import re
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from ..core.protocol import Message

__all__ = [
    "Concierge",
    "ConciergeAnswer",
    "ConciergeMemory",
    "KnowledgeBase",
    "Responder",
    "ResponderReply",
    "ResponderRequest",
    "RulesResponder",
]

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
# Shouting: at least this many letters, more than four in five of them capitals.
SHOUTING_LETTERS: Final = 12


def _stem(word: str) -> str:
    # Just enough to fold plurals: "towels" -> "towel", not "glass" -> "glas".
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True, slots=True)
class Topic:
    id: str
    title: str
    answer: str
    tokens: frozenset[str]
    keywords: frozenset[str]
    smalltalk: bool


@dataclass(frozen=True)
class KnowledgeBase:
    """A hotel's topics and the phrase lists that drive escalation.

    Build it with :meth:`load` (a TOML file) or :meth:`default` (the shipped hotel).
    """

    hotel_name: str
    topics: tuple[Topic, ...]
    normalize: tuple[tuple[str, str], ...]
    person_phrases: tuple[str, ...]
    upset_words: tuple[str, ...]
    yes_words: frozenset[str]
    idf: dict[str, float] = field(repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeBase:
        """Build from parsed TOML; raises ``ValueError`` naming what is missing."""
        try:
            normalize = sorted(
                ((k.lower(), v.lower()) for k, v in data.get("normalize", {}).items()),
                key=lambda kv: -len(kv[0]),
            )
            escalation = data.get("escalation", {})
            raw_topics = data["topic"]
        except (KeyError, AttributeError) as exc:
            raise ValueError(f"knowledge base is missing {exc}") from None
        tokenize = _Tokenizer(tuple(normalize))
        topics = []
        for raw in raw_topics:
            try:
                keywords = frozenset(
                    _stem(k) for kw in raw.get("keywords", []) for k in tokenize(kw)
                )
                text = " ".join([raw["title"], *raw.get("questions", [])])
                topics.append(
                    Topic(
                        id=raw["id"],
                        title=raw["title"],
                        answer=raw["answer"].strip(),
                        tokens=frozenset(tokenize(text)) | keywords,
                        keywords=keywords,
                        smalltalk=bool(raw.get("smalltalk", False)),
                    )
                )
            except KeyError as exc:
                raise ValueError(f"topic {raw.get('id', '?')!r} is missing {exc}") from None
        if not topics:
            raise ValueError("knowledge base has no topics")
        document_frequency: dict[str, int] = {}
        for topic in topics:
            for token in topic.tokens:
                document_frequency[token] = document_frequency.get(token, 0) + 1
        n = len(topics)
        idf = {t: math.log((n + 1) / df) for t, df in document_frequency.items()}
        return cls(
            hotel_name=data.get("hotel", {}).get("name", "the hotel"),
            topics=tuple(topics),
            normalize=tuple(normalize),
            person_phrases=tuple(p.lower() for p in escalation.get("person", [])),
            upset_words=tuple(w.lower() for w in escalation.get("upset", [])),
            yes_words=frozenset(w.lower() for w in escalation.get("yes", [])),
            idf=idf,
        )

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeBase:
        """Load a TOML knowledge base; raises ``OSError`` or ``ValueError``."""
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> KnowledgeBase:
        """The Harbourview Hotel shipped with trio_chat (``data/hotel.toml``)."""
        return cls.load(default_kb_path())


def default_kb_path() -> Path:
    """Where the shipped knowledge base lives: in the wheel, or in a source checkout."""
    packaged = importlib.resources.files("trio_chat") / "_data" / "hotel.toml"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "data" / "hotel.toml"


def _any_of(phrases: Iterable[str]) -> re.Pattern[str]:
    """A pattern found in a text exactly when one of ``phrases`` is in it (``in``)."""
    return re.compile(_one_of(phrases))


def _one_of(phrases: Iterable[str]) -> str:
    """A regular expression for exactly ``phrases``, their shared beginnings factored
    out ("check in|check out" as "check (?:in|out)"): at each place in a text the
    search tries one branch per next letter, not one per phrase."""
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for letter in phrase:
            node = node.setdefault(letter, {})
        node[""] = {}  # a phrase ends here
    if not trie:
        return r"(?!)"

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(k) + pattern(node[k]) for k in sorted(node) if k]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


class _Tokenizer:
    __slots__ = ("_any_phrase", "normalize")

    def __init__(self, normalize: tuple[tuple[str, str], ...]) -> None:
        self.normalize = normalize
        self._any_phrase = _any_of(phrase for phrase, _ in normalize)

    def __call__(self, text: str) -> list[str]:
        lower = text.lower()
        return self.of_folded(lower, " ".join(lower.split()))

    def of_folded(self, lower: str, folded: str) -> list[str]:
        """The tokens of a message given lower-cased (``lower``) and with its
        whitespace folded too (``folded``), as :meth:`Concierge.reply` has it already."""
        if "’" in lower:
            folded = " ".join(lower.replace("’", "'").split())
        text = " " + folded + " "
        # Most messages fold nothing: one regular expression says so, instead of a
        # Python step per phrase. When one does, the phrases go in order (a replacement
        # may make the next phrase appear), exactly as before.
        if self._any_phrase.search(text):
            for phrase, replacement in self.normalize:
                if phrase in text:
                    text = text.replace(phrase, f" {replacement} ")
        # _stem, inlined: a call per word was a good part of a reply's cost.
        return [
            w[:-1] if len(w) > 3 and w[-1] == "s" and w[-2] != "s" else w
            for w in _WORD_RE.findall(text)
            if len(w) > 1 and w not in _STOPWORDS
        ]


@dataclass(frozen=True, slots=True)
class ConciergeMemory:
    """What the concierge remembers of one conversation between messages."""

    unanswered_streak: int = 0
    offered_person: bool = False


@dataclass(frozen=True, slots=True)
class ConciergeAnswer:
    """One reply. ``escalate`` asks the server to hand the conversation to staff."""

    text: str
    kind: Literal["answer", "smalltalk", "unknown", "offer", "escalate"]
    topic: str | None = None
    escalate: bool = False


class Concierge:
    """Answers guest messages from a :class:`KnowledgeBase`, deterministically.

    A reply is on the path of every guest message a conversation in ``ai`` gets, so
    what can be worked out once is, here: each topic's weight per token, the answer
    objects. Per message, the phrase lists are one regular expression each and the
    letters are counted in C (``filter``, ``map``), not a Python step per item: the
    same answers (``tests/server/test_concierge_speed.py`` holds it to main's).
    """

    def __init__(self, kb: KnowledgeBase | None = None) -> None:
        self.kb = kb if kb is not None else KnowledgeBase.default()
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
        # What each of a topic's tokens is worth to it, multiplied out once, in the
        # order the scoring rule states it (so every score is the same to the last bit).
        self._weights = tuple(
            {
                t: self.kb.idf[t]
                * (1.5 if t in topic.keywords else 1.0)
                # A phrase folded by [normalize] ("room service") is the most specific cue.
                * (2.0 if t in self._phrase_tokens else 1.0)
                for t in topic.tokens
            }
            for topic in self.kb.topics
        )
        self._answers = tuple(
            ConciergeAnswer(t.answer, "smalltalk" if t.smalltalk else "answer", t.id)
            for t in self.kb.topics
        )
        self._person_re = _any_of(self.kb.person_phrases)
        self._upset_re = re.compile(r"\b(?:" + _one_of(self.kb.upset_words) + r")\b")

    def wants_person(self, text: str) -> bool:
        """True when the guest asks for a human."""
        return self._person_re.search(" ".join(text.lower().split())) is not None

    def is_upset(self, text: str) -> bool:
        """True when the guest is plainly unhappy (strong words, shouting, !!!)."""
        return self._upset(text, text.lower())

    def _upset(self, text: str, lower: str) -> bool:
        if self._upset_re.search(lower) or "!!!" in text:
            return True
        if len(text) < SHOUTING_LETTERS:  # too short to hold that many letters
            return False
        letters = "".join(filter(str.isalpha, text))
        return (
            len(letters) >= SHOUTING_LETTERS and sum(map(str.isupper, letters)) / len(letters) > 0.8
        )

    def best_topic(self, text: str) -> tuple[Topic | None, float]:
        """The best-matching topic and its score, or ``(None, 0.0)`` when no topic
        explains enough of the message (see ``MIN_COVERAGE``)."""
        best = self._best(text)
        return (None, 0.0) if best is None else (self.kb.topics[best[0]], best[1])

    def topics_for(self, text: str, limit: int = 3) -> list[Topic]:
        """The topics that explain ``text`` best, best first (what a language model is
        given to ground its answer), at most ``limit``; smalltalk is left out."""
        return [topic for topic, _ in self._ranked(text) if not topic.smalltalk][:limit]

    def _scored(self, text: str) -> list[tuple[int, float]]:
        """Every topic (by index, in the knowledge base's order) that explains enough of
        ``text`` (``MIN_COVERAGE``), with its score."""
        return self._scored_tokens(set(self._tokenize(text)))

    def _scored_tokens(self, tokens: set[str]) -> list[tuple[int, float]]:
        candidates = set(chain.from_iterable(map(self._topics_of.get, tokens, repeat(()))))
        if not candidates:  # no topic shares a word with it (nor, then, scores)
            return []
        information = sum(map(self.kb.idf.get, tokens, repeat(self._unknown_weight)))
        floor = MIN_COVERAGE * information
        topics, weights = self.kb.topics, self._weights
        scored = []
        for index in sorted(candidates):
            topic = topics[index]
            score = sum(map(weights[index].__getitem__, tokens & topic.tokens))
            if topic.smalltalk:
                score *= SMALLTALK_WEIGHT
            if score > 0 and score >= floor:
                scored.append((index, score))
        return scored

    def _best(self, text: str) -> tuple[int, float] | None:
        """The first of the best in :meth:`_ranked`'s order, without sorting them all."""
        return self._best_of(set(self._tokenize(text)))

    def _best_of(self, tokens: set[str]) -> tuple[int, float] | None:
        best = None
        for index, score in self._scored_tokens(tokens):
            if best is None or score > best[1]:
                best = (index, score)
        return best

    def _ranked(self, text: str) -> list[tuple[Topic, float]]:
        """Every topic that explains enough of ``text`` (``MIN_COVERAGE``), best first;
        ties keep the knowledge base's order."""
        topics = self.kb.topics
        scored = [(topics[index], score) for index, score in self._scored(text)]
        scored.sort(key=lambda ts: -ts[1])  # stable: ties stay in the base's order
        return scored

    def reply(self, text: str, memory: ConciergeMemory) -> tuple[ConciergeAnswer, ConciergeMemory]:
        """Answer ``text``; returns the answer and the memory to keep for next time."""
        # Lower-cased and folded once for every rule below (each did it again: a
        # quarter of a reply's time for a short message).
        lower = text.lower()
        folded = " ".join(lower.split())
        if self._person_re.search(folded) is not None or (
            memory.offered_person and _yes_folded(lower) in self.kb.yes_words
        ):
            return _HANDING_OVER, _FORGOTTEN
        if self._upset(text, lower):
            return _SORRY_HANDING_OVER, _FORGOTTEN
        best = self._best_of(set(self._tokenize.of_folded(lower, folded)))
        if best is not None:
            index, score = best
            answer = self._answers[index]
            if score >= MIN_SCORE * (SMALLTALK_WEIGHT if answer.kind == "smalltalk" else 1):
                return answer, _FORGOTTEN
        streak = memory.unanswered_streak + 1
        if streak >= 2:
            return _OFFER, ConciergeMemory(unanswered_streak=streak, offered_person=True)
        return _UNKNOWN, ConciergeMemory(
            unanswered_streak=streak, offered_person=memory.offered_person
        )


_NOT_IN_A_WORD: Final = re.compile(r"[^\w\s']")


def _yes_folded(lower: str) -> str:
    """The message (lower-cased) as an answer to "would you like a person?" is
    compared."""
    return " ".join(_NOT_IN_A_WORD.sub(" ", lower).split())


# Replies are immutable: the fixed ones are made once.
_FORGOTTEN: Final = ConciergeMemory()
_HANDING_OVER: Final = ConciergeAnswer(
    "Of course. I'm bringing in a member of our team now; they will see "
    "everything we've said so far.",
    "escalate",
    escalate=True,
)
_SORRY_HANDING_OVER: Final = ConciergeAnswer(
    "I'm so sorry about this. I'm asking a member of our team to help you personally, right now.",
    "escalate",
    escalate=True,
)
_OFFER: Final = ConciergeAnswer(
    "I'm sorry, I don't have an answer for that either. Would you like me to "
    "bring in a member of our team? Just say yes, or use 'talk to a person'.",
    "offer",
)
_UNKNOWN: Final = ConciergeAnswer(
    "I'm sorry, I'm not sure about that one. Could you put it another way? I can "
    "help with check-in and check-out, breakfast, Wi-Fi, parking, the spa, room "
    "service, housekeeping, taxis and tips for the area.",
    "unknown",
)


# ----------------------------------------------------------------- the interface


@dataclass(frozen=True, slots=True)
class ResponderRequest:
    """What a responder is told about one guest message.

    ``recent`` holds up to ``Responder.history_window`` earlier messages of the
    conversation, oldest first (empty when the responder asks for none).
    """

    conversation_id: str
    guest_id: str
    guest_name: str | None
    text: str
    recent: Sequence[Message] = ()
    # A responder that generates its answer bit by bit may call this with the text so
    # far; the guest sees it grow (``draft`` frames). Only the returned reply is stored.
    draft: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True)
class ResponderReply:
    """A responder's answer; ``escalate`` hands the conversation to staff after it."""

    text: str
    escalate: bool = False


class Responder(Protocol):
    """Anything that answers guests while a conversation is in ``ai`` status.

    The server calls :meth:`respond` once per stored guest message, under its own
    timeout; a responder that raises or times out is replaced, for that message, by
    an apology and a hand-off to staff, so a broken responder never silences a guest.
    One that keeps a deadline of its own may say so in an ``answer_timeout`` attribute
    (seconds): the server then waits at least that long. One that answers without
    waiting may offer a synchronous ``respond_now(request)``: the server calls it
    instead, with no timeout to arm (a failure is handled the same way). It may also
    offer ``respond_ahead(request) -> (reply, keep)``, asked before the guest message
    is stored so that the reply is written with it: whatever the responder remembers
    of the conversation moves on only when the server calls ``keep()`` (the reply was
    stored; a retry's or a failed write's reply is never kept).
    """

    history_window: int

    async def respond(self, request: ResponderRequest) -> ResponderReply: ...


class RulesResponder:
    """:class:`Responder` backed by :class:`Concierge` (no I/O, instant)."""

    history_window = 0

    def __init__(self, concierge: Concierge | None = None, *, max_conversations: int = 50_000):
        self.concierge = concierge if concierge is not None else Concierge()
        self._memory: OrderedDict[str, ConciergeMemory] = OrderedDict()
        self._max = max_conversations

    async def respond(self, request: ResponderRequest) -> ResponderReply:
        return self.respond_now(request)

    def respond_now(self, request: ResponderRequest) -> ResponderReply:
        """The synchronous core of :meth:`respond`."""
        reply, keep = self.respond_ahead(request)
        keep()
        return reply

    def respond_ahead(self, request: ResponderRequest) -> tuple[ResponderReply, Callable[[], None]]:
        """The reply, and ``keep``: what moves the conversation's memory on (the
        streak of unanswered questions, the offer of a person) once it is stored."""
        conversation_id = request.conversation_id
        answer, after = self.concierge.reply(
            request.text, self._memory.get(conversation_id, _FORGOTTEN)
        )

        def keep() -> None:
            self._memory.pop(conversation_id, None)
            self._memory[conversation_id] = after
            if len(self._memory) > self._max:
                self._memory.popitem(last=False)

        return ResponderReply(answer.text, answer.escalate), keep
