from __future__ import annotations

import math
import tracemalloc
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.timerwheel import TimerWheel


def test_fires_at_or_after_deadline_within_one_tick() -> None:
    w = TimerWheel(tick=0.1, slots=16, now=100.0)
    w.schedule(100.25, "a")
    w.schedule(100.30, "b")
    w.schedule(101.00, "c")
    assert len(w) == 3 and "a" in w
    assert w.advance(100.24) == []
    assert w.advance(100.29) == []  # "a" is due at the 100.3 tick boundary
    assert sorted(map(str, w.advance(100.31))) == ["a", "b"]
    assert w.advance(100.99) == []
    assert w.advance(101.0) == ["c"]
    assert len(w) == 0 and "a" not in w
    assert w.advance(200.0) == []


def test_deadlines_beyond_one_revolution() -> None:
    w = TimerWheel(tick=1.0, slots=8, now=0.0)
    w.schedule(100.0, "far")
    w.schedule(4.0, "near")  # same slot as "far" (100 % 8 == 4)
    for t in range(1, 100):
        fired = w.advance(float(t))
        assert "far" not in fired
        assert ("near" in fired) is (t == 4)
    assert w.advance(100.0) == ["far"]


def test_big_clock_jump_fires_everything_due_once() -> None:
    w = TimerWheel(tick=1.0, slots=4, now=0.0)
    for i in range(50):
        w.schedule(float(i), i)
    w.schedule(10_000.0, "later")
    fired = w.advance(1_000.0)
    assert sorted(fired, key=str) == sorted(range(50), key=str)
    assert len(w) == 1
    assert w.advance(9_999.0) == []
    assert w.advance(10_000.0) == ["later"]


def test_reschedule_moves_and_cancel_forgets() -> None:
    w = TimerWheel(tick=1.0, slots=8, now=0.0)
    w.schedule(3.0, "k")
    w.schedule(6.0, "k")
    assert len(w) == 1
    assert w.advance(5.0) == []
    w.schedule(2.0, "k")  # moved into the past: due now
    assert w.advance(5.0) == ["k"]
    w.schedule(7.0, "k")
    w.cancel("k")
    w.cancel("k")
    w.cancel("unknown")
    assert len(w) == 0
    assert w.advance(100.0) == []


def test_past_deadline_fires_on_next_advance_even_without_clock_movement() -> None:
    w = TimerWheel(tick=1.0, slots=8, now=10.0)
    w.schedule(5.0, "old")
    assert w.next_deadline() is not None and w.next_deadline() <= 10.0  # type: ignore[operator]
    assert w.advance(10.0) == ["old"]
    w.schedule(5.0, "x")
    w.cancel("x")
    assert w.advance(10.0) == []


def test_next_deadline() -> None:
    w = TimerWheel(tick=0.5, slots=8, now=0.0)
    assert w.next_deadline() is None
    w.schedule(2.2, "a")
    assert w.next_deadline() == 2.5
    w.schedule(1.1, "b")
    assert w.next_deadline() == 1.5
    w.schedule(50.0, "c")  # several revolutions away
    w.cancel("b")
    assert w.next_deadline() == 2.5
    assert w.advance(2.5) == ["a"]
    assert w.next_deadline() == 50.0
    w.cancel("c")
    assert w.next_deadline() is None


def test_infinite_deadline_never_fires_and_nan_is_refused() -> None:
    w = TimerWheel(tick=1.0, slots=8, now=0.0)
    w.schedule(math.inf, "never")
    assert w.advance(1e12) == []
    assert len(w) == 1
    with pytest.raises(ValueError):
        w.schedule(math.nan, "x")


@pytest.mark.parametrize(("tick", "slots"), [(0.0, 8), (-1.0, 8), (math.inf, 8), (1.0, 0)])
def test_bad_parameters(tick: float, slots: int) -> None:
    with pytest.raises(ValueError):
        TimerWheel(tick=tick, slots=slots, now=0.0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("s"), st.integers(0, 15), st.integers(-20, 400)),
        st.tuples(st.just("c"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("a"), st.just(0), st.integers(0, 60)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([1, 3, 8]))
def test_matches_a_reference_model(seq: list[tuple[str, int, int]], slots: int) -> None:
    # tick 1.0, deadlines in tenths: a deadline d fires at the first integer
    # time >= d; compare with a plain dict.
    w = TimerWheel(tick=1.0, slots=slots, now=0.0)
    model: dict[Hashable, float] = {}
    now = 0.0
    for op, key, val in seq:
        if op == "s":
            d = now + val / 10
            w.schedule(d, key)
            model[key] = d
        elif op == "c":
            w.cancel(key)
            model.pop(key, None)
        else:
            now += val / 4
            expect = {k for k, d in model.items() if math.ceil(d) <= now}
            fired = w.advance(now)
            assert len(fired) == len(set(fired))
            assert set(fired) == expect
            for k in expect:
                del model[k]
        assert len(w) == len(model)
        nd = w.next_deadline()
        if not model:
            assert nd is None
        else:
            assert nd == max(float(math.ceil(min(model.values()))), math.floor(now))


def test_250k_keys_are_cheap_and_all_fire_once() -> None:
    n = 250_000
    keys = list(range(n))
    w = TimerWheel(tick=0.1, slots=512, now=0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            w.schedule(1.0 + (k % 600) * 0.1, k)  # 60 s spread: beyond one revolution
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_key < 200, per_key
    assert len(w) == n
    for k in range(0, n, 7):
        w.schedule(30.0, k)  # moves
    seen = 0
    t = 0.0
    while len(w):
        t += 5.0
        seen += len(w.advance(t))
    assert seen == n
