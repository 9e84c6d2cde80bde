"""Per-session state that outlives connections (docs/protocol.md,
"Numbering, acknowledgement and resume").

A :class:`Session` numbers visitor messages (``n``), remembers which client
ids it has accepted (bounded), tracks the ids still in flight downstream,
numbers server frames (``seq``) and keeps the last ones in a replay buffer
bounded in frames and bytes. :class:`SessionTable` owns the sessions of one
worker and the detached ones waiting for a resume (bounded in count, expired
by the caller's clock). No I/O here.
"""

from __future__ import annotations

import base64
import os
from collections import OrderedDict
from typing import Any, Protocol

from gateway.recent import IdWindow

__all__ = ["Attachment", "Session", "SessionTable", "new_sid", "sid_owner"]

#: Bytes counted per replayed frame on top of its body (keys, seq, sender).
FRAME_OVERHEAD = 64


def new_sid(owner: int = 0) -> str:
    """A session id: 16 bytes, URL-safe base64 (22 characters); the first
    byte is the index of the worker that holds the session (so a resume
    that lands on another worker can be handed to it), the other 120 bits
    are random."""
    raw = bytearray(os.urandom(16))
    raw[0] = owner & 0xFF
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def sid_owner(sid: str) -> int | None:
    """The worker index in a session id made by :func:`new_sid`, or None
    for anything else."""
    if len(sid) != 22:
        return None
    try:
        raw = base64.urlsafe_b64decode(sid + "==")
    except (ValueError, TypeError):
        return None
    return raw[0] if len(raw) == 16 else None


class Attachment(Protocol):
    """The connection side a session talks to while attached."""

    def session_frame(self, frame: dict[str, Any]) -> None: ...

    def session_ack(self, msg_id: Any, n: int, dup: bool) -> None: ...

    def session_refused(self, msg_id: Any, code: int, reason: str, retry_after_ms: int) -> None: ...

    def taken_over(self) -> None: ...


def body_size(body: Any) -> int:
    if type(body) is str:
        return len(body) * 4 if not body.isascii() else len(body)
    try:
        return len(body)
    except TypeError:
        return 16


def replay_cost(frame: dict[str, Any]) -> int:
    """What a frame in the replay buffer counts against ``replay_bytes``."""
    return body_size(frame.get("body")) + FRAME_OVERHEAD


class Session:
    __slots__ = (
        "accepted",
        "conn",
        "dedup_max",
        "ds",
        "exp",
        "first",
        "inflight",
        "next_n",
        "platform",
        "reissue",
        "replay",
        "replay_bytes",
        "replay_max_bytes",
        "replay_max_frames",
        "seq",
        "sid",
        "tags",
        "tenant",
        "ticket",
        "visitor",
    )

    def __init__(
        self,
        sid: str,
        tenant: str,
        visitor: str,
        tags: dict[str, str],
        platform: str,
        dedup_max: int,
        replay_max_frames: int,
        replay_max_bytes: int,
    ) -> None:
        self.sid = sid
        self.tenant = tenant
        self.visitor = visitor
        self.tags = tags
        self.platform = platform
        self.exp = 0
        self.conn: Attachment | None = None
        self.next_n = 1
        # client id -> n, for the newest ids the downstream accepted
        self.accepted = IdWindow(dedup_max)
        self.dedup_max = dedup_max
        # client id -> n, for ids handed downstream and not yet acknowledged
        self.inflight: dict[Any, int] = {}
        self.seq = 0
        self.first = 1  # lowest seq still replayable
        # a list, not a deque: at most replay_frames entries, and an empty
        # deque costs 760 bytes per session
        self.replay: list[dict[str, Any]] = []
        self.replay_bytes = 0
        self.replay_max_frames = replay_max_frames
        self.replay_max_bytes = replay_max_bytes
        # the downstream side's state for this session (its route, messages
        # in flight); None until a downstream that needs one sets it
        self.ds: Any = None
        # the sticky ticket the visitor's hello carried, until the
        # downstream side has read it (gateway.downstream.stickyticket)
        self.ticket: str | None = None
        # id -> n of messages that were in flight when the session moved
        # here from another worker (gateway.session.migrate): sent again,
        # they keep their n
        self.reissue: dict[Any, int] | None = None

    # -- visitor -> downstream ------------------------------------------
    def classify(self, msg_id: Any) -> int | None:
        """The ``n`` of an id already accepted (a duplicate), -1 for an id in
        flight (to be dropped, its ack will follow), else None (new)."""
        n = self.accepted.get(msg_id)
        if n is not None:
            return n
        if msg_id in self.inflight:
            return -1
        return None

    def begin(self, msg_id: Any) -> int:
        """Numbers a new message and marks it in flight."""
        if self.reissue is not None:
            old = self.reissue.pop(msg_id, None)
            if not self.reissue:
                self.reissue = None
            if old is not None:
                self.inflight[msg_id] = old
                return old
        n = self.next_n
        self.next_n = n + 1
        self.inflight[msg_id] = n
        return n

    def abandon(self, msg_id: Any) -> bool:
        """The downstream refused ``msg_id``: it is no longer in flight (and
        not accepted, so the visitor may send it again)."""
        return self.inflight.pop(msg_id, None) is not None

    def accept(self, msg_id: Any) -> int | None:
        """The downstream acknowledged ``msg_id``: its ``n``, or None when it
        was not in flight (late or duplicate downstream ack)."""
        n = self.inflight.pop(msg_id, None)
        if n is None:
            return None
        self.accepted.put(msg_id, n)
        return n

    def restore_accepted(self, pairs: list[tuple[Any, int]]) -> None:
        """Sets the accepted ids (oldest first, as exported), keeping the
        newest ``dedup_max``."""
        self.accepted = IdWindow(self.dedup_max, pairs[-self.dedup_max :])

    # -- downstream -> visitor ------------------------------------------
    def push(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Numbers a ``deliver`` frame (sets ``seq``), keeps it for replay
        and sends it when attached."""
        self.seq += 1
        frame["seq"] = self.seq
        r = self.replay
        r.append(frame)
        self.replay_bytes += replay_cost(frame)
        if len(r) > self.replay_max_frames or self.replay_bytes > self.replay_max_bytes:
            k = 0
            left = len(r)
            size = self.replay_bytes
            while k < left and (left - k > self.replay_max_frames or size > self.replay_max_bytes):
                size -= replay_cost(r[k])
                k += 1
            self._drop_replayed(k, size)
        if self.conn is not None:
            self.conn.session_frame(frame)
        return frame

    def client_acked(self, seq: int) -> None:
        """Cumulative ack from the visitor: frames up to ``seq`` can go."""
        r = self.replay
        k = 0
        left = len(r)
        size = self.replay_bytes
        while k < left and r[k]["seq"] <= seq:
            size -= replay_cost(r[k])
            k += 1
        if k:
            self._drop_replayed(k, size)
        if seq >= self.seq and not r:
            self.first = self.seq + 1

    def _drop_replayed(self, k: int, size: int) -> None:
        """Forgets the ``k`` (>= 1) oldest replay frames in one deletion
        (not a pop(0) each); ``size`` is what the others count."""
        r = self.replay
        self.first = r[k - 1]["seq"] + 1
        del r[:k]
        self.replay_bytes = size

    def missed(self, last: int) -> tuple[list[dict[str, Any]], bool]:
        """The buffered frames with ``seq > last`` in order, and whether some
        frames after ``last`` are no longer buffered (resync needed)."""
        resync = last + 1 < self.first and last < self.seq
        return [f for f in self.replay if f["seq"] > last], resync


class SessionTable:
    """The sessions of one worker: attached ones, and detached ones (kept for
    resume, at most ``max_detached``, oldest dropped first; a bound lowered
    by a reload holds from the next detach)."""

    __slots__ = ("_detached", "_sessions", "max_detached")

    def __init__(self, max_detached: int) -> None:
        self._sessions: dict[str, Session] = {}
        self._detached: OrderedDict[str, float] = OrderedDict()  # sid -> detached at
        self.max_detached = max_detached

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Any:
        return iter(list(self._sessions.values()))

    @property
    def detached(self) -> int:
        return len(self._detached)

    def add(self, s: Session) -> None:
        self._sessions[s.sid] = s

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def attach(self, s: Session) -> None:
        self._detached.pop(s.sid, None)

    def detach(self, s: Session, now: float) -> list[Session]:
        """Marks ``s`` detached; returns sessions dropped to respect the
        bound (the caller tells the downstream they ended)."""
        s.conn = None
        self._detached[s.sid] = now
        dropped: list[Session] = []
        while len(self._detached) > self.max_detached:
            sid, _ = self._detached.popitem(last=False)
            old = self._sessions.pop(sid, None)
            if old is not None:
                dropped.append(old)
        return dropped

    def expire(self, now: float, ttl: float) -> list[Session]:
        """Drops detached sessions older than ``ttl``."""
        dropped: list[Session] = []
        d = self._detached
        while d:
            sid, at = next(iter(d.items()))
            if now - at < ttl:
                break
            d.popitem(last=False)
            s = self._sessions.pop(sid, None)
            if s is not None:
                dropped.append(s)
        return dropped

    def remove(self, s: Session) -> None:
        self._detached.pop(s.sid, None)
        self._sessions.pop(s.sid, None)
