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

__all__ = ["FIELDS", "Limits"]

MAX_KEYS: Final = 100_000


#: The configuration fields of the limits (a reload may change them in
#: place: :meth:`Limits.update`).
FIELDS: Final = tuple(
    f"{scope}_{what}"
    for scope in ("visitor_msg", "tenant_msg", "ip_msg", "ip_conn", "tenant_conn")
    for what in ("rate", "burst")
)


def _limiter(
    old: KeyedLimiter | None, rate: float, burst: int, share: float
) -> KeyedLimiter | None:
    """The limiter for ``rate`` and ``burst`` (None: off); ``old``, retuned,
    when there was one (its buckets keep their tokens)."""
    if rate <= 0:
        return None
    r, b = rate * share, max(1.0, burst * share)
    if old is None:
        return KeyedLimiter(r, b, MAX_KEYS)
    old.retune(r, b)
    return old


class Limits:
    __slots__ = ("ip_conn", "ip_msg", "tenant_conn", "tenant_msg", "visitor_msg")

    def __init__(self, cfg: Config, workers: int) -> None:
        self.visitor_msg: KeyedLimiter | None = None
        self.tenant_msg: KeyedLimiter | None = None
        self.ip_msg: KeyedLimiter | None = None
        self.ip_conn: KeyedLimiter | None = None
        self.tenant_conn: KeyedLimiter | None = None
        self.update(cfg, workers)

    def update(self, cfg: Config, workers: int) -> None:
        """Takes the limits of ``cfg`` (at start, and on a reload: a limit
        turned on starts with full buckets, one changed keeps each key's
        tokens up to its new burst, one turned off is gone)."""
        share = 1.0 / max(1, workers)
        self.visitor_msg = _limiter(
            self.visitor_msg, cfg.visitor_msg_rate, cfg.visitor_msg_burst, 1.0
        )
        self.tenant_msg = _limiter(
            self.tenant_msg, cfg.tenant_msg_rate, cfg.tenant_msg_burst, share
        )
        self.ip_msg = _limiter(self.ip_msg, cfg.ip_msg_rate, cfg.ip_msg_burst, share)
        self.ip_conn = _limiter(self.ip_conn, cfg.ip_conn_rate, cfg.ip_conn_burst, share)
        self.tenant_conn = _limiter(
            self.tenant_conn, cfg.tenant_conn_rate, cfg.tenant_conn_burst, share
        )

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
