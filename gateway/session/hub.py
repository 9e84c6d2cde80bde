"""Worker-wide session logic shared by every connection (sans-IO).

The :class:`Hub` owns the session table, the token verifier, the counters
and the link to the downstream side. Connections (WebSocket or HTTP/2
streams, see :mod:`gateway.session.visitor`) call into it; the downstream
calls :meth:`Hub.downstream_ack` and :meth:`Hub.deliver`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.config import Config
from gateway.protocol.tokens import TokenVerifier
from gateway.session.limits import Limits
from gateway.session.state import Session, SessionTable
from gateway.session.tally import Tally
from gateway.session.terms import Terms

__all__ = ["Downstream", "Hub", "Migrator", "Sender"]

Sender = dict[str, str]  # {"kind": "bot" | "agent" | "system", "name": ...}


class Downstream(Protocol):
    """What the sessions need from the downstream side (the demo bot, or the
    router and its links)."""

    def admit(self, hub: Hub, tenant: str, tags: dict[str, str]) -> float:
        """0.0 when a new session (of ``tenant``, entering with ``tags``) may
        start, else seconds to retry after."""
        ...

    def opened(self, hub: Hub, s: Session, resumed: bool) -> None: ...

    def closed(self, hub: Hub, s: Session, reason: str = "ended") -> None:
        """The session ended for good (expired or evicted: ``"ended"``), or
        moved to another worker (``"moved"``)."""
        ...

    def moving(self, hub: Hub, s: Session) -> Any:
        """What the downstream side keeps of ``s`` when the session moves to
        another worker of this node (msgpack-able; e.g. its endpoint and
        agent), handed to that worker's :meth:`moved_in`."""
        ...

    def moved_in(self, hub: Hub, s: Session, hint: Any) -> None:
        """``s`` moved here from another worker, with its :meth:`moving`
        hint (not yet opened: :meth:`opened` follows)."""
        ...

    def move_ended(self, hub: Hub, s: Session, origin: int) -> None:
        """Worker ``origin``, which ``s`` moved away from, passes nothing
        more on for it (see :mod:`gateway.downstream.moveorder`)."""
        ...

    def passed_on(self, hub: Hub, s: Session, body: Any, sender: Any, origin: int | None) -> None:
        """A reply for ``s`` passed on by worker ``origin`` (which got it
        after the session left; None: not known): delivered to the
        visitor, now or behind older ones (see
        :mod:`gateway.downstream.moveorder`)."""
        ...

    def submit(self, hub: Hub, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        """Hands a visitor message over; the downstream later calls
        :meth:`Hub.downstream_ack`. Returns False when it cannot take more
        messages now (the connection pauses reading until
        :meth:`Hub.downstream_ready`)."""
        ...


class Migrator(Protocol):
    """The worker's side of moving sessions between workers."""

    def holder(self, sid: str) -> int | None:
        """The worker that holds (or last held) session ``sid``, when it is
        another worker of this node."""
        ...

    def handoff_possible(self) -> bool:
        """Whether connections (plain-TCP sockets) can move to a peer."""
        ...

    def request(self, proto: Any, holder: int, sid: str, tenant: str, visitor: str) -> None:
        """Asks ``holder`` for the session; ``proto.pulled(state)`` follows."""
        ...

    def forward_deliver(self, sid: str, body: Any, sender: Sender) -> bool:
        """Sends a delivery for a session that moved away on to its holder;
        False when it did not move (or the tombstone expired)."""
        ...

    def forward_mark(self, sid: str) -> None:
        """Tells the holder of a session that moved away that nothing more
        for it comes through this worker (behind what was passed on)."""
        ...


class Hub:
    __slots__ = (
        "_paused",
        "cfg",
        "downstream",
        "index",
        "limits",
        "log",
        "migrator",
        "mono",
        "sessions",
        "stats",
        "terms",
        "verifier",
        "wall",
        "workers",
    )

    def __init__(
        self,
        cfg: Config,
        downstream: Downstream,
        wall: Callable[[], float] = time.time,
        log: Callable[..., None] | None = None,
        workers: int = 1,
        mono: Callable[[], float] = time.monotonic,
        index: int = 0,
    ) -> None:
        self.cfg = cfg
        # the terms of the connections opened from now on (gateway.session.terms)
        self.terms = Terms.of(cfg)
        self.index = index  # this worker's index (written into session ids)
        self.workers = workers
        # True when a resume of another worker's session may be handed to
        # that worker (set by the worker once its hand-off socket is up)
        # moves sessions between this node's workers (set by the worker
        # when it has peers; see gateway.session.migrate)
        self.migrator: Migrator | None = None
        self.verifier = TokenVerifier(cfg.tenants)
        self.sessions = SessionTable(cfg.max_detached_sessions)
        self.downstream = downstream
        self.stats = Tally()
        self.wall = wall
        self.mono = mono
        self.limits = Limits(cfg, workers)
        self.log: Callable[..., None] = log or (lambda *a, **k: None)
        # connections paused because the downstream could not take more
        self._paused: set[Any] = set()

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded configuration: new connections get its terms, new
        sessions its replay and duplicate bounds (read from ``cfg`` when
        they are made), and the detached sessions kept its bound (from the
        next detach); connections and sessions already there keep theirs."""
        self.cfg = cfg
        self.terms = Terms.of(cfg)
        self.sessions.max_detached = cfg.max_detached_sessions

    def new_session(
        self, tenant: str, visitor: str, tags: dict[str, str], platform: str
    ) -> Session:
        from gateway.session.state import new_sid

        c = self.cfg
        s = Session(
            new_sid(self.index),
            tenant,
            visitor,
            tags,
            platform,
            c.dedup_ids,
            c.replay_frames,
            c.replay_bytes,
        )
        self.sessions.add(s)
        return s

    def submit(self, conn: Any, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        ok = self.downstream.submit(self, s, msg_id, n, body)
        if not ok:
            self._paused.add(conn)
        return ok

    def downstream_ready(self) -> None:
        """The downstream can take messages again: resume paused readers."""
        if not self._paused:
            return  # (no new set per link read: nothing for the collector)
        paused, self._paused = self._paused, set()
        for conn in paused:
            conn.downstream_ready()

    def forget(self, conn: Any) -> None:
        self._paused.discard(conn)

    def downstream_ack(self, s: Session, msg_id: Any) -> None:
        n = s.accept(msg_id)
        if n is None:
            self.stats["downstream_ack_unknown"] += 1
            return
        self.stats["messages_acked"] += 1
        if s.conn is not None:
            s.conn.session_ack(msg_id, n, False)

    def downstream_refuse(
        self, s: Session, msg_id: Any, code: int, reason: str, retry_after_s: float
    ) -> None:
        """The downstream side gives up on ``msg_id`` for now: the visitor gets
        an ``error`` frame for that message (not a disconnect) and may send
        it again after ``retry_after``."""
        if not s.abandon(msg_id):
            return
        self.stats[f"errors_{int(code)}"] += 1
        if s.conn is not None:
            s.conn.session_refused(msg_id, code, reason, self.retry_after_ms(retry_after_s))

    def deliver(self, s: Session, body: Any, sender: Sender) -> int:
        """Sends ``body`` to the visitor of ``s`` (now if attached, else on
        resume, within the replay bounds); returns its ``seq``."""
        if self.migrator is not None:
            cur = self.sessions.get(s.sid)
            if cur is not s:
                # a stale reference (the demo bot's delayed reply) to a
                # session that moved to another worker (and maybe back)
                if cur is not None:
                    s = cur
                elif self.migrator.forward_deliver(s.sid, body, sender):
                    return 0
        frame = {"t": "deliver", "body": body, "from": sender, "ts": int(self.wall() * 1000)}
        s.push(frame)
        self.stats["messages_delivered"] += 1
        return int(frame["seq"])

    def detach(self, s: Session, now: float) -> None:
        for old in self.sessions.detach(s, now):
            self.stats["sessions_evicted"] += 1
            self.downstream.closed(self, old)

    def expire(self, now: float) -> int:
        dropped = self.sessions.expire(now, self.cfg.session_ttl_s)
        for s in dropped:
            self.stats["sessions_expired"] += 1
            self.downstream.closed(self, s)
        return len(dropped)

    def retry_after_ms(self, base_s: float) -> int:
        """A retry delay spread over [base, 2*base] so clients told to come
        back later do not return in step."""
        return int(max(base_s, 0.1) * (1.0 + random.random()) * 1000)
