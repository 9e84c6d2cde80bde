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
  holds into the session (it moves with the state) and C waits for both
  A and B: a hold waits for a set of workers, and a ``mend`` reaching a
  worker the session has left is passed on behind the replies it passed
  on. A ``mend`` from a worker the hold does not wait for is ignored.
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

    __slots__ = ("_by_sid",)

    def __init__(self) -> None:
        # sid -> (link, deadline), oldest first (deadlines grow with it)
        self._by_sid: OrderedDict[str, tuple[object, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_sid)

    def add(self, sid: str, link: object, now: float) -> None:
        """``sid`` moved away from ``link`` at ``now``."""
        w = self._by_sid
        w.pop(sid, None)
        w[sid] = (link, now + 2 * HOLD_S)
        if len(w) > MAX_WAITS:
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
    """One moved-in session's held frames (in arrival order)."""

    __slots__ = ("bytes", "deadline", "ep", "frames", "waits")

    def __init__(self, ep: str, deadline: float, waits: set[int]) -> None:
        self.ep = ep  # the endpoint whose frames are held
        self.deadline = deadline
        self.waits = waits  # the workers whose word is still awaited
        self.frames: list[dict[str, Any]] = []
        self.bytes = 0


class Holds:
    """The new worker's side: moved-in sessions whose replies from the
    old worker's endpoint wait for the old worker's ``mend``."""

    __slots__ = ("_by_sid",)

    def __init__(self) -> None:
        self._by_sid: OrderedDict[str, Hold] = OrderedDict()  # oldest deadline first

    def __len__(self) -> int:
        return len(self._by_sid)

    def start(self, sid: str, ep: str, now: float, waits: set[int]) -> None:
        """``sid`` moved in at ``now``; the workers ``waits`` will say when
        nothing more comes through them; its frames from ``ep`` are held
        until then."""
        h = self._by_sid
        h.pop(sid, None)
        if waits:
            h[sid] = Hold(ep, now + HOLD_S, set(waits))

    def waiting(self, sid: str) -> set[int]:
        """The workers the hold of ``sid`` still waits for (none: no hold)."""
        h = self._by_sid.get(sid)
        return set() if h is None else set(h.waits)

    def marked(self, sid: str, origin: int) -> list[dict[str, Any]] | None:
        """Worker ``origin`` says nothing more comes through it: the held
        frames when that was the last word awaited (the hold ends), else
        None (still waiting, or not waiting for ``origin`` at all)."""
        h = self._by_sid.get(sid)
        if h is None or origin not in h.waits:
            return None
        h.waits.discard(origin)
        if h.waits:
            return None
        del self._by_sid[sid]
        return h.frames

    def hold(self, sid: str, ep: str, frame: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The frames to hand on now: ``[frame]`` when ``sid``'s frames
        from ``ep`` are not held; None when ``frame`` is held; every held
        frame, this one last, when it took the hold over its bounds (which
        ends the hold)."""
        h = self._by_sid.get(sid)
        if h is None or h.ep != ep:
            return [frame]
        body = frame.get("body")
        h.bytes += len(body) if type(body) is str or type(body) is bytes else 0
        h.frames.append(frame)
        if len(h.frames) > MAX_FRAMES or h.bytes > MAX_BYTES:
            del self._by_sid[sid]
            return h.frames
        return None

    def end(self, sid: str) -> list[dict[str, Any]]:
        """The hold of ``sid`` ends (the session leaves): its frames, in
        order."""
        h = self._by_sid.pop(sid, None)
        return [] if h is None else h.frames

    def expire(self, now: float) -> list[tuple[str, list[dict[str, Any]]]]:
        """The holds past their deadline, ended: ``(sid, frames)`` each."""
        h = self._by_sid
        out: list[tuple[str, list[dict[str, Any]]]] = []
        while h:
            sid, hold = next(iter(h.items()))
            if hold.deadline > now:
                break
            del h[sid]
            out.append((sid, hold.frames))
        return out
