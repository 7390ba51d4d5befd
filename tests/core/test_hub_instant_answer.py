"""An answer the concierge gives at once (``Hub.instant_answer``) is asked before the
guest message is stored, written with it (``AppendMessage.answer``) and pushed with its
ack: one commit, one write. Whenever something earlier decides otherwise (a change of
status in flight, an answer under way, a hand-over being written) the message takes
the usual way: a :class:`StartReply` after its commit."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.server.commit_path_probe import staff_joins
from trio_chat.core.hub import Send, Write
from trio_chat.core.protocol import Message
from trio_chat.core.storage import Appended, AppendMessage, ConversationRow

from .test_hub import WALL, Driver, types


class Answers:
    """The hub's instant answer: records what it was asked, and which answers it was
    told to keep (stored)."""

    def __init__(self, escalate_on: str = "a person please") -> None:
        self.asked: list[str] = []
        self.kept: list[str] = []
        self.escalate_on = escalate_on

    def __call__(
        self, conversation_id: str, guest_id: str, guest_name: str | None, text: str
    ) -> tuple[str, bool, Callable[[], None]]:
        self.asked.append(text)
        return f"at once: {text}", text == self.escalate_on, lambda: self.kept.append(text)


def answer_of(write: Write) -> AppendMessage | None:
    assert isinstance(write.operation, AppendMessage)
    return write.operation.answer


def instant_driver() -> tuple[Driver, Answers]:
    d = Driver(concierge=True)
    answers = Answers()
    d.hub.instant_answer = answers
    return d, answers


def instant_guest() -> tuple[Driver, Answers, int, str]:
    """A driver with instant answers, and a signed-in guest: its session and
    conversation."""
    d, answers = instant_driver()
    guest, welcome = d.guest()
    return d, answers, guest, welcome["conversation_id"]


def history(d: Driver, cid: str) -> list[tuple[str, str]]:
    return [(m.sender, m.text) for m in d.backend.history(cid, 0, 100)]


def test_the_answer_is_written_with_the_message_and_pushed_with_its_ack() -> None:
    d, answers, guest, cid = instant_guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [write] = d.held
    assert answer_of(write) is not None  # one write for both
    assert answers.asked == ["breakfast?"]
    assert d.take(guest) == []  # nothing before the commit
    d.commit()
    frames = d.take(guest)
    assert types(frames) == ["ack", "message", "typing", "message", "typing"]
    assert frames[1]["sender"] == "guest" and frames[1]["seq"] == 1
    assert frames[2]["sender"] == "ai" and frames[2]["active"] is True
    assert frames[3]["sender"] == "ai" and frames[3]["seq"] == 2
    assert frames[3]["text"] == "at once: breakfast?"
    assert frames[4]["active"] is False
    assert d.replies == []  # no StartReply
    assert history(d, cid) == [("guest", "breakfast?"), ("ai", "at once: breakfast?")]
    assert d.hub.last_seq(cid) == 2


def test_every_subscriber_gets_the_answer_between_its_typing_frames_in_one_run() -> None:
    """The guest's second tab and a watching staff member get the reply's typing, answer
    and typing's end too, each subscriber's three one after another in the actions:
    the shell queues each such run on its connection at once."""
    d, _, guest, cid = instant_guest()
    second_tab, _ = d.guest(d.hub.sessions[guest].token)
    staff = d.staff()
    d.send(staff, type="watch", conversation_id=cid)
    for session in (guest, second_tab, staff):
        d.take(session)
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [write] = d.held
    d.hold = False
    actions = d.hub.stored(write, d.backend.apply_batch([write.operation])[0], d.now, WALL)
    sends = [(a.session, json.loads(a.frame)) for a in actions if isinstance(a, Send)]
    runs = [
        [(session, frame["type"]) for session, frame in sends[i : i + 3]]
        for i, (_, frame) in enumerate(sends)
        if frame["type"] == "typing" and frame["active"]
    ]
    assert sorted(run[0][0] for run in runs) == sorted([guest, second_tab, staff])
    for run in runs:
        session = run[0][0]
        assert run == [(session, "typing"), (session, "message"), (session, "typing")]
    d.run(actions)
    for session in (guest, second_tab, staff):
        frames = [f for f in d.take(session) if f["type"] in ("message", "typing")]
        assert [(f["type"], f.get("sender"), f.get("active")) for f in frames] == [
            ("message", "guest", None),
            ("typing", "ai", True),
            ("message", "ai", None),
            ("typing", "ai", False),
        ]


def test_a_retry_is_not_answered_again_and_its_answer_is_not_kept() -> None:
    """A retry is asked for its answer (nobody knows it is a retry before the storage
    says so), but the answer is neither stored nor kept: a concierge that remembers
    the conversation does not count it."""
    d, answers, guest, cid = instant_guest()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    d.take(guest)
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    frames = d.take(guest)
    assert types(frames) == ["ack"] and frames[0]["seq"] == 1
    assert d.replies == []
    assert [s for s, _ in history(d, cid)] == ["guest", "ai"]
    assert answers.asked == ["breakfast?", "breakfast?"] and answers.kept == ["breakfast?"]


def test_a_claim_stored_first_leaves_the_guest_message_to_the_usual_way() -> None:
    """The answer was decided while the conversation was the concierge's, but a claim
    reached the storage first (the hub never decides so itself; the storage checks all
    the same). The guest message is stored, its answer is not, and the message asks
    the usual way after its commit; that answer meets the claim too: nothing stored."""
    d, answers, guest, cid = instant_guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    [write] = d.held
    d.held.clear()
    d.hold = False
    d.backend.apply_batch([staff_joins(cid)])
    [result] = d.backend.apply_batch([write.operation])
    assert result.answer is not None and result.answer.conflict is not None
    d.run(d.hub.stored(write, result, d.now, 0.0))
    frames = d.take(guest)
    assert types(frames) == ["ack", "message", "typing"]  # asking the usual way
    [start] = d.replies
    d.reply(start)
    assert types(d.take(guest)) == ["typing"]  # it ends, with nothing said
    assert answers.asked == ["breakfast?"] and answers.kept == []
    assert [s for s, _ in history(d, cid)] == ["system", "guest"]


def test_with_a_change_of_status_in_flight_the_message_asks_after_its_commit() -> None:
    """A message in ``resolved`` reopens the conversation first: no instant answer, the
    concierge answers once the reopening is stored (in the order the protocol says)."""
    d, answers, guest, cid = instant_guest()
    d.resolved(cid)
    d.take(guest)
    d.send(guest, type="message", client_msg_id="m1", text="one more thing")
    assert answers.asked == []
    assert types(d.take(guest)) == ["ack", "message", "message", "status", "typing"]
    [start] = d.replies
    assert start.message.text == "one more thing"


def test_an_answer_under_way_the_usual_way_keeps_the_order() -> None:
    """While a StartReply is unanswered, later messages wait their turn behind it."""
    d, answers, guest, cid = instant_guest()
    d.hub.instant_answer = None
    d.send(guest, type="message", client_msg_id="m1", text="one")
    [start] = d.replies
    d.hub.instant_answer = answers
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert answers.asked == []  # one is still being answered
    d.reply(start, "answer one")
    assert [s.message.text for s in d.replies] == ["one", "two"]
    d.reply(d.replies[1], "answer two")
    assert [t for _, t in history(d, cid)] == ["one", "two", "answer one", "answer two"]


def test_a_hand_over_in_flight_silences_the_messages_behind_it() -> None:
    """The answer to the first message hands over to staff; a second message sent
    before that commit is not answered at once, and once the hand-over is decided the
    concierge is silent (as when the answer came after the commit)."""
    d, answers, guest, cid = instant_guest()
    d.hold = True
    d.send(guest, type="message", client_msg_id="m1", text="a person please")
    d.send(guest, type="message", client_msg_id="m2", text="hello?")
    assert answers.asked == ["a person please"]
    first, second = list(d.held)
    assert answer_of(first) is not None
    assert answer_of(second) is None
    d.commit()  # in the order written: the hand-over decided in the first commit, last
    assert d.replies == []
    assert [s for s, _ in history(d, cid)] == ["guest", "ai", "guest", "system"]
    assert d.hub.conversations[cid].status == "waiting"
    assert d.hub.conversations[cid].guest_writes == 0


def test_a_failed_write_keeps_nothing_and_blocks_nothing() -> None:
    d, answers, guest, cid = instant_guest()
    d.backend.fail_writes = True
    d.send(guest, type="message", client_msg_id="m1", text="a person please")
    errors = d.take(guest)
    assert types(errors) == ["error"] and errors[0]["code"] == "internal"
    assert d.hub.conversations[cid].guest_writes == 0
    d.backend.fail_writes = False
    d.send(guest, type="message", client_msg_id="m2", text="breakfast?")
    assert answers.asked == ["a person please", "breakfast?"]
    assert answers.kept == ["breakfast?"]  # the failed write's answer is not
    assert [s for s, _ in history(d, cid)] == ["guest", "ai"]


def test_without_a_concierge_nothing_is_asked() -> None:
    d, answers = instant_driver()
    d.hub.concierge = False
    guest, _ = d.guest()
    d.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    assert answers.asked == [] and d.replies == []
    assert types(d.take(guest)) == ["ack", "message"]


def test_a_message_still_being_written_keeps_the_next_from_answering_first() -> None:
    """Staff hands back while the guest writes: the first message, sent while the
    conversation was still staff's, asks after its commit; the second, sent once the
    hand-back committed but before the first did, must not be answered ahead of it."""
    d, answers, guest, cid = instant_guest()
    staff = d.staff()
    d.send(staff, type="claim", conversation_id=cid)
    d.hold = True
    d.send(staff, type="release", conversation_id=cid)
    d.send(guest, type="message", client_msg_id="m1", text="one")
    release, first = list(d.held)
    d.held.clear()
    d._commit(release)  # back with the concierge; "one" is still being written
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert answers.asked == []  # "one" is in flight: "two" waits its turn
    d.held.appendleft(first)
    d.commit()
    d.hold = False
    while d.replies:
        start = d.replies.pop(0)
        d.reply(start, f"answer {start.message.text}")
    texts = [t for s, t in history(d, cid) if s in ("guest", "ai")]
    assert texts == ["one", "two", "answer one", "answer two"]


def test_after_an_answer_given_the_usual_way_answers_keep_the_order() -> None:
    """A message in ``resolved`` reopens the conversation and is answered after its
    commit. A message sent while that answer is written goes the usual way too; the
    next one, sent once that answer committed but before the message before it did,
    must not be answered ahead of it."""
    d, answers, guest, cid = instant_guest()
    d.resolved(cid)
    d.send(guest, type="message", client_msg_id="m0", text="zero")  # reopens
    [start] = d.replies
    d.hold = True
    d.reply(start, "answer zero")
    d.send(guest, type="message", client_msg_id="m1", text="one")
    answer_zero, one = list(d.held)
    d.held.clear()
    d._commit(answer_zero)
    d.send(guest, type="message", client_msg_id="m2", text="two")
    assert answers.asked == []  # "one" is still being written
    d.held.appendleft(one)
    d.commit()
    d.hold = False
    answered = 1
    while answered < len(d.replies):
        start = d.replies[answered]
        d.reply(start, f"answer {start.message.text}")
        answered += 1
    texts = [t for s, t in history(d, cid) if s in ("guest", "ai")]
    assert texts == ["zero", "answer zero", "one", "two", "answer one", "answer two"]
    # All answered and committed: the next message is answered at once.
    d.send(guest, type="message", client_msg_id="m3", text="three")
    assert answers.asked == ["three"] and answers.kept == ["three"]


def test_a_stored_answer_keeps_everything_its_message_s_commit_said() -> None:
    """``AppendMessage.apply`` adds the answer's outcome to the message's result by hand
    (not ``_replace``): every other field must come through."""
    row = ConversationRow("c1", "g1", "Ana", "ai", None, None, 1, 0, 5.0, "hi")
    first = Appended(Message(1, "c1", "guest", "g1", "hi", "t", "m1"), False, at=5.0, row=row)
    answer = Appended(Message(2, "c1", "ai", "concierge", "hello", "t", None), False, at=5.0)

    class Backend:
        def append(self, op: AppendMessage) -> Appended:
            return first if op.sender == "guest" else answer

    op = AppendMessage(conversation_id="c1", sender="guest", author="g1", text="hi")
    op.answer = AppendMessage(conversation_id="c1", sender="ai", author="concierge", text="hello")
    result = op.apply(Backend())  # type: ignore[arg-type]
    assert result.answer is answer
    for name in Appended._fields:
        if name != "answer":
            assert getattr(result, name) == getattr(first, name), name
