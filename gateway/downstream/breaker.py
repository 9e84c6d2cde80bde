"""Circuit breaker per endpoint and outlier ejection per cluster, sans-IO
(time passed in as monotonic seconds).

:class:`Breaker` opens on ``consecutive_failures`` failures in a row, or
when, over the rolling ``window_s`` (10 buckets) with at least
``min_requests`` results, the failure share reaches ``failure_rate`` or the
share of calls slower than ``slow_call_s`` reaches ``slow_call_rate``. An
open breaker refuses calls for ``open_s`` (doubling on each consecutive
trip up to ``max_open_s``), then lets ``half_open_probes`` calls through;
all probes succeeding close it, any failure opens it again.

:class:`OutlierDetector` ejects an endpoint after ``consecutive_errors``
errors for ``base_ejection_s * times ejected``, never more than
``max_ejection_percent`` of the cluster's endpoints (at least one stays).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "BreakerConfig",
    "OutlierConfig",
    "OutlierDetector",
]

CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
BUCKETS: Final = 10
STATE_NAMES: Final = ("closed", "half_open", "open")


def _positive(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0 (got {v!r})")


def _share(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (got {v!r})")


def _count(name: str, v: int) -> None:
    if type(v) is not int or v < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")


@dataclass(frozen=True)
class BreakerConfig:
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 10.0
    slow_call_s: float = 1.0
    slow_call_rate: float = 0.8
    open_s: float = 5.0
    max_open_s: float = 60.0
    half_open_probes: int = 3

    def __post_init__(self) -> None:
        _count("consecutive_failures", self.consecutive_failures)
        _count("min_requests", self.min_requests)
        _count("half_open_probes", self.half_open_probes)
        _share("failure_rate", self.failure_rate)
        _share("slow_call_rate", self.slow_call_rate)
        for name in ("window_s", "slow_call_s", "open_s", "max_open_s"):
            _positive(name, getattr(self, name))
        if self.max_open_s < self.open_s:
            raise ValueError("max_open_s must be >= open_s")


class Breaker:
    __slots__ = (
        "_bucket_s",
        "_buckets",
        "_consecutive",
        "_open_for",
        "_opened_at",
        "_probes_ok",
        "_probes_out",
        "_state",
        "_win",
        "_win_idx",
        "cfg",
        "on_change",
        "trips",
    )

    def __init__(self, cfg: BreakerConfig, now: float) -> None:
        self.cfg = cfg
        self._state = CLOSED
        self._consecutive = 0
        self._bucket_s = cfg.window_s / BUCKETS
        # per bucket: [bucket index, calls, failures, slow]
        self._buckets: list[list[int]] = [[-1, 0, 0, 0] for _ in range(BUCKETS)]
        # the window's [calls, failures, slow] as of bucket ``_win_idx``:
        # summed over the buckets when a new bucket starts, then kept up to
        # date call by call (no sum over 10 buckets for every call)
        self._win = [0, 0, 0]
        self._win_idx = -1
        self._opened_at = 0.0
        self._open_for = cfg.open_s
        self._probes_out = 0
        self._probes_ok = 0
        self.trips = 0
        self.on_change: Callable[[int, int, float], None] | None = None

    def retune(self, cfg: BreakerConfig) -> None:
        """Takes reloaded settings in place. The state stays: an open
        breaker stays open, for no longer than the new ``max_open_s``, and
        the failures counted so far count against the new thresholds from
        the next call on. The window's counts stay unless its length
        changed; then it starts empty (its buckets would not line up)."""
        old, self.cfg = self.cfg, cfg
        if cfg.window_s != old.window_s:
            self._bucket_s = cfg.window_s / BUCKETS
            for b in self._buckets:
                b[0], b[1], b[2], b[3] = -1, 0, 0, 0
            win = self._win
            win[0], win[1], win[2] = 0, 0, 0
            self._win_idx = -1
        if self._state == CLOSED:
            self._open_for = cfg.open_s
        else:
            self._open_for = min(self._open_for, cfg.max_open_s)

    # -- state ------------------------------------------------------------------
    def state(self, now: float) -> int:
        if self._state == OPEN and now - self._opened_at >= self._open_for:
            self._set(HALF_OPEN, now)
            self._probes_out = 0
            self._probes_ok = 0
        return self._state

    def _set(self, new: int, now: float) -> None:
        old = self._state
        if old == new:
            return
        self._state = new
        if self.on_change is not None:
            self.on_change(old, new, now)

    def _trip(self, now: float) -> None:
        if self._state == HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.cfg.max_open_s)
        else:
            self._open_for = self.cfg.open_s
        self._opened_at = now
        self.trips += 1
        self._set(OPEN, now)
        self._consecutive = 0
        # the window starts empty once the breaker closes again: the counts
        # go too, not only the buckets' indexes (an index of -1 is inside
        # the window while the clock is under window_s, as a test's
        # MockClock is at first)
        for b in self._buckets:
            b[0], b[1], b[2], b[3] = -1, 0, 0, 0
        self._win_idx = -1

    # -- calls --------------------------------------------------------------------
    def allow(self, now: float) -> bool:
        """True when a call may go; in half-open each True is a probe whose
        result must be reported with :meth:`record` (or :meth:`release`)."""
        st = self.state(now)
        if st == CLOSED:
            return True
        if st == OPEN:
            return False
        if self._probes_out + self._probes_ok >= self.cfg.half_open_probes:
            return False
        self._probes_out += 1
        return True

    def release(self, now: float) -> None:
        """An allowed half-open probe was not used after all."""
        if self._state == HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def record(self, now: float, ok: bool, latency_s: float) -> None:
        self._record(now, ok, latency_s > self.cfg.slow_call_s)

    def record_ok(self, now: float, calls: int, slow: int) -> None:
        """``calls`` successes at ``now``, ``slow`` of them slower than
        ``slow_call_s``: exactly what that many :meth:`record` calls would
        do (the slow ones first). While closed, with no slow call and no
        trip possible along the way (the failure and slow shares only fall
        as successes are added, so checking the first call that reaches
        ``min_requests`` is enough), in one update."""
        if calls <= 0:
            return
        if slow == 0 and self.state(now) == CLOSED:
            idx = int(now / self._bucket_s)
            b = self._buckets[idx % BUCKETS]
            if b[0] != idx:
                b[0], b[1], b[2], b[3] = idx, 0, 0, 0
            if self._win_idx != idx:
                self._resum(idx)
            win = self._win
            cfg = self.cfg
            n = max(cfg.min_requests, win[0] + 1)  # calls when the first check can trip
            if n > win[0] + calls or not (
                win[1] >= cfg.failure_rate * n or win[2] >= cfg.slow_call_rate * n
            ):
                self._consecutive = 0
                b[1] += calls
                win[0] += calls
                return
        for i in range(calls):
            self._record(now, True, i < slow)

    def _resum(self, idx: int) -> None:
        """The window's sums as of bucket ``idx``, from the buckets."""
        calls = fails = slows = 0
        lo = idx - BUCKETS + 1
        for bb in self._buckets:
            if bb[0] >= lo:
                calls += bb[1]
                fails += bb[2]
                slows += bb[3]
        win = self._win
        win[0], win[1], win[2] = calls, fails, slows
        self._win_idx = idx

    def _check(self, now: float) -> None:
        cfg = self.cfg
        calls, fails, slows = self._win
        if calls >= cfg.min_requests and (
            fails >= cfg.failure_rate * calls or slows >= cfg.slow_call_rate * calls
        ):
            self._trip(now)

    def _record(self, now: float, ok: bool, slow: bool) -> None:
        cfg = self.cfg
        st = self.state(now)
        if st == HALF_OPEN:
            if self._probes_out > 0:
                self._probes_out -= 1
            if not ok or slow:
                self._trip(now)
                return
            self._probes_ok += 1
            if self._probes_ok >= cfg.half_open_probes:
                self._open_for = cfg.open_s
                self._consecutive = 0
                self._set(CLOSED, now)
            return
        if st == OPEN:
            return  # a late answer to a call made before the breaker opened
        idx = int(now / self._bucket_s)
        b = self._buckets[idx % BUCKETS]
        if b[0] != idx:
            b[0], b[1], b[2], b[3] = idx, 0, 0, 0
        b[1] += 1
        if not ok:
            b[2] += 1
            self._consecutive += 1
            if self._consecutive >= cfg.consecutive_failures:
                self._trip(now)
                return
        else:
            self._consecutive = 0
        if slow:
            b[3] += 1
        win = self._win
        if self._win_idx == idx:
            win[0] += 1
            if not ok:
                win[1] += 1
            if slow:
                win[2] += 1
        else:
            self._resum(idx)
        self._check(now)


@dataclass(frozen=True)
class OutlierConfig:
    consecutive_errors: int = 5
    base_ejection_s: float = 10.0
    max_ejection_percent: int = 50

    def __post_init__(self) -> None:
        _count("consecutive_errors", self.consecutive_errors)
        _positive("base_ejection_s", self.base_ejection_s)
        if type(self.max_ejection_percent) is not int or not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be an integer in 0..100")


class OutlierDetector:
    """Per-endpoint consecutive errors and ejections for one cluster."""

    __slots__ = ("_errors", "_times", "_until", "cfg", "endpoints")

    def __init__(self, cfg: OutlierConfig, endpoints: int = 0) -> None:
        self.cfg = cfg
        self.endpoints = endpoints
        self._errors: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._times: dict[str, int] = {}

    def ejected(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def forget(self, key: str) -> None:
        """Endpoint ``key`` left the cluster."""
        self._errors.pop(key, None)
        self._until.pop(key, None)
        self._times.pop(key, None)

    def ejected_count(self, now: float) -> int:
        return sum(1 for k in list(self._until) if self.ejected(k, now))

    def record(self, key: str, now: float, ok: bool) -> None:
        if ok:
            self._errors[key] = 0
            return
        n = self._errors.get(key, 0) + 1
        self._errors[key] = n
        if n < self.cfg.consecutive_errors or self.ejected(key, now):
            return
        total = max(self.endpoints, len(self._errors))
        cap = min(total - 1, total * self.cfg.max_ejection_percent // 100)
        if self.ejected_count(now) >= cap:
            return
        times = self._times.get(key, 0) + 1
        self._times[key] = times
        self._until[key] = now + self.cfg.base_ejection_s * times
        self._errors[key] = 0
