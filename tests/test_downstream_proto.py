"""The downstream link's frames, sans-IO: the gateway's ``msg`` frames built
from a cached head, and the checks each side's link decoder runs."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.downstream.proto import (
    MAX_LINK_FRAME,
    check_from_downstream,
    check_from_gateway,
    encode,
    encode_acks,
    encode_msg,
    msg_head,
)
from gateway.protocol.codec import LengthPrefixedDecoder
from gateway.protocol.codes import Code, ProtocolError

_ids = st.one_of(st.text(max_size=40), st.integers(0, 2**63), st.none())
_bodies = st.one_of(st.text(max_size=300), st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=20), st.sampled_from(["bot", "human"]),
       st.integers(0, 2**63), _ids, _bodies)  # fmt: skip
def test_msg_from_a_cached_head_is_the_whole_frame(
    sid: str, group: str, stage: str, n: int, msg_id: Any, body: Any
) -> None:
    whole = {"t": "msg", "sid": sid, "n": n, "id": msg_id, "body": body,
             "group": group, "stage": stage}  # fmt: skip
    fast = encode_msg(msg_head(sid, group, stage), n, msg_id, body)
    assert len(fast) == len(encode(whole))
    (got,) = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_gateway).feed(fast)
    assert got == whole


def _feed_downstream(frame: Any) -> list[dict[str, Any]]:
    payload = msgpack.packb(frame, use_bin_type=True)
    data = len(payload).to_bytes(4, "big") + payload
    return LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(data)


def test_downstream_frames_the_gateway_reads_pass() -> None:
    frames = [
        {"t": "ack", "sid": "s1", "n": 3},
        {"t": "nack", "sid": "s1", "n": 4, "code": 503},
        {"t": "deliver", "sid": "s1", "body": "hi", "from": {"kind": "agent", "name": "a1"}},
        {"t": "deliver", "sid": "s1", "body": b"\x00\xff"},
        {"t": "assign", "sid": "s1", "agent": "a1", "group": "billing"},
        {"t": "handover", "sid": "s1", "extra": [1, [2, {"x": 3}]]},  # extra keys ignored
        {"t": "acks", "sids": {"s1": [3, 4], "s2": [1]}},  # no top-level sid
    ]
    for f in frames:
        assert _feed_downstream(f) == [f]


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        ([1, 2], Code.BAD_FRAME, "not a map"),
        ({"sid": "s1", "n": 1}, Code.BAD_FRAME, "non-string t"),
        ({"t": 7, "sid": "s1"}, Code.BAD_FRAME, "non-string t"),
        ({"t": "ack", "n": 1}, Code.BAD_FRAME, "ack.sid"),
        ({"t": "ack", "sid": "s" * 129, "n": 1}, Code.BAD_FRAME, "ack.sid"),
        ({"t": "ack", "sid": "s1", "n": -1}, Code.BAD_FRAME, "ack.n"),
        ({"t": "ack", "sid": "s1", "n": "1"}, Code.BAD_FRAME, "ack.n"),
        ({"t": "nack", "sid": "s1", "n": 1, "code": "x"}, Code.BAD_FRAME, "nack.code"),
        ({"t": "deliver", "sid": "s1", "body": 5}, Code.BAD_FRAME, "deliver.body"),
        (
            {"t": "deliver", "sid": "s1", "body": "x", "from": {"kind": 1}},
            Code.BAD_FRAME,
            "deliver.from",
        ),
        (
            {"t": "deliver", "sid": "s1", "body": "x", "from": {b"kind": "bot"}},
            Code.BAD_FRAME,
            "deliver.from",
        ),
        (
            {"t": "deliver", "sid": "s1", "body": "x", "from": "bot"},
            Code.BAD_FRAME,
            "deliver.from",
        ),
        ({"t": "assign", "sid": "s1"}, Code.BAD_FRAME, "assign.agent"),
        ({"t": "wat", "sid": "s1"}, Code.UNKNOWN_TYPE, "unknown downstream frame"),
        ({"t": "acks"}, Code.BAD_FRAME, "acks.sids must be a map"),
        ({"t": "acks", "sids": [["s1", 1]]}, Code.BAD_FRAME, "acks.sids must be a map"),
        ({"t": "acks", "sids": {"s" * 129: [1]}}, Code.BAD_FRAME, "acks.sids keys"),
        ({"t": "acks", "sids": {"s1": 1}}, Code.BAD_FRAME, "non-empty lists"),
        ({"t": "acks", "sids": {"s1": []}}, Code.BAD_FRAME, "non-empty lists"),
        ({"t": "acks", "sids": {"s1": [1, -1]}}, Code.BAD_FRAME, "ints >= 0"),
        ({"t": "acks", "sids": {"s1": [1, "2"]}}, Code.BAD_FRAME, "ints >= 0"),
        ({"t": "acks", "sids": {"s1": list(range(300))}}, Code.BAD_FRAME, "bad msgpack"),
    ],
)
def test_bad_downstream_frames_are_refused_with_the_reason(
    frame: Any, code: Code, words: str
) -> None:
    with pytest.raises(ProtocolError) as e:
        _feed_downstream(frame)
    assert e.value.code == code
    assert words in str(e.value)


def test_acks_frame_encodes_what_the_gateway_reads() -> None:
    acks = {"sid-a": [1, 2, 3], "sid-b": [7]}
    (got,) = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(encode_acks(acks))
    assert got == {"t": "acks", "sids": acks}


def test_gateway_frames_checked_by_desk_sim() -> None:
    good = {"t": "open", "sid": "s1", "tenant": "t", "visitor": "v", "group": "g",
            "stage": "bot", "agent": None, "tags": {"page": "/pricing"}}  # fmt: skip
    assert check_from_gateway(good) is good
    assert check_from_gateway({"t": "close", "sid": "s1"})["t"] == "close"
    for bad in (
        {**good, "tags": [1]},
        {**good, "tags": {1: "x"}},
        {**good, "group": 3},
        {"t": "msg", "sid": "s1", "n": 1, "body": "x"},  # no group
        {"t": "msg", "sid": "s1", "n": 1, "body": "x", "group": "g"} | {"n": -2},
        "open",
    ):
        with pytest.raises(ProtocolError):
            check_from_gateway(bad)
