"""The workers' event counters (gateway.session.tally)."""

from __future__ import annotations

import collections

from gateway.session.tally import Tally


def test_missing_keys_read_as_zero_without_being_stored() -> None:
    t = Tally()
    assert t["errors_4003"] == 0
    assert "errors_4003" not in t and len(t) == 0
    t["errors_4003"] += 1
    t["errors_4003"] += 2
    t["bytes_in_ws"] += 230
    assert t == {"errors_4003": 3, "bytes_in_ws": 230}
    assert t.get("nope") is None  # get() is dict's: no default count
    assert dict(t) == {"errors_4003": 3, "bytes_in_ws": 230}


def test_counts_as_counter_did() -> None:
    keys = ["a", "b", "a", "c", "a", "b"]
    t, c = Tally(), collections.Counter[str]()
    for k in keys:
        t[k] += 1
        c[k] += 1
    assert dict(t) == dict(c)
    del t["a"]
    assert t["a"] == 0 and "a" not in t


def test_stores_use_dicts_own_slots() -> None:
    # what makes it cheaper than collections.Counter: no Python-level
    # __setitem__/__delitem__ (either one routes every store through a
    # method lookup and call) and no per-instance __dict__
    assert not {"__setitem__", "__delitem__", "__getitem__"} & set(vars(Tally))
    assert "__dict__" not in dir(Tally())
    assert {"__setitem__", "__delitem__"} & set(vars(collections.Counter))
