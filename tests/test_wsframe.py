"""The server-side RFC 6455 frame codec (sans-IO), checked against wsproto's
client side as an independent implementation. Every test runs with the
native scan (native/src/pyws.rs) and with the Python parser alone;
tests/test_wsframe_native.py compares the two."""

from __future__ import annotations

import itertools
import operator
import os
import random
import struct

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import FrameDecoder

from gateway.protocol import wsframe
from gateway.protocol.wsframe import FrameReader, WsViolation


def client_frame(
    op: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bytes | None = None
) -> bytes:
    """A masked client frame built by hand (any header we like)."""
    key = os.urandom(4) if mask is None else mask
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | op
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    masked = bytes(map(operator.xor, payload, itertools.cycle(key)))
    return head + key + masked


@pytest.fixture(autouse=True, params=["native", "python"])
def reader_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Readers built without ``native=`` use the native scan or not."""
    monkeypatch.setattr(wsframe, "FASTPATH", request.param == "native")
    return str(request.param)


def drain(r: FrameReader) -> list[tuple[int, bytes | str]]:
    out = []
    while (got := r.next()) is not None:
        out.append(got)
    return out


def test_wsproto_client_messages_round_trip_byte_by_byte() -> None:
    c = Connection(ConnectionType.CLIENT)
    rng = random.Random(7)
    sent: list[tuple[int, bytes | str]] = []
    wire = b""
    for i in range(60):
        n = rng.choice([0, 1, 125, 126, 127, 65535, 65536, 70000])
        if i % 3 == 0:
            text = "é" * (n // 2)
            wire += c.send(TextMessage(data=text))
            sent.append((wsframe.OP_TEXT, text))
        else:
            data = rng.randbytes(n)
            wire += c.send(BytesMessage(data=data))
            sent.append((wsframe.OP_BINARY, data))
    # all at once
    r = FrameReader(1 << 20)
    r.feed(wire)
    assert drain(r) == sent
    assert r.buffered == 0
    # in random pieces, down to single bytes
    r = FrameReader(1 << 20)
    got: list[tuple[int, bytes | str]] = []
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 7, 100, 4096])
        r.feed(wire[pos : pos + step])
        pos += step
        got += drain(r)
    assert got == sent


def test_fragments_join_and_control_frames_interleave() -> None:
    c = Connection(ConnectionType.CLIENT)
    wire = c.send(TextMessage(data="héllo ", message_finished=False))
    wire += c.send(Ping(payload=b"p1"))
    wire += c.send(TextMessage(data="wörld", message_finished=True))
    wire += c.send(BytesMessage(data=b"\x00\x01", message_finished=False))
    wire += c.send(BytesMessage(data=b"\x02", message_finished=True))
    wire += c.send(CloseConnection(code=4000, reason="bye"))
    r = FrameReader(1024)
    r.feed(wire)
    got = drain(r)
    assert got == [
        (wsframe.OP_PING, b"p1"),
        (wsframe.OP_TEXT, "héllo wörld"),
        (wsframe.OP_BINARY, b"\x00\x01\x02"),
        (wsframe.OP_CLOSE, struct.pack("!H", 4000) + b"bye"),
    ]
    assert wsframe.parse_close(got[-1][1]) == (4000, "bye")  # type: ignore[arg-type]


def test_a_text_character_split_across_fragments_is_valid() -> None:
    raw = "€".encode()
    wire = client_frame(wsframe.OP_TEXT, raw[:1], fin=False) + client_frame(0, raw[1:])
    r = FrameReader(100)
    r.feed(wire)
    assert drain(r) == [(wsframe.OP_TEXT, "€")]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes((0x82, 3)) + b"abc", 1002),  # unmasked
        (client_frame(wsframe.OP_BINARY, b"x", rsv=0x40), 1002),
        (client_frame(0x3, b"x"), 1002),  # reserved data opcode
        (client_frame(0xB, b"x"), 1002),  # reserved control opcode
        (client_frame(wsframe.OP_PING, b"x" * 126), 1002),  # long control frame
        (client_frame(wsframe.OP_PING, b"x", fin=False), 1002),  # fragmented control
        (client_frame(0, b"x"), 1002),  # continuation of nothing
        (
            client_frame(wsframe.OP_TEXT, b"a", fin=False) + client_frame(wsframe.OP_TEXT, b"b"),
            1002,
        ),
        (client_frame(wsframe.OP_TEXT, b"\xff\xfe"), 1007),
        (client_frame(wsframe.OP_TEXT, b"\xe2\x82"), 1007),  # truncated character
        (b"GET / HTTP/1.1\r\n\r\n", 1002),  # garbage: RSV bits
        (struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"mask", 1002),
    ],
)
def test_violations_carry_their_close_code(wire: bytes, code: int) -> None:
    r = FrameReader(1000)
    r.feed(wire)
    with pytest.raises(WsViolation) as e:
        drain(r)
    assert e.value.code == code
    assert r.next() is None  # failed for good
    r.feed(client_frame(wsframe.OP_BINARY, b"ok"))
    assert r.next() is None


def test_oversize_refused_from_the_header_before_the_payload() -> None:
    r = FrameReader(1000)
    # only the header of a 1 MiB frame has arrived
    r.feed(struct.pack("!BBQ", 0x82, 0xFF, 1 << 20) + b"mask")
    with pytest.raises(WsViolation) as e:
        r.next()
    assert e.value.code == 1009
    # the limit covers the fragments of one message together
    r = FrameReader(1000)
    r.feed(client_frame(wsframe.OP_BINARY, b"x" * 600, fin=False))
    assert r.next() is None
    r.feed(client_frame(0, b"x" * 401))
    with pytest.raises(WsViolation) as e:
        r.next()
    assert e.value.code == 1009
    # exactly at the limit is fine
    r = FrameReader(1000)
    r.feed(client_frame(wsframe.OP_BINARY, b"x" * 600, fin=False) + client_frame(0, b"x" * 400))
    assert r.next() == (wsframe.OP_BINARY, b"x" * 1000)


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (b"", (1005, "")),
        (struct.pack("!H", 1000), (1000, "")),
        (struct.pack("!H", 3999) + b"fin", (3999, "fin")),
        (b"\x03", 1002),
        (struct.pack("!H", 1005), 1002),
        (struct.pack("!H", 1006), 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 2000), 1002),
        (struct.pack("!H", 5000), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),
    ],
)
def test_parse_close(payload: bytes, expect: tuple[int, str] | int) -> None:
    if isinstance(expect, int):
        with pytest.raises(WsViolation) as e:
            wsframe.parse_close(payload)
        assert e.value.code == expect
    else:
        assert wsframe.parse_close(payload) == expect


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 100000])
def test_server_frames_parse_in_wsproto(n: int) -> None:
    payload = os.urandom(n)
    dec = FrameDecoder(client=True)
    dec.receive_bytes(wsframe.frame(wsframe.OP_BINARY, payload))
    f = dec.process_buffer()
    assert f is not None
    assert f.payload == payload and f.frame_finished and f.message_finished
    assert dec.process_buffer() is None


def test_close_frame_reason_is_cut_at_a_character_boundary() -> None:
    data = wsframe.close_frame(1008, "ü" * 100)
    dec = FrameDecoder(client=True)
    dec.receive_bytes(data)
    f = dec.process_buffer()
    assert f is not None
    assert isinstance(f.payload, bytes)
    assert struct.unpack("!H", f.payload[:2])[0] == 1008
    assert f.payload[2:].decode() == "ü" * 61  # 122 bytes: one more would pass 123
    assert len(data) <= 2 + 125


def test_unmask_matches_a_bytewise_xor() -> None:
    for n in (0, 1, 3, 4, 5, 230, 4097):
        data = os.urandom(n)
        key = os.urandom(4)
        assert wsframe.unmask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
