"""Token-bucket rate limits on visitor traffic, sans-IO (docs/protocol.md,
"Rate limits").

Messages per second per visitor, per tenant and per source IP; new
sessions (hellos) per second per source IP and per tenant. Each limit is a
gateway-wide rate split evenly between the workers (a visitor's connection
lives on one worker, so the per-visitor limit is not split). A rate of 0
turns a limit off. Keys are bounded (:data:`MAX_KEYS` per limit, least
recently used evicted).
"""

from __future__ import annotations

from typing import Final

from gateway.config import Config
from gateway.ratelimit import KeyedLimiter

__all__ = ["Limits"]

MAX_KEYS: Final = 100_000


def _limiter(rate: float, burst: int, share: float) -> KeyedLimiter | None:
    if rate <= 0:
        return None
    return KeyedLimiter(rate * share, max(1.0, burst * share), MAX_KEYS)


class Limits:
    __slots__ = ("ip_conn", "ip_msg", "tenant_conn", "tenant_msg", "visitor_msg")

    def __init__(self, cfg: Config, workers: int) -> None:
        share = 1.0 / max(1, workers)
        self.visitor_msg = _limiter(cfg.visitor_msg_rate, cfg.visitor_msg_burst, 1.0)
        self.tenant_msg = _limiter(cfg.tenant_msg_rate, cfg.tenant_msg_burst, share)
        self.ip_msg = _limiter(cfg.ip_msg_rate, cfg.ip_msg_burst, share)
        self.ip_conn = _limiter(cfg.ip_conn_rate, cfg.ip_conn_burst, share)
        self.tenant_conn = _limiter(cfg.tenant_conn_rate, cfg.tenant_conn_burst, share)

    def message(self, tenant: str, visitor: str, ip: str, now: float) -> tuple[float, str]:
        """(0.0, "") when the message may pass, else (seconds to wait, the
        limit's scope: "visitor", "tenant" or "ip"). Buckets are checked in
        that order; tokens taken by the ones before a refusing bucket stay
        taken (a refused message still spends its sender's budget)."""
        lim = self.visitor_msg
        if lim is not None:
            w = lim.take((tenant, visitor), now)
            if w > 0:
                return w, "visitor"
        lim = self.tenant_msg
        if lim is not None:
            w = lim.take(tenant, now)
            if w > 0:
                return w, "tenant"
        lim = self.ip_msg
        if lim is not None and ip:
            w = lim.take(ip, now)
            if w > 0:
                return w, "ip"
        return 0.0, ""

    def connection(self, tenant: str, ip: str, now: float) -> tuple[float, str]:
        """Like :meth:`message` for a new session (scopes "ip", "tenant")."""
        lim = self.ip_conn
        if lim is not None and ip:
            w = lim.take(ip, now)
            if w > 0:
                return w, "ip"
        lim = self.tenant_conn
        if lim is not None:
            w = lim.take(tenant, now)
            if w > 0:
                return w, "tenant"
        return 0.0, ""
