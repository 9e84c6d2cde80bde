"""The embedded demo downstream: an in-process bot that answers visitors.

It stands in for a real downstream so that ``gateway serve`` without any
configuration shows a working conversation. Every visitor message is
acknowledged at once (the bot "accepted" it) and answered after
``bot_think_ms``; a new session gets a greeting. Pending replies are bounded
(:data:`MAX_PENDING`); beyond that replies are dropped and counted.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Final

import trio

from gateway.ops.names import MESSAGE_ACK
from gateway.session.hub import Hub
from gateway.session.state import Session

__all__ = ["DemoBot"]

MAX_PENDING: Final = 200_000
GREETING: Final = "Hi! I'm the demo bot. Say something and I'll answer."
SENDER: Final = {"kind": "bot", "name": "demo-bot"}
_ACK_OBSERVE: Final = MESSAGE_ACK.labels().observe


def reply_to(body: Any) -> Any:
    if type(body) is str:
        return f"You said: {body}"
    return body  # bytes (e.g. sealed payloads) are echoed unchanged


class DemoBot:
    __slots__ = ("_heap", "_seq", "_wake", "hub", "max_sessions", "think_s")

    def __init__(self, think_ms: int, max_sessions: int) -> None:
        self.think_s = think_ms / 1000.0
        self.max_sessions = max_sessions
        self._heap: list[tuple[float, int, Session, Any]] = []
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
        pass

    def moving(self, hub: Hub, s: Session) -> Any:
        return None  # its pending replies follow the session (Hub.deliver)

    def moved_in(self, hub: Hub, s: Session, hint: Any) -> None:
        pass

    def submit(self, hub: Hub, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        hub.downstream_ack(s, msg_id)
        _ACK_OBSERVE(0.0)  # the bot accepts at once
        if self.think_s <= 0:
            hub.deliver(s, reply_to(body), SENDER)
            return True
        if len(self._heap) >= MAX_PENDING:
            hub.stats["bot_replies_dropped"] += 1
            return True
        heapq.heappush(
            self._heap, (trio.current_time() + self.think_s, next(self._seq), s, reply_to(body))
        )
        if self._wake is not None:
            self._wake.set()
        return True

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
                _, _, s, body = heapq.heappop(heap)
                hub.deliver(s, body, SENDER)
