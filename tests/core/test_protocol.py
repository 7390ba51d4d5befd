"""The protocol codec, as pure code."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import ProtocolError
from trio_chat.core import protocol as proto


def code_of(raw: str | bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        proto.parse_client_frame(raw)
    return info.value.code


def test_hello_with_and_without_token() -> None:
    assert proto.parse_client_frame('{"type":"hello","token":null}') == proto.Hello(None, None)
    assert proto.parse_client_frame('{"type":"hello"}') == proto.Hello(None, None)
    hello = proto.parse_client_frame('{"type":"hello","token":"g.a.b","name":"  Ana "}')
    assert hello == proto.Hello("g.a.b", "Ana")


def test_message_is_trimmed_and_keeps_its_id() -> None:
    frame = proto.parse_client_frame(
        json.dumps({"type": "message", "client_msg_id": "a-1_B.2", "text": "  hi\n"})
    )
    assert frame == proto.SendMessage("a-1_B.2", "hi", None)


def test_unknown_fields_are_ignored() -> None:
    frame = proto.parse_client_frame('{"type":"ping","id":[1,{"x":2}],"extra":true}')
    assert frame == proto.Ping([1, {"x": 2}])


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{}", "bad_json"),
        ("{", "bad_json"),
        ('{"type":"ping","id":Infinity}', "bad_json"),
        ('{"type":"ping","id":-Infinity}', "bad_json"),
        ('{"type":"ping","id":1e999}', "bad_json"),
        ("[" * 5000 + "]" * 5000, "bad_json"),
        ('{"type":"ping","id":' + "1" * 5000 + "}", "bad_json"),
        ("null", "bad_message"),
        ('"hello"', "bad_message"),
        ('{"type":7}', "bad_message"),
        ('{"type":"read","seq":true}', "bad_message"),
        ('{"type":"read","seq":1.5}', "bad_message"),
        ('{"type":"history","after_seq":0,"limit":0}', "bad_message"),
        ('{"type":"claim"}', "bad_message"),
        ('{"type":"claim","conversation_id":"a/b"}', "bad_message"),
        ('{"type":"message","client_msg_id":"","text":"x"}', "bad_message"),
        ('{"type":"message","client_msg_id":"é","text":"x"}', "bad_message"),
        ('{"type":"message","client_msg_id":5,"text":"x"}', "bad_message"),
        ('{"type":"message","client_msg_id":"a","text":["x"]}', "bad_message"),
        ('{"type":"Hello"}', "unknown_type"),
    ],
)
def test_bad_frames_map_to_the_contract_codes(raw: str | bytes, code: str) -> None:
    assert code_of(raw) == code


def test_size_limits_are_too_large_and_inclusive() -> None:
    ok = {"type": "message", "client_msg_id": "a" * 64, "text": "x" * 4000}
    assert isinstance(proto.parse_client_frame(json.dumps(ok)), proto.SendMessage)
    assert code_of(json.dumps({**ok, "client_msg_id": "a" * 65})) == "too_large"
    assert code_of(json.dumps({**ok, "text": "x" * 4001})) == "too_large"
    # Trimming happens before counting.
    assert isinstance(
        proto.parse_client_frame(json.dumps({**ok, "text": " " + "x" * 4000 + " "})),
        proto.SendMessage,
    )


def test_ref_names_the_message_or_the_request_type() -> None:
    with pytest.raises(ProtocolError) as info:
        proto.parse_client_frame('{"type":"message","client_msg_id":"m7","text":""}')
    assert info.value.ref == "m7"
    with pytest.raises(ProtocolError) as info:
        proto.parse_client_frame('{"type":"typing"}')
    assert info.value.ref == "typing"
    with pytest.raises(ProtocolError) as info:
        proto.parse_client_frame("nope")
    assert info.value.ref is None


def test_history_limit_is_clamped_not_refused() -> None:
    frame = proto.parse_client_frame('{"type":"history","after_seq":3,"limit":100000}')
    assert frame == proto.HistoryRequest(3, 500, None)
    assert proto.parse_client_frame('{"type":"history","after_seq":0}') == proto.HistoryRequest(
        0, 200, None
    )


def test_timestamps_are_iso_utc_milliseconds() -> None:
    assert proto.format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert proto.format_ts(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", proto.format_ts())
    # The formatted second is reused only for the same second, backwards too.
    assert proto.format_ts(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"
    assert proto.format_ts(1_700_000_001.0) == "2023-11-14T22:13:21.000Z"
    assert proto.format_ts(1_699_999_999.5) == "2023-11-14T22:13:19.500Z"


def test_history_frame_stays_under_one_mebibyte() -> None:
    big = [proto.Message(i, "c", "guest", "g", "€" * 4000, "t", None) for i in range(1, 201)]
    frame = proto.history_frame("c", big, last_seq=200)
    assert len(frame.encode()) < proto.MAX_SERVER_FRAME_BYTES
    decoded = json.loads(frame)
    assert decoded["has_more"] is True
    kept = [m["seq"] for m in decoded["messages"]]
    assert kept == list(range(1, len(kept) + 1)) and 50 < len(kept) < 200


def test_message_round_trips_through_the_wire() -> None:
    message = proto.Message(3, "c_1", "staff", "Anna", "hello", "2024-01-01T00:00:00.000Z", "s1")
    assert proto.Message.from_wire(json.loads(proto.message_frame(message))) == message
    with pytest.raises(ProtocolError):
        proto.Message.from_wire({"seq": True})


_OPTIONAL_TEXT = st.none() | st.text(max_size=40)


@given(
    st.builds(
        proto.Message,
        seq=st.integers(min_value=0, max_value=2**63),
        conversation_id=st.text(max_size=40),
        sender=st.sampled_from(["guest", "ai", "staff", "system"]) | st.text(max_size=8),
        author=_OPTIONAL_TEXT,
        text=st.text(max_size=200),
        ts=st.text(max_size=30),
        client_msg_id=_OPTIONAL_TEXT,
    )
)
def test_the_chat_frames_written_field_by_field_are_the_encoders_bytes(
    message: proto.Message,
) -> None:
    """Every character the encoder escapes (quotes, controls, lone surrogates) is
    escaped alike, and the keys keep their order."""
    assert proto.message_frame(message) == proto.encode({"type": "message", **message.to_wire()})
    assert proto.ack_frame(message) == proto.encode(
        {
            "type": "ack",
            "client_msg_id": message.client_msg_id,
            "seq": message.seq,
            "conversation_id": message.conversation_id,
            "ts": message.ts,
        }
    )


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_any_input_parses_or_raises_protocol_error(raw: str | bytes) -> None:
    try:
        proto.parse_client_frame(raw)
    except ProtocolError as exc:
        assert exc.code in {"bad_json", "bad_message", "unknown_type", "too_large"}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.sampled_from(sorted(proto.CLIENT_TYPES)),
    st.dictionaries(
        st.sampled_from(
            [
                "token",
                "name",
                "client_msg_id",
                "text",
                "after_seq",
                "limit",
                "active",
                "seq",
                "id",
                "conversation_id",
                "reason",
            ]
        ),
        json_values,
    ),
)
def test_any_fields_parse_or_raise_protocol_error(
    frame_type: str, fields: dict[str, object]
) -> None:
    try:
        proto.parse_client_frame(json.dumps({**fields, "type": frame_type}))
    except ProtocolError as exc:
        assert exc.code in {"bad_message", "too_large"}
