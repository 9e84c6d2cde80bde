"""The downstream side of a worker: routes sessions to skill groups and
clusters, forwards visitor messages over the links, and turns downstream
acks, deliveries, assignments and handovers into session events.

Delivery guarantee (docs/protocol.md, "Downstream"): a visitor message is
acknowledged to the visitor only when a downstream acked it. Every message
sent and not answered is kept (``Flow.sent``); a nack, a timeout
(``request_timeout_s``) or the loss of its link puts it back in the
session's queue (``Flow.waiting``, in order) and it is sent again, with the
same ``sid``/``n``, to an endpoint that is available (downstreams
deduplicate on those). After ``max_attempts`` failed attempts, or when the
session's queue is full, the visitor gets a per-message ``error`` 4429 with
``retry_after`` (the message is not acked, so the visitor sends it again).

Replies keep their order when a session moves to another worker: see
:mod:`gateway.downstream.moveorder` (``moving``, ``moved_in``,
``move_ended``, ``_elsewhere``).

The class is sans-IO apart from the links it drives (``Link.send``); the
I/O tasks are started by :meth:`Forwarder.run`.
"""

from __future__ import annotations

import functools
import random
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

import trio

from gateway.crypto import Keyring
from gateway.downstream.admission import Admission, ClusterLoad
from gateway.downstream.balancer import Balancer, Endpoint
from gateway.downstream.breaker import OPEN, STATE_NAMES, Breaker, OutlierDetector
from gateway.downstream.link import STOPPING, Link
from gateway.downstream.moveorder import Holds, MarkWaits
from gateway.downstream.proto import encode, encode_msg, msg_head
from gateway.downstream.routing import StickyTable
from gateway.downstream.settings import ClusterSpec, DownstreamSettings
from gateway.downstream.stickyticket import StickyTickets
from gateway.downstream.tls import client_context
from gateway.ops import names as metrics
from gateway.ops.registry import CounterChild, HistogramChild
from gateway.protocol.codes import Code
from gateway.protocol.tokens import Tenant
from gateway.session.hub import Hub
from gateway.session.state import Session

__all__ = ["Forwarder"]

TICK_S: Final = 0.1
#: Sessions pumped per tick at most (the rest wait for the next tick).
PUMP_PER_TICK: Final = 5000
BOT_STAGE: Final = "bot"


class _Deadlines:
    """Sent messages in deadline order: the deadline, the session and the
    message's number at the same index of three deques. Not one deque of
    tuples: a tuple per message lived until its deadline, so every
    young-generation collection of the garbage collector during a rise in
    load scanned the last ~20,000 of them (pauses of several ms, in the
    tail of the forwarding latency). Floats and ints are not tracked by the
    collector and appending to a deque allocates nothing it tracks."""

    __slots__ = ("at", "n", "s")

    def __init__(self) -> None:
        self.at: deque[float] = deque()
        self.s: deque[Session] = deque()
        self.n: deque[int] = deque()

    def __len__(self) -> int:
        return len(self.at)

    def clear(self) -> None:
        self.at.clear()
        self.s.clear()
        self.n.clear()


class _Out:
    """A visitor message handed downstream and not answered yet."""

    __slots__ = (
        "attempts", "body", "deadline", "ep", "link", "msg_id", "n", "received", "t0", "tried",
    )  # fmt: skip

    def __init__(self, n: int, msg_id: Any, body: Any, received: float) -> None:
        self.n = n
        self.msg_id = msg_id
        self.body = body
        self.received = received  # when the visitor's message came in
        self.attempts = 0
        self.t0 = 0.0  # when it was last sent downstream
        self.deadline = 0.0
        self.ep: _Ep | None = None
        self.link: Link | None = None
        self.tried: list[str] | None = None  # endpoint keys that failed it


class Flow:
    """Downstream state of one session."""

    __slots__ = (
        "agent", "cluster", "ep", "group", "head", "head_route", "link", "probe", "route", "sent",
        "sticky_ep", "waiting",
    )  # fmt: skip

    def __init__(self, route: Any) -> None:
        self.route = route
        self.cluster: _Cluster | None = None
        # the skill group serving the session: the route's, or the fallback
        # group it overflowed to when the session was opened
        self.group = ""
        self.ep: _Ep | None = None
        self.link: Link | None = None  # the link the session is open on
        self.sent: dict[int, _Out] = {}
        self.waiting: deque[_Out] = deque()
        self.agent: str | None = None
        # a returning visitor's: the key of the endpoint that served it
        # before (the sticky table), preferred when the session is opened
        # on no endpoint yet
        self.sticky_ep = ""
        # holds a half-open probe slot of ``ep`` (granted by the pick; used by
        # the next message sent, or released)
        self.probe = False
        # the unchanging part of the session's msg frames, and the route it
        # was made for (proto.msg_head)
        self.head = b""
        self.head_route: Any = None


class _Ep:
    __slots__ = ("cluster", "endpoint", "key", "links")

    def __init__(self, cluster: _Cluster, endpoint: Endpoint) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.key: str = endpoint.key
        self.links: list[Link] = []

    def link_for(self, sid: str) -> Link | None:
        links = self.links
        if len(links) == 1:
            return links[0] if links[0].up else None
        first = hash(sid) % len(links)
        for i in range(len(links)):
            ln = links[(first + i) % len(links)]
            if ln.up:
                return ln
        return None


class _Cluster:
    __slots__ = (
        "balancer", "eps", "inflight", "m_error", "m_latency", "m_ok", "name", "spec",
        "ssl_context", "waiting",
    )  # fmt: skip

    def __init__(self, spec: ClusterSpec) -> None:
        self.name = spec.name
        self.spec = spec
        self.eps: dict[str, _Ep] = {}
        self.inflight = 0
        self.waiting = 0  # messages buffered in sessions for this cluster
        self.balancer: Balancer
        self.ssl_context: ssl.SSLContext | None = None  # for its TLS links
        # the cluster's metric children, looked up once (a registry never
        # drops a child)
        self.m_latency: HistogramChild = metrics.DOWNSTREAM_LATENCY.labels(spec.name)
        self.m_ok: CounterChild = metrics.DOWNSTREAM_REQUESTS.labels(spec.name, "ok")
        self.m_error: CounterChild = metrics.DOWNSTREAM_REQUESTS.labels(spec.name, "error")

    def load(self, now: float) -> ClusterLoad:
        return ClusterLoad(
            available_endpoints=self.balancer.available(now),
            pending=self.waiting,
            inflight=self.inflight,
            capacity=max(1, len(self.eps)) * 1,
        )


class _Oks:
    """Successes for one endpoint not recorded yet (:meth:`Forwarder._finish`)."""

    __slots__ = ("calls", "ep", "latency", "slow", "slow_s")

    def __init__(self) -> None:
        self.ep: _Ep | None = None
        self.calls = 0
        self.latency = 0.0  # their sum
        self.slow = 0
        self.slow_s = 0.0  # the endpoint's slow-call threshold


class Forwarder:
    """Implements :class:`gateway.session.hub.Downstream` over HTTP/2 links."""

    def __init__(
        self,
        settings: DownstreamSettings,
        node: int = 0,
        worker: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.s = settings
        self.rng = rng or random.Random()
        self.router = settings.router()
        self.admission = Admission(settings.admission, self.rng)
        self.sticky = StickyTable(settings.sticky_entries, settings.sticky_ttl_s)
        # the sticky table's entries sealed for the visitors to carry to
        # other workers and nodes, keyed by the tenants' current secrets;
        # the keyring's nonce field comes from ``state_dir`` (None: the
        # default state directory) and the node id
        self.node = node
        self.state_dir: str | None = None
        self.tickets = StickyTickets(self._tenant, self._keyring)
        self.hub: Hub | None = None
        # the worker's reactor (gateway.server.reactor), when there is one:
        # frames queued while it handles a batch are written at its end
        self.reactor: Any = None
        self._dirty: set[Link] = set()
        # each link's last connect failure, while it is not up (logged once
        # per reason)
        self._last_failure: dict[Link, str] = {}
        self.clusters: dict[str, _Cluster] = {}
        self.links: list[Link] = []
        # where the link tasks run, once run() has started (links added by
        # a reload start there)
        self._nursery: trio.Nursery | None = None
        self._headers = [("x-gateway-node", str(node)), ("x-gateway-worker", str(worker))]
        for spec in settings.clusters.values():
            self._add_cluster(spec, client_context(spec) if spec.tls else None)
        # sessions with messages waiting for an endpoint or for link room
        self._backlog: dict[str, Session] = {}
        # sent messages in deadline order
        self._deadlines = _Deadlines()
        self._now = 0.0
        self._m_ack: HistogramChild = metrics.MESSAGE_ACK.labels()
        self._oks = _Oks()  # acks gathered for one endpoint (see _finish)
        # replies in order across moves between workers (moveorder): the
        # sessions moved away waiting for their ``moved`` frame, and the
        # moved-in ones whose replies wait for the old worker's word
        self._marks = MarkWaits()
        self._holds = Holds()

    def _add_cluster(self, spec: ClusterSpec, ctx: ssl.SSLContext | None) -> _Cluster:
        """Cluster ``spec`` with its endpoints, their breakers and links (not
        started) and its balancer; ``ctx``: its links' TLS client context."""
        c = _Cluster(spec)
        c.ssl_context = ctx
        endpoints = [self._new_endpoint(c, host, port).endpoint for host, port in spec.endpoints]
        c.balancer = Balancer(endpoints, self.rng, OutlierDetector(self.s.outlier))
        self.clusters[c.name] = c
        return c

    def _new_endpoint(self, c: _Cluster, host: str, port: int) -> _Ep:
        """An endpoint of ``c`` with its breaker and links (not started, not
        in the balancer yet)."""
        settings, spec = self.s, c.spec
        key = f"{host}:{port}"
        breaker = Breaker(settings.breaker, 0.0)
        breaker.on_change = functools.partial(self._breaker_changed, spec.name, key)
        ep_obj = Endpoint(key, breaker)
        ep_obj.up = False
        ep = _Ep(c, ep_obj)
        c.eps[ep.key] = ep
        for i in range(spec.links_per_endpoint):
            ln = Link(
                self,
                ep,
                host,
                port,
                i,
                [*self._headers, ("x-gateway-link", str(i)), *spec.headers],
                c.ssl_context,
                settings.link_high_water,
                settings.health_interval_s,
                settings.health_timeout_s,
                server_name=spec.server_name,
                drain_timeout_s=settings.request_timeout_s,
            )
            ep.links.append(ln)
            self.links.append(ln)
        return ep

    # -- reload -----------------------------------------------------------------
    def update_routing(self, settings: DownstreamSettings) -> None:
        """Applies reloaded routing (rules, the default group, groups added,
        changed or removed: :func:`gateway.reload.plan_reload`): new
        sessions and the keyword rules of every message follow it. A session
        keeps its group unless that group was removed (it goes to the entry
        group the new rules give it). Sessions in a group that changed or
        went (as their skill group, or as the group serving them now) leave
        their link (``close`` with reason ``moved``) and are opened again
        where their group now points: at once if attached, on resume if
        not. What they have in flight is answered where it went, or
        redelivered after ``request_timeout_s``."""
        before = self.s.groups
        self.s = settings
        self.router = settings.router()
        changed = {n for n, g in before.items() if settings.groups.get(n) != g}
        if changed and self.hub is not None:
            self._regroup(self.hub, changed)

    def _regroup(self, hub: Hub, changed: set[str]) -> None:
        groups, now = self.s.groups, self._time()
        for s in hub.sessions:
            fl: Flow | None = s.ds
            if fl is None or (fl.route.group not in changed and fl.group not in changed):
                continue
            if fl.route.group not in groups:
                fl.route = self.router.entry_group(s.tags)
            self._leave_link(s, fl)
            fl.group = ""  # the msg frames name the group it is opened in next
            fl.head_route = None
            if s.conn is None:
                continue  # opened again on resume
            self._open(s, fl, now)
            if fl.waiting:
                self._pump(s, fl, now)
            else:
                self._drop_probe(fl, now)

    def update_cluster_tls(
        self, settings: DownstreamSettings, contexts: dict[str, ssl.SSLContext]
    ) -> None:
        """Reloaded TLS files (CA, client certificate and key) of some
        clusters, as their new client contexts: each link's next connection
        uses them; connected links go on."""
        for name, ctx in contexts.items():
            c = self.clusters[name]
            c.spec = settings.clusters[name]
            c.ssl_context = ctx
            for ep in c.eps.values():
                for ln in ep.links:
                    ln.ssl_context = c.ssl_context

    def update_tuning(self, settings: DownstreamSettings) -> None:
        """Reloaded timeouts, bounds, admission, breaker and outlier settings
        (:data:`gateway.reload.TUNING_FIELDS`): what is read when a message
        is sent takes them from ``self.s``; the links, the sticky table, the
        endpoints' breakers (:meth:`Breaker.retune`: their state and counts
        stay) and the clusters' outlier detectors keep copies, set here. A
        shorter request timeout applies to the messages in flight too (their
        deadlines are brought forward, which keeps the deadline queue in
        order for the ones sent from now)."""
        timeout = settings.request_timeout_s
        if timeout < self.s.request_timeout_s:
            latest = self._time() + timeout
            dl = self._deadlines
            dl.at = deque(d if d <= latest else latest for d in dl.at)
            for s, n in zip(dl.s, dl.n, strict=True):
                fl: Flow | None = s.ds
                out = fl.sent.get(n) if fl is not None else None
                if out is not None and out.deadline > latest:
                    out.deadline = latest
        if settings.breaker != self.s.breaker or settings.outlier != self.s.outlier:
            for c in self.clusters.values():
                for ep in c.eps.values():
                    ep.endpoint.breaker.retune(settings.breaker)
                if c.balancer.outliers is not None:
                    c.balancer.outliers.cfg = settings.outlier
        self.s = settings
        self.admission.cfg = settings.admission
        self.sticky.max_entries = settings.sticky_entries
        self.sticky.ttl_s = settings.sticky_ttl_s
        for ln in self.links:
            ln.high_water = settings.link_high_water
            ln.health_interval_s = settings.health_interval_s
            ln.health_timeout_s = settings.health_timeout_s
            ln.drain_timeout_s = settings.request_timeout_s

    def add_clusters(
        self, settings: DownstreamSettings, contexts: dict[str, ssl.SSLContext | None]
    ) -> None:
        """Clusters a reload added (:func:`gateway.reload.plan_reload`), named
        by ``contexts`` with their links' TLS client contexts (None: h2c):
        their links start at once; the groups that use them come with the
        same reload's routing (:meth:`update_routing`). Call before the
        other updates of the reload (they may point at these clusters); it
        leaves ``self.s`` to them (they compare it with the new settings).
        """
        for name, ctx in contexts.items():
            c = self._add_cluster(settings.clusters[name], ctx)
            for ep in c.eps.values():
                self._start_links(ep)
            if self.hub is not None:
                self.hub.log("info", "downstream_cluster_added", cluster=name,
                             endpoints=list(c.eps))  # fmt: skip

    def remove_clusters(self, names: list[str]) -> None:
        """Clusters a reload removed (:func:`gateway.reload.plan_reload`).
        Call after the same reload's routing (:meth:`update_routing`), which
        opened their sessions again where their groups now point: their
        links drain (:meth:`Link.retire`; what is in flight on them is
        answered there, or redelivered after ``request_timeout_s``) and end,
        and their metrics go (the endpoints' once their links have ended)."""
        for name in names:
            c = self.clusters.pop(name, None)
            if c is None:
                continue
            for ep in c.eps.values():
                self._retire_endpoint(ep)
            metrics.DOWNSTREAM_INFLIGHT.remove(name)
            if self.hub is not None:
                self.hub.log("info", "downstream_cluster_removed", cluster=name,
                             endpoints=list(c.eps))  # fmt: skip

    def update_endpoints(self, settings: DownstreamSettings) -> None:
        """Applies a reloaded configuration that differs from the running one
        only in its clusters' endpoint lists (:func:`gateway.reload.plan_reload`):
        new endpoints get links (started at once) and join their balancer;
        removed ones leave it, so no new session goes there, and their links
        drain (:meth:`Link.retire`): the sessions on them move with their
        next message, what is in flight is answered there or, after
        ``request_timeout_s``, redelivered elsewhere."""
        self.s = settings
        now = self._time()
        for name, spec in settings.clusters.items():
            c = self.clusters[name]
            c.spec = spec
            keep = {f"{h}:{p}" for h, p in spec.endpoints}
            for key in [k for k in c.eps if k not in keep]:
                ep = c.eps.pop(key)
                c.balancer.remove(key)
                self._retire_endpoint(ep)
                if self.hub is not None:
                    self.hub.log("info", "downstream_endpoint_removed", cluster=name, endpoint=key)
            for host, port in spec.endpoints:
                if f"{host}:{port}" in c.eps:
                    continue
                ep = self._new_endpoint(c, host, port)
                c.balancer.add(ep.endpoint)
                self._start_links(ep)
                if self.hub is not None:
                    self.hub.log("info", "downstream_endpoint_added", cluster=name,
                                 endpoint=ep.key)  # fmt: skip
        # sessions waiting for an endpoint may have one now
        for s in list(self._backlog.values()):
            fl: Flow | None = s.ds
            if fl is not None:
                self._pump(s, fl, now)

    def _start_links(self, ep: _Ep) -> None:
        """Starts the links of an endpoint a reload added (before
        :meth:`run` has started, it starts every link itself)."""
        if self._nursery is not None:
            for ln in ep.links:
                self._nursery.start_soon(self._run_link, ln)

    def _retire_endpoint(self, ep: _Ep) -> None:
        """An endpoint a reload removed (alone or with its cluster): no new
        session goes there, and its links drain and end (:meth:`Link.retire`)."""
        ep.endpoint.up = False
        for ln in ep.links:
            ln.retire()

    async def _run_link(self, ln: Link) -> None:
        """A link's task; a retired link's last: it leaves the worker's
        links, and its endpoint's gauges go once its last link has ended."""
        await ln.run()
        if ln in self.links:
            self.links.remove(ln)
        self._dirty.discard(ln)
        self._last_failure.pop(ln, None)
        ep: _Ep = ln.endpoint
        if all(x.retired and x not in self.links for x in ep.links):
            c, key = ep.cluster.name, ep.key
            for g in (
                metrics.BREAKER_STATE,
                metrics.DOWNSTREAM_LINKS_UP,
                metrics.DOWNSTREAM_ENDPOINT_LATENCY,
                metrics.DOWNSTREAM_ENDPOINT_OUTSTANDING,
            ):
                g.remove(c, key)

    # -- helpers --------------------------------------------------------------
    def _time(self) -> float:
        r = self.reactor
        if r is not None and r.in_batch:
            now: float = r.now  # the batch's clock, read once per batch
        else:
            # (not contextlib.suppress: this runs for every message)
            try:
                now = trio.current_time()
            except RuntimeError:  # outside trio: tests set _now
                return self._now
        self._now = now
        return now

    def _target_group(self, route: Any) -> str:
        """The group whose cluster serves ``route`` now (its bot group at the
        bot stage)."""
        g = self.s.groups[route.group]
        if route.stage == BOT_STAGE and g.bot is not None:
            return str(g.bot)
        return str(route.group)

    def _cluster_of(self, group: str) -> _Cluster:
        return self.clusters[self.s.groups[group].cluster]

    def _group_unavailable(self, group: str) -> bool:
        c = self._cluster_of(group)
        now = self._now
        return (
            c.balancer.available(now) == 0 or c.inflight >= self.s.admission.max_pending_per_cluster
        )

    # -- Downstream protocol (called by the hub) --------------------------------
    def admit(self, hub: Hub, tenant: str = "", tags: dict[str, str] | None = None) -> float:
        now = self._time()
        route = self.router.entry_group(tags or {})
        group = self._target_group(route)
        if self._group_unavailable(group):
            fb = self.router.fallback(group, self._group_unavailable)
            if fb is not None:
                group = fb
        d = self.admission.admit_session(now, self._cluster_of(group).load(now))
        if d.retry_after_s > 0:
            metrics.ADMISSION_REJECTIONS.labels(d.reason).inc()
        return float(d.retry_after_s)

    def opened(self, hub: Hub, s: Session, resumed: bool) -> None:
        self.hub = hub
        fl: Flow | None = s.ds
        if fl is None:
            fl = s.ds = Flow(self.router.entry_group(s.tags))
            if s.ticket is not None:
                self._carried(hub, s, s.ticket)
            hint = self.sticky.get(s.tenant, s.visitor, self._time())
            if hint is not None:
                fl.sticky_ep, fl.agent = hint
        if fl.link is None or not fl.link.up:
            now = self._time()
            self._open(s, fl, now)
            if not fl.waiting:
                self._drop_probe(fl, now)

    def _keyring(self) -> Keyring:
        return Keyring(state_dir=self.state_dir, node_id=self.node)

    def _tenant(self, name: str) -> Tenant | None:
        hub = self.hub
        return hub.verifier.tenant(name) if hub is not None else None

    def _carried(self, hub: Hub, s: Session, ticket: str) -> None:
        """The sticky ticket of a new session's hello: what it says becomes
        this worker's sticky entry for the visitor, unless the one here is
        newer. One that does not open is counted and ignored. (The visitor
        protocol drops ``s.ticket`` once the session is opened.)"""
        wall, now = hub.wall(), self._time()
        got = self.tickets.open(s.tenant, s.visitor, ticket, wall, self.sticky.ttl_s)
        if got is None:
            hub.stats["sticky_tickets_refused"] += 1
            return
        hub.stats["sticky_tickets_used"] += 1
        ep, agent, issued = got
        stamp = now - max(0.0, wall - issued)  # when it was issued, on this clock
        known = self.sticky.stamp(s.tenant, s.visitor)
        if known is None or known < stamp:
            self.sticky.put(s.tenant, s.visitor, ep, agent, stamp)

    def closed(self, hub: Hub, s: Session, reason: str = "ended") -> None:
        fl: Flow | None = s.ds
        if fl is None:
            return
        if self._holds:
            self._holds.end(s.sid)  # (a moving session's were released by moving)
        if fl.link is not None and fl.link.up:
            fl.link.send(encode({"t": "close", "sid": s.sid, "reason": reason}))
            fl.link.sessions.discard(s)
            if reason == "moved" and fl.link.marks:
                self._marks.add(s.sid, fl.link, self._time())
        for out in fl.sent.values():
            self._finish(out, ok=True, count=False)
        if fl.waiting and fl.cluster is not None:
            fl.cluster.waiting -= len(fl.waiting)
        fl.sent.clear()
        fl.waiting.clear()
        self._drop_probe(fl, self._now)
        self._backlog.pop(s.sid, None)

    # -- writes gathered per reactor batch --------------------------------------------
    def link_dirty(self, link: Link) -> bool:
        r = self.reactor
        if r is not None and r.in_batch:
            self._dirty.add(link)
            return True
        return False

    def flush_links(self) -> None:
        """The end of a reactor batch: each link with frames queued during
        it writes them now, in one send."""
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            for link in dirty:
                link.flush_now()

    def moving(self, hub: Hub, s: Session) -> Any:
        fl: Flow | None = s.ds
        if fl is None:
            return None
        waits: list[int] = []
        if self._holds:
            # replies held here since the session moved in go to it first,
            # and move with its state; the workers this one still waited
            # for (oldest first), the next one waits for
            waits = self._holds.waiting(s.sid)
            self._release(hub, s, self._holds.end(s.sid))
        hint: dict[str, Any] = {"ep": fl.ep.key if fl.ep is not None else "", "agent": fl.agent}
        ln = fl.link
        if ln is not None and ln.up and ln.marks:
            waits.append(hub.index)  # this worker will say when its link is done
        if waits:
            hint["marks"] = waits
        return hint

    def moved_in(self, hub: Hub, s: Session, hint: Any) -> None:
        # the new worker prefers the endpoint and agent that served the
        # session, as for a returning visitor (sticky)
        if type(hint) is not dict:
            return
        ep, agent = hint.get("ep"), hint.get("agent")
        if type(ep) is str and (agent is None or type(agent) is str):
            now = self._time()
            self.sticky.put(s.tenant, s.visitor, ep, agent, now)
            marks = hint.get("marks")
            if ep and type(marks) is list and 0 < len(marks) <= 64:
                waits = [w for w in marks if type(w) is int]
                self._holds.start(s.sid, ep, now, waits)

    def move_ended(self, hub: Hub, s: Session, origin: int) -> None:
        """Worker ``origin``, which ``s`` moved away from, says nothing more
        comes through it: once every such worker said so, the replies held
        meanwhile go to the visitor."""
        self.hub = hub
        frames = self._holds.marked(s.sid, origin)
        if frames is not None:
            self._release(hub, s, frames)

    def passed_on(self, hub: Hub, s: Session, body: Any, sender: Any, origin: int | None) -> None:
        """A reply passed on by worker ``origin``: to the visitor now, or
        held behind what older workers may still pass on."""
        f = {"t": "deliver", "sid": s.sid, "body": body, "from": sender}
        frames = [f] if origin is None else self._holds.passed_on(s.sid, origin, f)
        if frames:
            self._release(hub, s, frames)

    def _release(self, hub: Hub, s: Session, frames: list[dict[str, Any]]) -> None:
        for f in frames:
            self._visible(hub, s, f)

    def submit(self, hub: Hub, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        self.hub = hub
        fl: Flow | None = s.ds
        if fl is None:
            fl = s.ds = Flow(self.router.entry_group(s.tags))
        now = self._time()
        if self.router.keyword_rules:  # (no call per message without them)
            new_route = self.router.message_group(fl.route, body)
            if new_route is not fl.route:  # message_group returns it when unchanged
                fl.route = new_route
                fl.link = None  # re-open in the new group
        out = _Out(n, msg_id, body, now)
        c = fl.cluster
        if c is None:
            verdict = self.admission.message_verdict(len(fl.sent), len(fl.waiting), True, 0)
        else:
            # the session's own endpoint being fine answers "is any endpoint
            # available" without going over the cluster's endpoints
            ep = fl.ep
            available = (ep is not None and ep.cluster is c and self._ep_ok(ep, now)) or (
                c.balancer.available(now) > 0
            )
            verdict = self.admission.message_verdict(
                len(fl.sent), len(fl.waiting), available, c.inflight
            )
        if verdict == "refuse":
            self._refuse(s, out, "session queue full")
            return True
        fl.waiting.append(out)
        if fl.cluster is not None:
            fl.cluster.waiting += 1
        if verdict == "send" or fl.link is None:
            self._pump(s, fl, now)
        if fl.waiting:
            self._backlog[s.sid] = s
        link = fl.link
        return not fl.waiting and (link is None or not link.full)

    # -- sending ----------------------------------------------------------------
    def _pick(self, fl: Flow, now: float, exclude: list[str] | None) -> tuple[_Ep, str] | None:
        """An endpoint for the session and the group it serves: the route's
        group; its fallback chain when that group has no available endpoint,
        or when its cluster is saturated (``max_pending_per_cluster`` in
        flight) and the session is not on it already (sessions it serves
        keep it, their messages waiting); None if nothing is available."""
        group = self._target_group(fl.route)
        c = self._cluster_of(group)
        if fl.ep is not None and fl.ep.cluster is c:
            prefer: str | None = fl.ep.key
        else:
            # a returning visitor's first open on this cluster (its first
            # at all, or a handover from the bots to the humans): the
            # endpoint that served it (the balancer ignores a key that is
            # not in this cluster)
            prefer = fl.sticky_ep or None
        full = fl.cluster is not c and c.inflight >= self.s.admission.max_pending_per_cluster
        ep = None if full else c.balancer.pick(now, exclude or (), prefer)
        if ep is None:
            fb = self.router.fallback(group, self._group_unavailable)
            if fb is not None and fb != group:
                fc = self._cluster_of(fb)
                fep = fc.balancer.pick(now, exclude or (), None)
                if fep is not None:
                    return fc.eps[fep.key], fb
            if full:  # nowhere to overflow to: wait on the saturated cluster
                ep = c.balancer.pick(now, exclude or (), prefer)
        if ep is None:
            return None
        return c.eps[ep.key], group

    def _leave_link(self, s: Session, fl: Flow) -> None:
        """The session leaves its link (if on one): the desk there is told
        it moved (``close``, reason ``moved``)."""
        ln = fl.link
        if ln is not None:
            ln.sessions.discard(s)
            if ln.up:
                ln.send(encode({"t": "close", "sid": s.sid, "reason": "moved"}))
            fl.link = None

    def _open(self, s: Session, fl: Flow, now: float, exclude: list[str] | None = None) -> bool:
        """Opens the session on an available endpoint; False if none."""
        picked = self._pick(fl, now, exclude)
        ep, group = picked if picked is not None else (None, "")
        link = ep.link_for(s.sid) if ep is not None else None
        if ep is None or link is None:
            if ep is not None:
                ep.endpoint.breaker.release(now)
            return False
        self._drop_probe(fl, now)
        if ep.endpoint.breaker.state(now) != 0:
            fl.probe = True  # the pick granted a half-open probe: next message
        else:
            ep.endpoint.breaker.release(now)
        if fl.link is not link:
            self._leave_link(s, fl)
        if fl.cluster is not ep.cluster:
            if fl.cluster is not None:
                fl.cluster.waiting -= len(fl.waiting)
            ep.cluster.waiting += len(fl.waiting)
        fl.cluster = ep.cluster
        fl.ep = ep
        fl.link = link
        if fl.group != group:
            fl.group = group
            fl.head_route = None  # the msg frames name the new group
        link.sessions.add(s)
        sticky_ep = fl.sticky_ep
        if sticky_ep and sticky_ep in ep.cluster.eps and self.hub is not None:
            # a returning visitor's first open on the cluster that served it:
            # back on its endpoint, or elsewhere (that one unavailable)
            kept = ep.key == sticky_ep
            self.hub.stats["sticky_routes_kept" if kept else "sticky_routes_moved"] += 1
            fl.sticky_ep = ""
        route = fl.route
        if route.stage != BOT_STAGE:
            # the endpoint serving the visitor now (with the agent hint it
            # carries): where its next session goes (not a bot-first
            # stage's, which would take the humans' place)
            self.sticky.put(s.tenant, s.visitor, ep.key, fl.agent, now)
        link.send(
            encode(
                {
                    "t": "open",
                    "sid": s.sid,
                    "tenant": s.tenant,
                    "visitor": s.visitor,
                    "tags": s.tags,
                    "group": group,
                    "stage": str(route.stage),
                    "agent": fl.agent,
                }
            )
        )
        return True

    def _pump(self, s: Session, fl: Flow, now: float) -> None:
        """Sends the session's waiting messages as far as bounds allow."""
        if not fl.waiting:
            self._backlog.pop(s.sid, None)
            return
        link = fl.link
        if link is None or not link.up or not fl.ep or not (fl.probe or self._ep_ok(fl.ep, now)):
            first = fl.waiting[0]
            if not self._open(s, fl, now, first.tried):
                return
            link = fl.link
            assert link is not None
        ep = fl.ep
        assert ep is not None
        if fl.probe:
            # a half-open endpoint: one message (the probe) until it closes
            if fl.sent:
                return
            max_sess = 1
            fl.probe = False
        else:
            max_sess = self.s.admission.max_inflight_per_session
        c = ep.cluster
        settings = self.s
        max_link = settings.max_inflight_per_link
        max_pending = settings.admission.max_pending_per_cluster
        deadline = now + settings.request_timeout_s
        sid = s.sid
        if fl.head_route is not fl.route:
            route = fl.head_route = fl.route
            fl.head = msg_head(sid, fl.group, str(route.stage))
        head = fl.head
        endpoint, bal = ep.endpoint, c.balancer
        dl = self._deadlines
        dl_at, dl_s, dl_n = dl.at, dl.s, dl.n
        waiting, sent = fl.waiting, fl.sent
        # bytes the link may still queue (Link.full), and the frames for it,
        # handed over in one Link.send
        room = link.room
        frames: list[bytes] = []
        while (
            waiting
            and len(sent) < max_sess
            and link.inflight < max_link
            and c.inflight < max_pending
            and room > 0
        ):
            out = waiting.popleft()
            c.waiting -= 1
            out.attempts += 1
            out.t0 = now
            out.deadline = deadline
            out.ep = ep
            out.link = link
            n = out.n
            sent[n] = out
            link.inflight += 1
            c.inflight += 1
            bal.start(endpoint)
            dl_at.append(deadline)
            dl_s.append(s)
            dl_n.append(n)
            frame = encode_msg(head, n, out.msg_id, out.body)
            room -= len(frame)
            frames.append(frame)
        if frames:
            link.send(frames[0] if len(frames) == 1 else b"".join(frames))
        if waiting:
            self._backlog[sid] = s
        else:
            self._backlog.pop(sid, None)

    def _drop_probe(self, fl: Flow, now: float) -> None:
        if fl.probe:
            fl.probe = False
            if fl.ep is not None:
                fl.ep.endpoint.breaker.release(now)

    def _ep_ok(self, ep: _Ep, now: float) -> bool:
        e = ep.endpoint
        return bool(e.up and e.healthy and e.breaker.state(now) == 0)

    def _finish(self, out: _Out, ok: bool, count: bool = True) -> None:
        """``out`` is answered (or given up on): its link and cluster slots
        are free, and its endpoint learns how it went. Counted successes
        (acks) are gathered in ``self._oks`` and recorded once per
        endpoint and link read (:meth:`_flush_oks`); anything else first
        records what was gathered, so the breaker sees results in order."""
        ep, link = out.ep, out.link
        if ep is None or link is None:
            return
        link.inflight -= 1
        c = ep.cluster
        c.inflight -= 1
        now = self._now
        latency = now - out.t0
        out.ep = None
        out.link = None
        if ok and count:
            c.m_latency.observe(latency)
            oks = self._oks
            if ep is not oks.ep:
                self._flush_oks()
                oks.ep = ep
                oks.slow_s = ep.endpoint.breaker.cfg.slow_call_s
            oks.calls += 1
            oks.latency += latency
            if latency > oks.slow_s:
                oks.slow += 1
            return
        if self._oks.ep is not None:
            self._flush_oks()
        c.balancer.finish(ep.endpoint, now, latency, ok)
        if count:
            c.m_latency.observe(latency)
            c.m_error.inc()

    def _refuse(self, s: Session, out: _Out, why: str) -> None:
        hub = self.hub
        if hub is not None:
            hub.downstream_refuse(
                s, out.msg_id, Code.DOWNSTREAM_BUSY, why, self.s.admission.retry_after_s
            )

    def _retry(self, s: Session, fl: Flow, out: _Out, failed: _Ep | None) -> None:
        """Puts a failed message back at the head of the session's queue, or
        refuses it to the visitor after ``max_attempts``."""
        if failed is not None:
            if out.tried is None:
                out.tried = []
            if failed.key not in out.tried:
                out.tried.append(failed.key)
        if out.attempts >= self.s.max_attempts:
            self._refuse(s, out, "downstream failed")
            return
        fl.waiting.appendleft(out)
        if fl.cluster is not None:
            fl.cluster.waiting += 1
        self._backlog[s.sid] = s
        if failed is not None and fl.ep is failed:
            fl.link = None  # re-pick an endpoint, not the one that failed
        metrics.DOWNSTREAM_REDELIVERED.labels(failed.cluster.name if failed else "").inc()

    # -- link events ------------------------------------------------------------------
    def link_up(self, link: Link) -> None:
        self._time()
        ep: _Ep = link.endpoint
        ep.endpoint.up = True
        ep.endpoint.healthy = True
        self._last_failure.pop(link, None)
        if self.hub is not None:
            self.hub.log("info", "downstream_link_up", endpoint=link.key)
            self.hub.downstream_ready()

    def link_connect_failed(self, link: Link, why: str) -> None:
        ep: _Ep = link.endpoint
        metrics.DOWNSTREAM_CONNECT_FAILURES.labels(ep.cluster.name, link.key).inc()
        # logged when the reason changes, not on every retry of a link
        # that keeps failing the same way (a wrong CA, a desk that is down)
        if self.hub is not None and self._last_failure.get(link) != why:
            self.hub.log("warning", "downstream_connect_failed", endpoint=link.key, why=why[:200])
        self._last_failure[link] = why

    def link_draining(self, link: Link) -> None:
        now = self._time()
        ep: _Ep = link.endpoint
        ep.endpoint.up = any(ln.up for ln in ep.links)
        if self.hub is not None:
            self.hub.log("info", "downstream_link_draining", endpoint=link.key,
                         inflight=link.inflight)  # fmt: skip
        # sessions with messages waiting move to another link now, the
        # others with their next message; what is in flight here is
        # answered here
        for s in list(link.sessions):
            fl: Flow | None = s.ds
            if fl is not None and fl.link is link and fl.waiting:
                self._pump(s, fl, now)

    def link_down(self, link: Link, why: str) -> None:
        now = self._time()
        ep: _Ep = link.endpoint
        ep.endpoint.up = any(ln.up for ln in ep.links)
        if self.hub is not None:
            # a drain that ended with everything answered, or the worker
            # stopping, is routine
            level = "info" if why.startswith("drained") or why == STOPPING else "warning"
            self.hub.log(level, "downstream_link_down", endpoint=link.key, why=why[:200])
        if self._marks and self.hub is not None and self.hub.migrator is not None:
            # nothing more comes on this link for the sessions that moved
            # away from it
            for sid in self._marks.link_down(link):
                self.hub.migrator.forward_mark(sid)
        sessions = list(link.sessions)
        link.sessions.clear()
        for s in sessions:
            fl: Flow | None = s.ds
            if fl is None or fl.link is not link:
                continue
            fl.link = None
            failed = [o for o in fl.sent.values() if o.link is link]
            for o in sorted(failed, key=lambda o: o.n, reverse=True):
                del fl.sent[o.n]
                self._finish(o, ok=False)
                self._retry(s, fl, o, ep)
        link.inflight = 0
        for s in sessions:
            fl = s.ds
            if fl is not None and fl.waiting:
                self._pump(s, fl, now)

    def link_drained(self, link: Link) -> None:
        for s in list(link.sessions):
            fl: Flow | None = s.ds
            if fl is not None and fl.waiting and s.sid in self._backlog:
                self._pump(s, fl, self._now)
        if self.hub is not None:
            self.hub.downstream_ready()

    def link_frames(self, link: Link, frames: list[dict[str, Any]]) -> None:
        hub = self.hub
        if hub is None:
            return
        self._time()
        sessions = hub.sessions
        freed = False
        for f in frames:
            if f["t"] == "acks":
                for sid, ns in f["sids"].items():
                    s = sessions.get(sid)
                    if s is None:
                        hub.stats["downstream_unknown_session"] += 1
                    elif self._acked(hub, s, ns):
                        freed = True
                continue
            s = sessions.get(f["sid"])
            if s is None:
                self._elsewhere(hub, link, f)
                continue
            fl: Flow | None = s.ds
            t = f["t"]
            if t == "ack":
                if self._acked(hub, s, (f["n"],)):
                    freed = True
            elif t == "deliver" or t == "assign":
                if self._holds:
                    held = self._holds.hold(s.sid, link.endpoint.key, f)
                    if held is not None:
                        self._release(hub, s, held)
                elif t == "deliver":
                    hub.deliver(s, f["body"], f.get("from") or {"kind": "agent", "name": "?"})
                else:
                    self._visible(hub, s, f)
            elif t == "nack":
                out = fl.sent.pop(f["n"], None) if fl is not None else None
                if out is None or fl is None:
                    continue
                failed = out.ep
                self._finish(out, ok=False)
                hub.stats["downstream_nacks"] += 1
                self._retry(s, fl, out, failed)
                self._pump(s, fl, self._now)
            elif t == "handover" and fl is not None:
                fl.route = self.router.handover(fl.route)
                fl.link = None
                hub.stats["handovers"] += 1
                self._open(s, fl, self._now)
        self._flush_oks()
        if freed:
            hub.downstream_ready()

    def _visible(self, hub: Hub, s: Session, f: dict[str, Any]) -> None:
        """A ``deliver`` or ``assign`` frame for ``s``: what the visitor
        sees of it."""
        if f["t"] == "deliver":
            hub.deliver(s, f["body"], f.get("from") or {"kind": "agent", "name": "?"})
            return
        fl: Flow | None = s.ds
        if fl is not None:
            fl.agent = f["agent"]
            ep = fl.ep
            self.sticky.put(s.tenant, s.visitor, ep.key if ep else "", fl.agent, self._now)
            conn = s.conn
            if ep is not None and conn is not None:
                # for the visitor's next session, wherever it lands
                tk = self.tickets
                ticket = tk.seal(s.tenant, s.visitor, ep.key, fl.agent, hub.wall())
                if ticket is not None:
                    conn.session_frame({"t": "sticky", "ticket": ticket})
                    hub.stats["sticky_tickets_issued"] += 1
                elif tk.error is not None and not hub.stats["sticky_tickets_off"]:
                    hub.stats["sticky_tickets_off"] += 1  # logged once
                    hub.log("warning", "sticky_tickets_off", why=tk.error)
        hub.deliver(s, _joined(f["agent"]), _assign_sender(f["agent"]))

    def _elsewhere(self, hub: Hub, link: Link, f: dict[str, Any]) -> None:
        """A frame for a session this worker does not have: one that moved
        to another worker gets its replies and assignments passed on, and
        its new worker is told when the link's downstream sends nothing more
        for it here (``moved``)."""
        t, sid, mig = f["t"], f["sid"], hub.migrator
        if mig is not None:
            if t == "deliver":
                sender = f.get("from") or {"kind": "agent", "name": "?"}
                if mig.forward_deliver(sid, f["body"], sender):
                    return
            elif t == "assign":
                agent = f["agent"]
                if mig.forward_deliver(sid, _joined(agent), _assign_sender(agent)):
                    return
            elif t == "moved":
                if self._marks.take(link, sid):
                    mig.forward_mark(sid)
                return
        if t != "moved":
            hub.stats["downstream_unknown_session"] += 1

    def _acked(self, hub: Hub, s: Session, ns: Iterable[int]) -> bool:
        """The downstream accepted messages ``ns`` of ``s``: each gets its
        visitor ack. False when none of them was in flight."""
        fl: Flow | None = s.ds
        if fl is None:
            hub.stats["downstream_ack_unknown"] += 1
            return False
        sent = fl.sent
        now = self._now
        ack_seconds = self._m_ack
        any_ok = False
        for n in ns:
            out = sent.pop(n, None)
            if out is None:
                hub.stats["downstream_ack_unknown"] += 1
                continue
            self._finish(out, ok=True)
            # from the visitor's message to its ack: queueing while no
            # endpoint could take it and redeliveries included
            ack_seconds.observe(now - out.received)
            hub.downstream_ack(s, out.msg_id)
            any_ok = True
        if any_ok and fl.waiting:
            self._pump(s, fl, now)
        return any_ok

    def _end_holds(self, hub: Hub, now: float) -> None:
        """Moved-in sessions whose old worker did not say in time that its
        link is done: their held replies go now."""
        for sid, frames in self._holds.expire(now):
            s = hub.sessions.get(sid)
            if s is not None and frames:
                hub.stats["downstream_move_hold_timeouts"] += 1  # replies were delayed
                self._release(hub, s, frames)

    def _flush_oks(self) -> None:
        """Records the successes gathered by :meth:`_finish` (at the end of
        a link read, and before any other result)."""
        oks = self._oks
        ep = oks.ep
        if ep is None:
            return
        if oks.calls:
            c = ep.cluster
            c.balancer.finish_ok(
                ep.endpoint, self._now, oks.calls, oks.latency / oks.calls, oks.slow
            )
            c.m_ok.inc(oks.calls)
        oks.ep = None
        oks.calls = oks.slow = 0
        oks.latency = 0.0

    # -- time ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Timeouts and retries; called every :data:`TICK_S`."""
        self._now = now
        if self._holds and self.hub is not None:
            self._end_holds(self.hub, now)
        if self._marks:
            self._marks.expire(now)
        dl = self._deadlines
        while dl.at and dl.at[0] <= now:
            dl.at.popleft()
            s, n = dl.s.popleft(), dl.n.popleft()
            fl: Flow | None = s.ds
            if fl is None:
                continue
            out = fl.sent.get(n)
            if out is None or out.deadline > now:
                continue  # answered, or re-sent with a later deadline
            del fl.sent[n]
            failed = out.ep
            self._finish(out, ok=False)
            if self.hub is not None:
                self.hub.stats["downstream_timeouts"] += 1
            self._retry(s, fl, out, failed)
        if self._backlog:
            for sid in list(self._backlog)[:PUMP_PER_TICK]:
                s2 = self._backlog.get(sid)
                if s2 is None:
                    continue
                fl2: Flow | None = s2.ds
                if fl2 is None or not fl2.waiting:
                    self._backlog.pop(sid, None)
                    continue
                self._pump(s2, fl2, now)
        for c in self.clusters.values():
            metrics.DOWNSTREAM_INFLIGHT.labels(c.name).set(c.inflight)
            for ep in c.eps.values():
                # state() also moves an open breaker whose time is up to
                # half-open, so no breaker waits longer than a tick for that
                st = ep.endpoint.breaker.state(now)
                metrics.BREAKER_STATE.labels(c.name, ep.key).set(st)
                metrics.DOWNSTREAM_LINKS_UP.labels(c.name, ep.key).set(
                    sum(1 for ln in ep.links if ln.up)
                )
                e = ep.endpoint
                metrics.DOWNSTREAM_ENDPOINT_LATENCY.labels(c.name, ep.key).set(e.ewma_s)
                metrics.DOWNSTREAM_ENDPOINT_OUTSTANDING.labels(c.name, ep.key).set(e.outstanding)

    def _breaker_changed(self, cluster: str, key: str, old: int, st: int, now: float) -> None:
        """The breaker's ``on_change``: counts and logs the transition."""
        to = STATE_NAMES[st]
        metrics.BREAKER_TRANSITIONS.labels(cluster, key, to).inc()
        if self.hub is not None:
            level = "warning" if st == OPEN else "info"
            self.hub.log(level, "breaker", cluster=cluster, endpoint=key, to=to,
                         was=STATE_NAMES[old])  # fmt: skip

    async def run(self) -> None:
        """The link tasks and the tick, until cancelled."""
        async with trio.open_nursery() as n:
            self._nursery = n
            for ln in self.links:
                n.start_soon(self._run_link, ln)
            while True:
                await trio.sleep(TICK_S)
                self.tick(trio.current_time())


def _joined(agent: str) -> str:
    return f"{agent} joined the conversation"


def _assign_sender(agent: str) -> dict[str, str]:
    return {"kind": "system", "name": "assign", "agent": agent}
