"""The gateway's wire decoding per message, native fast paths against the
Python code they replace and, for WebSocket, against wsproto (the library
a Python server would use). Sans-IO, one process, no sockets.

    .venv/bin/pytest bench/test_wire_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q

- ``test_ws_read[...]``: 8 masked binary visitor ``msg`` messages (262
  bytes each) arrive in one read and are turned into frames (dicts):
  ``native-decode`` is the gateway's connection reader (native scan with
  frame decoding), ``native`` the scan alone plus ``decode_frame``,
  ``python`` the Python parser plus ``decode_frame``, ``wsproto`` wsproto's
  server connection plus ``decode_frame``. Divide by 8 per message.
- ``test_link_read[...]``: 100 ``msg`` frames of ~300 bytes arrive on a
  downstream link in one read and are decoded and checked by desk-sim's
  decoder: ``native`` (native msgpack) or ``python`` (``msgpack.unpackb``
  per frame). Divide by 100 per message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from gateway.downstream.proto import check_from_gateway, encode_msg, msg_head
from gateway.protocol.codec import LengthPrefixedDecoder, decode_frame
from gateway.protocol.wsframe import OP_FRAME, FrameReader, unmask

MAX = 65536
WS_MESSAGES = 8
LINK_FRAMES = 100


def _client_message(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return (
        bytes((0x82, 0x80 | 126)) + len(payload).to_bytes(2, "big") + mask + unmask(payload, mask)
    )


_PAYLOAD = msgpack.packb({"t": "msg", "id": "c-123456", "body": {"text": "x" * 230}})
_READ = b"".join(_client_message(_PAYLOAD) for _ in range(WS_MESSAGES))


def _reader(native: bool, frame_max: int) -> Callable[[], int]:
    r = FrameReader(MAX, native=native, frame_max=frame_max)

    def read() -> int:
        r.feed(_READ)
        n = 0
        while (got := r.next()) is not None:
            op, payload = got
            frame = payload if op == OP_FRAME else decode_frame(payload, MAX)
            n += len(frame)
        return n

    return read


def _wsproto() -> Callable[[], int]:
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    req = next(ws.events())
    assert isinstance(req, Request)
    ws.send(AcceptConnection())

    def read() -> int:
        ws.receive_data(_READ)
        n = 0
        for ev in ws.events():
            assert isinstance(ev, BytesMessage)
            n += len(decode_frame(bytes(ev.data), MAX))
        return n

    return read


@pytest.mark.parametrize("impl", ["native-decode", "native", "python", "wsproto"])
def test_ws_read(benchmark: Any, impl: str) -> None:
    read = {
        "native-decode": lambda: _reader(True, MAX),
        "native": lambda: _reader(True, 0),
        "python": lambda: _reader(False, 0),
        "wsproto": _wsproto,
    }[impl]()
    assert read() == 3 * WS_MESSAGES  # every message decoded to its 3 keys
    benchmark.pedantic(read, rounds=300, iterations=10, warmup_rounds=10)


_LINK = b"".join(
    encode_msg(msg_head(f"s-{i:016d}", "general", "human"), 1000 + i, f"c-{i}", "x" * 230)
    for i in range(LINK_FRAMES)
)


@pytest.mark.parametrize("impl", ["native", "python"])
def test_link_read(benchmark: Any, impl: str) -> None:
    d = LengthPrefixedDecoder(MAX, check_from_gateway, native=impl == "native")

    def read() -> int:
        return len(d.feed(_LINK))

    assert read() == LINK_FRAMES
    benchmark.pedantic(read, rounds=300, iterations=5, warmup_rounds=10)
