"""Replies keep their order when a session moves to another worker while a
reply is on its way to the old one (docs/protocol.md, "Replies across a
move"; gateway/downstream/moveorder.py).

A scripted downstream behind a two-worker gateway holds its reply to the
visitor's first message until the session is re-opened on the other
worker's link; then it writes a newer reply on the new link at once, and
the older one (then ``moved``) on the old link 150 ms later: the older
reply reaches the new worker through the old one, after the newer one
reached it directly. The visitor must see the older one first. An
assignment sent on the old link is passed on too (it was dropped as a
frame for an unknown session before)."""

from __future__ import annotations

import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import msgpack
import pytest
import trio

from gateway.config import DEMO_TENANT, load_config
from gateway.downstream.moveorder import HOLD_S, Holds, MarkWaits
from gateway.downstream.proto import FEATURES_HEADER, LINK_PATH, MOVED_MARK, check_from_downstream
from gateway.protocol.codec import LengthPrefixedDecoder
from gateway.protocol.codes import ProtocolError
from gateway.protocol.tokens import mint
from gateway.session.hub import Hub
from tests.hubkit import Visitor, attach, hub_for
from tests.test_server_h2 import H2Client
from tests.test_server_process import free_port, serve_two_workers, stop, wait_listening


def _frame(f: dict[str, Any]) -> bytes:
    body = msgpack.packb(f, use_bin_type=True)
    return struct.pack("!I", len(body)) + body


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.lock = trio.Lock()

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)


class Reordering:
    """The downstream of the module docstring. ``features``: what its link
    answers carry in ``x-downstream-features``; ``marks``: whether it sends
    ``moved`` on the old link."""

    def __init__(self, features: str, marks: bool) -> None:
        self.features = features
        self.marks = marks
        self.links: dict[int, tuple[_Conn, int, str]] = {}  # link -> conn, stream, worker
        self.next_link = 0
        self.bound: dict[str, int] = {}  # sid -> link of its last open
        self.pending: dict[str, int] = {}  # sid -> link its first reply is held for
        self.moved = trio.Event()
        self.nursery: trio.Nursery | None = None

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as n:
            self.nursery = n
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        c = _Conn(stream)
        c.h2.initiate_connection()
        await c.flush()
        decoders: dict[int, tuple[int, LengthPrefixedDecoder]] = {}
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            for ev in c.h2.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    hdrs = dict(ev.headers)
                    assert hdrs[":path"] == LINK_PATH
                    link = self.next_link = self.next_link + 1
                    self.links[link] = (c, ev.stream_id, str(hdrs["x-gateway-worker"]))
                    decoders[ev.stream_id] = (link, LengthPrefixedDecoder(1 << 20))
                    extra = [(FEATURES_HEADER, self.features)] if self.features else []
                    c.h2.send_headers(ev.stream_id, [(":status", "200"), *extra])
                elif isinstance(ev, h2.events.DataReceived):
                    c.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    link, dec = decoders[ev.stream_id]
                    for f in dec.feed(ev.data):
                        self._on_frame(link, f)
            await c.flush()

    def _send(self, link: int, f: dict[str, Any]) -> None:
        c, stream, _ = self.links[link]
        c.h2.send_data(stream, _frame(f))
        assert self.nursery is not None
        self.nursery.start_soon(c.flush)

    def _on_frame(self, link: int, f: dict[str, Any]) -> None:
        sid = f["sid"]
        if f["t"] == "open":
            old = self.bound.get(sid)
            self.bound[sid] = link
            held = self.pending.get(sid)
            if held is not None and self.links[held][2] != self.links[link][2]:
                # re-opened on the other worker's link: the newer reply on
                # the new link now, the older one on the old link later
                del self.pending[sid]
                self._send(link, _deliver(sid, "second"))
                assert self.nursery is not None
                self.nursery.start_soon(self._late, held, sid)
            assert old is None or old != link
        elif f["t"] == "msg":
            self._send(link, {"t": "ack", "sid": sid, "n": f["n"]})
            if f["n"] == 1:
                self.pending[sid] = link

    async def _late(self, link: int, sid: str) -> None:
        await trio.sleep(0.15)
        self._send(link, _deliver(sid, "first"))
        self._send(link, {"t": "assign", "sid": sid, "agent": "agent-7", "group": "support"})
        if self.marks:
            self._send(link, {"t": "moved", "sid": sid})
        self.moved.set()


JOINED = "agent-7 joined the conversation"  # the visitor's notice of the assignment


def _deliver(sid: str, body: str) -> dict[str, Any]:
    return {"t": "deliver", "sid": sid, "body": body, "from": {"kind": "agent", "name": "a"}}


async def _replies_across_a_move(
    tmp_path: Path, features: str, marks: bool
) -> tuple[list[str], str]:
    """Runs the scenario; returns the reply bodies in the order the visitor
    saw them, and the gateway's /metrics text at the end."""
    desk = Reordering(features, marks)
    port, oport = free_port(), free_port()
    async with trio.open_nursery() as n:
        dport = await n.start(desk.serve)
        proc = serve_two_workers(
            tmp_path,
            port,
            args=(
                "--downstream",
                f"support=127.0.0.1:{dport}",
                "--ops-listen",
                f"127.0.0.1:{oport}",
            ),
        )
        try:
            await trio.to_thread.run_sync(wait_listening, port)
            with trio.fail_after(10):
                while len(desk.links) < 2:  # both workers' links
                    await trio.sleep(0.05)
            cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
            t = cfg.tenants[DEMO_TENANT]
            tok = mint(DEMO_TENANT, "v-move", t.secrets[t.primary_kid], 600, time.time())
            hello: dict[str, Any] = {"t": "hello", "v": 1, "token": tok}
            cl = await H2Client.connect(port)
            st = await cl.open()
            await cl.send(st, hello)
            w = await cl.recv(st)
            sid = w["sid"]
            await cl.send(st, {"t": "msg", "id": 1, "body": "hello?"})
            with trio.fail_after(5):
                while (await cl.recv(st))["t"] != "ack":
                    pass
            # new connections until one lands on the other worker (the
            # kernel spreads them) and the session moves there
            for _ in range(40):
                await cl.stream.aclose()
                cl = await H2Client.connect(port)
                st = await cl.open()
                await cl.send(st, {**hello, "resume": {"sid": sid, "last": 0}})
                w = await cl.recv(st)
                assert w["t"] == "welcome" and w["resumed"] is True, w
                with trio.move_on_after(0.5):  # the new worker's open
                    while sid in desk.pending:
                        await trio.sleep(0.01)
                if sid not in desk.pending:
                    break
            assert sid not in desk.pending, "the session never moved"
            bodies: list[str] = []
            seqs: list[int] = []
            with trio.fail_after(5 + HOLD_S):
                while len(bodies) < 3:
                    f = await cl.recv(st)
                    if f["t"] == "deliver":
                        bodies.append(f["body"])
                        seqs.append(f["seq"])
            assert seqs == [1, 2, 3], seqs
            await cl.stream.aclose()
            await trio.sleep(1.2)  # the workers' next report
            metrics = await trio.to_thread.run_sync(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{oport}/metrics", timeout=5)
                    .read()
                    .decode()
                )
            )
        finally:
            out = stop(proc)
            n.cancel_scope.cancel()
    assert "Traceback" not in out, out
    return bodies, metrics


class TwoMoves(Reordering):
    """A downstream for two moves, A to B to C (three workers): it holds
    back what it writes on A's and B's links until the session is opened
    on a third worker's link, then writes C's reply at once, B's (then
    ``moved``) 150 ms later and A's (then ``moved``) 300 ms later: the
    replies of the old links are still on their way when newer ones come.
    ``back``: the session moved back to a worker it had left (the test
    then starts over with a new session)."""

    def __init__(self) -> None:
        super().__init__(MOVED_MARK, marks=True)
        self.chain: dict[str, list[tuple[str, int]]] = {}  # sid -> (worker, link)
        self.opened = trio.Event()  # set at every open from another worker
        self.back = False

    def _on_frame(self, link: int, f: dict[str, Any]) -> None:
        sid, worker = f["sid"], self.links[link][2]
        if f["t"] == "msg":
            self._send(link, {"t": "ack", "sid": sid, "n": f["n"]})
            return
        if f["t"] != "open":
            return
        chain = self.chain.setdefault(sid, [])
        if chain and chain[-1][0] == worker:
            return
        if any(w == worker for w, _ in chain):
            self.back = True
        chain.append((worker, link))
        self.opened.set()
        if len(chain) == 3 and not self.back:
            self._send(link, _deliver(sid, "third"))
            assert self.nursery is not None
            self.nursery.start_soon(self._old_link, chain[1][1], sid, "second", 0.15)
            self.nursery.start_soon(self._old_link, chain[0][1], sid, "first", 0.3)

    async def _old_link(self, link: int, sid: str, body: str, delay: float) -> None:
        await trio.sleep(delay)
        self._send(link, _deliver(sid, body))
        self._send(link, {"t": "moved", "sid": sid})


async def test_after_two_moves_replies_keep_the_order_of_the_links(tmp_path: Path) -> None:
    """Three workers, a session moved A to B to C within the hold: the
    visitor sees A's reply, then B's, then C's, though they reached C in the
    other order (B's passed on before A's, C's own first)."""
    desk = TwoMoves()
    port = free_port()
    async with trio.open_nursery() as n:
        dport = await n.start(desk.serve)
        proc = serve_two_workers(
            tmp_path, port, args=("--workers", "3", "--downstream", f"support=127.0.0.1:{dport}")
        )
        try:
            await trio.to_thread.run_sync(wait_listening, port)
            with trio.fail_after(10):
                while len(desk.links) < 3:  # every worker's link
                    await trio.sleep(0.05)
            cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
            t = cfg.tenants[DEMO_TENANT]
            bodies: list[str] = []
            for attempt in range(20):  # a new session when one moves back
                desk.back = False
                tok = mint(DEMO_TENANT, f"v{attempt}", t.secrets[t.primary_kid], 600, time.time())
                hello: dict[str, Any] = {"t": "hello", "v": 1, "token": tok}
                cl = await H2Client.connect(port)
                st = await cl.open()
                await cl.send(st, hello)
                sid = (await cl.recv(st))["sid"]
                await cl.send(st, {"t": "msg", "id": 1, "body": "hello?"})
                with trio.fail_after(5):
                    while (await cl.recv(st))["t"] != "ack":
                        pass
                # new connections (the kernel picks the worker) until the
                # session has been on three workers, or moved back
                while len(desk.chain[sid]) < 3 and not desk.back:
                    await cl.stream.aclose()
                    desk.opened = trio.Event()
                    cl = await H2Client.connect(port)
                    st = await cl.open()
                    await cl.send(st, {**hello, "resume": {"sid": sid, "last": 0}})
                    w = await cl.recv(st)
                    assert w["t"] == "welcome" and w["resumed"] is True, w
                    with trio.move_on_after(0.1):  # an open on a new worker's link
                        await desk.opened.wait()
                if desk.back:
                    await cl.stream.aclose()
                    continue
                with trio.fail_after(5 + HOLD_S):
                    while len(bodies) < 3:
                        f = await cl.recv(st)
                        if f["t"] == "deliver":
                            bodies.append(f["body"])
                await cl.stream.aclose()
                break
            assert bodies == ["first", "second", "third"]
        finally:
            out = stop(proc)
            n.cancel_scope.cancel()
    assert "Traceback" not in out, out


def _event(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'gateway_events_total{{event="{name}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_reply_on_its_way_to_the_old_worker_stays_ahead(tmp_path: Path) -> None:
    bodies, metrics = await _replies_across_a_move(tmp_path, MOVED_MARK, marks=True)
    assert bodies == ["first", JOINED, "second"]
    assert _event(metrics, "move_marks_forwarded") == 1
    assert _event(metrics, "deliveries_forwarded") == 2  # the reply and the assignment
    assert _event(metrics, "downstream_move_hold_timeouts") == 0


async def test_without_the_feature_replies_are_not_held(tmp_path: Path) -> None:
    """The same downstream without ``moved`` in its features: nothing is
    held, so the newer reply comes first (the scenario does reorder)."""
    bodies, metrics = await _replies_across_a_move(tmp_path, "", marks=False)
    assert bodies == ["second", "first", JOINED]
    assert _event(metrics, "move_marks_forwarded") == 0


async def test_a_downstream_that_never_says_moved_delays_replies_by_the_hold(
    tmp_path: Path,
) -> None:
    """It announces the feature but never sends ``moved``: the newer reply
    is held until the hold ends (HOLD_S), then delivered, behind the older."""
    bodies, metrics = await _replies_across_a_move(tmp_path, f"x, {MOVED_MARK}", marks=False)
    assert bodies == ["first", JOINED, "second"]
    assert _event(metrics, "downstream_move_hold_timeouts") == 1
    assert _event(metrics, "move_marks_forwarded") == 0


# -- sans-IO ----------------------------------------------------------------------


def test_moved_is_a_downstream_frame() -> None:
    assert check_from_downstream({"t": "moved", "sid": "s"}) == {"t": "moved", "sid": "s"}
    with pytest.raises(ProtocolError):
        check_from_downstream({"t": "moved"})
    with pytest.raises(ProtocolError):
        check_from_downstream({"t": "moved", "sid": 3})


def test_mark_waits_follow_the_link_and_expire() -> None:
    a, b = object(), object()
    w = MarkWaits()
    w.add("s1", a, 10.0)
    w.add("s2", a, 10.5)
    w.add("s3", b, 11.0)
    assert not w.take(b, "s1")  # from another link: not the one it left
    assert w.take(a, "s1") and not w.take(a, "s1")  # once
    assert w.link_down(a) == ["s2"] and len(w) == 1
    assert w.expire(11.0 + 2 * HOLD_S - 0.01) == 0
    assert w.expire(11.0 + 2 * HOLD_S) == 1 and len(w) == 0


def test_mark_waits_are_bounded() -> None:
    a = object()
    w = MarkWaits(max_waits=3)
    for i in range(5):
        w.add(f"s{i}", a, float(i))
    assert len(w) == 3 and not w.take(a, "s0") and w.take(a, "s4")


def test_holds_keep_frames_from_the_old_endpoint_only() -> None:
    h = Holds()
    assert h.hold("s1", "ep-a", {"t": "deliver", "body": "x"}) == [{"t": "deliver", "body": "x"}]
    h.start("s1", "ep-a", 5.0, [0])
    f1, f2 = {"t": "deliver", "body": "one"}, {"t": "assign", "agent": "a1"}
    assert h.hold("s1", "ep-a", f1) is None and h.hold("s1", "ep-a", f2) is None
    other = {"t": "deliver", "body": "other desk"}
    assert h.hold("s1", "ep-b", other) == [other]  # another endpoint: not ordered with it
    assert h.end("s1") == [f1, f2] and h.end("s1") == [] and len(h) == 0


def test_holds_end_at_their_deadline_in_order() -> None:
    h = Holds()
    h.start("s1", "ep", 1.0, [0])
    h.start("s2", "ep", 1.5, [0])
    h.hold("s2", "ep", {"t": "deliver", "body": "b"})
    assert h.expire(1.0 + HOLD_S - 0.01) == []
    assert h.expire(1.5 + HOLD_S) == [("s1", []), ("s2", [{"t": "deliver", "body": "b"}])]


@pytest.mark.parametrize("what", ["frames", "bytes"])
def test_a_hold_over_its_bounds_hands_everything_on(what: str) -> None:
    if what == "frames":
        h = Holds(max_frames=3, max_bytes=1000)
    else:
        h = Holds(max_frames=1000, max_bytes=25)
    h.start("s", "ep", 0.0, [0])
    frames = [{"t": "deliver", "body": "0123456789"} for _ in range(4)]
    got = [h.hold("s", "ep", f) for f in frames]
    n = 3 if what == "frames" else 2
    assert got[:n] == [None] * n and got[n] == frames[: n + 1] and len(h) == 0


def test_desk_sim_says_moved_on_the_link_a_session_left() -> None:
    """desk-sim's side: a session re-opened (or messaged) on another link
    leaves a mark for its old link; the first open and the same link do
    not."""
    from gateway.downstream.desk import Desk, DeskConfig

    desk = Desk(DeskConfig(reply=False))
    opened = {"t": "open", "sid": "s1", "tenant": "t", "visitor": "v", "group": "g",
              "stage": "bot", "agent": None}  # fmt: skip
    desk.on_frame(1, opened)
    desk.on_frame(1, {"t": "msg", "sid": "s1", "n": 1, "id": 1, "body": "x", "group": "g"})
    assert desk.take_marks() == []
    desk.on_frame(2, opened)
    assert desk.take_marks() == [(1, "s1")] and desk.take_marks() == []
    desk.on_frame(3, {"t": "msg", "sid": "s1", "n": 2, "id": 2, "body": "y", "group": "g"})
    assert desk.take_marks() == [(2, "s1")] and desk.link_of("s1") == 3


def _seen(s: Any, v: Visitor) -> list[tuple[str, Any]]:
    """The replies the visitor of ``s`` got, in order."""
    return [(s.sid, b) for b in v.delivered()]


def _forwarder_with_a_moved_in_session(state_dir: Path) -> tuple[Any, Any, Any, Hub, Visitor]:
    """A forwarder (of worker 1) with a session that moved in from worker
    0, its hub a real one and its visitor recording what it gets."""
    from gateway.downstream.forwarder import Flow, Forwarder
    from gateway.downstream.settings import merge_cli_specs, parse_settings
    from gateway.session.state import Session

    settings = parse_settings(merge_cli_specs({}, ["general=127.0.0.1:9001,127.0.0.1:9002"]))
    assert settings is not None
    fw = Forwarder(settings)
    hub = hub_for(fw, state_dir, workers=3, index=1)
    fw.hub = hub
    s = Session("sid-h", "t", "v", {}, "web", 4, 8, 1 << 20)
    v = attach(hub, s)
    eps = list(fw.clusters["general"].eps.values())
    fw._now = 100.0
    fw.moved_in(hub, s, {"ep": eps[0].key, "agent": None, "marks": [0]})
    s.ds = Flow(None)
    s.ds.ep = eps[0]
    return fw, s, eps, hub, v


def test_the_forwarder_holds_replies_from_the_old_endpoint_until_mend(tmp_path: Path) -> None:
    fw, s, eps, hub, v = _forwarder_with_a_moved_in_session(tmp_path)
    same, other = eps[0].links[0], eps[1].links[0]
    fw.link_frames(same, [_deliver(s.sid, "newer"), {"t": "assign", "sid": s.sid, "agent": "a9"}])
    fw.link_frames(other, [_deliver(s.sid, "elsewhere")])  # another desk: not held
    assert _seen(s, v) == [(s.sid, "elsewhere")] and s.ds.agent is None
    hub.deliver(s, "older (passed on)", {})  # what the old worker's mdel does
    fw.move_ended(hub, s, 1)  # not awaited: ignored
    assert v.delivered() == ["elsewhere", "older (passed on)"]
    fw.move_ended(hub, s, 0)
    assert v.delivered() == [
        "elsewhere", "older (passed on)", "newer", "a9 joined the conversation",
    ]  # fmt: skip
    assert s.ds.agent == "a9"
    fw.link_frames(same, [_deliver(s.sid, "later")])  # the hold is over
    assert _seen(s, v)[-1] == (s.sid, "later")


def test_the_forwarder_ends_a_hold_at_its_deadline_and_on_a_further_move(tmp_path: Path) -> None:
    fw, s, eps, hub, v = _forwarder_with_a_moved_in_session(tmp_path)
    fw.link_frames(eps[0].links[0], [_deliver(s.sid, "held")])
    fw.tick(100.0 + HOLD_S - 0.05)
    assert _seen(s, v) == []
    fw.tick(100.0 + HOLD_S + 0.05)
    assert _seen(s, v) == [(s.sid, "held")] and hub.stats["downstream_move_hold_timeouts"] == 1
    # moving on while replies are held: they are delivered first (and go
    # with the exported state), and the next worker waits for worker 0 too
    fw2, s2, eps2, hub2, v2 = _forwarder_with_a_moved_in_session(tmp_path)
    fw2.link_frames(eps2[0].links[0], [_deliver(s2.sid, "held")])
    hint = fw2.moving(hub2, s2)
    assert _seen(s2, v2) == [(s2.sid, "held")] and hint["marks"] == [0]
    # on a link whose downstream marks, this worker (index 1) is awaited too
    fw3, s3, eps3, hub3, v3 = _forwarder_with_a_moved_in_session(tmp_path)
    _marking_link_up(eps3[0].links[0])
    s3.ds.link = eps3[0].links[0]
    assert fw3.moving(hub3, s3)["marks"] == [0, 1]
    # a hold waits for every worker named
    fw3.moved_in(hub3, s3, {"ep": eps3[0].key, "agent": None, "marks": [0, 1]})
    fw3.link_frames(eps3[0].links[0], [_deliver(s3.sid, "newest")])
    fw3.move_ended(hub3, s3, 1)
    assert _seen(s3, v3) == []
    fw3.move_ended(hub3, s3, 0)
    assert _seen(s3, v3) == [(s3.sid, "newest")]


def _marking_link_up(link: Any) -> None:
    from gateway.downstream.link import UP, LinkCore

    link.core = LinkCore()
    link.core.features = frozenset({MOVED_MARK})
    link.state = UP


def test_a_hold_waits_for_every_worker_it_names() -> None:
    h = Holds()
    h.start("none", "ep", 0.0, [])
    assert len(h) == 0  # nobody to wait for: no hold
    h.start("s", "ep", 0.0, [3, 5, 3])
    f = {"t": "deliver", "body": "b"}
    assert h.hold("s", "ep", f) is None
    assert h.waiting("s") == [3, 5]  # in the order the session left them
    assert h.marked("s", 4) is None  # not awaited
    assert h.marked("s", 3) == []  # awaited, but the frame waits for 5 too
    assert h.waiting("s") == [5] and h.marked("s", 3) is None  # 3 again: nothing
    assert h.marked("s", 5) == [f] and len(h) == 0 and h.waiting("s") == []


def _d(body: str) -> dict[str, Any]:
    return {"t": "deliver", "body": body}


def test_after_two_moves_replies_go_oldest_worker_first() -> None:
    """A to B to C (workers 0, 1, then here): what A's link brought goes
    first, then B's, then C's own; each as soon as the workers before it
    said their last word."""
    first, second, third = _d("first"), _d("second"), _d("third")
    h = Holds()
    h.start("s", "ep", 0.0, [0, 1])
    assert h.hold("s", "ep", third) is None  # C's own: waits for A and B
    assert h.passed_on("s", 1, second) is None  # B's: waits for A
    assert h.passed_on("s", 0, first) == [first]  # A's: nothing older
    assert h.passed_on("s", 7, _d("x")) == [_d("x")]  # not a worker it left
    assert h.marked("s", 0) == [second]
    assert h.passed_on("s", 1, _d("second+")) == [_d("second+")]  # A is done
    assert h.marked("s", 1) == [third] and len(h) == 0

    # B's word before A's: nothing goes until A's, then B's before C's own,
    # whatever order they came in
    h.start("s", "ep", 0.0, [0, 1])
    assert h.hold("s", "ep", third) is None and h.passed_on("s", 1, second) is None
    assert h.marked("s", 1) == []
    assert h.marked("s", 0) == [second, third] and len(h) == 0

    # the hold's end (deadline, the session moving on, its bounds): the
    # same order
    h.start("s", "ep", 0.0, [0, 1])
    assert h.hold("s", "ep", third) is None and h.passed_on("s", 1, second) is None
    assert h.end("s") == [second, third]
    h.start("s", "ep", 0.0, [0, 1])
    assert h.hold("s", "ep", third) is None and h.passed_on("s", 1, second) is None
    assert h.expire(HOLD_S) == [("s", [second, third])]


async def test_a_mend_for_a_session_that_moved_on_follows_it(tmp_path: Path) -> None:
    """The migrator's side: a mend for a session held here goes to the
    downstream with its origin; for one that moved on, to its holder (hops
    counted, at most MAX_HOPS); malformed ones are refused and counted."""
    from gateway.server.migrator import WorkerMigrator
    from gateway.session.migrate import MAX_HOPS
    from gateway.session.state import Session

    ended: list[tuple[str, int]] = []
    passed: list[tuple[str, Any, int | None]] = []

    class Down:
        def move_ended(self, hub: Any, s: Any, origin: int) -> None:
            ended.append((s.sid, origin))

        def passed_on(self, hub: Any, s: Any, body: Any, sender: Any, origin: int | None) -> None:
            passed.append((s.sid, body, origin))

    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
    hub = Hub(cfg, Down(), workers=3, index=1)  # type: ignore[arg-type]
    spawned: list[Any] = []

    class W:
        pass

    w = W()
    w.hub, w.cfg, w.spawn = hub, cfg, spawned.append  # type: ignore[attr-defined]
    mig = WorkerMigrator(w)  # type: ignore[arg-type]
    here = Session("sid-here", "t", "v", {}, "web", 4, 8, 1 << 20)
    hub.sessions.add(here)
    mig.on_message(msgpack.packb({"k": "mend", "sid": "sid-here", "from": 0, "hops": 0}))
    assert ended == [("sid-here", 0)]
    mig.tombs.add("sid-gone", 2, trio.current_time() + 60)
    mig.on_message(msgpack.packb({"k": "mend", "sid": "sid-gone", "from": 0, "hops": 0}))
    assert list(mig.queues[2]) == [{"k": "mend", "sid": "sid-gone", "from": 0, "hops": 1}]
    mig.on_message(msgpack.packb({"k": "mend", "sid": "sid-gone", "from": 0, "hops": MAX_HOPS}))
    assert len(mig.queues[2]) == 1  # too many hops: dropped
    mig.on_message(msgpack.packb({"k": "mend", "sid": "sid-gone", "from": "0"}))
    assert hub.stats["migrate_bad"] == 1 and len(spawned) == 1  # one sender task for peer 2
    # a reply passed on names the worker whose link brought it, kept when
    # it is passed on again
    sender = {"kind": "agent", "name": "a"}
    mdel = {"k": "mdel", "sid": "sid-here", "body": "hi", "sender": sender, "from": 0, "hops": 1}
    mig.on_message(msgpack.packb(mdel))
    mig.on_message(msgpack.packb({**mdel, "from": None}))  # not named: delivered now
    assert passed == [("sid-here", "hi", 0), ("sid-here", "hi", None)]
    mig.on_message(msgpack.packb({**mdel, "sid": "sid-gone"}))
    assert list(mig.queues[2])[-1] == {**mdel, "sid": "sid-gone", "hops": 2}
    assert mig.forward_deliver("sid-gone", "reply", sender)
    assert list(mig.queues[2])[-1] == {
        "k": "mdel", "sid": "sid-gone", "body": "reply", "sender": sender, "from": 1, "hops": 0,
    }  # fmt: skip
