"""Rate limits and history in flight, in the hub: buckets per guest and staff member
(shared by their tabs), per client address (shared by everyone there), a cost for every
frame, one history reply at a time per connection, and no bucket kept for nobody.

Built on the synchronous :class:`~tests.core.test_hub.Driver`, with the hub configured
per test; the clock is a number the test moves.
"""

from __future__ import annotations

import json
from typing import Any

from trio_chat.core.errors import StorageError
from trio_chat.core.hub import (
    HISTORY_RETRY_MS,
    Action,
    Hub,
    HubConfig,
    Read,
    ReportWritten,
    Write,
)
from trio_chat.core.protocol import CloseCode
from trio_chat.core.ratelimit import BucketTable

from .test_hub import WALL, Driver, types


class LimitDriver(Driver):
    """A :class:`Driver` whose hub has the limits given, and whose sockets report a
    history reply written only when the test says so (:meth:`write_out`)."""

    def __init__(self, **limits: Any) -> None:
        super().__init__()
        settings: dict[str, Any] = {
            "heartbeat_s": 0,
            "server_name": "test",
            "rate_limit": 0.0,
            "rate_burst": 20,
            "rate_limit_per_ip": 0.0,
            "rate_burst_per_ip": 100,
        }
        settings.update(limits)
        self.hub = Hub(self.hub.signer, HubConfig(**settings), concierge=False)
        self.unwritten: list[int] = []
        self.addresses = iter(range(1_000, 2_000))

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ReportWritten):
                self.unwritten.append(action.session)
            else:
                super().run([action])

    def write_out(self) -> None:
        while self.unwritten:
            self.run(self.hub.written(self.unwritten.pop(0), self.now, WALL))

    def connect_from(self, address: str) -> int:
        session = next(self.addresses)
        self.hub.opened(session, address, self.now)
        return session

    def guest_from(self, address: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        session = self.connect_from(address)
        self.send(session, type="hello", token=token)
        welcome = self.take(session)[0]
        assert welcome["type"] == "welcome", welcome
        return session, welcome

    def leave(self, session: int) -> None:
        self.run(self.hub.closed(session, self.now, WALL))


def refusals(frames: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    return [(f["ref"], f["retry_after_ms"]) for f in frames if f.get("code") == "rate_limited"]


def say(d: Driver, session: int, n: int, text: str = "hi") -> None:
    d.send(session, type="message", client_msg_id=f"m{n}", text=text)


# ------------------------------------------------------------------ per guest / staff


def test_a_second_tab_shares_the_guests_bucket() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=3)
    d.now = 100.0
    first, welcome = d.guest()
    second, _ = d.guest(welcome["token"])
    for n in range(3):
        say(d, first, n)
    say(d, second, 3)
    assert refusals(d.take(second)) == [("m3", 1000)]
    d.now += 1.0  # one token back, for either tab
    say(d, second, 4)
    assert types(d.take(second))[:1] == ["ack"]
    say(d, first, 5)
    assert refusals(d.take(first)) == [("m5", 1000)]


def test_a_new_connection_does_not_refill_a_guests_bucket() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=3)
    first, welcome = d.guest()
    for n in range(3):
        say(d, first, n)
    d.leave(first)
    back, _ = d.guest(welcome["token"])
    say(d, back, 3)
    assert refusals(d.take(back)) == [("m3", 1000)]


def test_a_staff_member_is_limited_across_consoles() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=2)
    _, welcome = d.guest()
    cid = welcome["conversation_id"]
    member = d.backend.add_staff("Anna")
    token = d.hub.signer.issue("s", member.staff_id)
    anna, again = d.connect(), d.connect()
    for console in (anna, again):
        d.send(console, type="hello", token=token)
        assert types(d.take(console))[:2] == ["welcome", "queue"]
    d.send(anna, type="claim", conversation_id=cid)
    d.send(anna, type="message", conversation_id=cid, client_msg_id="s1", text="hello")
    assert "error" not in types(d.take(anna))
    d.send(again, type="watch", conversation_id=cid)
    assert refusals(d.take(again)) == [("watch", 1000)]


# ----------------------------------------------------------------------- per address


def test_guests_behind_one_address_share_its_bucket_and_others_do_not() -> None:
    d = LimitDriver(rate_limit_per_ip=1.0, rate_burst_per_ip=5)
    d.now = 50.0
    a, _ = d.guest_from("203.0.113.7")  # a hello costs the address one token
    b, _ = d.guest_from("203.0.113.7")
    say(d, a, 1)
    say(d, b, 2)
    say(d, a, 3)
    say(d, b, 4)
    assert refusals(d.take(b)) == [("m4", 1000)]
    elsewhere, _ = d.guest_from("198.51.100.1")
    say(d, elsewhere, 5)
    assert types(d.take(elsewhere))[:1] == ["ack"]


def test_a_hello_over_the_address_limit_is_refused_and_closed_with_4429() -> None:
    d = LimitDriver(rate_limit_per_ip=1.0, rate_burst_per_ip=2)
    d.guest_from("203.0.113.7")
    d.guest_from("203.0.113.7")
    third = d.connect_from("203.0.113.7")
    actions = d.hub.frame(third, json.dumps({"type": "hello", "token": None}), d.now, WALL)
    assert not [a for a in actions if isinstance(a, (Read, Write))]  # no guest created
    d.run(actions)
    [refusal] = d.take(third)
    assert (refusal["code"], refusal["ref"], refusal["retry_after_ms"]) == (
        "rate_limited",
        "hello",
        1000,
    )
    assert d.closes[third][0] == CloseCode.RATE_LIMITED


def test_no_address_and_a_zero_rate_mean_no_address_limit() -> None:
    off = LimitDriver(rate_limit_per_ip=0.0, rate_burst_per_ip=1)
    for _ in range(5):
        off.guest_from("203.0.113.7")
    assert off.hub.buckets_held() == (0, 0)
    on = LimitDriver(rate_limit_per_ip=1.0, rate_burst_per_ip=1)
    for _ in range(5):
        on.guest()  # not a network peer (the mock's console, a test)
    assert on.hub.buckets_held() == (0, 0)


# ---------------------------------------------------------------------------- costs


def test_typing_and_read_marks_cost_a_tenth_and_are_refused_past_the_burst() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=2)
    guest, _ = d.guest()
    for _ in range(10):
        d.send(guest, type="typing", active=True)
    for _ in range(10):
        d.send(guest, type="read", seq=0)
    assert refusals(d.take(guest)) == []
    d.send(guest, type="typing", active=False)
    d.send(guest, type="read", seq=0)
    d.send(guest, type="ping", id=1)
    assert refusals(d.take(guest)) == [("typing", 100), ("read", 100), ("ping", 100)]


def test_a_history_page_costs_four_tokens() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=10)
    guest, _ = d.guest()
    for _ in range(2):
        d.send(guest, type="history", after_seq=0)
        d.write_out()
    assert types(d.take(guest)) == ["history", "history"]
    d.send(guest, type="history", after_seq=0)
    assert refusals(d.take(guest)) == [("history", 2000)]  # 2 left, 4 needed
    say(d, guest, 1)
    say(d, guest, 2)
    assert types(d.take(guest)) == ["ack", "message", "ack", "message"]


def test_refusals_are_not_bad_frames_but_a_flood_is_closed_with_4429() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=1)
    d.now = 10.0
    guest, _ = d.guest()
    for _ in range(30):
        d.send(guest, type="escalate")
    assert guest not in d.closes
    for step in range(1, 21):
        d.now = 10.0 + step * 0.5
        d.send(guest, type="typing", active=True)
        for _ in range(10):
            d.send(guest, type="typing", active=True)
    assert d.closes[guest] == (CloseCode.RATE_LIMITED, "still flooding after being told")


# ---------------------------------------------------------------- history in flight


def test_one_history_reply_at_a_time_until_it_is_written() -> None:
    d = LimitDriver()
    guest, _ = d.guest()
    d.send(guest, type="history", after_seq=0)
    assert types(d.take(guest)) == ["history"]
    assert d.unwritten == [guest]
    d.send(guest, type="history", after_seq=0)
    [refusal] = d.take(guest)
    assert (refusal["code"], refusal["ref"], refusal["retry_after_ms"]) == (
        "rate_limited",
        "history",
        HISTORY_RETRY_MS,
    )
    say(d, guest, 1)  # everything else goes on meanwhile
    assert types(d.take(guest)) == ["ack", "message"]
    d.write_out()
    d.send(guest, type="history", after_seq=0)
    assert types(d.take(guest)) == ["history"]


def test_each_connection_has_its_own_history_in_flight() -> None:
    d = LimitDriver()
    first, welcome = d.guest()
    second, _ = d.guest(welcome["token"])
    d.send(first, type="history", after_seq=0)
    d.send(second, type="history", after_seq=0)
    assert types(d.take(first)) == types(d.take(second)) == ["history"]


def test_a_failed_history_read_does_not_block_the_next_one() -> None:
    d = LimitDriver()
    guest, _ = d.guest()
    [read] = d.hub.frame(guest, json.dumps({"type": "history", "after_seq": 0}), d.now, WALL)
    assert isinstance(read, Read)
    d.run(d.hub.read_failed(read, StorageError("disk gone"), d.now, WALL))
    assert [f["code"] for f in d.take(guest)] == ["internal"]
    d.send(guest, type="history", after_seq=0)
    assert types(d.take(guest)) == ["history"]


# ------------------------------------------------------------------ no bucket leaks


def test_buckets_of_people_gone_are_forgotten_once_full_again() -> None:
    d = LimitDriver(rate_limit=1.0, rate_burst=4, rate_limit_per_ip=10.0, rate_burst_per_ip=20)
    d.now = 0.0
    quiet, _ = d.guest_from("203.0.113.7")
    busy, _ = d.guest_from("203.0.113.8")
    for n in range(4):
        say(d, busy, n)
    assert d.hub.buckets_held() == (2, 2)
    d.now = 0.1  # the addresses have their hello's token back
    d.leave(quiet)  # full: forgotten at once
    d.leave(busy)  # four tokens short: kept until refilled
    assert d.hub.buckets_held() == (1, 1)
    d.now = 3.9
    d.guest_from("198.51.100.1")  # events prune the table as they come
    assert d.hub.buckets_held() == (2, 1)  # busy's address refilled in 2 s, not busy
    d.now = 4.2  # busy let go at 0.1; 4 tokens at 1/s (its address: 2 s at most)
    d.connect_from("198.51.100.2")
    assert d.hub.buckets_held() == (1, 2)


def test_a_bucket_table_stays_as_big_as_the_crowd_however_many_come_and_go() -> None:
    table = BucketTable(rate=1.0, burst=2.0)
    for n in range(10_000):
        bucket = table.hold(f"guest {n}", float(n))
        bucket.try_take(float(n), 2.0)
        table.let_go(f"guest {n}", float(n))
    assert len(table) <= 3
