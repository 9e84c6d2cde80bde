"""Sans-IO protection and routing classes with a fake clock and seeded RNGs:
breaker, outlier ejection, P2C balancer, routing, sticky table, admission,
rate limits, downstream settings."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.downstream.admission import Admission, AdmissionConfig, ClusterLoad
from gateway.downstream.balancer import Balancer, Endpoint
from gateway.downstream.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerConfig,
    OutlierConfig,
    OutlierDetector,
)
from gateway.downstream.routing import BOT, HUMAN, Group, Route, Router, Rule, StickyTable
from gateway.downstream.settings import merge_cli_specs, parse_settings
from gateway.session.limits import Limits

# -- breaker -----------------------------------------------------------------


def test_breaker_opens_on_consecutive_failures_and_probes_after_open_s() -> None:
    b = Breaker(BreakerConfig(consecutive_failures=3, open_s=5.0, half_open_probes=2), 0.0)
    for t in (1.0, 1.1):
        b.record(t, False, 0.01)
    assert b.state(1.2) == CLOSED
    b.record(1.2, True, 0.01)  # a success resets the run
    for t in (1.3, 1.4):
        b.record(t, False, 0.01)
    assert b.state(1.5) == CLOSED
    b.record(1.5, False, 0.01)
    assert b.state(1.5) == OPEN and not b.allow(6.4)
    assert b.state(6.5) == HALF_OPEN
    assert b.allow(6.5) and b.allow(6.5) and not b.allow(6.5)  # two probes only
    b.record(6.6, True, 0.01)
    assert b.state(6.6) == HALF_OPEN
    b.record(6.7, True, 0.01)
    assert b.state(6.7) == CLOSED and b.allow(6.7)


def test_breaker_probe_failure_reopens_with_doubled_open_time() -> None:
    b = Breaker(BreakerConfig(consecutive_failures=1, open_s=2.0, max_open_s=5.0), 0.0)
    b.record(0.0, False, 0.0)
    assert b.state(1.9) == OPEN and b.state(2.0) == HALF_OPEN
    assert b.allow(2.0)
    b.record(2.1, False, 0.0)
    assert b.state(2.1) == OPEN
    assert b.state(6.05) == OPEN and b.state(6.15) == HALF_OPEN  # 4 s now
    b.allow(6.2)
    b.record(6.2, False, 0.0)
    assert b.state(11.15) == OPEN and b.state(11.25) == HALF_OPEN  # capped at 5 s
    for _ in range(3):
        assert b.allow(11.3)
        b.record(11.3, True, 0.0)
    assert b.state(11.3) == CLOSED
    b.record(12.0, False, 0.0)
    assert b.state(13.95) == OPEN and b.state(14.05) == HALF_OPEN  # back to open_s


def test_breaker_failure_rate_needs_min_requests_and_window_forgets() -> None:
    cfg = BreakerConfig(consecutive_failures=100, failure_rate=0.5, min_requests=10, window_s=10)
    b = Breaker(cfg, 0.0)
    for i in range(9):  # 9 results, 5 failures: below min_requests
        b.record(i * 0.1, i % 2 == 1, 0.0)
    assert b.state(1.0) == CLOSED
    b.record(1.0, True, 0.0)  # 10 results, 5 failures -> 50%: opens
    assert b.state(1.0) == OPEN
    b2 = Breaker(cfg, 0.0)
    for i in range(6):
        b2.record(0.1 * i, False, 0.0)  # old failures...
    for i in range(10):
        b2.record(20.0 + 0.1 * i, True, 0.0)  # ...forgotten 20 s later
    b2.record(21.5, False, 0.0)
    assert b2.state(21.5) == CLOSED


def test_breaker_retune_keeps_state_and_counts_against_the_new_thresholds() -> None:
    """A reload's settings taken in place: failures counted so far count
    against the new thresholds (a twin left alone stays closed), an open
    breaker stays open no longer than the new max_open_s, and a new window
    length starts the window empty."""
    old = BreakerConfig(consecutive_failures=5, failure_rate=0.5, min_requests=10)
    a, twin = Breaker(old, 0.0), Breaker(old, 0.0)
    for b in (a, twin):
        for i in range(10):  # 10 calls, 4 failures: 40%
            b.record(1.0 + 0.01 * i, i not in (1, 3, 5, 7), 0.0)
        assert b.state(1.1) == CLOSED
    a.retune(dataclasses.replace(old, consecutive_failures=5, failure_rate=0.4))
    for b in (a, twin):
        b.record(1.2, False, 0.0)  # 11 calls, 5 failures: 45%
    assert a.state(1.2) == OPEN and twin.state(1.2) == CLOSED
    # consecutive failures: 4 so far, and the new threshold is 3
    c = Breaker(BreakerConfig(consecutive_failures=5), 0.0)
    for t in (1.0, 1.1, 1.2, 1.3):
        c.record(t, False, 0.0)
    c.retune(BreakerConfig(consecutive_failures=3))
    assert c.state(1.3) == CLOSED
    c.record(1.4, False, 0.0)
    assert c.state(1.4) == OPEN
    # open for 4 s after a failed probe (2 s doubled); the new cap is 3 s
    d = Breaker(BreakerConfig(consecutive_failures=1, open_s=2.0, max_open_s=60.0), 0.0)
    d.record(0.0, False, 0.0)
    assert d.allow(2.0)
    d.record(2.0, False, 0.0)  # reopened at 2.0 for 4 s
    d.retune(BreakerConfig(consecutive_failures=1, open_s=2.0, max_open_s=3.0))
    assert d.state(4.95) == OPEN and d.state(5.05) == HALF_OPEN
    # a new window length: the 9 failures before no longer count
    e = Breaker(BreakerConfig(consecutive_failures=100, min_requests=10), 0.0)
    for i in range(9):
        e.record(1.0 + 0.01 * i, False, 0.0)
    e.retune(BreakerConfig(consecutive_failures=100, min_requests=10, window_s=20.0))
    e.record(1.5, False, 0.0)
    assert e.state(1.5) == CLOSED
    for i in range(9):
        e.record(1.6 + 0.01 * i, False, 0.0)
    assert e.state(1.7) == OPEN  # 10 in the new window


def test_breaker_slow_calls_open_it() -> None:
    cfg = BreakerConfig(min_requests=5, slow_call_s=0.5, slow_call_rate=0.8)
    b = Breaker(cfg, 0.0)
    for i in range(3):
        b.record(i * 0.1, True, 0.9)
    b.record(0.4, True, 0.1)
    b.record(0.5, True, 0.1)
    assert b.state(0.5) == CLOSED  # 3 of 5 slow: under 80%
    b = Breaker(cfg, 0.0)
    for i in range(5):
        b.record(i * 0.1, True, 0.9)
    assert b.state(0.5) == OPEN


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allow", "ok", "fail", "release"]), st.floats(0, 3))))
def test_breaker_never_has_more_probes_out_than_allowed(ops: list[tuple[str, float]]) -> None:
    cfg = BreakerConfig(consecutive_failures=1, open_s=1.0, half_open_probes=2)
    b = Breaker(cfg, 0.0)
    now = 0.0
    for op, dt in ops:
        now += dt
        if op == "allow":
            b.allow(now)
        elif op == "release":
            b.release(now)
        else:
            b.record(now, op == "ok", 0.0)
        assert b._probes_out >= 0
        assert b._probes_out <= cfg.half_open_probes
        assert b._probes_out + b._probes_ok <= cfg.half_open_probes


def _replay_against_model(
    cfg: BreakerConfig, calls: list[tuple[float, bool, float]], close_after_trip: bool
) -> None:
    """Records ``calls`` (time step, ok, latency) on a breaker whose clock
    starts at 0 and checks after each that it is open exactly when a plain
    recount of the last 10 buckets says it should trip. Stops at the first
    trip, or (``close_after_trip``) waits ``open_s``, closes it with one
    good probe and goes on with the recount starting empty."""
    b = Breaker(cfg, 0.0)
    bucket_s = cfg.window_s / 10
    seen: list[tuple[int, bool, bool]] = []
    now = 0.0
    for dt, ok, latency in calls:
        now += dt
        idx = int(now / bucket_s)
        seen.append((idx, ok, latency > cfg.slow_call_s))
        window = [c for c in seen if c[0] > idx - 10]
        n = len(window)
        fails = sum(1 for c in window if not c[1])
        slows = sum(1 for c in window if c[2])
        expect_trip = n >= cfg.min_requests and (
            fails >= cfg.failure_rate * n or slows >= cfg.slow_call_rate * n
        )
        b.record(now, ok, latency)
        assert (b.state(now) == OPEN) == expect_trip, (len(seen), n, fails, slows, now)
        if expect_trip:
            if not close_after_trip:
                return
            now += cfg.open_s * 1.25  # (open_s itself could fall short in floats)
            assert b.allow(now)  # half-open: one probe
            b.record(now, True, 0.0)
            assert b.state(now) == CLOSED
            seen = []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 0.7), st.booleans(), st.sampled_from([0.0, 0.0, 2.0])),
        max_size=300,
    )
)
def test_breaker_rate_trip_matches_a_rolling_window_model(
    calls: list[tuple[float, bool, float]],
) -> None:
    """The failure/slow-rate trip happens at exactly the call where a plain
    recount of the last 10 buckets says it should (the breaker keeps running
    sums instead of recounting)."""
    cfg = BreakerConfig(consecutive_failures=10_000, min_requests=8, failure_rate=0.5,
                        window_s=2.0, slow_call_s=1.0, slow_call_rate=0.6)  # fmt: skip
    _replay_against_model(cfg, calls, close_after_trip=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 0.3), st.booleans(), st.sampled_from([0.0, 0.0, 2.0])),
        max_size=300,
    )
)
# a trip within the first window_s of the clock (a test's MockClock starts
# at 0): the calls before it must not count again once the breaker closed
@example([(0.05, False, 0.0), (0.05, True, 0.0)] * 4 + [(0.05, True, 0.0)] * 5
         + [(0.05, False, 0.0), (0.05, True, 0.0)] * 2)  # fmt: skip
def test_breaker_window_starts_empty_after_each_trip(
    calls: list[tuple[float, bool, float]],
) -> None:
    """As the rolling-window model above, on after every trip: once the
    breaker opened, waited ``open_s`` and closed on its probe, only the
    calls made since count, whatever the clock's origin."""
    cfg = BreakerConfig(consecutive_failures=10_000, min_requests=8, failure_rate=0.5,
                        window_s=2.0, slow_call_s=1.0, slow_call_rate=0.6,
                        open_s=0.1, max_open_s=0.1, half_open_probes=1)  # fmt: skip
    _replay_against_model(cfg, calls, close_after_trip=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1.5),
            st.sampled_from(["ok", "fail", "allow"]),
            st.integers(1, 12),
            st.integers(0, 12),
        ),
        max_size=120,
    )
)
# failures short of a streak, then a batch of successes that reaches
# min_requests while the failure share still trips the breaker
@example([(0.0, "fail", 1, 0), (0.0, "ok", 1, 0)] * 2 + [(0.0, "fail", 1, 0), (0.0, "ok", 3, 0)])
def test_breaker_record_ok_equals_one_record_per_call(
    ops: list[tuple[float, str, int, int]],
) -> None:
    """``record_ok(now, k, slow)`` (the forwarder's per-batch update)
    leaves the breaker exactly as ``k`` calls of ``record`` would, the slow
    ones first: closed, half-open and open, trips included."""
    cfg = BreakerConfig(consecutive_failures=3, min_requests=6, failure_rate=0.5,
                        window_s=2.0, slow_call_s=1.0, slow_call_rate=0.6,
                        open_s=1.0, half_open_probes=2)  # fmt: skip
    one, many = Breaker(cfg, 0.0), Breaker(cfg, 0.0)
    now = 0.0
    for dt, op, k, slow in ops:
        now += dt
        slow = min(slow, k)
        if op == "ok":
            for i in range(k):
                one.record(now, True, 2.0 if i < slow else 0.0)
            many.record_ok(now, k, slow)
        elif op == "fail":
            one.record(now, False, 0.0)
            many.record(now, False, 0.0)
        else:
            assert one.allow(now) == many.allow(now)
        assert one.state(now) == many.state(now)
        assert one.trips == many.trips
        for attr in ("_consecutive", "_probes_out", "_probes_ok", "_open_for", "_win"):
            assert getattr(one, attr) == getattr(many, attr), attr
        assert [b[:4] for b in one._buckets] == [b[:4] for b in many._buckets]


def test_balancer_finish_ok_counts_outstanding_and_moves_the_ewma_once() -> None:
    e = Endpoint("a", Breaker(BreakerConfig(), 0.0))
    b = Balancer([e], random.Random(1))
    for _ in range(5):
        b.start(e)
    b.finish_ok(e, 1.0, 3, 0.004, 0)
    assert e.outstanding == 2 and e.ewma_s == 0.004  # first sample sets it
    b.finish_ok(e, 11.0, 2, 0.014, 0)
    assert e.outstanding == 0
    assert 0.004 < e.ewma_s < 0.014  # weighted by the 10 s between them
    b.finish_ok(e, 12.0, 4, 0.1, 0)
    assert e.outstanding == 0  # never below zero


def test_breaker_config_rejects_bad_values() -> None:
    for bad in (
        {"consecutive_failures": 0},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"open_s": -1},
        {"open_s": 10, "max_open_s": 5},
        {"half_open_probes": 0},
    ):
        with pytest.raises(ValueError):
            BreakerConfig(**bad)


# -- outlier ejection --------------------------------------------------------


def test_outlier_ejects_after_consecutive_errors_within_the_percent_cap() -> None:
    o = OutlierDetector(OutlierConfig(consecutive_errors=2, base_ejection_s=10), endpoints=4)
    o.record("a", 0.0, False)
    assert not o.ejected("a", 0.0)
    o.record("a", 0.1, False)
    assert o.ejected("a", 0.1) and o.ejected("a", 10.0) and not o.ejected("a", 10.2)
    for k in ("b", "c"):
        o.record(k, 11.0, False)
        o.record(k, 11.0, False)
    # a is back; 50% of 4 endpoints = 2 may be out: b and c
    assert o.ejected("b", 11.0) and o.ejected("c", 11.0)
    o.record("a", 12.0, False)
    o.record("a", 12.0, False)
    assert not o.ejected("a", 12.0)  # the cap holds it in
    assert not o.ejected("b", 21.1) and not o.ejected("c", 21.1)
    o.record("a", 22.0, False)
    o.record("a", 22.0, False)
    assert o.ejected("a", 41.9) and not o.ejected("a", 42.1)  # second time: 20 s


def test_outlier_never_ejects_the_last_endpoint() -> None:
    o = OutlierDetector(OutlierConfig(consecutive_errors=1, max_ejection_percent=100), 1)
    o.record("only", 0.0, False)
    assert not o.ejected("only", 0.0)


# -- balancer ------------------------------------------------------------------


def _eps(*keys: str) -> list[Endpoint]:
    return [Endpoint(k, Breaker(BreakerConfig(), 0.0)) for k in keys]


def test_p2c_prefers_the_cheaper_endpoint_and_never_an_unavailable_one() -> None:
    eps = _eps("a", "b", "c")
    bal = Balancer(eps, random.Random(7))
    for e, lat in zip(eps, (0.001, 0.004, 0.002), strict=True):
        e.observe(0.0, lat)
    eps[2].up = False
    picks = Counter()
    for _ in range(2000):
        e = bal.pick(1.0)
        assert e is not None
        picks[e.key] += 1
    assert picks["c"] == 0
    assert picks["a"] == 2000  # with two candidates, P2C always compares both
    eps[2].up = True
    picks.clear()
    for _ in range(3000):
        e = bal.pick(1.0)
        assert e is not None
        picks[e.key] += 1
    # a wins every duel it is in (2/3 of them); c beats b
    assert picks["a"] > 1800 and picks["c"] > picks["b"] and picks["b"] == 0


def test_p2c_counts_outstanding_requests() -> None:
    a, b = _eps("a", "b")
    a.observe(0.0, 0.001)
    b.observe(0.0, 0.002)
    bal = Balancer([a, b], random.Random(1))
    assert bal.pick(0.0) is a
    for _ in range(3):
        bal.start(a)  # (3+1)*1ms > (0+1)*2ms
    assert bal.pick(0.0) is b
    for _ in range(3):
        bal.finish(a, 1.0, 0.001, True)
    assert a.outstanding == 0 and bal.pick(1.0) is a


def test_sticky_preference_and_exclusion() -> None:
    a, b = _eps("a", "b")
    a.observe(0.0, 0.001)
    b.observe(0.0, 0.009)
    bal = Balancer([a, b], random.Random(3))
    assert bal.pick(0.0, prefer="b") is b
    assert bal.pick(0.0, prefer="b", exclude=("b",)) is a
    b.up = False
    assert bal.pick(0.0, prefer="b") is a
    a.up = False
    assert bal.pick(0.0) is None and bal.available(0.0) == 0


def test_balancer_skips_open_breakers_and_ejected_endpoints() -> None:
    a, b = _eps("a", "b")
    bal = Balancer([a, b], random.Random(5), OutlierDetector(OutlierConfig(consecutive_errors=2)))
    for _ in range(5):
        a.breaker.record(0.0, False, 0.0)
    assert a.breaker.state(0.0) == OPEN
    assert all(bal.pick(0.1) is b for _ in range(50))
    bal.finish(b, 0.2, 0.0, False)
    bal.finish(b, 0.2, 0.0, False)
    assert bal.outliers is not None and bal.outliers.ejected("b", 0.2)
    assert bal.pick(0.3) is None


def test_half_open_endpoint_gets_its_probes_and_closes() -> None:
    cfg = BreakerConfig(consecutive_failures=2, open_s=5.0, half_open_probes=3)
    a = Endpoint("a", Breaker(cfg, 0.0))
    b = Endpoint("b", Breaker(cfg, 0.0))
    bal = Balancer([a, b], random.Random(11))
    for t in (1.0, 1.1):
        a.breaker.record(t, False, 0.01)
    assert a.breaker.state(2.0) == OPEN
    assert {bal.pick(2.0).key for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    # half-open at 6.1: the next three picks are A's probes, then B again
    picks = [bal.pick(6.2) for _ in range(5)]
    assert [e.key for e in picks if e] == ["a", "a", "a", "b", "b"]
    for _ in range(3):
        bal.finish(a, 6.3, 0.002, ok=True)
    assert a.breaker.state(6.3) == CLOSED
    b.observe(6.3, 0.01)  # B measured slower than A now: A is back in the duels
    assert "a" in {bal.pick(6.4).key for _ in range(20)}  # type: ignore[union-attr]


def test_ewma_converges_to_recent_latency() -> None:
    (e,) = _eps("a")
    e.observe(0.0, 0.100)
    for i in range(1, 200):
        e.observe(i * 1.0, 0.002)
    assert abs(e.ewma_s - 0.002) < 0.0005


# -- routing -------------------------------------------------------------------


def _router() -> Router:
    groups = {
        "general": Group("general", "desks", bot="triage", fallback="triage"),
        "billing": Group("billing", "desks", fallback="general"),
        "sales": Group("sales", "desks"),
        "triage": Group("triage", "bots"),
    }
    rules = [
        Rule("sales", channel="web", page="/pricing*"),
        Rule("billing", business="finance"),
        Rule("billing", keywords=("refund", "invoice")),
    ]
    return Router(rules, groups, "general")


def test_entry_rules_tags_and_globs() -> None:
    r = _router()
    assert r.entry_group({"channel": "web", "page": "/pricing/pro"}) == Route("sales", HUMAN)
    assert r.entry_group({"channel": "app", "page": "/pricing"}) == Route("general", BOT)
    assert r.entry_group({"business": "finance"}) == Route("billing", HUMAN)
    assert r.entry_group({}) == Route("general", BOT)


@pytest.mark.parametrize(
    ("text", "hit"),
    [
        ("I want a refund", True),
        ("REFUND, now!", True),
        ("refunds please", False),  # whole words in space-separated scripts
        ("prefund", False),
        ("my_refund", False),
        ("我要退款谢谢", True),  # Chinese has no spaces between words
        ("退款", True),
        ("返金してください", True),  # Japanese
        ("환불을 원해요", True),  # Korean: the particle attaches to the word
        ("ขอคืนเงินด้วย", True),  # Thai
        ("refund退款", True),
        ("learning c++ now", True),  # a keyword ending in a symbol
        ("c#", False),
        ("nothing to see", False),
    ],
)
def test_keywords_match_whole_words_or_unspaced_scripts(text: str, hit: bool) -> None:
    r = Rule("billing", keywords=("refund", "退款", "返金", "환불", "คืนเงิน", "c++"))
    assert r.body_match(text) is hit


def test_keywords_move_a_session_and_handover_goes_to_humans() -> None:
    r = _router()
    start = r.entry_group({})
    assert r.message_group(start, "hello") == start
    assert r.message_group(start, "I want a REFUND now") == Route("billing", HUMAN)
    assert r.message_group(start, "refunding") == start  # whole words only
    assert r.message_group(start, b"refund") == start  # bytes never match
    assert r.handover(start) == Route("general", HUMAN)


def test_fallback_chain_skips_unavailable_groups() -> None:
    r = _router()
    assert r.fallback("billing", lambda g: False) == "general"
    assert r.fallback("billing", lambda g: g == "general") == "triage"
    assert r.fallback("billing", lambda g: True) is None
    assert r.fallback("sales", lambda g: False) is None


def test_router_rejects_unknown_groups_and_cycles() -> None:
    g = {"a": Group("a", "c", fallback="b"), "b": Group("b", "c", fallback="a")}
    with pytest.raises(ValueError, match="cycle"):
        Router([], g, "a")
    with pytest.raises(ValueError):
        Router([Rule("zzz")], {"a": Group("a", "c")}, "a")
    with pytest.raises(ValueError):
        Router([], {"a": Group("a", "c", bot="nobot")}, "a")


def test_sticky_table_lru_and_ttl() -> None:
    t = StickyTable(max_entries=2, ttl_s=100)
    t.put("t", "v1", "ep1", "ag1", 0.0)
    t.put("t", "v2", "ep2", None, 0.0)
    assert t.get("t", "v1", 1.0) == ("ep1", "ag1")  # v1 now most recent
    t.put("t", "v3", "ep3", None, 2.0)
    assert t.get("t", "v2", 2.0) is None and len(t) == 2
    assert t.get("t", "v1", 101.5) is None  # expired


# -- admission -----------------------------------------------------------------


def test_admission_refuses_new_sessions_with_spread_retry_after() -> None:
    a = Admission(AdmissionConfig(retry_after_s=2.0, max_pending_per_cluster=100), random.Random(9))
    assert a.admit_session(0.0, ClusterLoad(1, 0, 10, 1)).retry_after_s == 0.0
    d = a.admit_session(0.0, ClusterLoad(0, 0, 0, 1))
    assert d.reason == "no_endpoint"
    waits = [a.admit_session(0.0, ClusterLoad(0, 0, 0, 1)).retry_after_s for _ in range(200)]
    assert min(waits) >= 2.0 and max(waits) <= 4.0
    assert max(waits) - min(waits) > 1.5  # spread, not synchronized
    later = [a.admit_session(30.0, ClusterLoad(0, 0, 0, 1)).retry_after_s for _ in range(50)]
    assert min(later) > 4.0  # grows while the cluster stays unavailable
    assert a.admit_session(31.0, ClusterLoad(1, 100, 0, 1)).reason == "pending_full"
    assert a.admit_session(31.0, ClusterLoad(1, 0, 95, 1)).reason == "overload"
    assert a.admit_session(32.0, ClusterLoad(1, 0, 0, 1)).retry_after_s == 0.0


def test_admission_of_messages_buffers_then_refuses() -> None:
    a = Admission(AdmissionConfig(max_inflight_per_session=2, max_buffered_per_session=3), None)  # type: ignore[arg-type]
    up, down = ClusterLoad(1, 0, 0, 1), ClusterLoad(0, 0, 0, 1)
    assert a.admit_message(0, 0, up) == "send"
    assert a.admit_message(2, 0, up) == "buffer"
    assert a.admit_message(0, 0, down) == "buffer"
    assert a.admit_message(0, 3, down) == "refuse"
    # the same rules on plain values (the forwarder's per-message path)
    assert a.message_verdict(0, 0, True, 0) == "send"
    assert a.message_verdict(1, 0, True, 0) == "send"
    assert a.message_verdict(2, 0, True, 0) == "buffer"
    assert a.message_verdict(0, 0, False, 0) == "buffer"
    assert a.message_verdict(0, 0, True, 4096) == "buffer"  # cluster at max_pending
    assert a.message_verdict(0, 3, True, 0) == "refuse"


# -- rate limits ---------------------------------------------------------------


def _cfg(tmp_path: Any, **kw: Any) -> Any:
    return load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, kw)


def test_limits_per_visitor_tenant_ip_with_fake_clock(tmp_path: Any) -> None:
    cfg = _cfg(tmp_path, visitor_msg_rate=2.0, visitor_msg_burst=2, tenant_msg_rate=1.0,
               tenant_msg_burst=3, ip_msg_rate=0.0)  # fmt: skip
    lim = Limits(cfg, workers=1)
    assert lim.message("t", "v1", "1.1.1.1", 0.0) == (0.0, "")
    assert lim.message("t", "v1", "1.1.1.1", 0.0) == (0.0, "")
    wait, scope = lim.message("t", "v1", "1.1.1.1", 0.0)
    assert scope == "visitor" and wait == pytest.approx(0.5)
    assert lim.message("t", "v1", "1.1.1.1", 0.5)[1] == ""  # refilled
    wait, scope = lim.message("t", "v2", "1.1.1.1", 0.5)  # 4th tenant message
    assert scope == "tenant" and wait > 0


def test_limits_split_between_workers_and_off_at_zero(tmp_path: Any) -> None:
    cfg = _cfg(tmp_path, ip_conn_rate=4.0, ip_conn_burst=4, visitor_msg_rate=0.0)
    lim = Limits(cfg, workers=2)  # 2/s and burst 2 per worker
    assert lim.connection("t", "ip", 0.0)[1] == ""
    assert lim.connection("t", "ip", 0.0)[1] == ""
    assert lim.connection("t", "ip", 0.0)[1] == "ip"
    assert lim.connection("t", "other-ip", 0.0)[1] == ""
    assert all(lim.message("t", "v", "ip", 0.0) == (0.0, "") for _ in range(1000))


# -- settings ------------------------------------------------------------------


def test_cli_specs_make_clusters_and_groups_first_is_default() -> None:
    doc = merge_cli_specs({}, ["sales=127.0.0.1:7001,127.0.0.1:7002", "bots=127.0.0.1:7003"])
    s = parse_settings(doc)
    assert s is not None and s.default_group == "sales"
    assert s.clusters["sales"].endpoints == (("127.0.0.1", 7001), ("127.0.0.1", 7002))
    assert s.groups["bots"].cluster == "bots"


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"clusters": {}}, "at least one cluster"),
        ({"clusters": {"c": {"endpoints": []}}}, "endpoints"),
        ({"clusters": {"c": {"endpoints": ["nope"]}}}, "HOST:PORT|port"),
        (
            {"clusters": {"c": {"endpoints": ["h:1"]}}, "groups": {"g": {"cluster": "x"}}},
            "no cluster",
        ),
        ({"clusters": {"c": {"endpoints": ["h:1"]}}, "request_timeout_s": 0}, "request_timeout_s"),
        ({"clusters": {"c": {"endpoints": ["h:1"]}}, "breaker": {"nope": 1}}, "unknown"),
        ({"clusters": {"c": {"endpoints": ["h:1"]}}, "default_group": "zz"}, "default_group"),
        ({"clusters": {"c": {"endpoints": ["h:1"]}}, "rules": [{"group": "zz"}]}, "unknown group"),
        ({"clusters": {"c": {"endpoints": ["h:1"]}}, "surprise": 1}, "unknown"),
    ],
)
def test_bad_downstream_tables_are_refused(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_settings(doc)


def test_bad_cli_spec_is_a_config_error(tmp_path: Any) -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match="GROUP=HOST:PORT"):
        _cfg(tmp_path, downstream_specs=["no-equals-sign"])
