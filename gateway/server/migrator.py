"""Sessions moving between the workers of one node (the trio shell of
:mod:`gateway.session.migrate`).

Messages travel over the workers' unix ``SOCK_SEQPACKET`` sockets (the ones
that carry handed-over connections), one msgpack map each, without a file
descriptor:

- ``mreq`` ``{rid, from, sid, tenant, visitor, hops}``: worker ``from``
  got a resume for ``sid`` and asks for the session;
- ``mrep`` ``{rid, state}``: the session's state, or nil when the holder
  does not have it (or it belongs to another visitor);
- ``mdel`` ``{sid, body, sender, from, hops}``: a delivery for a session
  that moved, passed on to its new holder; ``from``: the worker whose
  downstream link brought it;
- ``mend`` ``{sid, from, hops}``: nothing more for a session that moved
  comes through worker ``from``'s downstream link (behind its last
  ``mdel``; passed on like it; see :mod:`gateway.downstream.moveorder`).

A worker that receives ``mreq`` for a session it gave away passes the
request on to the holder its tombstone names (at most
:data:`~gateway.session.migrate.MAX_HOPS` times). Messages to one peer go
out in order through one sender task per peer, from a queue bounded by
:data:`QUEUE_LIMIT` (over it: dropped and counted; a dropped ``mreq`` ends
as a fresh session after :data:`WAIT_S`).
"""

from __future__ import annotations

import logging
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from gateway.session.migrate import MAX_HOPS, Tombstones, export_state, import_state
from gateway.session.state import sid_owner

if TYPE_CHECKING:
    from gateway.server.worker import Worker

__all__ = ["QUEUE_LIMIT", "STATE_MAX_BYTES", "WAIT_S", "WorkerMigrator"]

_log = logging.getLogger("gateway.migrate")

#: How long a resume waits for the holder's answer before it gets a fresh
#: session.
WAIT_S: Final = 2.0
#: Messages queued per peer.
QUEUE_LIMIT: Final = 10000
#: A session's exported state, packed (its replay frames are trimmed to fit).
STATE_MAX_BYTES: Final = 180 * 1024


class WorkerMigrator:
    """The :class:`gateway.session.hub.Migrator` of a worker with peers."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.hub = w.hub
        self.tombs = Tombstones(w.cfg.max_detached_sessions)
        self.pending: dict[int, Any] = {}  # rid -> VisitorProtocol waiting
        self.next_rid = 0
        self.queues: dict[int, deque[dict[str, Any]]] = {}  # per peer, in order
        self.sending: set[int] = set()

    # -- Migrator ---------------------------------------------------------------
    def holder(self, sid: str) -> int | None:
        hub = self.hub
        h = self.tombs.holder(sid, trio.current_time())
        if h is not None:
            return h
        owner = sid_owner(sid)
        if owner is not None and owner != hub.index and owner < hub.workers:
            return owner
        return None

    def handoff_possible(self) -> bool:
        return self.w.ssl_ctx is None

    def request(self, proto: Any, holder: int, sid: str, tenant: str, visitor: str) -> None:
        self.next_rid += 1
        rid = self.next_rid
        self.pending[rid] = proto
        msg = {"k": "mreq", "rid": rid, "from": self.hub.index, "sid": sid}
        msg.update(tenant=tenant, visitor=visitor, hops=0)
        self._send(holder, msg)
        self.w.spawn(partial(self._give_up_later, rid))

    def forward_deliver(self, sid: str, body: Any, sender: dict[str, str]) -> bool:
        h = self.tombs.holder(sid, trio.current_time())
        if h is None:
            return False
        self.hub.stats["deliveries_forwarded"] += 1
        msg = {"k": "mdel", "sid": sid, "body": body, "sender": sender, "from": self.hub.index}
        self._send(h, {**msg, "hops": 0})
        return True

    def forward_mark(self, sid: str) -> None:
        h = self.tombs.holder(sid, trio.current_time())
        if h is not None:
            self.hub.stats["move_marks_forwarded"] += 1
            self._send(h, {"k": "mend", "sid": sid, "from": self.hub.index, "hops": 0})

    # -- sending --------------------------------------------------------------------
    def _send(self, peer: int, msg: dict[str, Any]) -> None:
        q = self.queues.get(peer)
        if q is None:
            q = self.queues[peer] = deque()
        if len(q) >= QUEUE_LIMIT:
            self.hub.stats["migrate_queue_full"] += 1
            return
        q.append(msg)
        if peer not in self.sending:
            self.sending.add(peer)
            self.w.spawn(partial(self._sender, peer))

    async def _sender(self, peer: int) -> None:
        q = self.queues[peer]
        try:
            while q:
                msg = q.popleft()
                if not await self.w.send_handoff(peer, None, msg):
                    self.hub.stats["migrate_send_failed"] += 1
        finally:
            self.sending.discard(peer)

    async def _give_up_later(self, rid: int) -> None:
        await trio.sleep(WAIT_S)
        proto = self.pending.pop(rid, None)
        if proto is not None:
            self.hub.stats["migrations_failed"] += 1
            proto.migrated()

    # -- receiving ------------------------------------------------------------------
    def on_message(self, data: bytes) -> None:
        try:
            m = msgpack.unpackb(data, raw=False)
            if type(m) is not dict:
                raise ValueError("not a map")
            k = m.get("k")
            if k == "mreq":
                self._on_request(m)
            elif k == "mrep":
                self._on_reply(m)
            elif k == "mdel":
                self._on_deliver(m)
            elif k == "mend":
                self._on_mark(m)
            else:
                raise ValueError(f"unknown kind {k!r}")
        except Exception as e:  # from our own peers, but checked all the same
            self.hub.stats["migrate_bad"] += 1
            _log.warning("bad message from a peer worker: %s", str(e)[:100])

    def _on_request(self, m: dict[str, Any]) -> None:
        hub = self.hub
        rid, frm, sid = m["rid"], m["from"], m["sid"]
        if type(frm) is not int or not 0 <= frm < hub.workers or type(sid) is not str:
            raise ValueError("bad mreq")
        now = trio.current_time()
        s = hub.sessions.get(sid)
        if s is None:
            h = self.tombs.holder(sid, now)
            hops = int(m.get("hops", 0))
            if h is not None and h != frm and hops < MAX_HOPS:
                self._send(h, {**m, "hops": hops + 1})
                return
            self._send(frm, {"k": "mrep", "rid": rid, "state": None})
            return
        if s.tenant != m.get("tenant") or s.visitor != m.get("visitor"):
            self._send(frm, {"k": "mrep", "rid": rid, "state": None})
            return
        try:
            state = export_state(s, STATE_MAX_BYTES, hub.downstream.moving(hub, s))
        except ValueError:
            hub.stats["migrate_too_big"] += 1
            self._send(frm, {"k": "mrep", "rid": rid, "state": None})
            return
        old = s.conn
        if old is not None:  # the visitor's previous connection, now stale
            s.conn = None
            hub.stats["sessions_taken_over"] += 1
            old.taken_over()
        hub.sessions.remove(s)
        hub.downstream.closed(hub, s, "moved")
        self.tombs.add(sid, frm, now + hub.cfg.session_ttl_s)
        hub.stats["sessions_moved_out"] += 1
        self._send(frm, {"k": "mrep", "rid": rid, "state": state})

    def _on_reply(self, m: dict[str, Any]) -> None:
        hub = self.hub
        proto = self.pending.pop(m["rid"], None)
        state = m.get("state")
        if state is not None:
            cfg = hub.cfg
            try:
                s = import_state(state, cfg.dedup_ids, cfg.replay_frames, cfg.replay_bytes)
            except ValueError:
                hub.stats["migrate_bad"] += 1
            else:
                if hub.sessions.get(s.sid) is None:
                    hub.downstream.moved_in(hub, s, state.get("ds"))
                    hub.sessions.add(s)
                    hub.detach(s, trio.current_time())  # attached by the hello
                    self.tombs.discard(s.sid)
                    hub.stats["sessions_moved_in"] += 1
        if proto is not None:
            proto.migrated()

    def _on_deliver(self, m: dict[str, Any]) -> None:
        hub = self.hub
        sid, sender, origin = m["sid"], m.get("sender"), m.get("from")
        if type(sid) is not str or type(sender) is not dict:
            raise ValueError("bad mdel")
        s = hub.sessions.get(sid)
        if s is not None:
            hub.downstream.passed_on(
                hub, s, m["body"], sender, origin if type(origin) is int else None
            )
            return
        h = self.tombs.holder(sid, trio.current_time())
        hops = int(m.get("hops", 0))
        if h is not None and hops < MAX_HOPS:
            self._send(h, {**m, "hops": hops + 1})
        else:
            hub.stats["downstream_unknown_session"] += 1

    def _on_mark(self, m: dict[str, Any]) -> None:
        hub = self.hub
        sid, origin = m["sid"], m["from"]
        if type(sid) is not str or type(origin) is not int:
            raise ValueError("bad mend")
        s = hub.sessions.get(sid)
        if s is not None:
            hub.downstream.move_ended(hub, s, origin)
            return
        # it moved on again: its new worker waits for ``origin`` too (behind
        # the replies passed on from there, which went the same way)
        h = self.tombs.holder(sid, trio.current_time())
        hops = int(m.get("hops", 0))
        if h is not None and hops < MAX_HOPS:
            self._send(h, {**m, "hops": hops + 1})
