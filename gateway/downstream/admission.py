"""Admission control, sans-IO: sessions already connected are always served
(their messages wait in a bounded per-session queue while their cluster
recovers); new sessions are refused with a jittered ``retry_after`` while
their cluster has no available endpoint, is at its pending limit or is
overloaded, the delay growing (capped) the longer the cluster stays
unavailable so that reconnect storms spread out."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = ["Admission", "AdmissionConfig", "ClusterLoad", "Decision"]

MAX_RETRY_AFTER_S: Final = 30.0
SEND, BUFFER, REFUSE = "send", "buffer", "refuse"


@dataclass(frozen=True)
class AdmissionConfig:
    max_pending_per_cluster: int = 4096
    max_inflight_per_session: int = 32
    max_buffered_per_session: int = 64
    retry_after_s: float = 2.0
    overload_inflight_ratio: float = 0.9

    def __post_init__(self) -> None:
        for f in (
            "max_pending_per_cluster",
            "max_inflight_per_session",
            "max_buffered_per_session",
        ):
            v = getattr(self, f)
            if type(v) is not int or v < 1:
                raise ValueError(f"{f} must be an integer >= 1 (got {v!r})")
        if not (math.isfinite(self.retry_after_s) and 0 < self.retry_after_s <= MAX_RETRY_AFTER_S):
            raise ValueError(f"retry_after_s must be in (0, {MAX_RETRY_AFTER_S}]")
        if not 0 < self.overload_inflight_ratio <= 1:
            raise ValueError("overload_inflight_ratio must be in (0, 1]")


class ClusterLoad(NamedTuple):
    available_endpoints: int
    pending: int  # messages waiting in session queues for this cluster
    inflight: int  # messages sent and not answered
    capacity: int  # endpoints configured


class Decision(NamedTuple):
    retry_after_s: float  # 0.0 = admitted
    reason: str  # "" | "no_endpoint" | "pending_full" | "overload"


class Admission:
    __slots__ = ("_unavailable_since", "cfg", "rng")

    def __init__(self, cfg: AdmissionConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self._unavailable_since: float | None = None

    def _jitter(self, now: float) -> float:
        since = self._unavailable_since
        base = self.cfg.retry_after_s
        if since is not None:
            # grows with how long the cluster has been unavailable: x2 per 10 s
            base = min(MAX_RETRY_AFTER_S / 2, base * 2 ** ((now - since) / 10.0))
        return base * (1.0 + self.rng.random())

    def admit_session(self, now: float, load: ClusterLoad) -> Decision:
        cfg = self.cfg
        reason = ""
        if load.available_endpoints <= 0:
            reason = "no_endpoint"
        elif load.pending >= cfg.max_pending_per_cluster:
            reason = "pending_full"
        elif load.inflight >= cfg.overload_inflight_ratio * cfg.max_pending_per_cluster:
            reason = "overload"
        if not reason:
            self._unavailable_since = None
            return Decision(0.0, "")
        if self._unavailable_since is None:
            self._unavailable_since = now
        return Decision(self._jitter(now), reason)

    def admit_message(self, session_inflight: int, session_buffered: int, load: ClusterLoad) -> str:
        """ "send" now, "buffer" in the session's queue, or "refuse" (the
        session's queue is full: the visitor gets 4429 with retry_after)."""
        return self.message_verdict(
            session_inflight, session_buffered, load.available_endpoints > 0, load.inflight
        )

    def message_verdict(
        self, session_inflight: int, session_buffered: int, available: bool, cluster_inflight: int
    ) -> str:
        """:meth:`admit_message` on plain values (the forwarder's per-message
        path: no :class:`ClusterLoad` to build)."""
        cfg = self.cfg
        if session_buffered >= cfg.max_buffered_per_session:
            return REFUSE
        if (
            available
            and session_inflight < cfg.max_inflight_per_session
            and cluster_inflight < cfg.max_pending_per_cluster
        ):
            return SEND
        return BUFFER
