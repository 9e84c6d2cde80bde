"""Sans-IO session logic: numbering, dedup, replay bounds, resume, admission,
window pause/resume, without sockets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DEMO_TENANT, load_config
from gateway.protocol.codes import Code, ProtocolError
from gateway.protocol.tokens import mint
from gateway.session.hub import Hub
from gateway.session.migrate import Tombstones, export_state, import_state
from gateway.session.state import FRAME_OVERHEAD, Session, SessionTable, new_sid, sid_owner
from gateway.session.visitor import VisitorProtocol


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.paused = 0
        self.resumed = 0

    def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(dict(frame))

    def send_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        self.send({"t": "ack", "id": msg_id, "n": n, "dup": dup})

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.resumed += 1

    def types(self) -> list[str]:
        return [f["t"] for f in self.sent]

    accept_handoff = False

    def handoff(self, owner: int, hello: dict[str, Any]) -> bool:
        self.handed = (owner, hello)
        return self.accept_handoff

    proto: VisitorProtocol | None = None

    def rehello(self, hello: dict[str, Any]) -> None:
        assert self.proto is not None
        self.proto.on_frame(hello)
        self.resume()


class FakeMigrator:
    """Holders by the sid's owner byte (3 workers, this one is 0)."""

    def __init__(self, handoff: bool = True) -> None:
        self.requests: list[tuple[Any, int, str, str, str]] = []
        self.handoff = handoff

    def holder(self, sid: str) -> int | None:
        owner = sid_owner(sid)
        return owner if owner is not None and 0 < owner < 3 else None

    def handoff_possible(self) -> bool:
        return self.handoff

    def request(self, proto: Any, holder: int, sid: str, tenant: str, visitor: str) -> None:
        self.requests.append((proto, holder, sid, tenant, visitor))

    def forward_deliver(self, sid: str, body: Any, sender: dict[str, str]) -> bool:
        return False


class FakeDown:
    def __init__(self) -> None:
        self.submitted: list[tuple[Session, Any, int, Any]] = []
        self.wait = 0.0
        self.accept = True
        self.ended: list[Session] = []

    def admit(self, hub: Hub, tenant: str, tags: dict[str, str]) -> float:
        return self.wait

    def opened(self, hub: Hub, s: Session, resumed: bool) -> None:
        pass

    def closed(self, hub: Hub, s: Session) -> None:
        self.ended.append(s)

    def submit(self, hub: Hub, s: Session, msg_id: Any, n: int, body: Any) -> bool:
        self.submitted.append((s, msg_id, n, body))
        return self.accept


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {"window": 3, "replay_frames": 4})
    return Hub(cfg, FakeDown())


def token(hub: Hub, visitor: str = "v", ttl: int = 600) -> str:
    t = hub.cfg.tenants[DEMO_TENANT]
    return mint(DEMO_TENANT, visitor, t.secrets[t.primary_kid], ttl, time.time())


def open_conn(hub: Hub, visitor: str = "v", **hello: Any) -> tuple[VisitorProtocol, FakeSink]:
    sink = FakeSink()
    p = VisitorProtocol(hub, sink, None)
    p.on_frame({"t": "hello", "v": 1, "token": token(hub, visitor), **hello})
    return p, sink


def test_hello_then_messages_numbered_and_acked_after_downstream(hub: Hub) -> None:
    p, sink = open_conn(hub)
    assert sink.types() == ["welcome"]
    down: FakeDown = hub.downstream  # type: ignore[assignment]
    p.on_frame({"t": "msg", "id": "a", "body": "x"})
    p.on_frame({"t": "msg", "id": "b", "body": "y"})
    assert [(i, n) for _, i, n, _ in down.submitted] == [("a", 1), ("b", 2)]
    assert sink.types() == ["welcome"]  # no ack before the downstream acked
    s = p.session
    assert s is not None
    hub.downstream_ack(s, "b")
    hub.downstream_ack(s, "a")
    assert sink.sent[1:] == [
        {"t": "ack", "id": "b", "n": 2, "dup": False},
        {"t": "ack", "id": "a", "n": 1, "dup": False},
    ]
    hub.downstream_ack(s, "a")  # a late duplicate ack from downstream is ignored
    assert len(sink.sent) == 3 and hub.stats["downstream_ack_unknown"] == 1
    p.on_frame({"t": "msg", "id": "a", "body": "x"})
    assert sink.sent[-1] == {"t": "ack", "id": "a", "n": 1, "dup": True}
    assert len(down.submitted) == 2


def test_in_flight_duplicate_is_not_forwarded_twice(hub: Hub) -> None:
    p, sink = open_conn(hub)
    p.on_frame({"t": "msg", "id": 5, "body": "x"})
    p.on_frame({"t": "msg", "id": 5, "body": "x"})
    assert len(hub.downstream.submitted) == 1  # type: ignore[attr-defined]
    assert sink.types() == ["welcome"]


def test_window_pauses_and_resumes(hub: Hub) -> None:
    p, sink = open_conn(hub)
    for i in range(3):
        p.on_frame({"t": "msg", "id": i, "body": "x"})
    assert sink.paused == 1
    p.on_frame({"t": "msg", "id": 99, "body": "x"})
    assert sink.sent[-1]["code"] == int(Code.WINDOW_EXCEEDED) and sink.sent[-1]["id"] == 99
    assert p.session is not None
    hub.downstream_ack(p.session, 0)
    assert sink.resumed == 1


def test_downstream_backpressure_pauses_until_ready(hub: Hub) -> None:
    p, sink = open_conn(hub)
    hub.downstream.accept = False  # type: ignore[attr-defined]
    p.on_frame({"t": "msg", "id": 1, "body": "x"})
    assert sink.paused == 1
    hub.downstream_ready()
    assert sink.resumed == 1


def test_replay_bounds_and_resync(hub: Hub) -> None:
    p, _sink = open_conn(hub)
    s = p.session
    assert s is not None
    for i in range(6):
        hub.deliver(s, f"m{i}", {"kind": "agent", "name": "a"})
    assert [f["seq"] for f in s.replay] == [3, 4, 5, 6] and s.first == 3
    assert s.missed(4) == ([s.replay[2], s.replay[3]], False)
    frames, resync = s.missed(1)
    assert resync and [f["seq"] for f in frames] == [3, 4, 5, 6]
    s.client_acked(5)
    assert [f["seq"] for f in s.replay] == [6]
    # byte bound
    s2 = Session("x", "t", "v", {}, "web", 10, 100, 1000)
    s2.push({"t": "deliver", "body": "z" * 600})
    s2.push({"t": "deliver", "body": "z" * 600})
    assert len(s2.replay) == 1 and s2.first == 2


def test_resume_replays_and_takes_over(hub: Hub) -> None:
    p1, sink1 = open_conn(hub, "r")
    s = p1.session
    assert s is not None
    hub.deliver(s, "one", {"kind": "bot", "name": "b"})
    hub.deliver(s, "two", {"kind": "bot", "name": "b"})
    _p2, sink2 = open_conn(hub, "r", resume={"sid": s.sid, "last": 1})
    assert sink1.closed == (4005, "taken over")
    assert sink2.sent[0]["resumed"] is True
    assert [f.get("seq") for f in sink2.sent[1:]] == [2]
    with pytest.raises(ProtocolError) as e:
        open_conn(hub, "intruder", resume={"sid": s.sid, "last": 0})
    assert e.value.code == Code.BAD_RESUME


def test_detached_sessions_expire_and_are_bounded(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        {"GATEWAY_STATE_DIR": str(tmp_path)},
        {"max_detached_sessions": 2, "session_ttl_s": 10},
    )
    down = FakeDown()
    hub = Hub(cfg, down)
    ps = [open_conn(hub, f"v{i}")[0] for i in range(3)]
    for i, p in enumerate(ps):
        p.connection_lost(float(i))
    assert len(hub.sessions) == 2 and len(down.ended) == 1  # oldest evicted
    assert hub.expire(10.5) == 0
    assert hub.expire(11.5) == 1  # detached at 1.0
    assert hub.expire(12.5) == 1
    assert len(hub.sessions) == 0


def test_admission_refuses_new_sessions_with_retry_after(hub: Hub) -> None:
    hub.downstream.wait = 2.0  # type: ignore[attr-defined]
    sink = FakeSink()
    p = VisitorProtocol(hub, sink, None)
    with pytest.raises(ProtocolError) as e:
        p.on_frame({"t": "hello", "v": 1, "token": token(hub)})
    assert e.value.code == Code.OVERLOADED
    p.fail(e.value)
    err = sink.sent[-1]
    assert err["code"] == 4003 and 2000 <= err["retry_after"] <= 4000
    assert sink.closed is not None and sink.closed[0] == 4003


@pytest.mark.parametrize("kind", ["str", "int"])
def test_dedup_window_keeps_exactly_the_newest_ids(kind: str) -> None:
    """String ids (a RecentMap under the window) and int ids (the compact
    arrays, as the SDK and widget send them)."""

    def mid(i: int) -> object:
        return f"m{i}" if kind == "str" else 5000 + i

    s = Session("sid-d", "t", "v", {}, "web", 64, 8, 1 << 20)
    for i in range(1000):
        assert s.classify(mid(i)) is None
        n = s.begin(mid(i))
        assert s.accept(mid(i)) == n == i + 1
        # every one of the newest 64 ids is still a duplicate, with its n
        assert all(s.classify(mid(j)) == j + 1 for j in range(max(0, i - 63), i + 1))
        # exactly the newest 64 (or all, before 64)
        assert len(s.accepted) == min(i + 1, 64)
        assert s.classify(mid(i - 64)) is None
        if kind == "str":
            assert s.accepted.other is not None
            assert len(s.accepted.other.order) <= 2 * 64  # the order list is compacted
        else:
            assert s.accepted.other is None and len(s.accepted.ids) <= 64
    assert list(s.accepted) == [mid(j) for j in range(936, 1000)]
    # the same id again once forgotten: a new message, remembered again
    n = s.begin(mid(0))
    assert s.accept(mid(0)) == n == 1001 and s.classify(mid(0)) == 1001
    assert s.classify(mid(936)) is None and len(s.accepted) == 64


def test_session_table_iteration_and_remove() -> None:
    t = SessionTable(5)
    s = Session("a", "t", "v", {}, "web", 4, 4, 1000)
    t.add(s)
    assert list(t) == [s] and t.get("a") is s
    t.remove(s)
    assert len(t) == 0


def test_session_ids_carry_their_worker() -> None:
    for owner in (0, 1, 13, 255):
        sid = new_sid(owner)
        assert len(sid) == 22 and sid_owner(sid) == owner
    assert len({new_sid(3) for _ in range(1000)}) == 1000
    for bad in ("", "short", "!" * 22, "a" * 23):
        assert sid_owner(bad) is None


def test_resume_of_another_workers_session_is_handed_over(tmp_path: Path) -> None:
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
    hub = Hub(cfg, FakeDown(), workers=3, index=0)
    mig = FakeMigrator()
    hub.migrator = mig
    sid = new_sid(2)
    sink = FakeSink()
    sink.accept_handoff = True
    p = VisitorProtocol(hub, sink, None)
    hello = {"t": "hello", "v": 1, "token": token(hub), "resume": {"sid": sid, "last": 4}}
    p.on_frame(hello)
    assert sink.handed == (2, hello) and sink.sent == [] and p.state == p.CLOSED
    assert hub.stats["handoffs_out"] == 1 and len(hub.sessions) == 0
    # the connection cannot move (the owner's queue, TLS, HTTP/2): the
    # session is asked for instead, reading pauses until the answer
    sink2 = FakeSink()
    p2 = sink2.proto = VisitorProtocol(hub, sink2, None)
    p2.on_frame(dict(hello))
    assert sink2.handed[0] == 2 and sink2.sent == [] and sink2.paused == 1
    assert p2.state == p2.HELLO and hub.stats["migrations_requested"] == 1
    (req,) = mig.requests
    assert req[0] is p2 and req[1:] == (2, sid, "demo", "v")
    # the session arrives (as the worker's migrator would import it)
    moved = Session(sid, "demo", "v", {}, "web", 16, 16, 1 << 20)
    moved.next_n = 8
    for i in range(1, 4):
        moved.push({"t": "deliver", "body": f"m{i}"})
    hub.sessions.add(moved)
    hub.detach(moved, 0.0)
    p2.migrated()
    w = sink2.sent[0]
    assert w["t"] == "welcome" and w["resumed"] is True and w["sid"] == sid
    assert [f["seq"] for f in sink2.sent[1:]] == [] and sink2.resumed == 1  # last was 4
    assert p2.state == p2.OPEN and moved.conn is p2
    # not there after all (or no answer): a fresh session, asked once only
    sink3 = FakeSink()
    p3 = sink3.proto = VisitorProtocol(hub, sink3, None)
    p3.on_frame({**hello, "resume": {"sid": new_sid(1), "last": 0}})
    assert len(mig.requests) == 2 and sink3.sent == []
    p3.migrated()
    assert sink3.sent[0]["t"] == "welcome" and sink3.sent[0]["resumed"] is False
    assert len(mig.requests) == 2
    p3.migrated()  # a late second answer changes nothing
    assert sink3.types().count("welcome") == 1
    # an adopted connection is not handed on again, but may still pull the
    # session; our own index or one past the worker count: served here
    s5 = FakeSink()
    s5.accept_handoff = True
    p5 = VisitorProtocol(hub, s5, None)
    p5.adopted = True
    p5.on_frame({**hello, "resume": {"sid": new_sid(2), "last": 0}})
    assert not hasattr(s5, "handed") and len(mig.requests) == 3
    for owner in (0, 7):
        s3 = FakeSink()
        s3.accept_handoff = True
        VisitorProtocol(hub, s3, None).on_frame(
            {**hello, "resume": {"sid": new_sid(owner), "last": 0}}
        )
        assert not hasattr(s3, "handed") and s3.types()[0] == "welcome"
    # without hand-off (TLS listener): straight to asking for the session
    mig.handoff = False
    s6 = FakeSink()
    s6.accept_handoff = True
    VisitorProtocol(hub, s6, None).on_frame({**hello, "resume": {"sid": new_sid(1), "last": 0}})
    assert not hasattr(s6, "handed") and len(mig.requests) == 4
    s4 = FakeSink()
    s4.accept_handoff = True
    with pytest.raises(ProtocolError):
        VisitorProtocol(hub, s4, None).on_frame({**hello, "token": "forged"})
    assert not hasattr(s4, "handed")


def test_session_state_moves_with_its_numbering_replay_and_dedup() -> None:
    s = Session("sid-x", "t", "v", {"channel": "web"}, "ios", 4, 8, 1 << 20)
    s.exp = 1234
    for i in range(6):
        n = s.begin(f"id{i}")
        if i < 5:
            s.accept(f"id{i}")  # id5 stays in flight (n = 6)
    assert n == 6
    for i in range(10):
        s.push({"t": "deliver", "body": f"reply {i}", "from": {"kind": "bot", "name": "b"}})
    s.client_acked(3)
    state = export_state(s, 1 << 20)
    packed = msgpack.packb(state, use_bin_type=True)
    t = import_state(msgpack.unpackb(packed, raw=False), 4, 8, 1 << 20)
    assert (t.sid, t.tenant, t.visitor, t.tags, t.platform, t.exp) == (
        "sid-x",
        "t",
        "v",
        {"channel": "web"},
        "ios",
        1234,
    )
    assert t.seq == 10 and t.first == s.first == 4 and t.next_n == 7
    assert [f["seq"] for f in t.replay] == list(range(4, 11))
    assert t.replay_bytes == s.replay_bytes
    # dedup: the last 4 accepted ids answer as duplicates with their n
    assert t.classify("id4") == 5 and t.classify("id1") == 2 and t.classify("id0") is None
    # the message in flight when it moved is sent again: same n
    assert t.classify("id5") is None and t.begin("id5") == 6 and t.reissue is None
    assert t.begin("new") == 7
    missed, resync = t.missed(3)
    assert [f["seq"] for f in missed] == list(range(4, 11)) and not resync
    # too big to move whole: the oldest frames stay behind, first moves up
    limit = len(packed) - 60
    small = export_state(s, limit)
    assert len(msgpack.packb(small, use_bin_type=True)) <= limit
    u = import_state(small, 4, 8, 1 << 20)
    assert u.first > 4 and [f["seq"] for f in u.replay] == list(range(u.first, 11))
    assert u.missed(3)[1] is True  # a visitor that saw seq 3 must resync
    with pytest.raises(ValueError):
        export_state(s, 50)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("sid"),
        lambda d: d.update(seq=-1),
        lambda d: d.update(tags={"a": 1}),
        lambda d: d.update(replay=[{"body": "no seq"}]),
        lambda d: d.update(accepted=[["id", "n"]]),
        lambda d: d.update(inflight=[[1.5, 2]]),
        lambda d: d.update(accepted="x"),
    ],
)
def test_malformed_session_state_is_refused(mutate: Any) -> None:
    s = Session("sid-y", "t", "v", {}, "web", 4, 8, 1 << 20)
    d = export_state(s, 1 << 20)
    mutate(d)
    with pytest.raises(ValueError):
        import_state(d, 4, 8, 1 << 20)
    with pytest.raises(ValueError):
        import_state(["not", "a", "map"], 4, 8, 1 << 20)


def test_tombstones_expire_and_stay_bounded() -> None:
    t = Tombstones(2)
    t.add("a", 1, 10.0)
    t.add("b", 2, 10.0)
    assert t.holder("a", 5.0) == 1 and t.holder("b", 5.0) == 2
    t.add("c", 3, 10.0)
    assert len(t) == 2 and t.holder("a", 5.0) is None  # oldest dropped
    assert t.holder("c", 10.0) is None and len(t) == 1  # expired
    t.discard("b")
    assert len(t) == 0


def test_delivery_to_a_stale_session_follows_it(tmp_path: Path) -> None:
    """The demo bot's delayed reply may hold a session object that has moved
    to another worker (passed on through the migrator) or moved away and
    back (delivered to the session now in the table)."""
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
    hub = Hub(cfg, FakeDown(), workers=3, index=0)
    forwarded: list[tuple[str, Any]] = []

    class Forwarding(FakeMigrator):
        def forward_deliver(self, sid: str, body: Any, sender: dict[str, str]) -> bool:
            forwarded.append((sid, body))
            return True

    hub.migrator = Forwarding()
    old = hub.new_session("demo", "v", {}, "web")
    hub.sessions.remove(old)  # it moved away
    assert hub.deliver(old, "late", {"kind": "bot", "name": "b"}) == 0
    assert forwarded == [(old.sid, "late")] and old.seq == 0
    back = Session(old.sid, "demo", "v", {}, "web", 4, 8, 1 << 20)
    back.seq = 5
    hub.sessions.add(back)  # and came back as a new object
    assert hub.deliver(old, "later", {"kind": "bot", "name": "b"}) == 6
    assert back.replay[-1]["body"] == "later" and old.seq == 0 and len(forwarded) == 1


def test_a_moved_session_keeps_its_agent_at_the_desk() -> None:
    """close {reason: moved} keeps the desk's session and agent (the new
    worker re-opens it with the agent hint); close ended releases them."""
    from gateway.downstream.desk import Desk, DeskConfig

    desk = Desk(DeskConfig(agents=1, capacity=1))
    opened = {"t": "open", "sid": "s1", "tenant": "t", "visitor": "v", "group": "g",
              "stage": "human", "agent": None}  # fmt: skip
    (assign,) = [a[2] for a in desk.on_frame(1, opened)]
    assert assign["t"] == "assign"
    agent = assign["agent"]
    assert desk.on_frame(1, {"t": "close", "sid": "s1", "reason": "moved"}) == []
    assert desk.sessions["s1"].agent == agent
    assert desk.on_frame(2, {**opened, "agent": agent}) == []  # same agent, no re-assign
    assert desk.sessions["s1"].link == 2
    desk.on_frame(2, {"t": "close", "sid": "s1", "reason": "ended"})
    assert "s1" not in desk.sessions and desk.load["g"][agent] == 0


def test_the_downstream_hint_moves_with_the_state() -> None:
    s = Session("sid-z", "t", "v", {}, "web", 4, 8, 1 << 20)
    d = export_state(s, 1 << 20, {"ep": "127.0.0.1:9000", "agent": "g-agent-2"})
    packed = msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)
    assert packed["ds"] == {"ep": "127.0.0.1:9000", "agent": "g-agent-2"}
    import_state(packed, 4, 8, 1 << 20)  # the hint does not disturb the import


def test_the_forwarder_hint_carries_endpoint_and_agent(hub: Hub) -> None:
    """What the forwarder of the old worker keeps of a moving session (its
    endpoint and agent) becomes the new worker's sticky preference."""
    from gateway.downstream.forwarder import Flow, Forwarder
    from gateway.downstream.settings import merge_cli_specs, parse_settings

    settings = parse_settings(merge_cli_specs({}, ["general=127.0.0.1:9001,127.0.0.1:9002"]))
    assert settings is not None
    old, new = Forwarder(settings), Forwarder(settings)
    s = Session("sid-f", "t", "v", {}, "web", 4, 8, 1 << 20)
    assert old.moving(hub, s) is None  # never routed
    fl = s.ds = Flow(None)
    fl.agent = "general-agent-3"
    eps = list(old.clusters["general"].eps.values())
    fl.ep = eps[1]
    hint = old.moving(hub, s)
    assert hint == {"ep": eps[1].key, "agent": "general-agent-3"}
    new.moved_in(hub, s, msgpack.unpackb(msgpack.packb(hint)))
    got = new.sticky.get("t", "v", new._time())
    assert got is not None and got[1] == "general-agent-3" and got[0] == hint["ep"]
    new.moved_in(hub, s, {"ep": 3, "agent": []})  # ignored
    assert new.sticky.get("t", "v", new._time()) == got


def test_desk_queues_sessions_for_busy_agents_first_come_first_served() -> None:
    """With every agent busy, new sessions wait in order and are told
    their place; a session that ends leaves the queue; an agent set free
    takes the longest-waiting session that is still there."""
    from gateway.downstream.desk import Desk, DeskConfig

    desk = Desk(DeskConfig(agents=1, capacity=1))

    def opened(sid: str) -> list[dict[str, Any]]:
        f = {"t": "open", "sid": sid, "tenant": "t", "visitor": sid, "group": "g",
             "stage": "human", "agent": None}  # fmt: skip
        return [a[2] for a in desk.on_frame(1, f)]

    def closed(sid: str) -> list[dict[str, Any]]:
        return [a[2] for a in desk.on_frame(1, {"t": "close", "sid": sid, "reason": "ended"})]

    assert opened("s1")[0]["t"] == "assign"
    for i, sid in enumerate(["s2", "s3", "s4"], start=1):
        (told,) = opened(sid)
        assert told["t"] == "deliver" and f"number {i} in the queue" in told["body"]
    assert closed("s2") == []  # left while waiting: nobody is freed
    (nxt,) = closed("s1")
    assert nxt == {"t": "assign", "sid": "s3", "agent": "g-agent-1", "group": "g"}
    (nxt,) = closed("s3")
    assert nxt["sid"] == "s4"
    assert closed("s4") == [] and not desk.waiting["g"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 300)),
            st.tuples(st.just("ack"), st.integers(-2, 6)),
        ),
        max_size=200,
    )
)
def test_replay_buffer_matches_a_pop_one_at_a_time_model(ops: list[tuple[str, int]]) -> None:
    """push() trimming and client_acked() drop the oldest frames in one
    deletion: the same frames, bytes and ``first`` as dropping them one by
    one, within 6 frames and 1,000 bytes."""
    s = Session("sid-r", "t", "v", {}, "web", 4, 6, 1000)
    model: list[tuple[int, int]] = []  # (seq, bytes)
    first = 1
    seq = 0
    for op, v in ops:
        if op == "push":
            seq += 1
            s.push({"t": "deliver", "body": "x" * v, "from": {"kind": "bot", "name": "b"}})
            model.append((seq, v + FRAME_OVERHEAD))
            while model and (len(model) > 6 or sum(b for _, b in model) > 1000):
                first = model.pop(0)[0] + 1
        else:
            upto = seq - v  # ack a little behind (or ahead of) the newest
            s.client_acked(upto)
            while model and model[0][0] <= upto:
                first = model.pop(0)[0] + 1
            if upto >= seq and not model:
                first = seq + 1
        assert [f["seq"] for f in s.replay] == [q for q, _ in model]
        assert s.replay_bytes == sum(b for _, b in model)
        assert s.first == first
