"""Scale-out: what a cluster's hub tells the other server processes and hears from
them besides commits: who is on duty (``staff_presence``) and the concierge's drafts.
Frame in, actions out (the ``Driver`` of ``test_hub``, with ``cluster`` on)."""

from __future__ import annotations

import json
from typing import Any

from trio_chat.core.hub import Action, Relay, RelayStaff

from .test_hub import WALL, Driver


class ClusterDriver(Driver):
    """The ``Driver``, keeping every action the hub answered (reads' continuations
    included) in :attr:`seen`."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hub.cluster = True
        self.seen: list[Action] = []

    def run(self, actions: list[Action]) -> None:
        self.seen += actions
        super().run(actions)


def cluster_driver(**options: Any) -> ClusterDriver:
    return ClusterDriver(**options)


def sign_in(d: Driver, name: str) -> tuple[int, list[Action]]:
    """A console of ``name`` signs in; its session and the hub's actions."""
    member = next((m for m in d.backend.list_staff() if m.name == name), None)
    if member is None:
        member = d.backend.add_staff(name)
    session = d.connect()
    token = d.hub.signer.issue("s", member.staff_id)
    seen = d.seen if isinstance(d, ClusterDriver) else []
    start = len(seen)
    actions = d.hub.frame(session, json.dumps({"type": "hello", "token": token}), d.now, WALL)
    d.run(actions)
    return session, (seen[start:] if isinstance(d, ClusterDriver) else actions)


def staff_relays(actions: list[Action]) -> list[tuple[str, ...]]:
    return [a.names for a in actions if isinstance(a, RelayStaff)]


def presence(d: Driver, session: int) -> list[list[str]]:
    return [f["staff"] for f in d.take(session) if f["type"] == "staff_presence"]


def test_who_is_on_duty_here_is_relayed_when_it_changes_and_only_then() -> None:
    d = cluster_driver()
    _, actions = sign_in(d, "Anna")
    assert staff_relays(actions) == [("Anna",)]
    _, again = sign_in(d, "Anna")  # a second console: the same names
    assert staff_relays(again) == []
    ben, actions = sign_in(d, "Ben")
    assert staff_relays(actions) == [("Anna", "Ben")]
    assert staff_relays(d.hub.closed(ben, d.now, WALL)) == [("Anna",)]
    assert d.hub.on_duty_here() == ("Anna",)
    # A hub alone (not a cluster) relays nothing.
    alone = Driver()
    assert staff_relays(sign_in(alone, "Anna")[1]) == []


def test_staff_on_duty_elsewhere_count_until_their_node_says_otherwise_or_goes() -> None:
    d = cluster_driver()
    anna, _ = sign_in(d, "Anna")
    d.take(anna)
    d.run(d.hub.staff_elsewhere("n2", ["Ben"], d.now, WALL))
    assert presence(d, anna) == [["Anna", "Ben"]]
    d.run(d.hub.staff_elsewhere("n2", ["Ben"], d.now, WALL))  # heard again: no change
    d.run(d.hub.staff_elsewhere("n3", ["Anna"], d.now, WALL))  # Anna there too: no change
    assert presence(d, anna) == []
    # A console signing in here now hears of Ben at once.
    carl, _ = sign_in(d, "Carl")
    assert presence(d, carl) == [["Anna", "Ben", "Carl"]]
    assert presence(d, anna) == [["Anna", "Ben", "Carl"]]
    d.run(d.hub.staff_elsewhere("n2", [], d.now, WALL))  # Ben signed out there
    assert presence(d, anna) == [["Anna", "Carl"]]
    d.run(d.hub.staff_elsewhere("n2", ["Ben"], d.now, WALL))
    d.take(anna)
    d.run(d.hub.node_gone("n2", d.now, WALL))  # n2 died: Ben is off duty
    assert presence(d, anna) == [["Anna", "Carl"]]
    d.run(d.hub.closed(anna, d.now, WALL))
    assert presence(d, carl)[-1] == ["Anna", "Carl"]  # Anna is still on duty on n3


def test_a_draft_is_relayed_for_subscribers_on_other_nodes() -> None:
    here = cluster_driver(concierge=True)
    guest, welcome = here.guest()
    cid = welcome["conversation_id"]
    here.send(guest, type="message", client_msg_id="m1", text="breakfast?")
    here.take(guest)
    actions = here.hub.drafted(cid, "Breakfast is", here.now, WALL)
    [relay] = [a for a in actions if isinstance(a, Relay)]
    assert relay.conversation_id == cid and relay.frame is not None
    # Another node, where a staff member watches the conversation.
    there = cluster_driver()
    there.backend = here.backend
    staff, _ = sign_in(there, "Anna")
    there.send(staff, type="watch", conversation_id=cid)
    there.take(staff)
    there.run(there.hub.relayed(cid, "n1", relay.frame, None, there.now, WALL))
    assert [f for f in there.take(staff) if f["type"] == "draft"] == [
        {"type": "draft", "conversation_id": cid, "sender": "ai", "text": "Breakfast is"}
    ]
