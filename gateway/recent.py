"""A map that keeps its newest ``cap`` keys (dedup windows), sans-IO.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["RecentMap"]

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
