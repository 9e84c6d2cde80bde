"""The native scan of the WebSocket reader (native/src/pyws.rs) against
the Python parser: the same frames, violations and buffer accounting on
any byte stream cut anywhere, read by a consumer that pauses; and the scan
is really used, in bounded batches."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol import wsframe
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


def test_a_buffer_that_is_not_bytes_is_parsed_in_python() -> None:
    r = FrameReader(100)
    r.feed(bytearray(client_frame(wsframe.OP_BINARY, b"ab")))  # type: ignore[arg-type]
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
