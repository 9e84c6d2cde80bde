"""The heartbeat check of a visitor connection (sans-IO,
:func:`gateway.server.shell.heartbeat_step`), driven the way the worker's
timer wheel drives it: late by up to two of its 0.25 s ticks."""

from __future__ import annotations

import math

from gateway.server.shell import HB_PING, HB_TIMEOUT, HB_WAIT, heartbeat_step

TICK = 0.25


def _late(deadline: float, phase: float) -> float:
    """When the wheel runs a check due at ``deadline``: at the first of its
    wakeups (every tick, at ``phase`` within it) from the tick boundary the
    deadline rounds up to (up to two ticks late)."""
    slot = math.ceil(deadline / TICK) * TICK
    return phase + math.ceil((slot - phase) / TICK) * TICK


def _run(hb: float, misses: int, answers: bool, until: float, phase: float) -> float | None:
    """A connection opened at 0 whose peer answers every ping at once
    (``answers``) or stays silent; returns when it timed out, or None."""
    last_rx, pinged, t = 0.0, 0.0, 0.1 * hb
    while t < until:
        act, nxt = heartbeat_step(t, last_rx, pinged, hb, hb * misses)
        if act == HB_TIMEOUT:
            return t
        if act == HB_PING:
            pinged = t
            if answers:
                last_rx = t + 0.001
        assert nxt >= t
        t = max(_late(nxt, phase), t + TICK)
    return None


def test_a_peer_that_answers_every_ping_never_times_out_however_late_the_checks() -> None:
    # hb 0.2 s x 2 is under two ticks: every check may come when the limit
    # has passed; the answered pings keep the peer alive
    for phase in (0.0, 0.01, 0.1, 0.2, 0.249):
        for hb, misses in ((0.2, 2), (0.4, 2), (0.2, 1), (25.0, 2)):
            assert _run(hb, misses, answers=True, until=600.0, phase=phase) is None


def test_a_silent_peer_times_out_after_the_limit_with_a_ping_unanswered() -> None:
    for phase in (0.0, 0.1, 0.249):
        for hb, misses in ((0.4, 2), (1.0, 3), (25.0, 2)):
            t = _run(hb, misses, answers=False, until=600.0, phase=phase)
            assert t is not None
            assert hb * misses <= t <= hb * misses + hb + 3 * TICK, (hb, misses, phase, t)


def test_one_step() -> None:
    # nothing heard for half an interval: ping, look again at the limit
    assert heartbeat_step(10.0, 9.0, 0.0, 2.0, 4.0) == (HB_PING, 12.0)
    # recent traffic: wait
    assert heartbeat_step(10.0, 9.5, 0.0, 2.0, 4.0) == (HB_WAIT, 12.0)
    # a ping out for 0.5 s, unanswered, the limit passed: not yet (it
    # needs half an interval to be answered)
    assert heartbeat_step(13.5, 9.0, 13.0, 2.0, 4.0) == (HB_WAIT, 14.0)
    assert heartbeat_step(14.0, 9.0, 13.0, 2.0, 4.0)[0] == HB_TIMEOUT
    # the limit passed but the last ping was answered (a late check): ping
    assert heartbeat_step(14.0, 9.0, 8.5, 2.0, 4.0) == (HB_PING, 15.0)
    # one ping unanswered, no new one before an interval has passed
    assert heartbeat_step(11.0, 9.0, 10.5, 2.0, 4.0) == (HB_WAIT, 13.0)
