"""Smaller idle HTTP/2 connections: h2's state, minus its empty deques.

h2 keeps every HTTP/2 setting as a ``collections.deque`` of values (current
first, then those waiting for the peer's acknowledgement), in two
``Settings`` objects per connection, and hpack keeps each header table's
dynamic entries in another deque. An empty or one-item deque costs 760
bytes, so these ~16 deques were ~12 KB of the ~17.5 KB an idle connection's
h2 state takes (``tracemalloc``); its table of ten bound frame handlers
another 630 bytes. h2 and hpack only ever use them through
``[i]``, ``len``, iteration, ``append``, ``appendleft``, ``pop``,
``popleft`` and ``clear``: a setting's values become :class:`_Values`
(two slots: the current value and, while a change awaits acknowledgement,
a list of pending ones), a header table's entries a :class:`SmallDeque` (a
list, 56 bytes empty; its O(n) ``appendleft`` touches a table bounded by its
byte size). The handler
table becomes :class:`_Dispatch`, which binds the handler on each lookup.

:func:`compact` swaps them in place and is called after each batch of
received data that changed settings (a new setting key gets a fresh deque
from h2). It only swaps objects that are exactly ``deque``: if a future h2
stores them differently, nothing is swapped (and ``tests/test_server_h2.py``
notices that the swap no longer happens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["SmallDeque", "compact", "release"]

#: frame class -> name of the H2Connection method that receives it, learnt
#: from the first connection compacted (the same for every connection).
_HANDLER_NAMES: dict[type, str] = {}


class _Dispatch:
    """Stands for h2's per-connection ``{frame class: bound method}`` table
    (a dict of ten bound methods, ~630 bytes): looks the method up by name
    when a frame arrives. h2 only indexes the table (``table[cls](frame)``)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __getitem__(self, cls: type) -> Any:
        return getattr(self.conn, _HANDLER_NAMES[cls])


class _Values:
    """One setting's values, current first, then those awaiting the peer's
    acknowledgement (h2's deque): 48 bytes for the usual single value."""

    __slots__ = ("cur", "rest")

    def __init__(self, values: Any) -> None:
        items = list(values)
        self.cur = items[0]
        self.rest: list[Any] | None = items[1:] or None

    def __len__(self) -> int:
        return 1 + (len(self.rest) if self.rest else 0)

    def __getitem__(self, i: int) -> Any:
        if i == 0:
            return self.cur
        return list(self)[i]

    def __iter__(self) -> Iterator[Any]:
        yield self.cur
        if self.rest:
            yield from self.rest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Iterable):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def append(self, value: Any) -> None:
        if self.rest is None:
            self.rest = [value]
        else:
            self.rest.append(value)

    def popleft(self) -> Any:
        if not self.rest:
            raise IndexError("no pending value")
        old = self.cur
        self.cur = self.rest.pop(0)
        if not self.rest:
            self.rest = None
        return old


class SmallDeque(list[Any]):
    """The deque operations h2 and hpack use, over a list."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def compact(conn: Any) -> int:
    """Replaces the deques of an ``h2.connection.H2Connection``'s settings
    and header tables and its handler table; returns how many were
    replaced."""
    swapped = 0
    for settings in (getattr(conn, "local_settings", None), getattr(conn, "remote_settings", None)):
        table = getattr(settings, "_settings", None)
        if type(table) is not dict:
            continue
        for key, values in table.items():
            if type(values) is deque and values:
                table[key] = _Values(values)
                swapped += 1
    for side in (getattr(conn, "encoder", None), getattr(conn, "decoder", None)):
        ht = getattr(side, "header_table", None)
        entries = getattr(ht, "dynamic_entries", None)
        if type(entries) is deque:
            ht.dynamic_entries = SmallDeque(entries)  # type: ignore[union-attr]
            swapped += 1
    table = getattr(conn, "_frame_dispatch_table", None)
    if type(table) is dict and all(getattr(m, "__self__", None) is conn for m in table.values()):
        names = {cls: m.__func__.__name__ for cls, m in table.items()}
        if not _HANDLER_NAMES:
            _HANDLER_NAMES.update(names)
        if names == _HANDLER_NAMES:
            conn._frame_dispatch_table = _Dispatch(conn)
            swapped += 1
    return swapped


def release(conn: Any) -> None:
    """The connection is over: empties its handler table, the one reference
    cycle in an ``H2Connection`` (h2's table of bound methods, or the
    :class:`_Dispatch` that replaced it, refers back to the connection), so
    that reference counting frees it at once. Left to the cyclic collector,
    closed connections that had lived long enough to reach its oldest
    generation waited for a full collection, which came rarely enough that
    they piled up under churn. A frame fed to it afterwards raises
    ``KeyError``."""
    if isinstance(getattr(conn, "_frame_dispatch_table", None), (dict, _Dispatch)):
        conn._frame_dispatch_table = {}
