"""Sans-IO session logic: numbering, dedup, replay bounds, resume, admission,
window pause/resume, without sockets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DEMO_TENANT, load_config
from gateway.protocol.codes import Code, ProtocolError
from gateway.protocol.tokens import mint
from gateway.session.hub import Hub
from gateway.session.state import Session, SessionTable, new_sid, sid_owner
from gateway.session.visitor import VisitorProtocol


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.paused = 0
        self.resumed = 0

    def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(dict(frame))

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
    hub.handoff = True
    sid = new_sid(2)
    sink = FakeSink()
    sink.accept_handoff = True
    p = VisitorProtocol(hub, sink, None)
    hello = {"t": "hello", "v": 1, "token": token(hub), "resume": {"sid": sid, "last": 4}}
    p.on_frame(hello)
    assert sink.handed == (2, hello) and sink.sent == [] and p.state == p.CLOSED
    assert hub.stats["handoffs_out"] == 1 and len(hub.sessions) == 0
    # the owner cannot take it now: served here (a fresh session)
    sink2 = FakeSink()
    p2 = VisitorProtocol(hub, sink2, None)
    p2.on_frame(dict(hello))
    assert sink2.handed[0] == 2 and sink2.types()[0] == "welcome"
    assert sink2.sent[0]["resumed"] is False and sink2.sent[0]["sid"] != sid
    # an adopted connection (handed over already), our own index, an index
    # past the worker count, a bad token: never handed over
    for owner, adopted in ((2, True), (0, False), (7, False)):
        s3 = FakeSink()
        s3.accept_handoff = True
        p3 = VisitorProtocol(hub, s3, None)
        p3.adopted = adopted
        p3.on_frame({**hello, "resume": {"sid": new_sid(owner), "last": 0}})
        assert not hasattr(s3, "handed") and s3.types()[0] == "welcome"
    s4 = FakeSink()
    s4.accept_handoff = True
    with pytest.raises(ProtocolError):
        VisitorProtocol(hub, s4, None).on_frame({**hello, "token": "forged"})
    assert not hasattr(s4, "handed")
