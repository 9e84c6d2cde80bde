"""Hashed timer wheel driven by a clock passed in (no I/O, no trio).

Time is cut into ticks of ``tick`` seconds counted from the ``now`` given to
the constructor; a deadline belongs to the first tick boundary at or after it
and lives in slot ``tick_number % slots``. A key fires in the first
:meth:`advance` whose ``now`` reaches that boundary: never before its
deadline, at most one tick after it. Deadlines more than one revolution
(``tick * slots``) away stay in their slot until their own tick comes round.

Memory per key: one dict entry (key -> tick number) plus one set entry (the
slot). :meth:`schedule`, :meth:`cancel` and re-scheduling are O(1);
:meth:`advance` costs the keys it fires plus the slots it passes (at most
``slots`` per call, however far the clock jumped) plus the far-future keys
sharing those slots.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

__all__ = ["TimerWheel"]


class TimerWheel:
    __slots__ = ("_cur", "_due", "_hint", "_n", "_slots", "_t0", "_tick", "_where")

    def __init__(self, tick: float, slots: int, now: float) -> None:
        if not tick > 0 or not math.isfinite(tick):
            raise ValueError("tick must be a positive number of seconds")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._tick = float(tick)
        self._n = int(slots)
        self._t0 = float(now)
        self._cur = 0  # last tick number processed by advance()
        self._slots: list[set[Hashable]] = [set() for _ in range(self._n)]
        self._due: set[Hashable] = set()  # keys scheduled at or before _cur
        self._where: dict[Hashable, int] = {}  # key -> tick number
        self._hint: int | None = None  # cached earliest tick number, if known

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def _remove(self, key: Hashable, at: int) -> None:
        if at <= self._cur:
            self._due.discard(key)
        else:
            self._slots[at % self._n].discard(key)
        if at == self._hint:
            self._hint = None

    def schedule(self, deadline: float, key: Hashable) -> None:
        """Fires ``key`` at ``deadline``; a key already scheduled is moved.
        A deadline in the past fires on the next :meth:`advance`."""
        x = (deadline - self._t0) / self._tick
        if x != x:
            raise ValueError("deadline is NaN")
        at = math.ceil(x) if x < 1e15 else 1 << 62  # inf/huge: "never" in practice
        old = self._where.get(key)
        if old is not None:
            if old == at:
                return
            self._remove(key, old)
        self._where[key] = at
        if at <= self._cur:
            self._due.add(key)
        else:
            self._slots[at % self._n].add(key)
        hint = self._hint
        if (hint is not None and at < hint) or (hint is None and len(self._where) == 1):
            self._hint = at

    def cancel(self, key: Hashable) -> None:
        """Forgets ``key``; unknown keys are ignored."""
        at = self._where.pop(key, None)
        if at is not None:
            self._remove(key, at)

    def advance(self, now: float) -> list[Hashable]:
        """Every key whose tick boundary is at or before ``now``, removed from
        the wheel. A ``now`` earlier than a previous one fires nothing new."""
        fired: list[Hashable] = []
        where = self._where
        if self._due:
            fired.extend(self._due)
            for k in self._due:
                del where[k]
            self._due = set()
        target = math.floor((now - self._t0) / self._tick)
        cur = self._cur
        if target > cur:
            n = self._n
            for t in range(cur + 1, cur + 1 + min(target - cur, n)):
                slot = self._slots[t % n]
                if not slot:
                    continue
                ready = [k for k in slot if where[k] <= target]
                if ready:
                    if len(ready) == len(slot):
                        slot.clear()
                    else:
                        slot.difference_update(ready)
                    for k in ready:
                        del where[k]
                    fired.extend(ready)
            self._cur = target
        if self._hint is not None and (self._hint <= self._cur or not where):
            self._hint = None
        return fired

    def _earliest_tick(self) -> int | None:
        if not self._where:
            return None
        if self._due:
            return self._cur
        if self._hint is not None:
            return self._hint
        n = self._n
        where = self._where
        cur = self._cur
        best: int | None = None
        for t in range(cur + 1, cur + 1 + n):
            slot = self._slots[t % n]
            if slot and any(where[k] == t for k in slot):
                best = t
                break
        if best is None:  # only deadlines beyond one revolution
            best = min(where.values())
        self._hint = best
        return best

    def next_deadline(self) -> float | None:
        """The time at which the earliest key becomes due (its tick boundary,
        at or after its deadline), or None when the wheel is empty. A value
        at or before the last ``now`` means :meth:`advance` fires something."""
        t = self._earliest_tick()
        if t is None:
            return None
        return self._t0 + t * self._tick
