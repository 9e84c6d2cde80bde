"""Replies in order across a session's move to another worker, sans-IO
(docs/protocol.md, "Replies across a move").

When a session moves from worker A to worker B, the downstream may still
have replies for it on A's link (written before it saw B's ``open``); A
passes those on to B (``mdel``), but B's own link can bring newer replies
sooner. A downstream with the ``moved`` feature answers the re-binding with
a ``moved`` frame on A's link, behind everything it sent there for the
session. So:

- A keeps a :class:`MarkWaits` entry for the session from the move until
  that ``moved`` frame comes (or A's link goes down: nothing more comes on
  it either), then tells B (``mend`` from A, behind the ``mdel`` it passed
  on).
- B holds the session's replies and assignments from the same endpoint in
  a :class:`Holds` entry until then: they go to the visitor behind the
  passed-on ones. A hold ends at the latest :data:`HOLD_S` after the move,
  or when it reaches :data:`MAX_FRAMES` or :data:`MAX_BYTES`.
- If the session moves on to C before A's word came, B releases what it
  holds into the session (it moves with the state) and C waits for A and
  B, in that order: a hold waits for a list of workers, oldest first, and
  a ``mend`` reaching a worker the session has left is passed on behind
  the replies it passed on. A reply passed on names the worker whose link
  it came on (``mdel`` ``from``): one from B waits for A's word, C's own
  for both. A ``mend`` from a worker the hold does not wait for is
  ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

__all__ = ["HOLD_S", "MAX_BYTES", "MAX_FRAMES", "MAX_WAITS", "Hold", "Holds", "MarkWaits"]

#: Longest a moved-in session's replies are held waiting for the old
#: worker's word that nothing more comes through it.
HOLD_S: Final = 1.0
#: Frames held per session at most; one more releases them all.
MAX_FRAMES: Final = 256
#: Body bytes held per session at most; more releases them all.
MAX_BYTES: Final = 256 * 1024
#: Sessions moved away waiting for their ``moved`` frame, per worker (the
#: oldest is forgotten beyond it; its new worker's hold then times out).
MAX_WAITS: Final = 65536


class MarkWaits:
    """The old worker's side: sessions that moved away from a link whose
    downstream will send ``moved`` for them."""

    __slots__ = ("_by_sid", "max_waits")

    def __init__(self, max_waits: int = MAX_WAITS) -> None:
        # sid -> (link, deadline), oldest first (deadlines grow with it)
        self._by_sid: OrderedDict[str, tuple[object, float]] = OrderedDict()
        self.max_waits = max_waits

    def __len__(self) -> int:
        return len(self._by_sid)

    def add(self, sid: str, link: object, now: float) -> None:
        """``sid`` moved away from ``link`` at ``now``."""
        w = self._by_sid
        w.pop(sid, None)
        w[sid] = (link, now + 2 * HOLD_S)
        if len(w) > self.max_waits:
            w.popitem(last=False)

    def take(self, link: object, sid: str) -> bool:
        """``moved`` for ``sid`` came on ``link``: True when the session
        was waiting for it there (the new worker is to be told)."""
        w = self._by_sid.get(sid)
        if w is None or w[0] is not link:
            return False
        del self._by_sid[sid]
        return True

    def link_down(self, link: object) -> list[str]:
        """``link`` is gone: the sessions that waited on it (nothing more
        comes for them there)."""
        gone = [sid for sid, (ln, _) in self._by_sid.items() if ln is link]
        for sid in gone:
            del self._by_sid[sid]
        return gone

    def expire(self, now: float) -> int:
        """Forgets the waits whose new worker stopped holding long ago;
        returns how many."""
        w = self._by_sid
        n = 0
        while w:
            sid, (_, deadline) = next(iter(w.items()))
            if deadline > now:
                break
            del w[sid]
            n += 1
        return n


class Hold:
    """One moved-in session's held frames (in arrival order, each with the
    rank of where it came from: see :meth:`Holds.passed_on`)."""

    __slots__ = ("bytes", "deadline", "ep", "frames", "order", "waits")

    def __init__(self, ep: str, deadline: float, order: list[int]) -> None:
        self.ep = ep  # the endpoint whose frames are held
        self.deadline = deadline
        # the workers the session moved through, oldest first, and those
        # whose word is still awaited
        self.order = order
        self.waits = set(order)
        self.frames: list[tuple[int, dict[str, Any]]] = []
        self.bytes = 0

    def ready(self, rank: int) -> bool:
        """Whether a frame of ``rank`` may go: every worker the session
        left before the one it came through has said its last word."""
        return not any(w in self.waits for w in self.order[:rank])

    def take(self, everything: bool) -> list[dict[str, Any]]:
        """The held frames that may go (all of them with ``everything``),
        oldest worker's first, each worker's in arrival order."""
        if everything:
            out, self.frames = self.frames, []
        else:
            out = [x for x in self.frames if self.ready(x[0])]
            self.frames = [x for x in self.frames if not self.ready(x[0])]
        out.sort(key=lambda x: x[0])  # stable: arrival order within a rank
        return [f for _, f in out]


class Holds:
    """The new worker's side: moved-in sessions whose replies from the
    old worker's endpoint wait for the old worker's ``mend``.

    After two moves (A to B to C) C waits for A and B, in that order: what
    came on A's link is older than what came on B's, which is older than
    what comes on C's own. Replies passed on from B wait for A's word;
    C's own wait for both."""

    __slots__ = ("_by_sid", "max_bytes", "max_frames")

    def __init__(self, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES) -> None:
        self._by_sid: OrderedDict[str, Hold] = OrderedDict()  # oldest deadline first
        self.max_frames = max_frames
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._by_sid)

    def start(self, sid: str, ep: str, now: float, waits: list[int]) -> None:
        """``sid`` moved in at ``now``; the workers ``waits`` (in the order
        the session left them) will say when nothing more comes through
        them; its frames from ``ep`` are held until then."""
        h = self._by_sid
        h.pop(sid, None)
        order = list(dict.fromkeys(waits))  # without repeats, in order
        if order:
            h[sid] = Hold(ep, now + HOLD_S, order)

    def waiting(self, sid: str) -> list[int]:
        """The workers the hold of ``sid`` still waits for, oldest first
        (none: no hold)."""
        h = self._by_sid.get(sid)
        return [] if h is None else [w for w in h.order if w in h.waits]

    def marked(self, sid: str, origin: int) -> list[dict[str, Any]] | None:
        """Worker ``origin`` says nothing more comes through it: the held
        frames that may go now (every one when that was the last word
        awaited: the hold ends), or None when the hold does not wait for
        ``origin`` (or there is no hold)."""
        h = self._by_sid.get(sid)
        if h is None or origin not in h.waits:
            return None
        h.waits.discard(origin)
        if h.waits:
            return h.take(False)
        del self._by_sid[sid]
        return h.take(True)

    def hold(self, sid: str, ep: str, frame: dict[str, Any]) -> list[dict[str, Any]] | None:
        """A frame from this worker's own link: the frames to hand on now,
        ``[frame]`` when ``sid``'s frames from ``ep`` are not held; None
        when ``frame`` is held; every held frame, this one last, when it
        took the hold over its bounds (which ends the hold)."""
        h = self._by_sid.get(sid)
        if h is None or h.ep != ep:
            return [frame]
        return self._add(sid, h, len(h.order), frame)

    def passed_on(
        self, sid: str, origin: int, frame: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        """A reply passed on by worker ``origin`` (one the session left):
        as :meth:`hold`, but it waits only for the workers the session left
        before ``origin``."""
        h = self._by_sid.get(sid)
        if h is None or origin not in h.order:
            return [frame]
        rank = h.order.index(origin)
        if h.ready(rank):
            # (nothing of this rank or an older one is held: those went
            # at the word that made them ready)
            return [frame]
        return self._add(sid, h, rank, frame)

    def _add(
        self, sid: str, h: Hold, rank: int, frame: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        body = frame.get("body")
        h.bytes += len(body) if type(body) is str or type(body) is bytes else 0
        h.frames.append((rank, frame))
        if len(h.frames) > self.max_frames or h.bytes > self.max_bytes:
            del self._by_sid[sid]
            return h.take(True)
        return None

    def end(self, sid: str) -> list[dict[str, Any]]:
        """The hold of ``sid`` ends (the session leaves): its frames, in
        order."""
        h = self._by_sid.pop(sid, None)
        return [] if h is None else h.take(True)

    def expire(self, now: float) -> list[tuple[str, list[dict[str, Any]]]]:
        """The holds past their deadline, ended: ``(sid, frames)`` each."""
        h = self._by_sid
        out: list[tuple[str, list[dict[str, Any]]]] = []
        while h:
            sid, hold = next(iter(h.items()))
            if hold.deadline > now:
                break
            del h[sid]
            out.append((sid, hold.take(True)))
        return out
