"""RecentMap: the newest ``cap`` keys with their values, checked against a
plain model (a list of keys in insertion order)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.recent import RecentMap


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 70), st.lists(st.integers(0, 400), max_size=1500))
def test_recent_map_keeps_exactly_the_newest_keys(cap: int, keys: list[int]) -> None:
    m: RecentMap[int] = RecentMap(cap)
    model: dict[int, int] = {}  # insertion-ordered, like the map should be
    for i, k in enumerate(keys):
        m.put(k, i)
        if k in model:
            model[k] = i  # keeps its place
        else:
            model[k] = i
            if len(model) > cap:
                del model[next(iter(model))]
        assert len(m) == len(model)
        assert len(m.order) <= max(2 * cap, cap + 64)  # compacted
    assert list(m.items()) == list(model.items())
    assert list(m) == list(model)
    for k in set(keys):
        assert (k in m) == (k in model)
        assert m.get(k) == model.get(k)


def test_recent_map_from_items_and_bad_cap() -> None:
    m = RecentMap(3, [("a", 1), ("b", 2), ("c", 3), ("d", 4)])
    assert list(m.items()) == [("b", 2), ("c", 3), ("d", 4)]
    assert m.get("a") is None and "d" in m
    with pytest.raises(ValueError):
        RecentMap(0)
