"""The demo bot's pending replies when a session moves between workers
(sans-IO around trio's mock clock: two bots, two fake hubs)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from gateway.server.bot import MAX_MOVED_BYTES, DemoBot
from gateway.session.state import Session


class _Hub:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, Any]] = []
        self.stats: dict[str, int] = {}

    def deliver(self, s: Session, body: Any, sender: Any) -> int:
        self.delivered.append((s.sid, body))
        return len(self.delivered)

    def downstream_ack(self, s: Session, msg_id: Any) -> None:
        pass


def _session(sid: str = "s1") -> Session:
    return Session(sid, "t", "v", {}, "web", 4, 8, 1 << 20)


async def _two_bots(body: str, move: bool) -> tuple[_Hub, _Hub, Any]:
    """m0 on worker A; 30 ms later the session moves to B (or the move
    fails after ``moving``: no ``closed``); then m1 on B."""
    a, b = DemoBot(100, 100), DemoBot(100, 100)
    hub_a, hub_b = _Hub(), _Hub()
    async with trio.open_nursery() as n:
        n.start_soon(a.run, hub_a)
        n.start_soon(b.run, hub_b)
        s = _session()
        a.submit(hub_a, s, 1, 1, body)  # type: ignore[arg-type]
        await trio.sleep(0.03)
        hint = a.moving(hub_a, s)  # type: ignore[arg-type]
        if move:
            a.closed(hub_a, s, "moved")  # type: ignore[arg-type]
            s2 = _session()
            b.moved_in(hub_b, s2, hint)  # type: ignore[arg-type]
            b.submit(hub_b, s2, 2, 2, "m1")  # type: ignore[arg-type]
        await trio.sleep(0.5)
        n.cancel_scope.cancel()
    return hub_a, hub_b, hint


async def test_pending_replies_move_with_the_session_and_keep_their_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub_a, hub_b, hint = await _two_bots("m0", move=True)
    assert hint["bot"][0][1] == "You said: m0"
    assert 0.06 <= hint["bot"][0][0] <= 0.071  # what was left of 100 ms
    assert hub_a.delivered == []  # not answered on the old worker
    assert hub_b.delivered == [("s1", "You said: m0"), ("s1", "You said: m1")]


async def test_a_failed_move_keeps_the_replies_where_they_were(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub_a, hub_b, hint = await _two_bots("m0", move=False)
    assert hint is not None
    assert hub_a.delivered == [("s1", "You said: m0")]
    assert hub_b.delivered == []


async def test_replies_too_big_to_move_are_passed_on_when_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    big = "x" * (MAX_MOVED_BYTES + 1)
    hub_a, hub_b, hint = await _two_bots(big, move=True)
    assert hint is None
    # answered by the old worker when due (the hub passes it on to the
    # session's new worker), while m1 is answered on the new one
    assert hub_a.delivered == [("s1", f"You said: {big}")]
    assert hub_b.delivered == [("s1", "You said: m1")]


async def test_a_moved_in_hint_is_checked(autojump_clock: trio.testing.MockClock) -> None:
    b, hub = DemoBot(100, 100), _Hub()
    async with trio.open_nursery() as n:
        n.start_soon(b.run, hub)
        s = _session()
        bad: list[Any] = [
            None, "x", {"bot": "x"}, {"bot": [[1.0]]}, {"bot": [[-1, "x"]]},
            {"bot": [[1e9, "x"]]}, {"bot": [["1", "x"]]}, {"bot": [[0.01, 5]]},
        ]  # fmt: skip
        for hint in bad:
            b.moved_in(hub, s, hint)  # type: ignore[arg-type]
        b.moved_in(hub, s, {"bot": [[0.01, "ok"], [0.02, b"raw"]]})  # type: ignore[arg-type]
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert hub.delivered == [("s1", "ok"), ("s1", b"raw")]
