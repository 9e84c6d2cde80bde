from __future__ import annotations

import base64
import json
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import codec
from gateway.protocol.codec import (
    MAX_DEPTH,
    MAX_ENTRIES,
    Encoding,
    LengthPrefixedDecoder,
    decode_frame,
    encode_ack,
    encode_frame,
    length_prefix,
)
from gateway.protocol.codes import Code, ProtocolError


@pytest.fixture(autouse=True, params=["native", "python"])
def decoder_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Length-prefixed decoders built without ``native=`` decode their
    msgpack natively or not (tests/test_codec_native.py compares them)."""
    monkeypatch.setattr(codec, "FASTPATH", request.param == "native")
    return str(request.param)


MAX = 65536


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def code_of(data: bytes | str, max_size: int = MAX) -> Code:
    with pytest.raises(ProtocolError) as ei:
        decode_frame(data, max_size)
    return ei.value.code


def nested(depth: int) -> dict[str, Any]:
    """A frame whose deepest container is at ``depth`` (the frame is 1)."""
    inner: Any = []
    for _ in range(depth - 2):
        inner = [inner]
    return {"t": "x", "a": inner}


def both(frame: Any) -> list[bytes | str]:
    return [pack(frame), json.dumps(frame)]


# --- round trips -------------------------------------------------------------


def test_msgpack_round_trip_keeps_str_and_bin() -> None:
    f = {"t": "msg", "id": "m1", "body": b"\x00\xffbin", "n": 2**63 - 1, "x": None, "ok": True}
    data = encode_frame(f, Encoding.MSGPACK)
    assert isinstance(data, bytes)
    assert decode_frame(data, MAX) == f
    g = {"t": "msg", "id": 7, "body": "héllo"}
    assert decode_frame(encode_frame(g, Encoding.MSGPACK), MAX) == g


def test_json_round_trip_is_compact_and_keeps_unicode() -> None:
    f = {"t": "deliver", "seq": 3, "body": "héllo 😀", "from": {"kind": "bot", "name": "b"}}
    text = encode_frame(f, Encoding.JSON)
    assert isinstance(text, str)
    assert " " not in text.replace("héllo 😀", "")
    assert "😀" in text  # not \u-escaped
    assert decode_frame(text, MAX) == f


def test_json_encodes_utf8_bytes_as_string_and_other_bytes_as_b64_marker() -> None:
    text = encode_frame({"t": "deliver", "body": "ok é".encode()}, Encoding.JSON)
    assert json.loads(text)["body"] == "ok é"
    raw = b"\xff\x00\xfe"
    text = encode_frame({"t": "deliver", "body": raw}, Encoding.JSON)
    assert json.loads(text)["body"] == {"$b64": base64.b64encode(raw).decode()}
    # encoded surrogates are not valid UTF-8 either
    assert "$b64" in str(encode_frame({"t": "x", "b": b"\xed\xa0\x80"}, Encoding.JSON))


def test_encode_errors_and_packer_recovers() -> None:
    with pytest.raises(TypeError):
        encode_frame({"t": "x", "o": object()}, Encoding.MSGPACK)
    # nothing of the failed frame leaks into the next one
    assert encode_frame({"t": "y"}, Encoding.MSGPACK) == pack({"t": "y"})
    with pytest.raises(ValueError):
        encode_frame({"t": "x", "f": float("nan")}, Encoding.JSON)
    with pytest.raises(TypeError):
        encode_frame({"t": "x", "o": object()}, Encoding.JSON)


# --- size --------------------------------------------------------------------


def test_size_limit_is_inclusive_in_bytes() -> None:
    f = {"t": "msg", "body": "a" * 100}
    for data in both(f):
        assert decode_frame(data, len(data)) == f
        assert code_of(data, len(data) - 1) is Code.TOO_BIG


def test_json_size_counts_utf8_bytes_not_code_points() -> None:
    text = json.dumps({"t": "msg", "body": "é" * 50}, ensure_ascii=False)
    nbytes = len(text.encode())
    assert len(text) < nbytes
    assert decode_frame(text, nbytes)["body"] == "é" * 50
    assert code_of(text, len(text)) is Code.TOO_BIG


# --- shape -------------------------------------------------------------------


@pytest.mark.parametrize("top", [[1, 2], 5, "t", None, True, 1.5])
def test_top_level_must_be_a_map(top: Any) -> None:
    for data in both(top):
        assert code_of(data) is Code.BAD_FRAME


@pytest.mark.parametrize("frame", [{"id": 1}, {"t": 1}, {"t": None}, {"t": b"msg"}, {"t": ["x"]}])
def test_t_must_be_a_string(frame: Any) -> None:
    assert code_of(pack(frame)) is Code.BAD_FRAME
    if not any(isinstance(v, bytes) for v in frame.values()):
        assert code_of(json.dumps(frame)) is Code.BAD_FRAME


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "x", 1: 2},
        {"t": "x", b"k": 2},
        {"t": "x", "m": {b"k": 1}},
        {"t": "x", "a": [{"ok": 1}, {b"k": 1}]},
        {"t": "x", "m": {"n": {2: 1}}},
    ],
)
def test_map_keys_must_be_strings_at_every_level(frame: dict[Any, Any]) -> None:
    data = msgpack.packb(frame, use_bin_type=True, strict_types=False)
    assert code_of(data) is Code.BAD_FRAME


def test_unknown_and_extra_fields_are_kept() -> None:
    f = {"t": "whatever", "zzz": [1, {"a": "b"}]}
    assert decode_frame(pack(f), MAX) == f


# --- nesting and entry counts ------------------------------------------------


def test_depth_limit_exact_both_encodings() -> None:
    assert MAX_DEPTH == 8
    for data in both(nested(MAX_DEPTH)):
        decode_frame(data, MAX)
    for data in both(nested(MAX_DEPTH + 1)):
        assert code_of(data) is Code.BAD_FRAME
    deep_map: Any = {"t": "x"}
    cur = deep_map
    for _ in range(MAX_DEPTH):  # 9 levels of maps
        cur["m"] = {}
        cur = cur["m"]
    for data in both(deep_map):
        assert code_of(data) is Code.BAD_FRAME


def test_very_deep_input_is_bad_frame_not_a_crash() -> None:
    deep_json = '{"t":"x","a":' + "[" * 100_000 + "]" * 100_000 + "}"
    assert code_of(deep_json, 10**6) is Code.BAD_FRAME
    deep_msgpack = b"\x82\xa1t\xa1x\xa1a" + b"\x91" * 100_000 + b"\xc0"
    assert code_of(deep_msgpack, 10**6) is Code.BAD_FRAME


def test_total_entry_budget_counts_every_level() -> None:
    assert MAX_ENTRIES == 256
    # 3 top-level entries + 2 * 126 items + 1 nested map entry = 256
    ok = {"t": "x", "a": list(range(126)), "b": [*range(125), {"k": 1}]}
    for data in both(ok):
        assert decode_frame(data, MAX) == ok
    over = {"t": "x", "a": list(range(126)), "b": [*range(125), {"k": 1, "l": 2}]}
    for data in both(over):
        assert code_of(data) is Code.BAD_FRAME


def test_too_many_top_level_or_container_entries() -> None:
    big_top = {"t": "x", **{f"k{i}": i for i in range(MAX_ENTRIES)}}
    for data in both(big_top):
        assert code_of(data) is Code.BAD_FRAME
    for data in both({"t": "x", "a": list(range(300))}):
        assert code_of(data) is Code.BAD_FRAME


def test_many_small_containers_count_towards_the_budget() -> None:
    f = {"t": "x", "a": [[] for _ in range(200)] + [[1]] * 60}
    for data in both(f):
        assert code_of(data) is Code.BAD_FRAME


# --- malformed msgpack -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used type byte
        b"\x82\xa1t",  # truncated
        pack({"t": "x"}) + b"\x00",  # trailing bytes
        b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8 in a str
        pack({"t": "x", "e": msgpack.ExtType(5, b"ab")}),
        b"\x82\xa1t\xa1x\xa2ts\xd6\xff\x00\x00\x00\x01",  # timestamp ext
    ],
)
def test_malformed_msgpack_is_bad_frame(data: bytes) -> None:
    assert code_of(data) is Code.BAD_FRAME


# --- malformed JSON ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"t":"x"} x',
        '{"t":"x"}{"t":"y"}',
        '{"t":"x","f":NaN}',
        '{"t":"x","f":-Infinity}',
        "{'t':'x'}",
        '{"t":"x","n":' + "9" * 5000 + "}",
    ],
)
def test_malformed_json_is_bad_frame(text: str) -> None:
    assert code_of(text) is Code.BAD_FRAME


def test_json_lone_surrogate_is_invalid_payload_but_pairs_are_fine() -> None:
    assert code_of('{"t":"msg","body":"a\\ud800b"}') is Code.INVALID_PAYLOAD
    assert code_of('{"t":"msg","m":{"\\uDC00":1}}') is Code.INVALID_PAYLOAD
    assert decode_frame('{"t":"msg","body":"\\ud83d\\ude00"}', MAX)["body"] == "😀"
    # an escaped backslash followed by "ud800" is plain text
    assert decode_frame('{"t":"msg","body":"\\\\ud800"}', MAX)["body"] == "\\ud800"


# --- length-prefixed stream --------------------------------------------------


def prefixed(*frames: Any) -> bytes:
    return b"".join(length_prefix(pack(f)) for f in frames)


def test_length_prefix_format() -> None:
    assert length_prefix(b"abc") == b"\x00\x00\x00\x03abc"
    assert length_prefix(b"") == b"\x00\x00\x00\x00"


def test_decoder_splits_whole_and_partial_frames() -> None:
    frames = [{"t": "hello", "v": 1}, {"t": "msg", "id": 1, "body": b"x" * 300}, {"t": "ping"}]
    data = prefixed(*frames)
    d = LengthPrefixedDecoder(MAX)
    assert d.feed(data) == frames
    assert d.buffered() == 0
    got: list[dict[str, Any]] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == frames and d.buffered() == 0
    assert d.feed(data[:10]) == []
    assert d.buffered() == 10
    assert d.feed(data[10:]) == frames


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8), st.data())
def test_decoder_any_split_gives_same_frames(sizes: list[int], data: st.DataObject) -> None:
    frames = [{"t": "msg", "id": i, "body": b"b" * n} for i, n in enumerate(sizes)]
    stream = prefixed(*frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    d = LengthPrefixedDecoder(1024)
    got: list[dict[str, Any]] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += d.feed(stream[prev:c])
        prev = c
    assert got == frames
    assert d.buffered() == 0


def test_decoder_rejects_oversize_length_from_the_header_alone() -> None:
    d = LengthPrefixedDecoder(100)
    ok = prefixed({"t": "a"})
    assert d.feed(ok + struct.pack(">I", 100)[:2]) == [{"t": "a"}]
    with pytest.raises(ProtocolError) as ei:
        d.feed(struct.pack(">I", 101)[2:])
    assert ei.value.code is Code.TOO_BIG
    assert d.buffered() == 0
    with pytest.raises(ProtocolError):  # poisoned
        d.feed(ok)


def test_decoder_frame_of_exactly_max_frame() -> None:
    f = {"t": "m", "b": b""}
    base = len(pack(f))
    f["b"] = b"z" * (100 - base)  # an empty bin8 already has its header
    assert len(pack(f)) == 100
    assert LengthPrefixedDecoder(100).feed(prefixed(f)) == [f]


def test_decoder_never_buffers_more_than_one_frame() -> None:
    d = LengthPrefixedDecoder(1000)
    d.feed(struct.pack(">I", 1000) + b"\x00" * 999)
    assert d.buffered() == 1003
    with pytest.raises(ProtocolError) as ei:
        d.feed(struct.pack(">I", 0xFFFFFFFF))  # completes the first frame: bad msgpack
    assert ei.value.code is Code.BAD_FRAME


@pytest.mark.parametrize(
    "payload", [b"", b"\xc1", pack([1]), pack({"t": 1}), pack({"t": "x"}) + b"\x00"]
)
def test_decoder_bad_payload_is_bad_frame(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as ei:
        LengthPrefixedDecoder(MAX).feed(length_prefix(payload))
    assert ei.value.code is Code.BAD_FRAME


def test_decoder_requires_positive_limit() -> None:
    with pytest.raises(ValueError):
        LengthPrefixedDecoder(0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80), st.integers(-(2**63), 2**64 - 1), st.none(), st.binary(max_size=20)
    ),
    st.integers(0, 2**64 - 1),
    st.one_of(st.booleans(), st.integers(0, 1)),
    st.permutations(["t", "id", "n", "dup"]),
)
def test_ack_frames_encode_to_the_same_bytes_as_the_generic_packer(
    msg_id: Any, n: int, dup: Any, order: list[str]
) -> None:
    """An ack frame encodes to what packing the map gives, whatever the key
    order and value types; ``encode_ack`` (the sinks' ``send_ack``, one per
    visitor message) gives the same bytes for its values."""
    values = {"t": "ack", "id": msg_id, "n": n, "dup": dup}
    frame = {k: values[k] for k in order}
    got = encode_frame(frame, Encoding.MSGPACK)
    assert got == msgpack.packb(frame, use_bin_type=True)
    assert msgpack.unpackb(got, raw=False) == frame
    if type(dup) is bool:  # what the sinks' send_ack sends
        assert encode_ack(msg_id, n, dup) == msgpack.packb(values, use_bin_type=True)
