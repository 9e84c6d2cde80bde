from __future__ import annotations

import math

import pytest

from gateway.ratelimit import KeyedLimiter, TokenBucket


def test_bucket_starts_full_then_refills_at_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3.0, now=10.0)
    assert [b.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(10.0) == pytest.approx(0.5)  # one token per 0.5 s
    assert b.take(10.25) == pytest.approx(0.25)  # refused takes consume nothing
    assert b.take(10.5) == 0.0
    assert b.take(10.5) == pytest.approx(0.5)
    assert b.take(100.0, 3.0) == 0.0  # refilled, capped at burst
    assert b.take(100.0) > 0


def test_bucket_weighted_and_impossible_takes() -> None:
    b = TokenBucket(rate=1.0, burst=5.0, now=0.0)
    assert b.take(0.0, 4.0) == 0.0
    assert b.take(0.0, 3.0) == pytest.approx(2.0)
    assert b.take(0.0, 6.0) == math.inf
    z = TokenBucket(rate=0.0, burst=1.0, now=0.0)
    assert z.take(0.0) == 0.0
    assert z.take(1e9) == math.inf


def test_bucket_ignores_clock_going_backwards() -> None:
    b = TokenBucket(rate=1.0, burst=1.0, now=100.0)
    assert b.take(100.0) == 0.0
    assert b.take(50.0) > 0
    assert b.take(100.5) == pytest.approx(0.5)
    assert b.take(101.0) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)]
)
def test_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)
    with pytest.raises(ValueError):
        KeyedLimiter(rate, burst, 10)
    with pytest.raises(ValueError):
        KeyedLimiter(1.0, 1.0, 0)


def test_keyed_limiter_is_per_key() -> None:
    lim = KeyedLimiter(rate=1.0, burst=2.0, max_keys=10)
    assert lim.take("a", 0.0) == 0.0
    assert lim.take("a", 0.0) == 0.0
    assert lim.take("a", 0.0) == pytest.approx(1.0)
    assert lim.take("b", 0.0) == 0.0  # independent
    assert lim.take("a", 1.0) == 0.0
    assert len(lim) == 2


def test_keyed_limiter_bounds_keys_and_evicts_least_recently_used() -> None:
    lim = KeyedLimiter(rate=0.001, burst=1.0, max_keys=3)
    for k in "abc":
        assert lim.take(k, 0.0) == 0.0  # each now empty
    assert lim.take("a", 0.0) > 0  # touch "a": "b" is now the oldest
    assert lim.take("d", 0.0) == 0.0  # evicts "b"
    assert len(lim) == 3
    assert lim.take("a", 0.0) > 0  # kept
    assert lim.take("c", 0.0) > 0  # kept
    assert lim.take("b", 0.0) == 0.0  # forgotten, so full again (evicts "d")
    assert len(lim) == 3
    for i in range(1000):
        lim.take(i, 0.0)
    assert len(lim) == 3


def test_keyed_limiter_retune_keeps_tokens_up_to_the_new_burst() -> None:
    lim = KeyedLimiter(rate=10.0, burst=10.0, max_keys=10)
    for _ in range(4):
        assert lim.take("a", 0.0) == 0.0  # a: 6 left
    assert lim.take("b", 0.0) == 0.0  # b: 9 left
    lim.retune(rate=1.0, burst=7.0)
    for _ in range(6):
        assert lim.take("a", 0.0) == 0.0  # a kept its 6
    assert lim.take("a", 0.0) == pytest.approx(1.0)  # then 1 token per second
    for _ in range(7):
        assert lim.take("b", 0.0) == 0.0  # b: cut from 9 to the new burst, 7
    assert lim.take("b", 0.0) > 0
    assert lim.take("a", 100.0) == 0.0  # refills to the new burst only
    for _ in range(6):
        assert lim.take("a", 100.0) == 0.0
    assert lim.take("a", 100.0) > 0
    with pytest.raises(ValueError):
        lim.retune(rate=-1.0, burst=1.0)


def test_a_retuned_bucket_keeps_its_tokens_up_to_the_new_burst() -> None:
    b = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    assert b.take(0.0, 8.0) == 0.0  # 2 left
    b.retune(rate=100.0, burst=4.0, now=1.0)  # 3 by now, at the old rate
    assert b.tokens == 3.0
    assert b.take(1.0, 3.0) == 0.0 and b.take(1.0) == 0.01  # then the new rate
    assert b.take(1.05, 4.0) == 0.0  # full again: 4, the new burst
    b.retune(rate=1.0, burst=2.0, now=1.05)
    assert b.tokens == 0.0
    assert b.take(3.0, 3.0) == math.inf  # more than the new burst
    b.retune(rate=1.0, burst=50.0, now=4.0)  # a larger burst: no tokens given
    assert b.tokens == 2.0
    with pytest.raises(ValueError):
        b.retune(rate=-1.0, burst=1.0, now=5.0)
