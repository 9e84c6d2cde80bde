"""CompactSettings (gateway.server.h2compact) behaves as h2's own Settings,
shares its current values among connections without one connection's
change reaching another, and keeps its table of shared values bounded."""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from gateway.server import h2compact
from gateway.server.h2compact import CompactSettings, compact

SC = h2.settings.SettingCodes
KEYS = [SC.HEADER_TABLE_SIZE, SC.INITIAL_WINDOW_SIZE, SC.MAX_FRAME_SIZE, SC.MAX_CONCURRENT_STREAMS]
UNKNOWN = 0x77  # an identifier h2 does not know


def compacted(settings: h2.settings.Settings) -> CompactSettings:
    holder = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    holder.local_settings = settings
    compact(holder)
    assert type(holder.local_settings) is CompactSettings
    return holder.local_settings


def cur(settings: object) -> Any:
    """A CompactSettings' dict of current values (shared or its own)."""
    assert type(settings) is CompactSettings
    return settings._cur


def observe(s: Any) -> Any:
    """Everything h2 can read from a Settings object."""
    out: dict[str, Any] = {"len": len(s), "keys": list(s)}
    for k in KEYS:
        try:
            out[f"get{int(k)}"] = s[k]
        except KeyError:
            out[f"get{int(k)}"] = "KeyError"
    for name in ("header_table_size", "initial_window_size", "max_frame_size"):
        try:
            out[name] = getattr(s, name)
        except KeyError:
            out[name] = "KeyError"
    return out


def apply(s: Any, op: tuple[str, Any, Any]) -> Any:
    kind, key, value = op
    try:
        if kind == "set":
            s[key] = value
            return None
        if kind == "update":
            s.update({key: value})
            return None
        if kind == "ack":
            return {k: (c.original_value, c.new_value) for k, c in s.acknowledge().items()}
        if kind == "del":
            del s[key]
            return None
        if kind == "items":
            return list(s.items())
    except (KeyError, h2.exceptions.InvalidSettingsValueError) as e:
        return type(e).__name__
    raise AssertionError(kind)


def random_ops(rng: random.Random, n: int) -> list[tuple[str, Any, Any]]:
    ops = []
    for _ in range(n):
        kind = rng.choice(["set", "set", "update", "ack", "ack", "del", "items"])
        key = rng.choice(KEYS)
        # now and then an invalid value (a window over 2^31-1, a frame size
        # under 16,384)
        value = rng.choice([0, 1, 100, 4096, 16384, 20000, 65535, 1 << 31, 1000])
        ops.append((kind, key, value))
    return ops


@pytest.mark.parametrize("seed", range(40))
def test_same_behaviour_as_h2_settings(seed: int) -> None:
    rng = random.Random(seed)
    client = bool(seed % 2)
    initial = {SC.MAX_CONCURRENT_STREAMS: 32, SC.HEADER_TABLE_SIZE: 0}
    plain = h2.settings.Settings(client=client, initial_values=initial)
    if seed % 4 < 2:  # what compact() makes of h2's
        ours = compacted(h2.settings.Settings(client=client, initial_values=initial))
    else:  # made directly
        ours = CompactSettings(client=client, initial_values=initial)
    assert observe(ours) == observe(plain)
    for op in random_ops(rng, 60):
        assert apply(ours, op) == apply(plain, op), op
        assert observe(ours) == observe(plain), op
    # an identifier h2 does not know: h2 keeps it, ours ignores it
    plain[UNKNOWN] = 5
    ours[UNKNOWN] = 5
    assert UNKNOWN in list(plain) and UNKNOWN not in list(ours)
    # validation of a received setting is h2's own
    for value in (0, 1, 2):
        got: list[Any] = [None, None]
        for i, s in enumerate((plain, ours)):
            try:
                s.validate_received_setting(SC.ENABLE_PUSH, value)
            except h2.exceptions.InvalidSettingsValueError as e:
                got[i] = e.error_code
        assert got[0] == got[1]


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    """A SETTINGS frame on the wire (hyperframe's serializer keeps only the
    low byte of an identifier)."""
    body = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
    return struct.pack(">L", len(body))[1:] + b"\x04\x00" + struct.pack(">L", 0) + body


def test_unknown_identifiers_from_a_peer_are_ignored() -> None:
    """RFC 9113 6.5.2: a receiver ignores settings it does not know. h2
    keeps every one a peer sends, for the connection's lifetime: ~62,000
    identifiers in 363 KiB of SETTINGS frames made one connection hold
    ~50 MB. Compacted, the connection keeps none of them, acknowledges
    every frame, and still applies the known setting in the same frame."""
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    s.initiate_connection()
    compact(s)
    s.data_to_send()
    s.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    known = len(s.remote_settings)
    bases = range(0x100, 0xF000, 2000)

    def feed() -> int:
        acks = 0
        for base in bases:
            pairs = [(k, 1) for k in range(base, base + 2000)]
            pairs.append((int(SC.MAX_FRAME_SIZE), 20000 + base))
            events = s.receive_data(settings_frame(pairs))
            compact(s)
            assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
            acks += s.data_to_send().count(b"\x00\x00\x00\x04\x01")  # SETTINGS, ACK
        return acks

    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        acks = feed()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # what the connection holds now, not this test's own leftovers (its
    # lists' tuples wait in CPython's free list)
    grown = sum(
        d.size_diff
        for d in after.compare_to(before, "filename")
        if d.traceback[0].filename != __file__
    )
    assert acks == len(bases)
    assert len(s.remote_settings) == known
    assert UNKNOWN not in s.remote_settings and 0x100 not in list(s.remote_settings)
    assert s.remote_settings.max_frame_size == 20000 + bases[-1]
    assert grown < 64 * 1024, grown  # ~50 MB in h2's own Settings


def test_connections_share_values_and_a_change_stays_on_its_connection() -> None:
    def server() -> h2.connection.H2Connection:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
        compact(c)
        return c

    a, b = server(), server()
    assert type(a.local_settings) is CompactSettings
    assert cur(a.local_settings) is cur(b.local_settings)  # one dict for both
    assert cur(a.remote_settings) is cur(b.remote_settings)
    shared = dict(cur(a.local_settings))
    # a's peer changes its frame size; b's view and the shared dict stay
    cl = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    cl.initiate_connection()
    cl.update_settings({SC.MAX_FRAME_SIZE: 32768})
    events = a.receive_data(cl.data_to_send())
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    compact(a)
    assert a.remote_settings.max_frame_size == 32768
    assert b.remote_settings.max_frame_size == 16384
    # a local change pending on a, then acknowledged: b unchanged throughout
    a.update_settings({SC.INITIAL_WINDOW_SIZE: 1000})
    assert a.local_settings.values_of(SC.INITIAL_WINDOW_SIZE) == [65535, 1000]
    cl.receive_data(a.data_to_send())
    events = a.receive_data(cl.data_to_send())
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    assert a.local_settings.initial_window_size == 1000
    assert b.local_settings.initial_window_size == 65535
    assert dict(cur(b.local_settings)) == shared
    # a third connection with the same settings as a shares a's new values
    c = server()
    c.update_settings({SC.INITIAL_WINDOW_SIZE: 1000})
    c.local_settings.acknowledge()
    compact(c)
    assert cur(c.local_settings) is cur(a.local_settings)


def test_table_of_shared_values_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer picks its own settings' values: thousands of distinct ones
    never grow the table past its bound, and each connection still reads
    its own."""
    monkeypatch.setattr(h2compact, "SHARED_MAX", 16)
    monkeypatch.setattr(h2compact, "_SHARED", {})
    conns = []
    for i in range(200):
        s = h2.settings.Settings(client=True)
        s[SC.MAX_FRAME_SIZE] = 16384 + i
        s.acknowledge()
        conns.append(compacted(s))
        assert len(h2compact._SHARED) <= 16
    assert [s.max_frame_size for s in conns] == [16384 + i for i in range(200)]
    # the common table is back after the next connection that has it
    a = compacted(h2.settings.Settings(client=True))
    b = compacted(h2.settings.Settings(client=True))
    assert a._cur is b._cur


def test_not_swapped_when_h2_keeps_something_else() -> None:
    """A Settings subclass, or one whose table is not h2's dict of deques,
    is left as it is (a future h2 keeps working, only without the saving)."""

    class Mine(h2.settings.Settings):
        pass

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.local_settings = Mine(client=False)
    odd = h2.settings.Settings(client=True)
    odd._settings = {SC.MAX_FRAME_SIZE: [16384]}  # type: ignore[dict-item]
    c.remote_settings = odd
    compact(c)
    assert type(c.local_settings) is Mine and c.remote_settings is odd
