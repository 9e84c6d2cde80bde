"""The load client's HTTP/2 side (sans-IO): one ``POST /v1/stream`` stream
per connection carrying ``u32 length || msgpack`` frames both ways, over h2c
with prior knowledge (or inside TLS with ALPN ``h2``). h2 answers the
gateway's PINGs (its heartbeats) by itself."""

from __future__ import annotations

import struct
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["H2Error", "H2Stream"]

_LEN: Final = struct.Struct(">I")
MAX_FRAME: Final = 16 << 20
_CONFIG: Final = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")


class H2Error(Exception):
    """The stream or connection ended; ``reason`` says how (for counting)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class H2Stream:
    __slots__ = ("buf", "c", "sid", "status")

    def __init__(self, authority: str, path: str) -> None:
        self.c = h2.connection.H2Connection(_CONFIG)
        self.c.initiate_connection()
        self.c.increment_flow_control_window(1 << 20)
        self.sid = self.c.get_next_available_stream_id()
        self.c.send_headers(
            self.sid,
            [
                (":method", "POST"),
                (":path", path),
                (":scheme", "http"),
                (":authority", authority),
                ("content-type", "application/msgpack"),
            ],
        )
        self.buf = bytearray()
        self.status = 0

    def out(self) -> bytes:
        """Bytes to write to the socket now."""
        data: bytes = self.c.data_to_send()
        return data

    def send(self, payload: bytes) -> None:
        """Queues one frame (the gateway's window is large: a load client
        that ran out of it would be a slow consumer anyway)."""
        try:
            self.c.send_data(self.sid, _LEN.pack(len(payload)) + payload)
        except h2.exceptions.FlowControlError:
            raise H2Error("h2_flow_control") from None
        except h2.exceptions.ProtocolError:
            raise H2Error("h2_stream_closed") from None

    def feed(self, data: bytes) -> list[bytes]:
        """Frames received; raises :class:`H2Error` when the stream ended."""
        try:
            events = self.c.receive_data(data)
        except h2.exceptions.ProtocolError:
            raise H2Error("h2_protocol_error") from None
        frames: list[bytes] = []
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id == self.sid:
                    self.buf += ev.data
                    self._split(frames)
            elif isinstance(ev, h2.events.ResponseReceived):
                headers: Any = dict(ev.headers)
                self.status = int(headers.get(":status", "0"))
                if self.status != 200:
                    raise H2Error(f"http:{self.status}")
            elif isinstance(ev, h2.events.StreamReset):
                raise H2Error(f"h2_reset:{int(ev.error_code or 0)}")
            elif isinstance(ev, h2.events.StreamEnded):
                raise H2Error("h2_stream_ended")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise H2Error(f"h2_goaway:{int(ev.error_code or 0)}")
        return frames

    def _split(self, frames: list[bytes]) -> None:
        buf = self.buf
        while len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                raise H2Error("h2_frame_too_big")
            if len(buf) < 4 + n:
                break
            frames.append(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
