"""Maps that keep their newest ``cap`` keys (dedup windows), sans-IO.

A plain dict keeps insertion order, but forgetting its oldest key with
``del d[next(iter(d))]`` is not O(1): iteration walks the holes the keys
deleted before left at the front of the entry table, up to a third of it
until the next resize (~0.6 µs per insert at 1,024 keys, ~3 µs at 4,096).
:class:`RecentMap` keeps the keys in a list beside the dict and forgets
the oldest by name; the list is compacted once its dead front is as long
as the live part (one memmove every ``cap`` inserts, amortised O(1); the
list holds at most ``2 * cap`` keys). ``collections.OrderedDict`` does the
same in O(1) but costs twice the memory per entry, and windows live in
every session.

Even so, a full window of 1,024 int ids cost ~180 bytes per id (the dict
and its deleted slots, the key list, two int objects per entry): ~187 KB
for a session that has sent 1,024 messages, so memory grew with every
chatting session up to that much. :class:`IdWindow` holds int ids (what
the SDK and the widget send, and the message numbers desk-sim
remembers) in two arrays used as rings, 16 bytes per id. A new id above
every id seen is known to be absent without a search; while ids come in
increasing order (clients count up) the ring is sorted and an older one (a
resend after a reconnect) is found by binary search, else by one search
through the array's bytes. The first id of another kind (a string) turns
the window into a :class:`RecentMap`.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["IdWindow", "RecentMap"]

V = TypeVar("V")


class RecentMap(Generic[V]):
    """The newest ``cap`` keys put, with their values (oldest first)."""

    __slots__ = ("cap", "d", "head", "order")

    def __init__(self, cap: int, items: Iterable[tuple[Any, V]] = ()) -> None:
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        self.d: dict[Any, V] = {}
        self.order: list[Any] = []
        self.head = 0  # order[:head] are forgotten
        for k, v in items:
            self.put(k, v)

    def put(self, key: Any, value: V) -> None:
        """Adds ``key`` as the newest (a key already held keeps its place
        and takes the new value)."""
        d = self.d
        if key in d:
            d[key] = value
            return
        d[key] = value
        order = self.order
        order.append(key)
        if len(d) > self.cap:
            h = self.head
            del d[order[h]]
            h += 1
            if h >= 64 and h * 2 >= len(order):
                del order[:h]
                h = 0
            self.head = h

    def get(self, key: Any) -> V | None:
        return self.d.get(key)

    def __contains__(self, key: Any) -> bool:
        return key in self.d

    def __len__(self) -> int:
        return len(self.d)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.d)

    def items(self) -> Iterable[tuple[Any, V]]:
        return self.d.items()


class IdWindow:
    """The newest ``cap`` ids put, each with an int value (oldest first),
    as :class:`RecentMap` but compact for int ids (see the module
    docstring). Values must fit in a signed 64-bit integer."""

    __slots__ = ("cap", "head", "ids", "mono", "other", "top", "vals")

    def __init__(self, cap: int, items: Iterable[tuple[Any, int]] = ()) -> None:
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        # slot i holds ids[i] and vals[i]; the arrays grow to cap items,
        # then the oldest slot (head) is overwritten
        self.ids: array[int] = array("Q")
        self.vals: array[int] = array("q")
        self.head = 0
        self.top = -1  # the largest int id ever put: any larger one is absent
        # every id was put above the ones before (the usual case: clients
        # count up), so the slots from head on are sorted: binary search
        self.mono = True
        self.other: RecentMap[int] | None = None  # after a non-int id
        for k, v in items:
            self.put(k, v)

    def _slot(self, key: int) -> int:
        """The slot of int ``key`` (in range), -1 when it is not held."""
        if key > self.top:
            return -1
        ids = self.ids
        n = len(ids)
        if self.mono:
            start = self.head
            cap = self.cap
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi) >> 1
                if ids[(start + mid) % cap] < key:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < n:
                s = (start + lo) % cap
                if ids[s] == key:
                    return s
            return -1
        # out of order: one search through the slots' bytes
        raw = ids.tobytes()
        kb = key.to_bytes(8, sys.byteorder)
        i = raw.find(kb)
        while i >= 0:
            if i & 7 == 0:
                return i >> 3
            i = raw.find(kb, i + 1)  # a match across two slots
        return -1

    def _to_map(self) -> RecentMap[int]:
        m: RecentMap[int] = RecentMap(self.cap, self.items())
        self.other = m
        self.ids = array("Q")
        self.vals = array("q")
        return m

    def put(self, key: Any, value: int) -> None:
        """Adds ``key`` as the newest (a key already held keeps its place
        and takes the new value)."""
        o = self.other
        if o is not None:
            o.put(key, value)
            return
        if type(key) is not int or key < 0 or key >> 64:
            self._to_map().put(key, value)
            return
        if key <= self.top:
            s = self._slot(key)
            if s >= 0:
                self.vals[s] = value
                return
        ids = self.ids
        # the value first: one beyond 64 bits raises OverflowError before
        # anything changed
        if len(ids) < self.cap:
            self.vals.append(value)
            ids.append(key)
        else:
            h = self.head
            self.vals[h] = value
            ids[h] = key
            self.head = h + 1 if h + 1 < self.cap else 0
        if key > self.top:
            self.top = key
        else:
            self.mono = False

    def get(self, key: Any) -> int | None:
        o = self.other
        if o is not None:
            return o.get(key)
        if type(key) is not int or key < 0:
            return None
        s = self._slot(key)  # (an id from 2**64 on is above the top)
        return self.vals[s] if s >= 0 else None

    def __contains__(self, key: Any) -> bool:
        o = self.other
        if o is not None:
            return key in o
        if type(key) is not int or key < 0:
            return False
        return self._slot(key) >= 0

    def __len__(self) -> int:
        o = self.other
        return len(o) if o is not None else len(self.ids)

    def __iter__(self) -> Iterator[Any]:
        return iter([k for k, _ in self.items()])

    def items(self) -> list[tuple[Any, int]]:
        """``(id, value)`` pairs, oldest first."""
        o = self.other
        if o is not None:
            return list(o.items())
        ids, vals, cap = self.ids, self.vals, self.cap
        n = len(ids)
        start = self.head if n == cap else 0
        return [(ids[(start + k) % cap], vals[(start + k) % cap]) for k in range(n)]
