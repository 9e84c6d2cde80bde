"""Server side of the RFC 6455 framing layer (sans-IO).

The gateway's hot path: every visitor message crosses it twice (in and out).
wsproto does the same job through a generator per connection, an event
object per frame and an incremental UTF-8 decoder; this reader parses a
complete frame with a few integer operations, unmasks with one big-integer
XOR and returns ``(opcode, payload)`` tuples. The opening handshake is
:mod:`gateway.server.http1`'s; no extension is negotiated, so every RSV bit
must be zero.

On CPython the common frames (whole text or binary messages, control
frames) are parsed and unmasked by the native core, many per call
(``native/src/pyws.rs``); the Python parser below handles everything else
(fragments, continuations, violations) and is the whole reader elsewhere or
with ``GATEWAY_WS_FASTPATH=0``. Both give the same messages and the same
violations; tests run every case through both.

Violations raise :class:`WsViolation` with the close code to send: 1002
(protocol error: unmasked client frame, RSV bits, unknown opcode, bad
control frame, bad continuation, bad close payload), 1007 (text or close
reason that is not UTF-8) and 1009 (a message over ``max_message`` bytes,
refused from the frame header, before its payload is buffered).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from gateway import fastpath
from gateway._native import lib as _lib
from gateway.protocol.codec import MAX_DEPTH, MAX_ENTRIES

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_FRAME",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameReader",
    "WsViolation",
    "close_frame",
    "frame",
    "parse_close",
]

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
#: Not a WebSocket opcode: a binary message the native scan decoded as a
#: msgpack frame that passed the codec's shape checks (``frame_max``).
OP_FRAME: Final = 0x12

_DATA_OPS: Final = frozenset((OP_TEXT, OP_BINARY))
_CONTROL_OPS: Final = frozenset((OP_CLOSE, OP_PING, OP_PONG))
#: Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry; 1004,
#: 1005, 1006 and 1015 are never sent on the wire); 3000-4999 are free.
_SENDABLE_CLOSE: Final = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)

#: Whether readers use the native scan by default: CPython, a native
#: library that has it, and GATEWAY_WS_FASTPATH not "0".
FASTPATH: Final = fastpath.enabled("GATEWAY_WS_FASTPATH", "gw_ws_scan")
#: Frames one native scan turns into objects at most (bounds the list it
#: builds, whatever a read holds; the rest waits for the next scan).
SCAN_LIMIT: Final = 64
# where a scan stopped (native/src/pyws.rs)
_SCAN_MORE: Final = 0
_SCAN_NO_MEMORY: Final = -22

_H2: Final = struct.Struct("!H")
_H8: Final = struct.Struct("!Q")
_SHORT: Final = struct.Struct("!BBH")
_LONG: Final = struct.Struct("!BBQ")


class WsViolation(Exception):
    """The peer broke RFC 6455 (or our size limit): close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XORs ``payload`` with the repeated 4-byte ``mask`` (one big-int XOR:
    linear in C, no per-byte Python loop)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameReader:
    """Splits client bytes into complete messages and control frames.

    ``feed`` appends bytes; ``next`` returns the next ``(opcode, payload)``
    or None when more bytes are needed. Text payloads come back as ``str``
    (validated UTF-8), binary ones as ``bytes``; fragments are joined (their
    total bounded by ``max_message``) and control frames interleaved with
    them come out on their own. After a violation the reader stays failed.

    ``native``: whether to use the native scan (default :data:`FASTPATH`).
    ``frame_max`` > 0: binary messages are the visitor protocol's msgpack
    frames; the native scan returns those of at most ``frame_max`` bytes
    that decode to a frame passing :func:`gateway.protocol.codec.decode_frame`'s
    checks as ``(OP_FRAME, dict)``, already decoded (any other stays bytes,
    for the codec to decode or refuse as usual).
    """

    __slots__ = (
        "buf", "failed", "frag_len", "frag_op", "frags", "frame_max", "max_message", "pos",
        "ready", "scan",
    )  # fmt: skip

    def __init__(self, max_message: int, native: bool | None = None, frame_max: int = 0) -> None:
        self.max_message = max_message
        self.frame_max = frame_max
        self.buf = b""
        self.pos = 0  # bytes of buf already returned as frames (no copy per frame)
        self.frag_op = 0  # opcode of the fragmented message in progress, 0: none
        self.frags: list[bytes] | None = None
        self.frag_len = 0
        self.failed = False
        # frames the native scan parsed and next() has not returned yet, last
        # first: (opcode, payload, offset in buf just past the frame)
        self.ready: list[tuple[int, Any, int]] = []
        use = FASTPATH if native is None else native
        self.scan: Any = _lib.gw_ws_scan if use else None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self.buf) - self.pos + self.frag_len

    def feed(self, data: bytes) -> None:
        if data and not self.failed:
            pos = self.pos
            buf = self.buf
            if self.ready:  # their offsets must stay valid
                self.buf = buf + data
                return
            self.buf = data if pos >= len(buf) else buf[pos:] + data
            self.pos = 0

    def next(self) -> tuple[int, Any] | None:
        """The next ``(opcode, payload)``: ``str`` for text, ``bytes`` for
        binary and control frames, a ``dict`` for ``OP_FRAME``."""
        ready = self.ready
        if not ready and self.scan is not None and not self.frag_op and not self.failed:
            buf = self.buf
            if self.pos >= len(buf):
                return None
            rc = self.scan(
                id(buf), self.pos, self.max_message, SCAN_LIMIT, id(ready),
                self.frame_max, MAX_ENTRIES, MAX_DEPTH,
            )  # fmt: skip
            if rc < 0:
                ready.clear()
                if rc == _SCAN_NO_MEMORY:
                    raise MemoryError("native WebSocket scan")
                raise RuntimeError(f"native WebSocket scan failed: {rc}")
            if not ready and rc == _SCAN_MORE:
                return None
            ready.reverse()
        if ready:
            op, payload, end = ready.pop()
            if end == len(self.buf):
                self.buf = b""
                self.pos = 0
            else:
                self.pos = end
            return op, payload
        return self._next_slow()

    def _next_slow(self) -> tuple[int, bytes | str] | None:
        """The Python parser: fragments, continuations, violations (and
        every frame without the native scan)."""
        while True:
            got = self._frame()
            if got is None:
                return None
            fin, op, payload = got
            if op in _CONTROL_OPS:
                return op, payload
            if op == OP_CONT:
                if not self.frag_op:
                    raise self._fail(1002, "continuation without a message")
                assert self.frags is not None
                self.frags.append(payload)
                self.frag_len += len(payload)
                if not fin:
                    continue
                op = self.frag_op
                payload = b"".join(self.frags)
                self.frag_op = 0
                self.frags = None
                self.frag_len = 0
            elif self.frag_op:
                raise self._fail(1002, "new message inside a fragmented one")
            elif not fin:
                self.frag_op = op
                self.frags = [payload]
                self.frag_len = len(payload)
                continue
            if op == OP_TEXT:
                try:
                    return OP_TEXT, payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise self._fail(1007, "invalid UTF-8 in a text message") from None
            return op, payload

    def _fail(self, code: int, reason: str) -> WsViolation:
        self.failed = True
        self.buf = b""
        self.pos = 0
        self.ready = []
        self.frags = None
        self.frag_len = 0
        return WsViolation(code, reason)

    def _frame(self) -> tuple[bool, int, bytes] | None:
        """One complete frame (fin, opcode, unmasked payload) off the buffer."""
        if self.failed:
            return None
        buf = self.buf
        at = self.pos
        have = len(buf) - at
        if have < 2:
            return None
        b0 = buf[at]
        b1 = buf[at + 1]
        if b0 & 0x70:
            raise self._fail(1002, "reserved bits set")
        if not b1 & 0x80:
            raise self._fail(1002, "client frames must be masked")
        op = b0 & 0x0F
        n = b1 & 0x7F
        pos = 2
        if op >= 8:
            if op not in _CONTROL_OPS:
                raise self._fail(1002, f"unknown opcode {op}")
            if n > 125 or not b0 & 0x80:
                raise self._fail(1002, "control frames must be short and whole")
        elif op not in _DATA_OPS and op != OP_CONT:
            raise self._fail(1002, f"unknown opcode {op}")
        elif n >= 126:
            if n == 126:
                if have < 4:
                    return None
                n = _H2.unpack_from(buf, at + 2)[0]
                pos = 4
            else:
                if have < 10:
                    return None
                n = _H8.unpack_from(buf, at + 2)[0]
                if n >> 63:
                    raise self._fail(1002, "length with its top bit set")
                pos = 10
            if n + self.frag_len > self.max_message:
                raise self._fail(1009, "message too big")
        elif n + self.frag_len > self.max_message:
            raise self._fail(1009, "message too big")
        end = pos + 4 + n
        if have < end:
            return None
        pos += at
        end += at
        payload = unmask(buf[pos + 4 : end], buf[pos : pos + 4])
        if end == len(buf):
            self.buf = b""
            self.pos = 0
        else:
            self.pos = end
        return bool(b0 & 0x80), op, payload


def parse_close(payload: bytes) -> tuple[int, str]:
    """The (code, reason) of a received close frame; 1005 when it has no
    code. Raises :class:`WsViolation` for a malformed one."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise WsViolation(1002, "close frame with a one-byte payload")
    code = _H2.unpack_from(payload)[0]
    if not (code in _SENDABLE_CLOSE or 3000 <= code <= 4999):
        raise WsViolation(1002, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsViolation(1007, "close reason is not UTF-8") from None
    return code, reason


def frame(op: int, payload: bytes) -> bytes:
    """A final, unmasked (server) frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | op, n)) + payload
    if n < 65536:
        return _SHORT.pack(0x80 | op, 126, n) + payload
    return _LONG.pack(0x80 | op, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control limit
    (at a character boundary)."""
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return frame(OP_CLOSE, _H2.pack(code) + raw)
