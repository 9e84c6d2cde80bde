"""Endpoint choice within a cluster, sans-IO: power of two choices on
``(outstanding + 1) * EWMA latency`` among the available endpoints (up,
healthy, breaker not open, not ejected), with a sticky preference; a
half-open endpoint with probe slots left takes the next new picks (its
probes)."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import Final

from gateway.downstream.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, OutlierDetector

__all__ = ["Balancer", "Endpoint"]

#: EWMA time constant: a sample's weight halves every ~7 s.
TAU_S: Final = 10.0
#: An endpoint not measured yet costs nothing, so a new or restarted one gets
#: traffic at once (its breaker and the outlier detector guard against a bad
#: one); a guess such as 5 ms would lose every P2C duel against measured
#: sub-millisecond peers and never be measured.
INITIAL_EWMA_S: Final = 0.0


class Endpoint:
    __slots__ = ("_stamp", "breaker", "ewma_s", "healthy", "key", "outstanding", "up")

    def __init__(self, key: str, breaker: Breaker, ewma_s: float = INITIAL_EWMA_S) -> None:
        self.key = key
        self.breaker = breaker
        self.outstanding = 0
        self.ewma_s = ewma_s
        self.healthy = True
        self.up = True
        self._stamp: float | None = None

    def observe(self, now: float, latency_s: float) -> None:
        if self._stamp is None:
            self.ewma_s = latency_s
        else:
            dt = max(0.0, now - self._stamp)
            w = math.exp(-dt / TAU_S)
            self.ewma_s = self.ewma_s * w + latency_s * (1.0 - w)
        self._stamp = now

    def cost(self) -> float:
        return (self.outstanding + 1) * max(self.ewma_s, 1e-6)


class Balancer:
    __slots__ = ("by_key", "endpoints", "outliers", "rng")

    def __init__(
        self,
        endpoints: list[Endpoint],
        rng: random.Random,
        outliers: OutlierDetector | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.by_key = {e.key: e for e in endpoints}
        self.rng = rng
        self.outliers = outliers
        if outliers is not None:
            outliers.endpoints = len(endpoints)

    def add(self, e: Endpoint) -> None:
        """Another endpoint (a configuration reload)."""
        if e.key in self.by_key:
            raise ValueError(f"endpoint {e.key} is in the balancer already")
        self.endpoints.append(e)
        self.by_key[e.key] = e
        if self.outliers is not None:
            self.outliers.endpoints = len(self.endpoints)

    def remove(self, key: str) -> None:
        """No more picks for endpoint ``key`` (a configuration reload); a
        key not in the balancer is ignored."""
        e = self.by_key.pop(key, None)
        if e is None:
            return
        self.endpoints.remove(e)
        if self.outliers is not None:
            self.outliers.endpoints = len(self.endpoints)
            self.outliers.forget(key)

    def _usable(self, e: Endpoint, now: float) -> bool:
        if not (e.up and e.healthy):
            return False
        if self.outliers is not None and self.outliers.ejected(e.key, now):
            return False
        return e.breaker.state(now) != OPEN

    def available(self, now: float) -> int:
        return sum(1 for e in self.endpoints if self._usable(e, now))

    def pick(
        self, now: float, exclude: Collection[str] = (), prefer: str | None = None
    ) -> Endpoint | None:
        """An endpoint whose breaker allowed the call, or None."""
        if prefer is not None and prefer not in exclude:
            e = self.by_key.get(prefer)
            if e is not None and self._usable(e, now) and e.breaker.allow(now):
                return e
        cands = [
            e
            for e in self.endpoints
            if e.key not in exclude and e.key != prefer and self._usable(e, now)
        ]
        # A half-open endpoint gets the next calls as its probes: were it to
        # wait until it wins a P2C duel against closed peers, it would never
        # be probed, never close, and stay out of rotation for good.
        half = [e for e in cands if e.breaker.state(now) == HALF_OPEN]
        self.rng.shuffle(half)
        for e in half:
            if e.breaker.allow(now):
                return e
        while cands:
            if len(cands) == 1:
                e = cands[0]
            else:
                a, b = self.rng.sample(cands, 2)
                # a closed breaker before a half-open one, then the lower cost
                ka = (a.breaker.state(now) != CLOSED, a.cost())
                kb = (b.breaker.state(now) != CLOSED, b.cost())
                e = a if ka <= kb else b
            if e.breaker.allow(now):
                return e
            cands.remove(e)  # half-open with no probe left
        return None

    def start(self, e: Endpoint) -> None:
        e.outstanding += 1

    def finish_ok(self, e: Endpoint, now: float, calls: int, mean_s: float, slow: int) -> None:
        """``calls`` successes at ``now`` (their mean latency, how many were
        slow): one :meth:`finish` each, in one update. (Samples taken at
        the same instant move the EWMA once: its weight is 0 for the time
        between them.)"""
        e.outstanding = max(0, e.outstanding - calls)
        e.observe(now, mean_s)
        e.breaker.record_ok(now, calls, slow)
        # (an endpoint removed by a reload has answers still coming in)
        if self.outliers is not None and e.key in self.by_key:
            self.outliers.record(e.key, now, True)

    def finish(self, e: Endpoint, now: float, latency_s: float, ok: bool) -> None:
        if e.outstanding > 0:
            e.outstanding -= 1
        if ok:
            e.observe(now, latency_s)
        e.breaker.record(now, ok, latency_s)
        if self.outliers is not None and e.key in self.by_key:
            self.outliers.record(e.key, now, ok)
