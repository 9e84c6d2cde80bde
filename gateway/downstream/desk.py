"""The reference downstream's behaviour, sans-IO: bot triage, skill groups,
agents with capacity, sticky agents, replies after a think time and injected
faults. ``gateway desk-sim`` (:mod:`gateway.downstream.desksim`) is the I/O
shell around it.

:meth:`Desk.on_frame` takes one gateway frame and returns what to send back
as ``(delay_s, sid, frame)`` actions; the shell sends each one after its
delay on the link the session is bound to at that time (a session that is
re-opened on another link follows it).

When a session is bound to another link (re-opened there, or a message of
it came there), nothing more for it goes out on the link it was bound to
before: :attr:`Desk.marks` collects ``(old link, sid)`` for the shell to
send ``moved`` on that old link, behind everything sent there for the
session (docs/protocol.md, "Replies across a move").
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway.recent import IdWindow

__all__ = ["HANDOVER_WORDS", "VIOLATIONS", "Desk", "DeskConfig"]

#: Words in a visitor message that make the bot hand the session over.
HANDOVER_WORDS: Final = ("agent", "human", "person")
_HANDOVER_RE: Final = re.compile(r"\b(" + "|".join(HANDOVER_WORDS) + r")\b", re.IGNORECASE)
#: Client message numbers remembered per session for deduplication.
DEDUP_PER_SESSION: Final = 4096

#: Protocol violations desk-sim commits on request (``--violate NAME``), to
#: see ``gateway desk-check`` (and a gateway's handling) catch a broken
#: downstream: name -> what it does.
VIOLATIONS: Final = {
    "no-dup-ack": "a repeated message (a number seen before) gets no ack",
    "bad-ack": "acks carry a negative message number (a malformed frame)",
    "no-moved": "the 'moved' feature is not announced and no moved frame is sent",
}

Action = tuple[float, str, dict[str, Any]]


@dataclass(frozen=True)
class DeskConfig:
    name: str = "desk-sim"
    latency_ms: float = 0.0  # delay before each ack
    think_ms: float = 200.0  # delay before a reply
    error_rate: float = 0.0  # share of messages answered with nack
    agents: int = 4  # per skill group
    capacity: int = 8  # sessions per agent
    stall_after: int = 0  # stop answering after this many messages (0 = never)
    crash_after: int = 0  # the shell exits after this many messages (0 = never)
    reply: bool = True  # send replies (False: acks only, for throughput runs)
    batch_acks: bool = True  # the acks of one read in one ``acks`` frame (False: ``ack`` each)
    max_sessions: int = 1_000_000
    #: request headers a link must carry (desk-sim answers 401 otherwise)
    require_headers: tuple[tuple[str, str], ...] = ()
    #: names from :data:`VIOLATIONS`: deliberate protocol violations
    violate: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be in [0, 1]")
        if self.latency_ms < 0 or self.think_ms < 0:
            raise ValueError("latency_ms and think_ms must be >= 0")
        if self.agents < 1 or self.capacity < 1:
            raise ValueError("agents and capacity must be >= 1")
        if self.stall_after < 0 or self.crash_after < 0:
            raise ValueError("stall_after and crash_after must be >= 0")
        unknown = [v for v in self.violate if v not in VIOLATIONS]
        if unknown:
            raise ValueError(
                f"unknown violation {unknown[0]!r} (known: {', '.join(sorted(VIOLATIONS))})"
            )


class _Session:
    __slots__ = ("agent", "group", "link", "seen", "sid", "stage", "tenant", "visitor")

    def __init__(self, sid: str, link: int, f: dict[str, Any]) -> None:
        self.sid = sid
        self.link = link
        self.tenant: str = f["tenant"]
        self.visitor: str = f["visitor"]
        self.group: str = f["group"]
        self.stage: str = f["stage"]
        self.agent: str | None = None
        self.seen = IdWindow(DEDUP_PER_SESSION)


class Desk:
    """Sessions, agents and counters of one desk-sim process."""

    def __init__(
        self,
        cfg: DeskConfig,
        rng: random.Random | None = None,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.record = record
        self.sessions: dict[str, _Session] = {}
        # group -> agent name -> sessions assigned
        self.load: dict[str, dict[str, int]] = {}
        # group -> sids queued for an agent, first come first served; an
        # OrderedDict, not a list: with tens of thousands waiting, a list's
        # membership test and front pop made every open cost O(queue)
        self.waiting: dict[str, OrderedDict[str, None]] = {}
        self.messages = 0
        self.stalled = False
        self.no_dup_ack = "no-dup-ack" in cfg.violate
        self.bad_ack = "bad-ack" in cfg.violate
        self.no_moved = "no-moved" in cfg.violate
        # (old link, sid) of sessions bound to another link since the shell
        # last took them: it sends ``moved`` for each on the old link
        self.marks: list[tuple[int, str]] = []
        self.stats: dict[str, int] = {
            "opens": 0,
            "msgs": 0,
            "dups": 0,
            "acks": 0,
            "nacks": 0,
            "unknown_session": 0,
            "handovers": 0,
        }

    def link_of(self, sid: str) -> int | None:
        s = self.sessions.get(sid)
        return None if s is None else s.link

    @property
    def crashed(self) -> bool:
        return self.cfg.crash_after > 0 and self.messages >= self.cfg.crash_after

    # -- input --------------------------------------------------------------
    def on_frame(self, link: int, f: dict[str, Any]) -> list[Action]:
        t = f["t"]
        if t == "msg":
            return self._on_msg(link, f)
        if t == "open":
            return self._on_open(link, f)
        if t == "close":
            if f.get("reason") == "moved":
                return []  # served on (re-opened on) another link: keep it
            return self._end(f["sid"])
        return []

    def _on_open(self, link: int, f: dict[str, Any]) -> list[Action]:
        sid = f["sid"]
        self.stats["opens"] += 1
        s = self.sessions.get(sid)
        if s is None:
            if len(self.sessions) >= self.cfg.max_sessions:
                return []
            s = self.sessions[sid] = _Session(sid, link, f)
        else:
            if s.link != link:
                self._bind(s, link)
            out: list[Action] = []
            if f["group"] != s.group or f["stage"] != s.stage:
                out = self._release(s)
                s.group, s.stage = f["group"], f["stage"]
            if s.stage == "human" and s.agent is None:
                out.extend(self._assign(s, sid, f.get("agent")))
            return out
        if s.stage == "human":
            return self._assign(s, sid, f.get("agent"))
        return []

    def _on_msg(self, link: int, f: dict[str, Any]) -> list[Action]:
        cfg = self.cfg
        sid, n = f["sid"], f["n"]
        s = self.sessions.get(sid)
        if s is None:
            # a message for a session this desk never saw opened (e.g. after
            # a desk restart): accept it under a session made up from it
            self.stats["unknown_session"] += 1
            s = self.sessions[sid] = _Session(
                sid,
                link,
                {"tenant": "?", "visitor": "?", "group": f["group"], "stage": "human"},
            )
        if s.link != link:
            self._bind(s, link)
        if self.stalled:
            return []
        self.messages += 1
        if cfg.stall_after and self.messages >= cfg.stall_after:
            self.stalled = True
        ack_delay = cfg.latency_ms / 1000.0
        if n in s.seen:
            self.stats["dups"] += 1
            if self.no_dup_ack:
                return []
            self.stats["acks"] += 1
            return [(ack_delay, sid, {"t": "ack", "sid": sid, "n": n, "dup": True})]
        if cfg.error_rate and self.rng.random() < cfg.error_rate:
            self.stats["nacks"] += 1
            return [(ack_delay, sid, {"t": "nack", "sid": sid, "n": n, "code": 503})]
        self.stats["msgs"] += 1
        s.seen.put(n, 0)
        if self.record is not None:
            self.record({"sid": sid, "n": n, "id": f.get("id"), "body": f.get("body")})
        self.stats["acks"] += 1
        acked = -1 - n if self.bad_ack else n
        out: list[Action] = [(ack_delay, sid, {"t": "ack", "sid": sid, "n": acked})]
        if cfg.reply:
            out.extend(self._reply(s, sid, f.get("body")))
        return out

    def _bind(self, s: _Session, link: int) -> None:
        """``s`` goes to ``link`` from the link it was bound to."""
        if not self.no_moved:
            self.marks.append((s.link, s.sid))
        s.link = link

    def take_marks(self) -> list[tuple[int, str]]:
        """The ``(old link, sid)`` rebinds since the last call (see the
        module docstring)."""
        marks, self.marks = self.marks, []
        return marks

    # -- behaviour ------------------------------------------------------------
    def _reply(self, s: _Session, sid: str, body: Any) -> list[Action]:
        think = self.cfg.think_ms / 1000.0
        if type(body) is not str:
            return [(think, sid, _deliver(sid, body, "bot", self.cfg.name))]
        if s.stage == "bot":
            if _HANDOVER_RE.search(body):
                self.stats["handovers"] += 1
                return [
                    (think, sid, _deliver(sid, "Connecting you to a person...", "bot", "triage")),
                    (think, sid, {"t": "handover", "sid": sid, "group": s.group}),
                ]
            return [(think, sid, _deliver(sid, f"Bot: you said {body!r}", "bot", "triage"))]
        if s.agent is None:
            return [(think, sid, _deliver(sid, "Still waiting for an agent.", "system", "queue"))]
        return [(think, sid, _deliver(sid, f"{s.agent}: noted {body!r}", "agent", s.agent))]

    def _agents(self, group: str) -> dict[str, int]:
        load = self.load.get(group)
        if load is None:
            load = self.load[group] = {f"{group}-agent-{i + 1}": 0 for i in range(self.cfg.agents)}
        return load

    def _assign(self, s: _Session, sid: str, hint: Any) -> list[Action]:
        load = self._agents(s.group)
        cap = self.cfg.capacity
        agent: str | None = None
        if type(hint) is str and load.get(hint, cap) < cap:
            agent = hint  # sticky: the agent who served this visitor before
        else:
            free = [a for a, n in load.items() if n < cap]
            if free:
                agent = min(free, key=lambda a: load[a])
        if agent is None:
            q = self.waiting.setdefault(s.group, OrderedDict())
            q[sid] = None  # a session already queued keeps its place
            text = f"All agents are busy; you are number {len(q)} in the queue."
            return [(0.0, sid, _deliver(sid, text, "system", "queue"))]
        load[agent] += 1
        s.agent = agent
        return [(0.0, sid, {"t": "assign", "sid": sid, "agent": agent, "group": s.group})]

    def _release(self, s: _Session) -> list[Action]:
        if s.agent is None:
            return []
        load = self._agents(s.group)
        load[s.agent] = max(0, load.get(s.agent, 1) - 1)
        s.agent = None
        q = self.waiting.get(s.group)
        while q:
            nxt = self.sessions.get(q.popitem(last=False)[0])
            if nxt is not None and nxt.agent is None and nxt.stage == "human":
                return self._assign(nxt, nxt.sid, None)
        return []

    def _end(self, sid: str) -> list[Action]:
        s = self.sessions.pop(sid, None)
        if s is None:
            return []
        q = self.waiting.get(s.group)
        if q:
            q.pop(sid, None)
        return self._release(s)

    def link_closed(self, link: int) -> None:
        """Sessions stay (the gateway re-opens them on another link)."""


def _deliver(sid: str, body: Any, kind: str, name: str) -> dict[str, Any]:
    return {"t": "deliver", "sid": sid, "body": body, "from": {"kind": kind, "name": name}}
