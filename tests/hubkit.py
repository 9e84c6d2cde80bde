"""A real :class:`~gateway.session.hub.Hub` for tests that drive the
forwarder without sockets, and a visitor connection that records what its
session tells it. (The hot path is compiled in a built tree, where the
forwarder only takes a real hub.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.session.hub import Downstream, Hub
from gateway.session.state import Session


class Visitor:
    """An attached connection (``Attachment``) that records everything."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.acks: list[Any] = []
        self.refused: list[tuple[Any, int]] = []
        self.ready = 0  # downstream_ready calls (a paused reader resumed)

    def session_frame(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)

    def session_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        self.acks.append(msg_id)

    def session_refused(self, msg_id: Any, code: int, reason: str, retry_after_ms: int) -> None:
        self.refused.append((msg_id, code))

    def taken_over(self) -> None:
        pass

    def downstream_ready(self) -> None:
        self.ready += 1

    def delivered(self) -> list[Any]:
        return [f["body"] for f in self.frames if f["t"] == "deliver"]


def hub_for(downstream: Downstream, state_dir: Path, **kw: Any) -> Hub:
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state_dir)}, {"window": 64})
    return Hub(cfg, downstream, **kw)


def attach(hub: Hub, s: Session) -> Visitor:
    """Adds ``s`` to the hub's sessions with a recording connection."""
    hub.sessions.add(s)
    v = Visitor()
    s.conn = v
    return v
