"""Input robustness and per-address registration limits, as pure code."""

from __future__ import annotations

import json

import pytest

from trio_chat.core import protocol as proto
from trio_chat.core.errors import ProtocolError
from trio_chat.core.hub import Close, Hub, HubConfig, Send, Write
from trio_chat.core.protocol import CloseCode
from trio_chat.core.registration import SWEEP_AT, RegistrationLimiter
from trio_chat.core.storage import CreateGuest
from trio_chat.core.tokens import TokenSigner

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("token", ["g.é.x", "g.\ud800.x", "ｇ.g_1.abc", "g.g_1.\u00e9" * 3])
def test_a_non_ascii_token_is_simply_not_genuine(token: str) -> None:
    assert TokenSigner(SECRET).verify(token) is None


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "history", "after_seq": 10**20},
        {"type": "history", "after_seq": 0, "limit": 2**63},
        {"type": "read", "seq": 10**20},
        {"type": "read", "seq": -(10**20)},
    ],
)
def test_integers_beyond_storage_are_a_bad_message(frame: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as caught:
        proto.parse_client_frame(json.dumps(frame))
    assert caught.value.code == "bad_message" and caught.value.ref == frame["type"]


def test_the_largest_storable_integer_still_parses() -> None:
    parsed = proto.parse_client_frame(json.dumps({"type": "history", "after_seq": 2**63 - 1}))
    assert isinstance(parsed, proto.HistoryRequest) and parsed.after_seq == 2**63 - 1


def test_registrations_are_limited_per_address_with_a_burst() -> None:
    limiter = RegistrationLimiter(per_minute=60, burst=3)
    assert [limiter.try_register("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.try_register("a", 0.0) == 1000  # one a second: the next in 1 s
    assert limiter.try_register("b", 0.0) == 0  # another address has its own bucket
    assert limiter.try_register("a", 1.0) == 0


def test_unlimited_registrations() -> None:
    limiter = RegistrationLimiter(per_minute=0, burst=1)
    assert not limiter.enabled
    assert all(limiter.try_register("a", 0.0) == 0 for _ in range(1000))
    assert len(limiter) == 0


def test_full_buckets_are_forgotten_so_memory_follows_recent_addresses() -> None:
    limiter = RegistrationLimiter(per_minute=60, burst=2)
    for i in range(SWEEP_AT):
        limiter.try_register(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == SWEEP_AT
    limiter.try_register("late", 1.0)  # nobody's bucket is full yet: all kept
    assert len(limiter) == SWEEP_AT + 1
    limiter.try_register("later", 10.0)  # 2 s refill any bucket: all forgotten
    assert len(limiter) == 1


def _hub(per_minute: float, burst: int) -> Hub:
    config = HubConfig(registrations_per_minute=per_minute, registration_burst=burst)
    return Hub(TokenSigner(SECRET), config, concierge=False)


def test_the_hub_refuses_a_registration_over_the_address_limit() -> None:
    hub = _hub(per_minute=6, burst=1)
    hub.opened(1, "192.0.2.1")
    [write] = hub.frame(1, '{"type":"hello","token":null}', 0.0, 0.0)
    assert isinstance(write, Write) and isinstance(write.operation, CreateGuest)
    hub.opened(2, "192.0.2.1")
    error, close = hub.frame(2, '{"type":"hello","token":null}', 1.0, 0.0)
    assert isinstance(error, Send) and isinstance(close, Close)
    frame = json.loads(error.frame)
    assert frame["code"] == "rate_limited" and frame["ref"] == "hello"
    assert frame["retry_after_ms"] == 9000  # one every 10 s, the last taken 1 s ago
    assert close.code == CloseCode.RATE_LIMITED
    assert hub.sessions[2].bad_frames == 0  # not a bad frame
    # Another address, or one the shell does not know, is not held back.
    hub.opened(3, "192.0.2.2")
    assert isinstance(hub.frame(3, '{"type":"hello","token":null}', 1.0, 0.0)[0], Write)
    hub.opened(4)
    assert isinstance(hub.frame(4, '{"type":"hello","token":null}', 1.0, 0.0)[0], Write)


def test_a_token_hello_is_not_a_registration() -> None:
    hub = _hub(per_minute=6, burst=1)
    hub.opened(1, "192.0.2.1")
    hub.frame(1, '{"type":"hello","token":null}', 0.0, 0.0)
    token = hub.signer.issue("g", "g_someone")
    hub.opened(2, "192.0.2.1")
    [read] = hub.frame(2, json.dumps({"type": "hello", "token": token}), 0.0, 0.0)
    assert type(read).__name__ == "Read"
