"""The downstream link's DATA frames without h2's per-frame machinery
(sans-IO), on both ends: the gateway's link core and desk-sim.

h2 handles a received DATA frame through its frame buffer, two state
machines, two flow-control window managers and an event object, and the
link then acknowledges the bytes through the window managers again. That
is paid on every read from a downstream, so at moderate rates (a read per
few messages) it was a sizable share of a worker's time per forwarded
message; a read through this module takes a third of the time
(``bench/test_link_bench.py``, docs/benchmarks.md).

:class:`DataSplitter` takes the bytes read from the link and hands back, in
order, either the payload of a DATA frame on the link's stream (flags
clear: no padding, no END_STREAM) or a run of other complete frames, which
the caller gives to h2 as before. h2 therefore never sees those DATA
frames: the splitter does their flow control itself. It checks that the
downstream stays within the window we advertised and, once half of it is
used, returns WINDOW_UPDATE frames (connection and stream) that give it
back, as h2 would have. h2's own view of the window only ever misses bytes,
so it stays permissive, and DATA frames that do reach h2 (padded,
END_STREAM, before the response headers) keep h2's accounting.

A frame is only taken out while no header block is open (HEADERS or
PUSH_PROMISE without END_HEADERS, then CONTINUATION), so a DATA frame in
the middle of one still reaches h2, which refuses it. Incomplete frames
wait for the next read, so h2 is only ever given whole frames.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["PREFACE", "DataSplitter", "FlowError", "window_update"]

_HEAD: Final = struct.Struct(">I")
DATA, HEADERS, PUSH_PROMISE, CONTINUATION = 0, 1, 5, 9
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
END_HEADERS: Final = 0x4
#: Frames longer than this go to h2 (which enforces our SETTINGS_MAX_FRAME_SIZE).
MAX_FAST_FRAME: Final = 1 << 20


class FlowError(Exception):
    """The downstream sent more DATA than the window we advertised."""


def window_update(stream: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (RFC 9113, 6.9)."""
    return b"\x00\x00\x04\x08\x00" + _HEAD.pack(stream) + _HEAD.pack(increment)


class DataSplitter:
    """Splits one direction of an HTTP/2 connection (after the client
    preface) into fast DATA payloads of ``stream`` and runs of other frames.

    ``window`` is the receive window we advertised, for the connection and
    for the stream alike (the link and desk-sim set both). ``server``: the
    bytes start with the client's connection preface, which goes to h2
    first."""

    __slots__ = ("buf", "consumed", "open_block", "pos", "preface", "stream", "window")

    def __init__(self, stream: int, window: int, server: bool = False) -> None:
        self.stream = stream
        self.window = window
        self.preface = len(PREFACE) if server else 0
        self.buf = b""
        self.pos = 0
        self.consumed = 0  # DATA bytes taken out and not yet given back
        self.open_block = False  # inside a header block (CONTINUATION to come)

    def feed(self, data: bytes) -> None:
        rest = self.buf[self.pos :]
        self.buf = rest + data if rest else data
        self.pos = 0

    def next(self, fast: bool) -> tuple[bool, bytes] | None:
        """``(True, payload)`` for a DATA frame of the stream taken out,
        ``(False, frames)`` for a run of complete frames for h2 (up to the
        next one that ``fast`` lets through), None when no complete frame
        is left. ``fast``: the stream is established (its response headers
        are in), so its DATA frames may be taken out."""
        buf, pos, n = self.buf, self.pos, len(self.buf)
        if self.preface:
            if n - pos < self.preface:
                return None
            self.pos, self.preface = pos + self.preface, 0
            return False, buf[pos : self.pos]
        start = pos
        while pos + 9 <= n:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            if (
                fast
                and ftype == DATA
                and not flags
                and not self.open_block
                and length <= MAX_FAST_FRAME
                and _HEAD.unpack_from(buf, pos + 5)[0] == self.stream
            ):
                if pos > start:  # the run before it goes to h2 first
                    self.pos = pos
                    return False, buf[start:pos]
                self.pos = end
                self.consumed += length
                if self.consumed > self.window:
                    raise FlowError(
                        f"downstream sent {self.consumed} bytes beyond a {self.window}-byte window"
                    )
                return True, buf[pos + 9 : end]
            if ftype in (HEADERS, PUSH_PROMISE, CONTINUATION):
                self.open_block = not flags & END_HEADERS
            pos = end
        self.pos = pos
        return (False, buf[start:pos]) if pos > start else None

    def window_updates(self) -> bytes:
        """WINDOW_UPDATE frames giving back what the DATA frames taken out
        used, once that is half the window (b"" before)."""
        if self.consumed < self.window // 2:
            return b""
        k, self.consumed = self.consumed, 0
        return window_update(0, k) + window_update(self.stream, k)
