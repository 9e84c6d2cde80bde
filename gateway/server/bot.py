"""The embedded demo downstream: an in-process bot that answers visitors.

It stands in for a real downstream so that ``gateway serve`` without any
configuration shows a working conversation. Every visitor message is
acknowledged at once (the bot "accepted" it) and answered after
``bot_think_ms``; a new session gets a greeting. Pending replies are bounded
(:data:`MAX_PENDING`); beyond that replies are dropped and counted.

When a session moves to another worker, its pending replies go with it
(:meth:`DemoBot.moving`, up to :data:`MAX_MOVED_BYTES`) and are answered
there after what is left of their think time, so they keep their order
with the replies to the visitor's next messages (a reply passed on from the
old worker when it is due could arrive after those).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Final

import trio

from gateway.ops.names import MESSAGE_ACK
from gateway.session.hub import Hub
from gateway.session.state import Session, body_size

__all__ = ["DemoBot"]

MAX_PENDING: Final = 200_000
#: A moving session takes its pending replies along up to this many bytes
#: of bodies; beyond, they are passed on to it one by one when due.
MAX_MOVED_BYTES: Final = 64 << 10
#: The longest think time a moved-in reply may still have (seconds).
MAX_MOVED_DELAY_S: Final = 60.0
GREETING: Final = "Hi! I'm the demo bot. Say something and I'll answer."
SENDER: Final = {"kind": "bot", "name": "demo-bot"}
_ACK_OBSERVE: Final = MESSAGE_ACK.labels().observe


def reply_to(body: Any) -> Any:
    if type(body) is str:
        return f"You said: {body}"
    return body  # bytes (e.g. sealed payloads) are echoed unchanged


class DemoBot:
    __slots__ = (
        "_by_sid", "_heap", "_seq", "_wake", "hub", "max_sessions", "think_s",
    )  # fmt: skip

    def __init__(self, think_ms: int, max_sessions: int) -> None:
        self.think_s = think_ms / 1000.0
        self.max_sessions = max_sessions
        # pending replies: [due, seq, session, body, live], in a heap and by
        # session (a moved session's are no longer live: they went with it)
        self._heap: list[list[Any]] = []
        self._by_sid: dict[str, list[list[Any]]] = {}
        self._seq = itertools.count()
        self._wake: trio.Event | None = None
        self.hub: Hub | None = None

    # -- Downstream -----------------------------------------------------------
    def admit(self, hub: Hub, tenant: str, tags: dict[str, str]) -> float:
        if len(hub.sessions) - hub.sessions.detached >= self.max_sessions:
            return 1.0
        return 0.0

    def opened(self, hub: Hub, s: Session, resumed: bool) -> None:
        if not resumed:
            hub.deliver(s, GREETING, SENDER)

    def closed(self, hub: Hub, s: Session, reason: str = "ended") -> None:
        if reason != "moved":
            return
        pending = self._movable(s.sid)
        if pending is not None:
            # they went with the session (moving): not answered here
            for e in pending:
                e[4] = False
            del self._by_sid[s.sid]

    def moving(self, hub: Hub, s: Session) -> Any:
        """The session's pending replies with what is left of their think
        time, if their bodies fit in :data:`MAX_MOVED_BYTES` (else None:
        each is passed on when due, by Hub.deliver). They stop being
        answered here once the move is done (``closed(..., "moved")``)."""
        pending = self._movable(s.sid)
        if pending is None:
            return None
        now = trio.current_time()
        return {"bot": [[max(0.0, e[0] - now), e[3]] for e in pending]}

    def _movable(self, sid: str) -> list[list[Any]] | None:
        """The session's pending replies if they go with it on a move."""
        pending = self._by_sid.get(sid)
        if not pending or sum(body_size(e[3]) for e in pending) > MAX_MOVED_BYTES:
            return None
        return pending

    def moved_in(self, hub: Hub, s: Session, hint: Any) -> None:
        replies = hint.get("bot") if type(hint) is dict else None
        if type(replies) is not list:
            return
        now = trio.current_time()
        for item in replies[:1000]:
            if type(item) is not list or len(item) != 2:
                continue
            delay, body = item
            if type(delay) not in (int, float) or not 0 <= delay <= MAX_MOVED_DELAY_S:
                continue
            if type(body) in (str, bytes):
                self._push(now + delay, s, body)

    def move_ended(self, hub: Hub, s: Session, origin: int) -> None:
        """Nothing to do: the bot's replies move with the session."""

    def passed_on(self, hub: Hub, s: Session, body: Any, sender: Any, origin: int | None) -> None:
        hub.deliver(s, body, sender)

    def submit(self, hub: Hub, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        hub.downstream_ack(s, msg_id)
        _ACK_OBSERVE(0.0)  # the bot accepts at once
        if self.think_s <= 0:
            hub.deliver(s, reply_to(body), SENDER)
            return True
        if len(self._heap) >= MAX_PENDING:
            hub.stats["bot_replies_dropped"] += 1
            return True
        self._push(trio.current_time() + self.think_s, s, reply_to(body))
        return True

    def _push(self, due: float, s: Session, body: Any) -> None:
        e = [due, next(self._seq), s, body, True]
        heapq.heappush(self._heap, e)
        self._by_sid.setdefault(s.sid, []).append(e)
        if self._wake is not None:
            self._wake.set()

    # -- the reply task ---------------------------------------------------------
    async def run(self, hub: Hub) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._wake = trio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            due = heap[0][0]
            now = trio.current_time()
            if due > now:
                await trio.sleep(due - now)
                continue
            while heap and heap[0][0] <= now:
                _, _, s, body, live = heapq.heappop(heap)
                if not live:
                    continue  # moved with its session
                pending = self._by_sid.get(s.sid)
                if pending:
                    pending.pop(0)  # a session's replies come due in order
                    if not pending:
                        del self._by_sid[s.sid]
                hub.deliver(s, body, SENDER)
