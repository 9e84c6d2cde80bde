"""The terms a visitor connection is opened with: its heartbeat, the
largest frame it may send, its window of unacknowledged messages and the
bounds of what may wait to be written to it. Its ``welcome`` tells the
visitor the first three (docs/protocol.md), so they hold for the
connection's life: a configuration reload (``gateway.reload``) gives the
connections opened after it new terms and leaves the others theirs.

One :class:`Terms` per configuration, shared by every connection opened
under it (a pointer per connection, not a copy of each number)."""

from __future__ import annotations

from gateway.config import Config

__all__ = ["Terms"]


class Terms:
    __slots__ = ("hb_misses", "hb_s", "max_frame", "out_max_bytes", "out_max_frames", "window")

    def __init__(
        self,
        hb_s: float,
        hb_misses: int,
        max_frame: int,
        window: int,
        out_max_bytes: int,
        out_max_frames: int,
    ) -> None:
        self.hb_s = hb_s  # heartbeat interval (seconds)
        self.hb_misses = hb_misses  # intervals of silence before a timeout
        self.max_frame = max_frame  # largest frame the visitor may send (bytes)
        self.window = window  # its messages in flight (not yet acked) at most
        # what may wait to be written to it before it is a slow consumer
        self.out_max_bytes = out_max_bytes
        self.out_max_frames = out_max_frames

    @staticmethod
    def of(cfg: Config) -> Terms:
        return Terms(
            cfg.heartbeat_s,
            cfg.heartbeat_misses,
            cfg.max_frame,
            cfg.window,
            cfg.outbound_max_bytes,
            cfg.outbound_max_frames,
        )
