"""The downstream link's DATA frames without h2's per-frame machinery
(sans-IO): read on both ends (the gateway's link core and desk-sim),
built by the gateway's link core.

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

The gateway's link also builds its outgoing DATA frames itself
(:class:`SendWindow`; h2's ``send_data`` cost about as much per write). It
then keeps the peer's windows: the splitter (``windows``) takes the
connection's and the stream's WINDOW_UPDATE frames out from the first
byte on (h2, never spending its own window, would otherwise let it grow
past 2^31-1 and fail), and the link applies the peer's
SETTINGS_INITIAL_WINDOW_SIZE changes that h2 reports. desk-sim does the
same for its first link stream.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

import h2.exceptions

__all__ = ["DATA_FRAME", "PREFACE", "RUN", "WINDOW", "DataSplitter", "FlowError", "SendWindow",
           "goaway", "h2_output", "send_headers_if_open", "window_update"]  # fmt: skip

_HEAD: Final = struct.Struct(">I")
DATA, HEADERS, PRIORITY, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 2, 4, 5, 6, 7, 8, 9,
)  # fmt: skip
#: SETTINGS_INITIAL_WINDOW_SIZE's identifier (h2's SettingCodes compare equal)
INITIAL_WINDOW_SIZE: Final = 4
#: What :meth:`DataSplitter.next` hands back: frames for h2, a DATA
#: frame's payload, a WINDOW_UPDATE's stream and increment (8 bytes).
RUN, DATA_FRAME, WINDOW = 0, 1, 2
MAX_WINDOW: Final = (1 << 31) - 1
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
END_HEADERS: Final = 0x4
#: Frames longer than this go to h2 (which enforces our SETTINGS_MAX_FRAME_SIZE).
MAX_FAST_FRAME: Final = 1 << 20


class FlowError(Exception):
    """The peer broke HTTP/2 flow control: more DATA than the window we
    advertised, or a WINDOW_UPDATE of zero or past 2^31-1."""


def window_update(stream: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (RFC 9113, 6.9)."""
    return b"\x00\x00\x04\x08\x00" + _HEAD.pack(stream) + _HEAD.pack(increment)


def goaway(last_stream_id: int) -> bytes:
    """A GOAWAY frame with NO_ERROR (RFC 9113, 6.8)."""
    return (
        b"\x00\x00\x08\x07\x00"
        + _HEAD.pack(0)
        + _HEAD.pack(last_stream_id & MAX_WINDOW)
        + _HEAD.pack(0)
    )


class DataSplitter:
    """Splits one direction of an HTTP/2 connection (after the client
    preface) into fast DATA payloads of ``stream`` and runs of other frames.

    ``window`` is the receive window we advertised, for the connection and
    for the stream alike (the link and desk-sim set both). ``server``: the
    bytes start with the client's connection preface, which goes to h2
    first. ``windows``: the WINDOW_UPDATE frames of the connection and the
    stream are taken out too (from the start), for a sender that builds
    its DATA frames itself (:class:`SendWindow`)."""

    __slots__ = (
        "buf", "consumed", "open_block", "pos", "preface", "stream", "window", "windows",
    )  # fmt: skip

    def __init__(
        self, stream: int, window: int, server: bool = False, windows: bool = False
    ) -> None:
        self.stream = stream
        self.window = window
        self.windows = windows
        self.preface = len(PREFACE) if server else 0
        self.buf = b""
        self.pos = 0
        self.consumed = 0  # DATA bytes taken out and not yet given back
        self.open_block = False  # inside a header block (CONTINUATION to come)

    def feed(self, data: bytes) -> None:
        rest = self.buf[self.pos :]
        self.buf = rest + data if rest else data
        self.pos = 0

    def next(self, fast: bool) -> tuple[int, bytes] | None:
        """``(DATA_FRAME, payload)`` for a DATA frame of the stream taken
        out, ``(WINDOW, stream and increment)`` for a WINDOW_UPDATE taken
        out, ``(RUN, frames)`` for a run of complete frames for h2 (up to
        the next one taken out), None when no complete frame is left.
        ``fast``: the stream is established (its response headers are in),
        so its DATA frames may be taken out."""
        buf, pos, n = self.buf, self.pos, len(self.buf)
        if self.preface:
            if n - pos < self.preface:
                return None
            self.pos, self.preface = pos + self.preface, 0
            return RUN, buf[pos : self.pos]
        start = pos
        while pos + 9 <= n:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            if not self.open_block:
                kind = -1
                if ftype == DATA:
                    if (
                        fast
                        and not flags
                        and length <= MAX_FAST_FRAME
                        and _HEAD.unpack_from(buf, pos + 5)[0] == self.stream
                    ):
                        kind = DATA_FRAME
                elif (
                    ftype == WINDOW_UPDATE
                    and self.windows
                    and length == 4
                    and _HEAD.unpack_from(buf, pos + 5)[0] & MAX_WINDOW in (0, self.stream)
                ):
                    kind = WINDOW
                if kind >= 0:
                    if pos > start:  # the run before it goes to h2 first
                        self.pos = pos
                        return RUN, buf[start:pos]
                    self.pos = end
                    if kind == WINDOW:
                        return WINDOW, buf[pos + 5 : end]
                    self.consumed += length
                    if self.consumed > self.window:
                        raise FlowError(
                            f"the peer sent {self.consumed} bytes beyond a {self.window}-byte"
                            " window"
                        )
                    return DATA_FRAME, buf[pos + 9 : end]
            if ftype in (HEADERS, PUSH_PROMISE, CONTINUATION):
                self.open_block = not flags & END_HEADERS
            pos = end
        self.pos = pos
        return (RUN, buf[start:pos]) if pos > start else None

    def window_updates(self) -> bytes:
        """WINDOW_UPDATE frames giving back what the DATA frames taken out
        used, once that is half the window (b"" before)."""
        if self.consumed < self.window // 2:
            return b""
        k, self.consumed = self.consumed, 0
        return window_update(0, k) + window_update(self.stream, k)


class SendWindow:
    """The peer's receive windows for the connection and one stream, spent
    on DATA frames built here instead of by h2 (RFC 9113, 6.9): the
    peer's WINDOW_UPDATEs come from :class:`DataSplitter` (``windows``)
    and its SETTINGS_INITIAL_WINDOW_SIZE changes from h2's events."""

    __slots__ = ("conn", "stream", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.conn = 65535  # the connection's initial window, fixed by the RFC
        self.stream = 65535  # until the peer's SETTINGS say otherwise

    def update(self, frame: bytes) -> None:
        """A WINDOW_UPDATE's 8 bytes (stream, increment) from the peer."""
        stream, inc = struct.unpack(">II", frame)
        stream &= MAX_WINDOW
        inc &= MAX_WINDOW
        if inc == 0:
            raise FlowError(f"WINDOW_UPDATE of 0 on stream {stream}")
        if stream == 0:
            self.conn += inc
        else:
            self.stream += inc
        if max(self.conn, self.stream) > MAX_WINDOW:
            raise FlowError(f"WINDOW_UPDATE on stream {stream} past 2^31-1")

    def settings_changed(self, changed: Mapping[Any, Any]) -> None:
        """The peer's SETTINGS as h2 reports them (``RemoteSettingsChanged
        .changed_settings``): a new SETTINGS_INITIAL_WINDOW_SIZE moves the
        stream's window."""
        ch = changed.get(INITIAL_WINDOW_SIZE)
        if ch is not None:
            old = 65535 if ch.original_value is None else ch.original_value
            self.initial_changed(old, ch.new_value)

    def initial_changed(self, old: int, new: int) -> None:
        """The peer changed SETTINGS_INITIAL_WINDOW_SIZE from ``old`` to ``new``."""
        self.stream += new - old
        if self.stream > MAX_WINDOW:
            raise FlowError("SETTINGS_INITIAL_WINDOW_SIZE takes the stream window past 2^31-1")

    def frames(self, data: bytes | bytearray, max_frame: int) -> tuple[bytes, int]:
        """DATA frames for as much of ``data`` as both windows allow, in
        pieces of at most ``max_frame`` bytes, and how much of it they carry
        (both windows spent)."""
        room = min(self.conn, self.stream, len(data))
        if room <= 0:
            return b"", 0
        head = _HEAD.pack(self.stream_id)
        parts: list[bytes | bytearray] = []
        pos = 0
        while pos < room:
            k = min(max_frame, room - pos)
            parts.append(k.to_bytes(3, "big") + b"\x00\x00" + head)
            parts.append(data[pos : pos + k])
            pos += k
        self.conn -= room
        self.stream -= room
        return b"".join(parts), room


def h2_output(conn: Any) -> bytes:
    """What an ``h2.connection.H2Connection`` has for the wire, or ``b""``
    without calling it when its buffer is empty: ``data_to_send`` is a
    Python call and a copy either way, and this is asked at every write of
    a link or connection, most of which h2 has nothing for (our DATA
    frames are ours). An h2 without that buffer attribute is simply asked."""
    return conn.data_to_send() if getattr(conn, "_data_to_send", True) else b""


def send_headers_if_open(conn: Any, stream: int, headers: list[tuple[str, str]], end: bool) -> bool:
    """An ``h2.connection.H2Connection``'s ``send_headers``; False, nothing
    sent, when h2 has closed the stream already: the peer reset it in the
    same read as its request, and h2 refuses to send on it, which is not an
    error of the connection (the gateway's visitor streams and desk-sim's
    link requests alike)."""
    try:
        conn.send_headers(stream, headers, end_stream=end)
    except h2.exceptions.ProtocolError:  # closed, or reset and forgotten
        return False
    return True
