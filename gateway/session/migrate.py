"""Moving a session between the workers of one node (sans-IO part).

A visitor's reconnect lands on whichever worker the kernel's SO_REUSEPORT
hash picks. A plain-TCP WebSocket connection is handed to the worker that
holds its session (its socket moves, see docs/architecture.md); a TLS or
HTTP/2 connection cannot move, so the session moves instead: the worker
that got the resume asks the holder for it, the holder exports the
session's state (:func:`export_state`), forgets it, keeps a tombstone
pointing at the new holder (:class:`Tombstones`: later resumes and
deliveries that still reach the old holder are sent on), and the new holder
imports it (:func:`import_state`) and answers the hello as a resume.

What moves: numbering (``next_n``), the dedup ids of accepted messages,
the server ``seq``, the replay buffer (the newest frames that fit in
``max_bytes``; ``first`` moves up for the rest, so the visitor is told to
resync if it missed those), the token expiry, and the messages still in
flight downstream (``id -> n``): the visitor sends those again after the
resume, and the new holder gives them their old ``n`` so the downstream's
dedup on ``(sid, n)`` recognises them (:attr:`Session.reissue`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import msgpack

from gateway.session.state import Session, body_size, replay_cost

__all__ = ["MAX_HOPS", "Tombstones", "export_state", "import_state"]

#: A request is passed on from tombstone to tombstone at most this often.
MAX_HOPS: Final = 3

_STR_FIELDS: Final = ("sid", "tenant", "visitor", "platform")
_INT_FIELDS: Final = ("next_n", "seq", "first", "exp")


def export_state(s: Session, max_bytes: int, ds: Any = None) -> dict[str, Any]:
    """The state of ``s`` as a msgpack-able map, at most ``max_bytes`` once
    packed (replay frames are dropped oldest first to fit); ``ds`` is the
    downstream side's hint (``Downstream.moving``)."""
    replay = list(s.replay)
    state = {
        "sid": s.sid,
        "tenant": s.tenant,
        "visitor": s.visitor,
        "tags": dict(s.tags),
        "platform": s.platform,
        "next_n": s.next_n,
        "seq": s.seq,
        "first": s.first,
        "exp": int(s.exp),
        "accepted": [[k, v] for k, v in s.accepted.items()],
        "inflight": [[k, v] for k, v in s.inflight.items()],
        "replay": replay,
        "ds": ds,
    }
    size = len(msgpack.packb(state, use_bin_type=True))
    while replay and size > max_bytes:
        old = replay.pop(0)
        size -= body_size(old.get("body")) + 32
        state["first"] = int(old["seq"]) + 1
        if size <= max_bytes:
            size = len(msgpack.packb(state, use_bin_type=True))
    if size > max_bytes:
        raise ValueError("session state too large to move")
    return state


def _pairs(v: Any, name: str) -> list[tuple[Any, int]]:
    if type(v) is not list:
        raise ValueError(f"{name} is not a list")
    out = []
    for item in v:
        if type(item) is not list or len(item) != 2 or type(item[1]) is not int:
            raise ValueError(f"bad {name} entry")
        if type(item[0]) not in (str, int):
            raise ValueError(f"bad {name} id")
        out.append((item[0], item[1]))
    return out


def import_state(d: Any, dedup_max: int, replay_max_frames: int, replay_max_bytes: int) -> Session:
    """A :class:`Session` from :func:`export_state`'s map; ``ValueError``
    when it is malformed (it comes from another worker of ours, but is
    checked like any input)."""
    if type(d) is not dict:
        raise ValueError("state is not a map")
    for k in _STR_FIELDS:
        if type(d.get(k)) is not str:
            raise ValueError(f"{k} missing")
    for k in _INT_FIELDS:
        if type(d.get(k)) is not int or d[k] < 0:
            raise ValueError(f"{k} missing")
    tags = d.get("tags")
    if type(tags) is not dict or not all(
        type(k) is str and type(v) is str for k, v in tags.items()
    ):
        raise ValueError("bad tags")
    replay = d.get("replay")
    if type(replay) is not list or not all(
        type(f) is dict and type(f.get("seq")) is int for f in replay
    ):
        raise ValueError("bad replay")
    s = Session(
        d["sid"],
        d["tenant"],
        d["visitor"],
        tags,
        d["platform"],
        dedup_max,
        replay_max_frames,
        replay_max_bytes,
    )
    s.next_n = d["next_n"]
    s.seq = d["seq"]
    s.first = d["first"]
    s.exp = d["exp"]
    s.restore_accepted(_pairs(d.get("accepted"), "accepted"))
    reissue = dict(_pairs(d.get("inflight"), "inflight"))
    s.reissue = reissue or None
    for f in replay:
        s.replay.append(f)
        s.replay_bytes += replay_cost(f)
    return s


class Tombstones:
    """Sessions that moved away from this worker: sid -> (holder, until),
    at most ``limit`` (oldest dropped first)."""

    __slots__ = ("_d", "limit")

    def __init__(self, limit: int) -> None:
        self._d: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.limit = 1
        self.resize(limit)

    def resize(self, limit: int) -> None:
        """A new bound (at least 1; a reload's), held from the next add."""
        self.limit = max(1, limit)

    def __len__(self) -> int:
        return len(self._d)

    def add(self, sid: str, holder: int, until: float) -> None:
        self._d.pop(sid, None)
        self._d[sid] = (holder, until)
        while len(self._d) > self.limit:
            self._d.popitem(last=False)

    def holder(self, sid: str, now: float) -> int | None:
        got = self._d.get(sid)
        if got is None:
            return None
        if got[1] <= now:
            del self._d[sid]
            return None
        return got[0]

    def discard(self, sid: str) -> None:
        self._d.pop(sid, None)
