"""A minimal, fast WebSocket client codec for the load harness (sans-IO).

The harness must not be the bottleneck, so this does only what a load client
needs: build the upgrade request, check the 101 response, frame outgoing
messages (masked, as RFC 6455 requires of clients; the key is fixed per
connection, which servers must accept, so framing is one concatenation) and
split incoming server frames (never masked) into (opcode, payload).
"""

from __future__ import annotations

import base64
import os
import struct

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ZERO_MASK = b"\x00\x00\x00\x00"


class HandshakeError(Exception):
    """The server did not switch protocols; ``status`` is its status code."""

    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(f"upgrade refused: HTTP {status}")
        self.status = status
        self.head = head


def upgrade_request(host: str, path: str, origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_upgrade(buf: bytearray) -> int:
    """Returns the length of a complete 101 response head at the start of
    ``buf``, 0 if incomplete; raises HandshakeError for any other status."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 16384:
            raise HandshakeError(0, bytes(buf[:200]))
        return 0
    head = bytes(buf[: end + 4])
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    if status != 101:
        raise HandshakeError(status, head)
    return end + 4


def frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """A final, masked client frame (zero masking key: payload unchanged)."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


def close_frame(code: int = 1000) -> bytes:
    return frame(struct.pack("!H", code), OP_CLOSE)


class FrameReader:
    """Splits the server's byte stream into frames. Fragmented messages are
    reassembled; control frames are returned as they come."""

    __slots__ = ("_buf", "_frag", "_frag_op", "max_size")

    def __init__(self, max_size: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._frag: bytearray | None = None
        self._frag_op = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if b1 & 0x80:
                raise ValueError("server frames must not be masked")
            if ln > self.max_size:
                raise ValueError(f"frame of {ln} bytes over the {self.max_size} limit")
            end = pos + hl + ln
            if end > n:
                break
            payload = bytes(buf[pos + hl : end])
            pos = end
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op >= 0x8:
                out.append((op, payload))
            elif op == OP_CONT:
                if self._frag is None:
                    raise ValueError("continuation without a first fragment")
                self._frag += payload
                if fin:
                    out.append((self._frag_op, bytes(self._frag)))
                    self._frag = None
            elif fin:
                out.append((op, payload))
            else:
                self._frag = bytearray(payload)
                self._frag_op = op
        if pos:
            del buf[:pos]
        return out
