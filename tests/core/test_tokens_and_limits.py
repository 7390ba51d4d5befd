"""Tokens and the rate limiter, as pure code."""

from __future__ import annotations

import pytest

from trio_chat.core.ratelimit import TokenBucket
from trio_chat.core.tokens import TokenSigner, new_id

SECRET = b"0123456789abcdef0123456789abcdef"


def test_tokens_verify_and_carry_kind_and_id() -> None:
    signer = TokenSigner(SECRET)
    guest = new_id("g")
    token = signer.issue("g", guest)
    assert signer.verify(token) == ("g", guest)
    assert signer.verify(signer.issue("s", "s_1")) == ("s", "s_1")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # a different mac
        lambda t: "s" + t[1:],  # a guest token presented as staff
        lambda t: t.replace(".", "", 1),
        lambda t: "",
        lambda t: t + ".x",
    ],
)
def test_forged_or_mangled_tokens_fail(mutate: object) -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("g", "g_abc")
    assert signer.verify(mutate(token)) is None  # type: ignore[operator]


def test_another_secret_does_not_verify() -> None:
    token = TokenSigner(SECRET).issue("g", "g_abc")
    assert TokenSigner(b"another secret of 32 bytes......").verify(token) is None


def test_tokens_use_only_the_protocol_alphabet() -> None:
    import re

    token = TokenSigner(SECRET).issue("g", new_id("g"))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", token)


def test_ids_are_unique_and_unguessable() -> None:
    ids = {new_id("g") for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) >= 18 for i in ids)


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenSigner(b"short")


def test_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0.0)
    assert all(bucket.try_take(0.0) == 0 for _ in range(20))
    assert bucket.try_take(0.0) == 100  # one token comes back in 100 ms
    assert bucket.try_take(0.05) == 50
    assert bucket.try_take(0.1) == 0
    assert bucket.try_take(0.1) > 0


def test_bucket_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    for _ in range(5):
        bucket.try_take(0.0)
    allowed = sum(bucket.try_take(100.0) == 0 for _ in range(10))
    assert allowed == 5


def test_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=0, now=0.0)
    assert all(bucket.try_take(0.0) == 0 for _ in range(1000))
