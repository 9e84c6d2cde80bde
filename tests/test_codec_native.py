"""The native msgpack decoding of length-prefixed frames
(native/src/pylink.rs) against msgpack itself: for any stream of frames
(valid values of every type, and every kind of frame msgpack refuses or
the native core leaves to it), cut anywhere, the decoder gives the same
objects, of the same types, and the same errors, with the native scan as
without it."""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol import codec
from gateway.protocol.codec import LengthPrefixedDecoder, length_prefix
from gateway.protocol.codes import ProtocolError

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(width=32)  # packable as float32 and float64
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), kids, max_size=6)
    ),
    max_leaves=25,
)

# payloads msgpack refuses or that the native core leaves to it
_ODD = [
    b"",  # empty
    b"\xc1",  # never used
    b"\xd4\x01\x02",  # fixext 1
    b"\xc7\x01\x05x",  # ext 8
    msgpack.packb(msgpack.Timestamp(1, 2)),  # the timestamp extension
    b"\x81\x01\x02",  # {1: 2}: int key
    b"\x81\xc0\x01",  # nil key
    b"\x81\x91\x01\x02",  # array key
    b"\xa2\xff\xfe",  # invalid UTF-8
    b"\xa3\xed\xa0\x80",  # an encoded surrogate
    b"\x81\xa2\xc3\x28\x01",  # invalid UTF-8 in a key
    msgpack.packb(list(range(257))),  # over max_array_len
    msgpack.packb(list(range(256))),  # at it
    msgpack.packb({str(i): i for i in range(257)}),  # over max_map_len
    b"\x91" * 40 + b"\xc0",  # deeper than the native core goes
    b"\x91" * 31 + b"\xc0",  # as deep as it goes
    b"\x81\xa1t" * 40 + b"\xc0",  # deep maps
    msgpack.packb({"t": "x"}) + b"\x00",  # trailing byte
    msgpack.packb({"t": "x"})[:-1],  # truncated
    b"\x92\x01",  # array short of an item
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion
    b"\xdb\x00\x00\x00\x09abc",  # str32 longer than the frame
    b"\xca\x7f\xc0\x00\x00",  # float32 NaN
    b"\xcb\x80\x00\x00\x00\x00\x00\x00\x00",  # -0.0
]


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(_ODD))
    v = draw(_values)
    data: bytes = msgpack.packb(v, use_bin_type=True, use_single_float=draw(st.booleans()))
    if kind == 1 and data:  # one byte changed
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


def _exact(obj: Any) -> str:
    """A rendering that tells 1, 1.0 and True, str and bytes, 0.0 and -0.0
    apart, with maps in their order."""
    return repr(obj)


def _run(native: bool, check: Any, stream: bytes, cuts: list[int], limit: int) -> list[str]:
    d = LengthPrefixedDecoder(limit, check, native=native)
    seen: list[str] = []
    prev = 0
    try:
        for c in [*sorted(cuts), len(stream)]:
            seen += [_exact(f) for f in d.feed(stream[prev:c])]
            seen.append(f"buffered {d.buffered()}")
            prev = c
    except ProtocolError as e:
        seen.append(f"error {e.code} {e}")
    return seen


def _identity(obj: Any) -> Any:
    return obj


def _boxed(obj: Any) -> dict[str, Any]:
    """Any decoded object as a frame (the decoder's frames are maps; the
    compiled build checks that)."""
    return {"v": obj}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payloads=st.lists(_payload(), max_size=8),
    cut_at=st.lists(st.floats(0, 1), max_size=5),
    limit=st.sampled_from([20, 100, 1 << 16]),
    shape_check=st.booleans(),
)
@example(payloads=[b"\xc0", b"\xc1", b"\xc0"], cut_at=[], limit=100, shape_check=False)
@example(  # the frame after a bad one is never reached
    payloads=[msgpack.packb({"t": "a"}), b"\x81\x01\x02", msgpack.packb({"t": "b"})],
    cut_at=[],
    limit=100,
    shape_check=True,
)
def test_native_and_msgpack_decode_alike(
    payloads: list[bytes], cut_at: list[float], limit: int, shape_check: bool
) -> None:
    stream = b"".join(map(length_prefix, payloads))
    cuts = [int(f * len(stream)) for f in cut_at]
    check = codec._check_frame if shape_check else _boxed
    fast = _run(True, check, stream, cuts, limit)
    slow = _run(False, check, stream, cuts, limit)
    assert fast == slow


def test_the_native_scan_is_on_by_default_and_decodes() -> None:
    wanted = os.environ.get("GATEWAY_MSGPACK_FASTPATH", "1") != "0"
    assert codec.FASTPATH is wanted
    d = LengthPrefixedDecoder(1000, _identity, native=True)
    frames = [{"t": "msg", "n": i, "body": "é" * i, "b": bytes(i), "f": i / 3} for i in range(50)]
    stream = b"".join(length_prefix(msgpack.packb(f)) for f in frames)
    assert d.feed(stream[:-1]) == frames[:-1]
    assert d.buffered() == len(length_prefix(msgpack.packb(frames[-1]))) - 1
    assert d.feed(stream[-1:]) == frames[-1:]
    # map keys come out interned, as msgpack's are (short ones come from
    # the native key cache, long ones are decoded each time)
    for name in ("sid", "a-long-key-" * 3):
        key = next(iter(d.feed(length_prefix(msgpack.packb({name: 1})))[0]))
        assert key == name and sys.intern(key) is key


def test_a_frame_the_native_core_leaves_is_decoded_in_python_in_order() -> None:
    deep = b"\x91" * 40 + b"\xc0"  # past the native depth limit, fine for msgpack
    stream = b"".join(
        length_prefix(p) for p in (msgpack.packb(1), deep, msgpack.packb(2), struct.pack(">B", 3))
    )
    got = [f["v"] for f in LengthPrefixedDecoder(1000, _boxed, native=True).feed(stream)]
    assert got[0] == 1 and got[2] == 2 and got[3] == 3
    inner = got[1]
    for _ in range(40):
        inner = inner[0]
    assert inner is None
