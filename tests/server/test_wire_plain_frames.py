"""The frame engine reads plain text frames itself (``_read_plain_texts``), and only
while ``websockets``' protocol holds nothing unfinished: whatever bytes arrive, in
whatever pieces, the engine finds the same messages and raises the same errors as the
protocol alone would."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_chat.server._wire import (
    PLAIN_TEXT_BYTES,
    FrameTooBig,
    Incoming,
    ProtocolViolation,
    WebsocketsEngine,
    _FrameBoundary,
)

LIMIT = 4096  # the engines' message limit in these tests


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    long_length: bool = False,
    mask: bytes = b"\x1f\x8b\x00\xd4",
) -> bytes:
    """A client's frame; ``long_length`` writes a short length in 16 bits (allowed by
    the engine, not the shortest form)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126 and not long_length:
        head += bytes([mask_bit | length])
    elif length < 0x10000:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(
    message: str, *, fin: bool = True, masked: bool = True, long_length: bool = False
) -> bytes:
    return frame(0x1, message.encode(), fin=fin, masked=masked, long_length=long_length)


Outcome = tuple[list[Incoming], tuple[type[Exception], int | None] | None]


def run(engine: WebsocketsEngine, chunks: Iterable[bytes]) -> Outcome:
    """Everything ``engine`` finds in ``chunks``, and the error it stops at."""
    found: list[Incoming] = []
    try:
        for chunk in chunks:
            found.extend(engine.receive(chunk))
    except (FrameTooBig, ProtocolViolation) as exc:
        return found, (type(exc), getattr(exc, "code", None))
    return found, None


def protocol_only() -> WebsocketsEngine:
    """The engine as it was: every byte through the protocol."""
    engine = WebsocketsEngine(LIMIT)
    engine._boundary = _FrameBoundary()
    engine._boundary.given_up = True
    return engine


def assert_same(data: bytes, cuts: Iterable[int]) -> Outcome:
    bounds = [0, *sorted(set(cuts)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    ours, reference = run(WebsocketsEngine(LIMIT), chunks), run(protocol_only(), chunks)
    assert ours == reference
    return ours


def messages(*texts: str) -> list[Incoming]:
    return [Incoming("message", t) for t in texts]


# ---------------------------------------------------------------- chosen cases

CASES: dict[str, tuple[bytes, Outcome]] = {
    "plain frames": (
        text("hello") + text("") + text("é" * 200) + text("x" * PLAIN_TEXT_BYTES),
        (messages("hello", "", "é" * 200, "x" * PLAIN_TEXT_BYTES), None),
    ),
    "past the plain size, then plain again": (
        text("y" * (PLAIN_TEXT_BYTES + 1)) + text("after"),
        (messages("y" * (PLAIN_TEXT_BYTES + 1), "after"), None),
    ),
    "a fragmented message with a ping inside, then a plain one": (
        text("frag", fin=False)
        + frame(0x9, b"p")
        + frame(0x0, b"-ment", fin=False)
        + frame(0x0, b"ed")
        + text("next"),
        ([Incoming("ping", b"p"), *messages("frag-mented", "next")], None),
    ),
    "binary": (
        frame(0x2, b"\x00\x01") + text("t"),
        ([Incoming("message", b"\x00\x01"), *messages("t")], None),
    ),
    "a sixteen-bit length for a short payload": (
        text("short", long_length=True) + text("ok"),
        (messages("short", "ok"), None),
    ),
    "not UTF-8": (text("a") + frame(0x1, b"\xff\xfe"), ([], (ProtocolViolation, 1007))),
    "unmasked": (text("a") + text("b", masked=False), ([], (ProtocolViolation, 1002))),
    "unmasked, long enough to pass for masked": (
        text("a") + text("an unmasked frame", masked=False),
        ([], (ProtocolViolation, 1002)),
    ),
    "a reserved bit": (text("a") + frame(0x1, b"b", rsv=0b100), ([], (ProtocolViolation, 1002))),
    "over the limit": (text("a") + text("z" * (LIMIT + 1)), ([], (FrameTooBig, None))),
    "a continuation out of nowhere": (frame(0x0, b"x"), ([], (ProtocolViolation, 1002))),
    "a new message inside a fragmented one": (
        text("a", fin=False) + text("b"),
        ([], (ProtocolViolation, 1002)),
    ),
    "nothing after a close": (
        text("before") + frame(0x8, struct.pack("!H", 1000)) + text("after"),
        ([*messages("before"), Incoming("close", "", 1000)], None),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_every_cut_of_the_bytes_finds_what_the_protocol_alone_finds(name: str) -> None:
    data, expected = CASES[name]
    whole = assert_same(data, [])
    found, error = whole
    assert error == expected[1]
    if error is None:
        assert found == expected[0]
    step = max(1, len(data) // 300)  # every cut for the small cases
    for cut in range(1, len(data), step):
        assert_same(data, [cut])
    assert_same(data, range(1, len(data)))  # a byte at a time


def test_a_plain_frame_never_reaches_the_protocol() -> None:
    """The point of the bypass: the usual chat frame costs the protocol nothing."""
    engine = WebsocketsEngine(LIMIT)

    def refuse(data: bytes | bytearray) -> None:
        raise AssertionError(f"the protocol was given {data!r}")

    engine._protocol.receive_data = refuse  # type: ignore[method-assign]
    frames = [text('{"type":"message","client_msg_id":"m1","text":"hi"}') for _ in range(3)]
    assert engine.receive(b"".join(frames)) == messages(
        *['{"type":"message","client_msg_id":"m1","text":"hi"}'] * 3
    )


def test_the_protocol_takes_over_mid_read_and_hands_back_at_a_frame_boundary() -> None:
    engine = WebsocketsEngine(LIMIT)
    data = text("one") + frame(0x9, b"ping") + text("two", fin=False)
    assert engine._boundary is None  # nothing given to the protocol yet: nothing kept
    assert engine.receive(data) == [*messages("one"), Incoming("ping", b"ping")]
    assert engine._boundary is not None  # a message half-assembled: all to the protocol
    assert engine.receive(frame(0x0, b"!")) == messages("two!")
    assert engine._boundary is None  # back at a boundary: plain frames bypass again


def test_a_close_ends_the_bypass_for_good() -> None:
    boundary = _FrameBoundary()
    boundary.feed(frame(0x8, struct.pack("!H", 1000)))
    assert boundary.given_up and not boundary.clean


# ---------------------------------------------------------------- any bytes

_FRAMES = st.one_of(
    st.builds(lambda t: text(t), st.text(max_size=40)),
    st.builds(
        lambda t: text(t), st.text(min_size=PLAIN_TEXT_BYTES - 2, max_size=PLAIN_TEXT_BYTES + 2)
    ),
    st.builds(
        frame,
        st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
        st.binary(max_size=140),
        fin=st.booleans(),
        masked=st.sampled_from([True, True, True, False]),
        rsv=st.sampled_from([0, 0, 0, 0, 1, 4]),
        long_length=st.booleans(),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_FRAMES, max_size=8), st.lists(st.integers(min_value=1, max_value=9000), max_size=6)
)
def test_any_frames_in_any_pieces_find_what_the_protocol_alone_finds(
    frames: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(frames)
    assert_same(data, [c for c in cuts if c < len(data)])
