"""Smaller idle HTTP/2 connections: h2's state, minus its per-connection
copies of what every connection has alike.

h2 keeps every HTTP/2 setting as a ``collections.deque`` of values (current
first, then those waiting for the peer's acknowledgement), in two
``Settings`` objects per connection, and hpack keeps each header table's
dynamic entries in another deque. An empty or one-item deque costs 760
bytes, so these ~16 deques were ~12 KB of the ~17.5 KB an idle connection's
h2 state takes (``tracemalloc``); its table of ten bound frame handlers
another 630 bytes.

- Each ``Settings`` becomes a :class:`CompactSettings`: its current values
  in one dict shared by all connections with the same values (interned,
  copied on change), the values awaiting acknowledgement in a dict only
  while there are some. Before it (one two-slot object per setting in the
  connection's own dict) they took ~1.4 KB a connection.
- A header table's entries become a :class:`SmallDeque` (a list, 56 bytes
  empty; hpack only uses ``[i]``, ``len``, iteration, ``append``,
  ``appendleft``, ``pop``, ``popleft`` and ``clear``, and its O(n)
  ``appendleft`` touches a table bounded by its byte size).
- The handler table becomes :class:`_Dispatch`, which binds the handler on
  each lookup.

:func:`compact` swaps them in place and is called after each batch of
received data that changed settings. It only swaps what is exactly what
the pinned h2 keeps (``Settings`` holding a dict of deques, a ``deque`` of
entries): if a future h2 stores them differently, nothing is swapped (and
``tests/test_server_h2.py`` notices that the swap no longer happens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import h2.exceptions
import h2.frame_buffer
import h2.settings

try:  # the check h2's own Settings.__setitem__ makes
    from h2.settings import _validate_setting
except ImportError:  # pragma: no cover - a future h2: settings stay h2's
    _validate_setting = None  # type: ignore[assignment]

__all__ = ["HEADER_BLOCK_FRAMES", "CompactSettings", "SmallDeque", "compact", "release"]

#: A header block arrives as a HEADERS frame and CONTINUATION frames, and
#: h2 keeps them all until the last one: up to 64 frames of up to 16 KiB
#: (the frame size the gateway allows), ~1 MiB per connection that a client
#: could pin with a block it never ends. The gateway advertises a 16 KiB
#: header list, which any HPACK encoding fits in one frame; a block of more
#: than this many frames is a connection error (PROTOCOL_ERROR, GOAWAY), so
#: a connection holds at most 64 KiB of it (as a WebSocket frame is bounded
#: by max_frame). Set for the whole process (h2 reads the module's global).
HEADER_BLOCK_FRAMES = 4
h2.frame_buffer.CONTINUATION_BACKLOG = min(
    h2.frame_buffer.CONTINUATION_BACKLOG, HEADER_BLOCK_FRAMES
)

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


#: interned tables of current setting values, shared by every connection
#: whose settings are the same (almost all of them). A peer chooses the
#: values of its own settings, so the table is bounded: when full it starts
#: over (connections keep the tables they have; the common ones are back
#: after the next connection that has them).
_SHARED: dict[tuple[tuple[Any, Any], ...], dict[Any, Any]] = {}
SHARED_MAX = 256
#: the settings identifiers h2 knows; any other a peer sends is ignored
_KNOWN: frozenset[int] = frozenset(int(c) for c in h2.settings.SettingCodes)


def _intern(values: dict[Any, Any]) -> dict[Any, Any]:
    key = tuple(values.items())
    shared = _SHARED.get(key)
    if shared is not None:
        return shared
    if len(_SHARED) >= SHARED_MAX:
        _SHARED.clear()
    _SHARED[key] = values
    return values


class CompactSettings(h2.settings.Settings):
    """h2's ``Settings`` with one ``{setting: current value}`` dict shared
    by every connection that has the same values (never changed in place: a
    change makes a new one), and the values waiting for the peer's
    acknowledgement in a dict of lists only while there are some. h2 keeps a
    dict of deques per ``Settings`` object (two per connection); this keeps two
    references and, rarely, the pending dict. Unlike h2, it ignores the
    settings identifiers h2 does not know (as RFC 9113 says a receiver
    must), so that what a peer sends cannot grow it.

    :func:`compact` puts one in place of each of a connection's h2
    ``Settings``; the whole mapping API h2 uses (``[]``, ``[]=``, ``del``,
    iteration, ``len``, ``acknowledge``, and through them ``update`` and
    the named properties) is overridden, so nothing reads ``_settings``
    as h2's dict of deques any more."""

    _cur: dict[Any, Any]
    _pending: dict[Any, list[Any]] | None = None

    def __init__(self, client: bool = True, initial_values: dict[Any, int] | None = None) -> None:
        made = _compact_settings(h2.settings.Settings(client, initial_values))
        if made is None:
            raise TypeError("this h2 keeps its settings in a way CompactSettings does not know")
        self._client = made._client
        self._cur = made._cur

    def __getitem__(self, key: Any) -> Any:
        val = self._cur[key]
        if val is None:  # a setting the peer is yet to acknowledge, as in h2
            raise KeyError(key)
        return val

    def __setitem__(self, key: Any, value: Any) -> None:
        invalid = _validate_setting(key, value)
        if invalid:
            raise h2.exceptions.InvalidSettingsValueError(
                f"Setting {key} has invalid value {value}", error_code=invalid
            )
        if key not in _KNOWN:
            # RFC 9113 6.5.2: an unknown or unsupported identifier MUST be
            # ignored. h2 keeps each one for the connection's lifetime: a
            # peer could make one connection hold ~50 MB with ~360 KB of
            # SETTINGS frames (every 16-bit identifier;
            # bench/h2_settings_mem.py).
            return
        if key not in self._cur:
            cur = dict(self._cur)
            cur[key] = None
            self._cur = cur
        pending = dict(self._pending) if self._pending else {}
        pending[key] = [*pending.get(key, ()), value]
        self._pending = pending

    def __delitem__(self, key: Any) -> None:
        cur = dict(self._cur)
        del cur[key]
        self._cur = _intern(cur)
        if self._pending and key in self._pending:
            pending = dict(self._pending)
            del pending[key]
            self._pending = pending or None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)

    def __len__(self) -> int:
        return len(self._cur)

    def values_of(self, key: Any) -> list[Any]:
        """The setting's values as h2 keeps them: current, then pending."""
        return [self._cur[key], *(self._pending or {}).get(key, ())]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactSettings):
            return self._cur == other._cur and (self._pending or {}) == (other._pending or {})
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def acknowledge(self) -> dict[Any, h2.settings.ChangedSetting]:
        """Each setting with a pending value takes the first of them (h2's
        ``popleft``); returns what changed, as h2 does."""
        changed: dict[Any, h2.settings.ChangedSetting] = {}
        if not self._pending:
            return changed
        cur = dict(self._cur)
        pending: dict[Any, list[Any]] = {}
        for key, values in self._pending.items():
            old, new = cur[key], values[0]
            cur[key] = new
            changed[key] = h2.settings.ChangedSetting(key, old, new)
            if len(values) > 1:
                pending[key] = values[1:]
        self._cur = _intern(cur)
        self._pending = pending or None
        return changed


def _compact_settings(settings: Any) -> Any:
    """A :class:`CompactSettings` with the values of an h2 ``Settings``, or
    None when it is not what this h2 version is known to keep (or is one
    already: its own changes keep it interned)."""
    if type(settings) is not h2.settings.Settings or _validate_setting is None:
        return None
    table = getattr(settings, "_settings", None)
    client = getattr(settings, "_client", None)
    if type(table) is not dict or type(client) is not bool:
        return None
    if not all(type(v) is deque and v for v in table.values()):
        return None
    pending = {k: list(v)[1:] for k, v in table.items() if len(v) > 1}
    done = CompactSettings.__new__(CompactSettings)
    done._client = client
    cur = {k: v[0] for k, v in table.items()}
    done._cur = _intern(cur) if not pending else cur
    if pending:
        done._pending = pending
    return done


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
    for name in ("local_settings", "remote_settings"):
        done = _compact_settings(getattr(conn, name, None))
        if done is not None:
            setattr(conn, name, done)
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
