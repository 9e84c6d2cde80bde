"""Token-bucket rate limits driven by a monotonic clock passed in."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["KeyedLimiter", "TokenBucket"]


def _check(rate: float, burst: float) -> None:
    if not rate >= 0 or not math.isfinite(rate):
        raise ValueError("rate must be a finite number >= 0")
    if not burst > 0 or not math.isfinite(burst):
        raise ValueError("burst must be a finite number > 0")


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full.

    :meth:`take` returns 0.0 and removes ``n`` tokens when they are there,
    otherwise removes nothing and returns the seconds until they will be
    (``inf`` when never: ``n > burst`` or a zero rate). A clock that goes
    backwards adds nothing.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        _check(rate, burst)
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = float(now)

    @property
    def tokens(self) -> float:
        """Tokens available at the last :meth:`take`."""
        return self._tokens

    def retune(self, rate: float, burst: float, now: float) -> None:
        """New rate and burst (a configuration reload): the bucket keeps
        its tokens as of ``now``, cut to the new burst, so a lower limit
        holds at once and a higher one fills up at the new rate."""
        _check(rate, burst)
        self.take(now, 0.0)  # the tokens earned so far, at the old rate
        self._rate = float(rate)
        self._burst = float(burst)
        if self._tokens > burst:
            self._tokens = float(burst)

    def take(self, now: float, n: float = 1.0) -> float:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        if n > self._burst or self._rate == 0:
            return math.inf
        return (n - self._tokens) / self._rate


class KeyedLimiter:
    """One :class:`TokenBucket`-equivalent per key, at most ``max_keys`` of
    them: adding a key beyond that evicts the least recently used bucket
    (which then starts full again if its key comes back)."""

    __slots__ = ("_buckets", "_burst", "_max", "_rate")

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        _check(rate, burst)
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._rate = float(rate)
        self._burst = float(burst)
        self._max = int(max_keys)
        # key -> [tokens, stamp]; order = least recently used first
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def retune(self, rate: float, burst: float) -> None:
        """New rate and burst for every bucket (a configuration reload):
        each keeps its tokens, cut to the new burst, so a lower limit holds
        at once and a higher one fills up at the new rate."""
        _check(rate, burst)
        self._rate = float(rate)
        self._burst = float(burst)
        for b in self._buckets.values():
            if b[0] > burst:
                b[0] = float(burst)

    def take(self, key: Hashable, now: float, n: float = 1.0) -> float:
        """Like :meth:`TokenBucket.take` on ``key``'s bucket."""
        buckets = self._buckets
        b = buckets.get(key)
        if b is None:
            if len(buckets) >= self._max:
                buckets.popitem(last=False)
            b = [self._burst, now]
            buckets[key] = b
        else:
            buckets.move_to_end(key)
            elapsed = now - b[1]
            if elapsed > 0:
                b[0] = min(self._burst, b[0] + elapsed * self._rate)
                b[1] = now
        if b[0] >= n:
            b[0] -= n
            return 0.0
        if n > self._burst or self._rate == 0:
            return math.inf
        return (n - b[0]) / self._rate
