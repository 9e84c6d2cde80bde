"""The native scan of the WebSocket reader (native/src/pyws.rs) against
the Python parser: the same frames, violations and buffer accounting on
any byte stream cut anywhere, read by a consumer that pauses; the frames it
decodes from binary messages are what the codec decodes, and the ones it
leaves are the ones the codec refuses or it cannot take; and the scan is
really used, in bounded batches."""

from __future__ import annotations

import os
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol import wsframe
from gateway.protocol.codec import decode_frame
from gateway.protocol.codes import ProtocolError
from gateway.protocol.wsframe import FrameReader, WsViolation
from tests.test_wsframe import client_frame, drain


def test_the_native_scan_is_used_and_bounded() -> None:
    # on by default (CPython, the native library built)
    wanted = os.environ.get("GATEWAY_WS_FASTPATH", "1") != "0"
    assert wsframe.FASTPATH is wanted
    frames = [client_frame(wsframe.OP_BINARY, bytes([i]) * (i % 200)) for i in range(200)]
    r = FrameReader(1000, native=True)
    r.feed(b"".join(frames))
    assert r.next() == (wsframe.OP_BINARY, b"")
    # the native scan parsed a bounded batch ahead
    assert len(r.ready) == wsframe.SCAN_LIMIT - 1
    assert r.buffered == sum(map(len, frames[1:]))
    rest = drain(r)
    assert rest == [(wsframe.OP_BINARY, bytes([i]) * (i % 200)) for i in range(1, 200)]
    assert r.buffered == 0 and r.buf == b""


def test_bytes_fed_while_parsed_frames_wait_are_kept_in_order() -> None:
    a, b, c = (client_frame(wsframe.OP_TEXT, t.encode()) for t in ("one", "two", "three"))
    r = FrameReader(100)
    r.feed(a + b + c[:3])
    assert r.next() == (wsframe.OP_TEXT, "one")
    r.feed(c[3:])  # the reader's consumer paused after one frame; more arrived
    assert r.buffered == len(b) + len(c)
    assert drain(r) == [(wsframe.OP_TEXT, "two"), (wsframe.OP_TEXT, "three")]
    assert r.buffered == 0


def test_the_native_scan_leaves_a_buffer_that_is_not_bytes_to_python() -> None:
    # FrameReader only holds bytes (the compiled build enforces it); the
    # native side still checks what it is given
    from gateway._native import lib

    for buf in (bytearray(client_frame(wsframe.OP_BINARY, b"ab")), memoryview(b"ab"), "ab"):
        out: list[Any] = []
        rc = lib.gw_ws_scan(id(buf), 0, 100, wsframe.SCAN_LIMIT, id(out), 0, 16, 8)
        assert rc == 1 and out == []  # GW_WS_SLOW: the Python parser's turn
    r = FrameReader(100)
    r.feed(client_frame(wsframe.OP_BINARY, b"ab"))
    assert drain(r) == [(wsframe.OP_BINARY, b"ab")]


_OPS = [0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]


@st.composite
def _wire(draw: st.DrawFn, limit: int) -> bytes:
    """A client byte stream: mostly valid frames, some of every kind of
    violation, text that is and is not UTF-8, all three length forms,
    lengths at and just over ``limit``."""
    sizes = [125, 126, 127, 300, 65536, limit - 1, limit, limit + 1]
    out = b""
    for _ in range(draw(st.integers(0, 10))):
        op = draw(st.sampled_from(_OPS))
        fin = draw(st.booleans() | st.just(True))
        rsv = draw(st.sampled_from([0, 0, 0, 0, 0, 0x10, 0x40]))
        payload = draw(
            st.binary(max_size=40)
            | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
            | st.sampled_from(sizes).map(lambda n: b"x" * n)
        )
        if draw(st.integers(0, 30)) == 0:  # unmasked
            out += bytes(((0x80 if fin else 0) | rsv | op, min(len(payload), 125)))
            out += payload[:125]
        else:
            out += client_frame(op, payload, fin=fin, rsv=rsv)
    return out


def _run(r: FrameReader, wire: bytes, cuts: list[int], takes: list[int]) -> list[object]:
    """Feeds ``wire`` in pieces, taking at most ``takes[i]`` frames after
    each (a consumer that pauses), then everything; records frames,
    ``buffered`` after each step, and the violation that ended it."""
    seen: list[object] = []
    pos = 0
    i = 0
    try:
        while pos < len(wire):
            step = cuts[i % len(cuts)] if cuts else len(wire)
            r.feed(wire[pos : pos + step])
            pos += step
            for _ in range(takes[i % len(takes)] if takes else 1 << 30):
                got = r.next()
                if got is None:
                    break
                seen.append(got)
            seen.append(("buffered", r.buffered))
            i += 1
        seen += drain(r)
        seen.append(("buffered", r.buffered))
    except WsViolation as e:
        seen.append(("violation", e.code, e.reason))
    return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from([50, 300, 70000]).flatmap(lambda n: st.tuples(st.just(n), _wire(n))),
    cuts=st.lists(st.integers(1, 700), max_size=6),
    takes=st.lists(st.integers(0, 3), max_size=4),
)
@example(  # valid frames, then invalid UTF-8: the good ones first, then 1007
    case=(300, client_frame(1, b"ok") + client_frame(2, b"b") + client_frame(1, b"\xff")),
    cuts=[],
    takes=[],
)
@example(case=(300, client_frame(2, b"x" * 300) + client_frame(2, b"x" * 301)), cuts=[], takes=[])
@example(case=(50, client_frame(2, b"x" * 50) + client_frame(1, b"x" * 51)), cuts=[], takes=[])
def test_native_and_python_readers_agree(
    case: tuple[int, bytes], cuts: list[int], takes: list[int]
) -> None:
    limit, wire = case
    fast = _run(FrameReader(limit, native=True), wire, cuts, takes)
    slow = _run(FrameReader(limit, native=False), wire, cuts, takes)
    assert fast == slow


# msgpack payloads for frame decoding: what the codec accepts and each way
# it refuses one
def _nest(levels: int) -> dict[str, Any]:
    inner: Any = []
    for _ in range(levels - 2):
        inner = [inner]
    return {"t": "x", "v": inner}


_FRAME_PAYLOADS = [
    msgpack.packb({"t": "msg", "id": "c-1", "body": {"text": "héllo", "n": [1, 2.5, None]}}),
    msgpack.packb({"t": "ack", "n": 3}),
    msgpack.packb([1, 2]),  # not a map
    msgpack.packb({"x": 1}),  # no t
    msgpack.packb({"t": 1}),  # t not a string
    b"\x82\xa1t\xa1a\xd9\x01t\x01",  # t a string, then again (as str8) an int
    b"\x82\xd9\x01t\x01\xa1t\xa1a",  # the other way round: a string wins
    msgpack.packb({"t": "x", "m": {b"k": 1}}, use_bin_type=True),  # bytes key nested
    msgpack.packb({b"t": "x"}, use_bin_type=True),  # bytes key at the top
    msgpack.packb(_nest(8)),  # as deep as allowed
    msgpack.packb(_nest(9)),  # one level too deep
    msgpack.packb({"t": "x", "l": list(range(254))}),  # 256 entries in all
    msgpack.packb({"t": "x", "l": list(range(255))}),  # 257
    msgpack.packb({"t": "x", **{f"k{i}": [i] for i in range(90)}}),  # 181 entries
    msgpack.packb({"t": "x", **{f"k{i}": [i, i] for i in range(90)}}),  # 271
    msgpack.packb({"t": "x"}) + b"\xc0",  # trailing bytes
    b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8
    msgpack.packb({"t": "x", "ts": msgpack.Timestamp(1, 0)}),  # an extension
]

_frame_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _frame_wire(draw: st.DrawFn, limit: int) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            payload = draw(st.sampled_from(_FRAME_PAYLOADS))
        else:
            value = draw(st.dictionaries(st.text(max_size=3), _frame_values, max_size=5))
            if kind == 1:
                value["t"] = draw(st.text(max_size=5))
            payload = msgpack.packb(value)
        if draw(st.integers(0, 5)) == 0 and len(payload) > 1:  # in two fragments
            cut = draw(st.integers(1, len(payload) - 1))
            out += client_frame(wsframe.OP_BINARY, payload[:cut], fin=False)
            out += client_frame(0, payload[cut:])
        else:
            out += client_frame(wsframe.OP_BINARY, payload)
    return out


def _decoded(items: list[object], limit: int) -> list[object]:
    """Each message as the connection ends up with it: a frame (decoded by
    the scan, or by the codec from bytes) or the codec's error."""
    out: list[object] = []
    for item in items:
        if isinstance(item, tuple) and item and item[0] == wsframe.OP_FRAME:
            out.append(("frame", repr(item[1])))
        elif isinstance(item, tuple) and item and item[0] == wsframe.OP_BINARY:
            try:
                out.append(("frame", repr(decode_frame(item[1], limit))))
            except ProtocolError as e:
                out.append(("error", e.code, str(e)))
        else:
            out.append(item)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from([40, 5000]).flatmap(lambda n: st.tuples(st.just(n), _frame_wire(n))),
    cuts=st.lists(st.integers(1, 400), max_size=4),
)
def test_frames_decoded_by_the_scan_are_what_the_codec_decodes(
    case: tuple[int, bytes], cuts: list[int]
) -> None:
    limit, wire = case
    fast = _run(FrameReader(limit, native=True, frame_max=limit), wire, cuts, [])
    slow = _run(FrameReader(limit, native=False, frame_max=limit), wire, cuts, [])
    assert _decoded(fast, limit) == _decoded(slow, limit)


def test_the_scan_decodes_valid_frames_and_leaves_the_rest() -> None:
    good = {"t": "msg", "id": "c-1", "body": {"text": "hi"}}
    wire = b"".join(
        client_frame(wsframe.OP_BINARY, p)
        for p in (msgpack.packb(good), msgpack.packb({"t": 1}), msgpack.packb(_nest(9)))
    )
    r = FrameReader(1000, native=True, frame_max=1000)
    r.feed(wire)
    got = drain(r)
    assert got[0] == (wsframe.OP_FRAME, good)
    assert [op for op, _ in got[1:]] == [wsframe.OP_BINARY, wsframe.OP_BINARY]
    # frame decoding is off by default, and never applies to text
    r = FrameReader(1000, native=True)
    r.feed(client_frame(wsframe.OP_BINARY, msgpack.packb(good)))
    assert r.next() == (wsframe.OP_BINARY, msgpack.packb(good))
    r = FrameReader(1000, native=True, frame_max=1000)
    r.feed(client_frame(wsframe.OP_TEXT, b'{"t":"x"}'))
    assert r.next() == (wsframe.OP_TEXT, '{"t":"x"}')
