"""RecentMap: the newest ``cap`` keys with their values, checked against a
plain model (a list of keys in insertion order)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.recent import IdWindow, RecentMap


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


def _model_put(model: dict[object, int], cap: int, k: object, v: int) -> None:
    if k not in model and len(model) >= cap:
        del model[next(iter(model))]
    model[k] = v  # a key already held keeps its place


_IDS = st.one_of(
    st.integers(0, 400),
    st.sampled_from([0, 255, 256, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
    # 8-byte patterns that straddle two slots of the arrays
    st.integers(0, 2**16).map(lambda x: x * 0x0101010101010101 % 2**64),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 70), st.lists(st.tuples(_IDS, st.integers(-(2**63), 2**63 - 1)), max_size=800)
)
def test_id_window_keeps_exactly_the_newest_ids(cap: int, puts: list[tuple[int, int]]) -> None:
    w = IdWindow(cap)
    model: dict[object, int] = {}
    for k, v in puts:
        w.put(k, v)
        _model_put(model, cap, k, v)
        assert len(w) == len(model)
        assert w.other is None and len(w.ids) == len(w.vals) == len(model)
    assert w.items() == list(model.items())
    assert list(w) == list(model)
    for k, _ in puts:
        if k in model:
            assert k in w and w.get(k) == model[k]
        else:  # forgotten
            assert k not in w and w.get(k) is None
    for k in (401, -1, 2**64, "401", 1.0, True):
        if k not in model:
            assert k not in w and w.get(k) is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 30),
    st.lists(
        st.tuples(
            st.one_of(_IDS, st.text(max_size=3), st.just(-5), st.just(2**64)), st.integers(0, 10**6)
        ),
        max_size=300,
    ),
)
def test_id_window_with_other_ids_turns_into_a_recent_map(
    cap: int, puts: list[tuple[object, int]]
) -> None:
    """A string id (or an int out of 0..2**64-1) moves what the window holds
    into a RecentMap, which goes on from there with the same answers."""
    w = IdWindow(cap)
    model: dict[object, int] = {}
    for k, v in puts:
        w.put(k, v)
        _model_put(model, cap, k, v)
        if type(k) is not int or not 0 <= k < 2**64:
            assert isinstance(w.other, RecentMap)
    assert w.items() == list(model.items()) and len(w) == len(model)
    for k in model:
        assert k in w and w.get(k) == model[k]


def test_id_window_rings_in_place_and_rejects_a_bad_cap() -> None:
    w = IdWindow(4, [(i, 10 * i) for i in range(1, 11)])
    assert w.items() == [(7, 70), (8, 80), (9, 90), (10, 100)]
    assert len(w.ids) == 4 and w.mono  # the four slots, reused
    assert 6 not in w and w.get(6) is None and w.get(9) == 90
    w.put(8, -1)  # keeps its place
    w.put(3, 30)  # older than the top, not held: the newest now
    assert w.items() == [(8, -1), (9, 90), (10, 100), (3, 30)] and not w.mono
    assert [w.get(k) for k in (3, 8, 9, 10, 7)] == [30, -1, 90, 100, None]
    with pytest.raises(ValueError):
        IdWindow(0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 70), st.sets(_IDS, max_size=400))
def test_id_window_of_increasing_ids_searches_its_sorted_ring(cap: int, ids: set[int]) -> None:
    """Ids that only go up (as clients count): the ring stays sorted from
    its oldest slot and old ids are found by binary search."""
    w = IdWindow(cap)
    model: dict[object, int] = {}
    order = sorted(ids)
    for i, k in enumerate(order):
        w.put(k, i)
        _model_put(model, cap, k, i)
    assert w.mono and w.items() == list(model.items())
    for k in order:
        assert w.get(k) == model.get(k) and (k in w) == (k in model)
        if k + 1 not in model:
            assert w.get(k + 1) is None
    if order:
        w.put(order[-1], -7)  # held: updated in place, still sorted
        assert w.mono and w.get(order[-1]) == -7


def test_id_window_refuses_a_value_beyond_64_bits_unchanged() -> None:
    w = IdWindow(2, [(1, 1), (2, 2)])
    for k in (3, 1):
        with pytest.raises(OverflowError):
            w.put(k, 2**63)
        assert w.items() == [(1, 1), (2, 2)]
