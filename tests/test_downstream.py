"""Downstream forwarding end to end on loopback: a gateway worker linked over
HTTP/2 to desk-sim servers (in-process, real sockets)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import gateway.client as gc
from gateway.downstream.desk import DeskConfig
from gateway.downstream.desksim import DeskServer, serve_desk
from gateway.ops import names as metrics
from tests.gwserver import running


@asynccontextmanager
async def desk(
    port: int = 0, record: Path | None = None, ssl_context: Any = None, **cfg: Any
) -> AsyncIterator[tuple[int, DeskServer, trio.CancelScope]]:
    async with trio.open_nursery() as n:
        scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_desk(
                    DeskConfig(**cfg),
                    "127.0.0.1",
                    port,
                    str(record) if record else None,
                    task_status=task_status,
                    ssl_context=ssl_context,
                )

        bound, srv = await n.start(run)
        yield bound, srv, scope
        n.cancel_scope.cancel()


def ds(*groups: tuple[str, list[int]], **extra: Any) -> dict[str, Any]:
    """A [downstream] table: one cluster and group per (name, ports)."""
    table: dict[str, Any] = {
        "clusters": {g: {"endpoints": [f"127.0.0.1:{p}" for p in ports]} for g, ports in groups},
        "groups": {g: {"cluster": g} for g, _ in groups},
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
    }
    table.update(extra)
    return table


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_links_up(fw: Any, n: int = 1, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while sum(1 for ln in fw.links if ln.up) < n:
            await trio.sleep(0.02)


async def test_message_reaches_desk_is_acked_and_answered(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    async with desk(record=rec, think_ms=0) as (dport, srv, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [dport]))) as gw:
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("alice"), reconnect=False) as s:
                await s.send("hello desk")
                assigned = await s.receive()
                reply = await s.receive()
    assert (assigned.sender_kind, assigned.sender_name) == ("system", "assign")
    assert assigned.body == "general-agent-1 joined the conversation"
    assert reply.body == "general-agent-1: noted 'hello desk'"
    assert (reply.sender_kind, reply.sender_name) == ("agent", "general-agent-1")
    got = records(rec)
    assert [(r["n"], r["body"]) for r in got] == [(1, "hello desk")]
    assert srv.desk.stats["opens"] >= 1


async def test_erroring_endpoint_trips_its_breaker_and_messages_go_to_the_other(
    tmp_path: Path,
) -> None:
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with desk(record=rec_a, error_rate=1.0, reply=False) as (pa, _, _):  # noqa: SIM117
        async with desk(record=rec_b, reply=False) as (pb, _, _):
            table = ds(("general", [pa, pb]), breaker={"consecutive_failures": 3})
            async with running(tmp_path, downstream=table) as gw:
                fw = gw.w.forwarder
                await wait_links_up(fw, 2)
                sent = []
                # 20 sessions: P2C puts about half of them on A first
                for v in range(20):
                    async with gc.connect(gw.url, token=gw.token(f"v{v}"), reconnect=False) as s:
                        for i in range(2):
                            await s.send(f"v{v} m{i}")
                            sent.append(f"v{v} m{i}")
                ep_a = fw.clusters["general"].eps[f"127.0.0.1:{pa}"].endpoint
                assert ep_a.breaker.state(trio.current_time()) != 0  # open or half-open
                assert ep_a.breaker.trips >= 1
                await trio.sleep(0.25)  # a forwarder tick sees the change
                opened = metrics.BREAKER_TRANSITIONS.labels("general", f"127.0.0.1:{pa}", "open")
                assert opened.value() >= 1
                closed_b = metrics.BREAKER_TRANSITIONS.labels("general", f"127.0.0.1:{pb}", "open")
                assert closed_b.value() == 0
                assert gw.stats["downstream_nacks"] >= 3
    assert records(rec_a) == []
    assert sorted(r["body"] for r in records(rec_b)) == sorted(sent)


async def test_stalled_endpoint_times_out_and_is_redelivered(tmp_path: Path) -> None:
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with trio.socket.socket() as probe:  # B's port, started later
        await probe.bind(("127.0.0.1", 0))
        pb = probe.getsockname()[1]
    # A answers one message, then stalls (connection up, nothing answered)
    async with desk(record=rec_a, stall_after=1, reply=False) as (pa, _, _):
        table = ds(("general", [pa, pb]), request_timeout_s=0.3)
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw, 1)
            async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                await s.send("first")  # only A is up: A takes it
                async with desk(port=pb, record=rec_b, reply=False):
                    await wait_links_up(fw, 2)
                    with trio.fail_after(10):
                        await s.send("second")  # to A (sticky), times out, then B
            assert gw.stats["downstream_timeouts"] >= 1
    assert [r["body"] for r in records(rec_a)] == ["first"]
    assert [r["body"] for r in records(rec_b)] == ["second"]


async def test_down_at_start_refuses_new_sessions_then_serves_when_up(tmp_path: Path) -> None:
    from tests.gwserver import RawWs

    with trio.socket.socket() as probe:  # a free port for the desk started later
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
        ws = await RawWs.connect(gw.port)
        err = await ws.hello(gw.token("v"))
        assert err["t"] == "error" and err["code"] == 4003
        assert 2000 <= err["retry_after"] <= 4000 * 4
        async with desk(port=port, reply=False):
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                await s.send("now it works")


async def test_connected_session_is_buffered_while_its_only_endpoint_restarts(
    tmp_path: Path,
) -> None:
    rec = tmp_path / "rec.jsonl"
    async with desk(record=rec, reply=False) as (port, _, scope):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            ack_hist = metrics.MESSAGE_ACK.labels()
            ds_hist = metrics.DOWNSTREAM_LATENCY.labels("general")
            async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                await s.send("before")
                ack0, ds0 = ack_hist.sum, ds_hist.sum
                scope.cancel()  # the only desk goes away
                with trio.fail_after(5):
                    while any(ln.up for ln in fw.links):
                        await trio.sleep(0.02)
                acked = trio.Event()

                async def send_during_outage() -> None:
                    await s.send("during")
                    acked.set()

                async with trio.open_nursery() as n:
                    n.start_soon(send_during_outage)
                    await trio.sleep(0.5)
                    assert not acked.is_set()  # not acked while nothing took it
                    async with desk(port=port, record=rec, reply=False):
                        with trio.fail_after(10):
                            await acked.wait()
            # the ack latency counts the wait for an endpoint (>= 0.5 s
            # here); the downstream latency only the time since the send
            assert ack_hist.sum - ack0 >= 0.5
            assert ds_hist.sum - ds0 < 0.5
    assert [r["body"] for r in records(rec)] == ["before", "during"]


async def test_visitor_rate_limit_answers_4029_and_keeps_the_connection(tmp_path: Path) -> None:
    from tests.gwserver import RawWs

    async with desk(reply=False) as (port, _, _):  # noqa: SIM117
        async with running(
            tmp_path,
            downstream=ds(("general", [port])),
            visitor_msg_rate=1.0,
            visitor_msg_burst=3,
        ) as gw:
            await wait_links_up(gw.w.forwarder)
            ws = await RawWs.connect(gw.port)
            assert (await ws.hello(gw.token("v")))["t"] == "welcome"
            for i in range(5):
                await ws.send({"t": "msg", "id": i, "body": f"m{i}"})
            acks, errors = [], []
            while len(acks) + len(errors) < 5:
                f = await ws.recv()
                if f["t"] == "ack":
                    acks.append(f["id"])
                elif f["t"] == "error":
                    errors.append(f)
            assert sorted(acks) == [0, 1, 2]
            assert [(e["code"], e["id"]) for e in errors] == [(4029, 3), (4029, 4)]
            assert all(e["retry_after"] > 0 for e in errors)
            await ws.send({"t": "ping", "ts": 7})  # the connection is still up
            assert (await ws.recv())["t"] == "pong"
            assert gw.stats["rate_limited_msg_visitor"] == 2


async def test_bot_first_triage_hands_over_and_keywords_reroute(tmp_path: Path) -> None:
    rec_bot, rec_desk = tmp_path / "bot.jsonl", tmp_path / "desk.jsonl"
    async with desk(record=rec_bot, think_ms=0) as (pbot, _, _):  # noqa: SIM117
        async with desk(record=rec_desk, think_ms=0) as (pdesk, _, _):
            table = ds(("triage", [pbot]), ("general", [pdesk]), ("billing", [pdesk]))
            table["groups"]["general"]["bot"] = "triage"
            table["default_group"] = "general"
            table["rules"] = [{"group": "billing", "keywords": ["refund"]}]
            async with running(tmp_path, downstream=table) as gw:
                await wait_links_up(gw.w.forwarder, 2)
                async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                    await s.send("hi")
                    assert (await s.receive()).body == "Bot: you said 'hi'"
                    await s.send("can I talk to a human please")
                    texts = [(await s.receive()).body for _ in range(2)]
                    assert texts == [
                        "Connecting you to a person...",
                        "general-agent-1 joined the conversation",
                    ]
                    await s.send("my order is late")
                    assert (await s.receive()).body == "general-agent-1: noted 'my order is late'"
                    await s.send("I want a refund")  # keyword rule: billing group
                    texts = [(await s.receive()).body for _ in range(2)]
                    assert texts == [
                        "billing-agent-1 joined the conversation",
                        "billing-agent-1: noted 'I want a refund'",
                    ]
                assert gw.stats["handovers"] == 1
    assert [r["body"] for r in records(rec_bot)] == ["hi", "can I talk to a human please"]
    assert [r["body"] for r in records(rec_desk)] == ["my order is late", "I want a refund"]


async def test_returning_visitor_gets_the_same_agent_back(tmp_path: Path) -> None:
    async with desk(think_ms=0, agents=3) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            await wait_links_up(gw.w.forwarder)
            agents = []
            # v0 and v1 take agents 1 and 2; v0 comes back in a new session
            for v in ("v0", "v1", "v0"):
                async with gc.connect(gw.url, token=gw.token(v), reconnect=False) as s:
                    await s.send("hello")
                    joined = await s.receive()
                    agents.append(joined.body.split()[0])
    assert agents[0] != agents[1]
    assert agents[2] == agents[0]


def _served_at(recs: dict[str, Path]) -> dict[str, dict[str, str]]:
    """visitor -> {round: desk name} from messages recorded as "VISITOR ROUND"."""
    where: dict[str, dict[str, str]] = {}
    for name, path in recs.items():
        for r in records(path):
            v, rnd = r["body"].split()
            where.setdefault(v, {})[rnd] = name
    return where


@pytest.mark.parametrize("bot_first", [False, True], ids=["direct", "bot-first"])
async def test_returning_visitor_goes_back_to_the_endpoint_that_served_it(
    tmp_path: Path, bot_first: bool
) -> None:
    """A returning visitor's new session is opened on the endpoint that
    served its last one, not on whichever the balancer would pick; with
    bot-first triage, on the humans' endpoint once the bot hands over (the
    bot's endpoint does not take its place)."""
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"

    async def chat(gw: Any, visitors: list[str], rnd: str) -> None:
        for v in visitors:
            async with gc.connect(gw.url, token=gw.token(v), reconnect=False) as s:
                if bot_first:
                    await s.send("a human please")
                    assert (await s.receive()).body.startswith("Connecting")
                await s.send(f"{v} {rnd}")
                while (await s.receive()).sender_name != "assign":
                    pass

    visitors = [f"v{i}" for i in range(16)]
    async with desk(record=rec_a, think_ms=0) as (pa, _, scope_a):  # noqa: SIM117
        async with desk(record=rec_b, think_ms=0) as (pb, _, _):
            async with desk(think_ms=0) as (pbot, _, _):
                table = ds(("general", [pa, pb]), ("triage", [pbot]))
                table["default_group"] = "general"
                if bot_first:
                    table["groups"]["general"]["bot"] = "triage"
                async with running(tmp_path, downstream=table) as gw:
                    fw = gw.w.forwarder
                    await wait_links_up(fw, 3)
                    await chat(gw, visitors, "first")
                    await chat(gw, visitors, "again")
                    assert gw.stats["sticky_routes_kept"] == 16
                    assert gw.stats["sticky_routes_moved"] == 0
                    # desk A goes away: its visitors come back to B, counted as moved
                    on_a = list(_served_at({"A": rec_a}))
                    scope_a.cancel()
                    with trio.fail_after(10):
                        while sum(1 for ln in fw.links if ln.up) > 2:
                            await trio.sleep(0.02)
                    await chat(gw, on_a, "third")
                    assert gw.stats["sticky_routes_moved"] == len(on_a)
    where = _served_at({"A": rec_a, "B": rec_b})
    assert len(where) == 16
    # both endpoints served first sessions (else the test shows nothing)
    assert {w["first"] for w in where.values()} == {"A", "B"}, where
    assert all(w["again"] == w["first"] for w in where.values()), where
    assert all(where[v]["third"] == "B" for v in on_a), where


async def test_sticky_ticket_takes_a_returning_visitor_back_from_another_node(
    tmp_path: Path,
) -> None:
    """Two gateway nodes share desks A and B (and the tenants' secrets).
    Each visitor is served on node 1 and gets a sticky ticket with its
    agent's assignment; its next session, on node 2 (which never saw it),
    presents the ticket and goes to the same desk. A ticket altered, or
    another visitor's, is refused and counted, and the session is served
    as any new one."""
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with desk(record=rec_a, think_ms=0) as (pa, _, _):  # noqa: SIM117
        async with desk(record=rec_b, think_ms=0) as (pb, _, _):
            table = ds(("general", [pa, pb]))
            async with running(tmp_path, downstream=table, node_id=1) as g1:  # noqa: SIM117
                async with running(tmp_path, downstream=table, node_id=2) as g2:
                    await wait_links_up(g1.w.forwarder, 2)
                    await wait_links_up(g2.w.forwarder, 2)
                    held: dict[str, str] = {}
                    for v in range(16):
                        tok = g1.token(f"v{v}")
                        async with gc.connect(g1.url, token=tok, reconnect=False) as s:
                            await s.send(f"v{v} first")
                            assert (await s.receive()).sender_name == "assign"
                            assert s.sticky is not None  # came before the assignment
                            held[f"v{v}"] = s.sticky
                    for v in range(16):
                        tok = g2.token(f"v{v}")
                        sticky = held[f"v{v}"]
                        async with gc.connect(
                            g2.url, token=tok, reconnect=False, sticky=sticky
                        ) as s:
                            await s.send(f"v{v} again")
                            assert (await s.receive()).sender_name == "assign"
                    assert g1.stats["sticky_tickets_issued"] == 16
                    assert g2.stats["sticky_tickets_used"] == 16
                    assert g2.stats["sticky_routes_kept"] == 16
                    # altered, and another visitor's: refused, still served
                    bad = held["v0"][:-2] + ("AA" if not held["v0"].endswith("AA") else "BB")
                    for visitor, ticket in (("x1", bad), ("x2", held["v1"])):
                        tok = g2.token(visitor)
                        async with gc.connect(
                            g2.url, token=tok, reconnect=False, sticky=ticket
                        ) as s:
                            assert await s.send(f"{visitor} refused") == 1
                    assert g2.stats["sticky_tickets_refused"] == 2
    where = _served_at({"A": rec_a, "B": rec_b})
    visitors = {v: w for v, w in where.items() if v.startswith("v")}
    assert len(visitors) == 16 and {"x1", "x2"} <= where.keys()
    assert {w["first"] for w in visitors.values()} == {"A", "B"}, where
    assert all(w["again"] == w["first"] for w in visitors.values()), where


async def test_no_sticky_tickets_when_the_state_directory_is_unusable(tmp_path: Path) -> None:
    """The tickets' keyring needs the state directory (its nonce field):
    when it cannot be used, the worker says so once, issues no ticket, and
    serves every session as before."""
    (tmp_path / "a-file").write_text("")
    async with desk(think_ms=0) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            gw.w.forwarder.state_dir = str(tmp_path / "a-file" / "state")
            await wait_links_up(gw.w.forwarder)
            for v in ("v0", "v1"):
                async with gc.connect(gw.url, token=gw.token(v), reconnect=False) as s:
                    await s.send("hello")
                    assert (await s.receive()).sender_name == "assign"
                    assert s.sticky is None
            assert gw.stats["sticky_tickets_off"] == 1
            assert gw.stats["sticky_tickets_issued"] == 0


async def test_burst_of_sessions_fills_large_link_writes(tmp_path: Path) -> None:
    # 150 opens + messages in one burst: the link writes more than one
    # 16 KiB DATA frame at once (once broke the desk's frame-size check)
    async with desk(think_ms=0) as (port, srv, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            await wait_links_up(gw.w.forwarder)
            acked = []

            async def one(i: int) -> None:
                async with gc.connect(gw.url, token=gw.token(f"v{i}"), reconnect=False) as s:
                    with trio.fail_after(20):
                        await s.send("x" * 200)
                    acked.append(i)

            async with trio.open_nursery() as n:
                for i in range(150):
                    n.start_soon(one, i)
            assert len(acked) == 150
            assert srv.desk.stats["opens"] == 150 and srv.desk.stats["msgs"] == 150
            assert not any(ln.state == 0 for ln in gw.w.forwarder.links)  # never dropped


async def test_flapping_endpoint_loses_and_refuses_nothing(tmp_path: Path) -> None:
    """A goes up and down four times while visitors arrive and keep
    sending; B stays up. Every message is acknowledged (none refused), and every
    acknowledged message reached A or B."""
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        pa = probe.getsockname()[1]
    async with desk(record=rec_b, reply=False) as (pb, _, _):
        table = ds(("general", [pa, pb]), request_timeout_s=1.0)
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw, 1)
            acked: list[str] = []
            a_up_cycles = 0

            async def visitor(v: int) -> None:
                # sessions open all through the flaps (they are sticky): some
                # while A is up, however slow the machine makes A's cycles
                await trio.sleep(v * 0.17)
                async with gc.connect(gw.url, token=gw.token(f"f{v}"), reconnect=False) as s:
                    for i in range(20):
                        await s.send(f"f{v} m{i}")
                        acked.append(f"f{v} m{i}")
                        await trio.sleep(0.03)

            async def flap() -> None:
                nonlocal a_up_cycles
                for _ in range(4):
                    async with desk(port=pa, record=rec_a, reply=False):
                        with trio.move_on_after(1.0):
                            await wait_links_up(fw, 2)
                            a_up_cycles += 1
                        await trio.sleep(0.3)
                    await trio.sleep(0.3)

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    n.start_soon(flap)
                    for v in range(16):
                        n.start_soon(visitor, v)
            assert gw.stats["downstream_nacks"] == 0
    assert len(acked) == 16 * 20  # send() raises on a refusal: none happened
    got_a = {r["body"] for r in records(rec_a)}
    got_b = {r["body"] for r in records(rec_b)}
    assert set(acked) <= got_a | got_b
    assert a_up_cycles >= 2 and got_a  # A really was in rotation between flaps


async def test_endpoint_that_never_answers_the_link_setup(tmp_path: Path) -> None:
    """A downstream that accepts TCP and never sends response headers (an
    overloaded or wedged process): the link gives up after its setup timeout
    and retries; the worker keeps serving through the other endpoint."""
    held: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, mute, 0)
        pm = listeners[0].socket.getsockname()[1]
        rec = tmp_path / "b.jsonl"
        async with desk(record=rec, reply=False) as (pb, _, _):  # noqa: SIM117
            async with running(tmp_path, downstream=ds(("general", [pm, pb]))) as gw:
                fw = gw.w.forwarder
                await wait_links_up(fw, 1)
                await trio.sleep(2.5)  # past the 2 s link setup timeout
                assert len(held) >= 1
                async with gc.connect(gw.url, token=gw.token("m"), reconnect=False) as s:
                    await s.send("still served")
                assert [r["body"] for r in records(rec)] == ["still served"]
        n.cancel_scope.cancel()


class _Owner:
    reactor = None

    def __init__(self) -> None:
        self.deferred = True
        self.drained = 0

    def link_up(self, link: Any) -> None:
        pass

    def link_down(self, link: Any, why: str) -> None:
        pass

    def link_connect_failed(self, link: Any, why: str) -> None:
        pass

    def link_draining(self, link: Any) -> None:
        pass

    def link_frames(self, link: Any, frames: list[dict[str, Any]]) -> None:
        pass

    def link_drained(self, link: Any) -> None:
        self.drained += 1

    def link_dirty(self, link: Any) -> bool:
        return self.deferred


async def test_link_frames_queued_in_a_reactor_batch_go_out_in_one_direct_write() -> None:
    """While the worker's reactor handles a batch, frames queued on a link
    wait (the writer task is not woken) and flush_now writes them with one
    non-blocking send; outside a batch, or while the writer is sending, the
    writer task gets them."""
    from gateway.downstream.link import UP, Link, LinkCore
    from gateway.downstream.proto import encode

    a_std, b = socket.socketpair()
    b.setblocking(False)
    a = trio.socket.from_stdlib_socket(a_std)
    owner = _Owner()
    link = Link(owner, None, "127.0.0.1", 1, 0, [])
    core = LinkCore()
    core.start("127.0.0.1:1", [])
    link.core, link.state = core, UP
    link._stream = trio.SocketStream(a)
    link._fd = a.fileno()
    core.flush()  # the preface and headers: not what this test is about
    link.send(encode({"t": "close", "sid": "s1", "reason": "ended"}))
    assert not link._wake.is_set() and core.backlog > 0
    with pytest.raises(BlockingIOError):
        b.recv(65536)  # nothing written yet
    link.flush_now()
    got = b.recv(65536)
    assert b"s1" in got and core.backlog == 0 and not link._wake.is_set()
    owner.deferred = False  # outside a batch: the writer task is woken
    link.send(encode({"t": "close", "sid": "s2", "reason": "ended"}))
    assert link._wake.is_set()
    link._wake = trio.Event()
    owner.deferred = True
    link._busy = True  # the writer is in a send: it gets the frames
    link.send(encode({"t": "close", "sid": "s3", "reason": "ended"}))
    link.flush_now()
    assert link._wake.is_set() and core.backlog > 0
    a.close()
    b.close()


async def answered(gw: Any, visitor: str, body: str) -> None:
    """``visitor`` sends ``body`` and gets desk-sim's reply to it."""
    async with gc.connect(gw.url, token=gw.token(visitor), reconnect=False) as s:
        await s.send(body)
        with trio.fail_after(5):
            while f"noted {body!r}" not in str((await s.receive()).body):
                pass


async def test_plain_link_is_read_by_the_reactor_and_leaves_it_when_it_goes_down(
    tmp_path: Path,
) -> None:
    """An h2c link has no reader task: the worker's reactor reads it. When
    the endpoint goes away its descriptor leaves the reactor before it is
    closed (a reused descriptor number would otherwise never be read), and
    the reconnected link is read by the reactor again."""
    async with desk(think_ms=0) as (port, _, scope):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            fw, reactor = gw.w.forwarder, gw.w.reactor
            await wait_links_up(fw)
            (link,) = fw.links
            fd = link._stream.socket.fileno()
            assert reactor.handlers[fd] is link._watch is not None
            await answered(gw, "v", "one")
            watch = link._watch
            scope.cancel()
            with trio.fail_after(5):
                while link.up:
                    await trio.sleep(0.02)
            assert link._watch is None
            assert watch not in reactor.handlers.values()
            async with desk(port=port, think_ms=0):
                await wait_links_up(fw)
                fd = link._stream.socket.fileno()
                assert reactor.handlers[fd] is link._watch is not watch
                await answered(gw, "w", "two")


async def _raw_link(port: int) -> tuple[trio.SocketStream, Any]:
    """A gateway-side link to desk-sim driven by hand (LinkCore over a
    plain socket): the test decides when to read and how to hang up."""
    from gateway.downstream.link import LinkCore

    sock = await trio.open_tcp_stream("127.0.0.1", port)
    core = LinkCore()
    core.start(f"127.0.0.1:{port}", [])
    await sock.send_all(core.flush())
    with trio.fail_after(5):
        while core.status is None:
            core.receive(await sock.receive_some(1 << 16))
            await sock.send_all(core.flush())
    return sock, core


def _open(sid: str) -> bytes:
    from gateway.downstream.proto import encode

    return encode(
        {"t": "open", "sid": sid, "tenant": "t", "visitor": sid, "tags": {},
         "group": "general", "stage": "human", "agent": None}
    )  # fmt: skip


async def test_desk_sim_outlives_a_gateway_connection_reset_while_it_writes() -> None:
    """A gateway that announces sessions, reads none of the answers and
    then resets its connection (a worker killed, a link dropped by its
    health check) ends that connection only: desk-sim goes on serving the
    others and accepts new ones."""
    async with desk(think_ms=0) as (port, srv, _):
        for round_ in range(2):
            sock, core = await _raw_link(port)
            for i in range(4000):  # an assignment comes back for each
                core.queue(_open(f"r{round_}-{i}"))
            with trio.move_on_after(1):  # until the windows or buffers fill
                while core.backlog:
                    await sock.send_all(core.flush())
                    await trio.sleep(0)
            await trio.sleep(0.2)  # desk-sim is now blocked writing to us
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            await sock.aclose()  # RST: desk-sim's send fails
            with trio.fail_after(5):
                while srv.conns:
                    await trio.sleep(0.02)
        sock, core = await _raw_link(port)  # still serving
        core.queue(_open("after"))
        await sock.send_all(core.flush())
        got: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while not any(f.get("sid") == "after" for f in got):
                got += core.receive(await sock.receive_some(1 << 16))
                await sock.send_all(core.flush())
        await sock.aclose()


async def _ack_of(ws: Any, msg_id: str, seen: list[str] | None = None) -> dict[str, Any]:
    """The next ``ack``; the bodies of deliveries before it (an agent
    joining) go to ``seen`` (the sticky ticket that comes with an
    assignment is skipped)."""
    while True:
        f = await ws.recv()
        if f.get("t") == "sticky":
            continue
        if f.get("t") != "deliver":
            assert (f.get("t"), f.get("id")) == ("ack", msg_id), f
            return f  # type: ignore[no-any-return]
        if seen is not None:
            seen.append(f["body"])


def _overflow_table(pd: int, pb: int, **admission: Any) -> dict[str, Any]:
    """general (cluster desks, on pd) overflows to triage (cluster bots, on pb)."""
    return {
        "clusters": {
            "desks": {"endpoints": [f"127.0.0.1:{pd}"]},
            "bots": {"endpoints": [f"127.0.0.1:{pb}"]},
        },
        "groups": {
            "general": {"cluster": "desks", "fallback": "triage"},
            "triage": {"cluster": "bots"},
        },
        "default_group": "general",
        "admission": admission,
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
    }


async def test_unavailable_group_overflows_new_sessions_to_its_fallback(tmp_path: Path) -> None:
    """The desks' only endpoint is down: a new visitor is not told to retry
    later but served by the fallback group's cluster."""
    from tests.gwserver import RawWs

    with trio.socket.socket() as probe:  # a port nothing listens on
        await probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    rec = tmp_path / "bots.jsonl"
    async with desk(record=rec, reply=False) as (pb, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=_overflow_table(dead, pb)) as gw:
            await wait_links_up(gw.w.forwarder, 1)
            ws = await RawWs.connect(gw.port)
            assert (await ws.hello(gw.token("u")))["t"] == "welcome"
            await ws.send({"t": "msg", "id": "u1", "body": "desks are down"})
            seen: list[str] = []
            await _ack_of(ws, "u1", seen)
            if not seen:
                seen.append((await ws.recv())["body"])
            # opened on the fallback's cluster as a session of the fallback group
            assert seen == ["triage-agent-1 joined the conversation"]
    assert [r["body"] for r in records(rec)] == ["desks are down"]


async def test_saturated_group_overflows_new_sessions_to_its_fallback(tmp_path: Path) -> None:
    """The desks' cluster is at max_pending_per_cluster (its desk stopped
    answering with two messages in flight): a visitor arriving now is served
    by the fallback group, while the sessions already on the desks stay
    there (their messages wait for the desk)."""
    from tests.gwserver import RawWs

    rec_d, rec_b = tmp_path / "desks.jsonl", tmp_path / "bots.jsonl"
    async with (
        desk(record=rec_d, reply=False, stall_after=1) as (pd, _, _),
        desk(record=rec_b, reply=False) as (pb, _, _),
        running(tmp_path, downstream=_overflow_table(pd, pb, max_pending_per_cluster=2)) as gw,
    ):
        fw = gw.w.forwarder
        await wait_links_up(fw, 2)
        a, b = await RawWs.connect(gw.port), await RawWs.connect(gw.port)
        assert (await a.hello(gw.token("a")))["t"] == "welcome"
        assert (await b.hello(gw.token("b")))["t"] == "welcome"
        await a.send({"t": "msg", "id": "a1", "body": "a1"})
        await _ack_of(a, "a1")  # the desk's last answer
        await a.send({"t": "msg", "id": "a2", "body": "a2"})
        await b.send({"t": "msg", "id": "b1", "body": "b1"})
        with trio.fail_after(5):
            while fw.clusters["desks"].inflight < 2:
                await trio.sleep(0.02)
        with trio.fail_after(5):
            async with gc.connect(gw.url, token=gw.token("c"), reconnect=False) as s:
                assert await s.send("desks are full") == 1
        await b.send({"t": "msg", "id": "b2", "body": "b2"})
        await trio.sleep(0.2)
        # a and b stay on the desks, their messages in flight or waiting there
        flows = {s.visitor: s.ds for s in gw.w.hub.sessions}
        for v, n in (("a", 1), ("b", 2)):
            assert flows[v].cluster.name == "desks" and flows[v].group == "general"
            assert len(flows[v].sent) + len(flows[v].waiting) == n
        assert flows["c"].cluster.name == "bots" and flows["c"].group == "triage"
    assert [r["body"] for r in records(rec_b)] == ["desks are full"]
    assert [r["body"] for r in records(rec_d)] == ["a1"]  # then it stalled


async def test_desk_draining_with_goaway_loses_and_duplicates_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A desk shutting down gracefully (desk-sim's SIGTERM: a GOAWAY that
    keeps the link stream) while visitors are sending: the gateway sends it
    nothing new, waits for the answers to what it has in flight there (its
    acks come 100 ms late), then closes the link. Every message is
    acknowledged and processed by exactly one desk; nothing is redelivered."""
    import logging

    caplog.set_level(logging.INFO)
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sent: list[str] = []
    async with (
        desk(record=rec_a, reply=False, latency_ms=100) as (pa, srv_a, _),
        desk(record=rec_b, reply=False) as (pb, _, _),
        running(tmp_path, downstream=ds(("general", [pa, pb]))) as gw,
    ):
        fw = gw.w.forwarder
        await wait_links_up(fw, 2)
        redelivered = metrics.DOWNSTREAM_REDELIVERED.labels("general").value()

        connected = 0
        go = trio.Event()

        async def visitor(i: int) -> None:
            nonlocal connected
            async with gc.connect(gw.url, token=gw.token(f"v{i}"), reconnect=False) as s:
                connected += 1
                await go.wait()
                for k in range(15):
                    body = f"v{i}#{k}"
                    with trio.fail_after(10):
                        await s.send(body)
                    sent.append(body)

        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(visitor, i)
            # every session opened (placed on an endpoint) before the
            # balancer has seen A's 100 ms acks, so some of them are on A
            with trio.fail_after(10):
                while connected < 12:
                    await trio.sleep(0.005)
            on_a = sum(
                1
                for s in gw.w.hub.sessions
                if s.ds.ep is not None and s.ds.ep.key == fw.links[0].key
            )
            assert on_a >= 1, "no session on desk A"
            go.set()
            with trio.fail_after(10):
                while fw.links[0].inflight < min(2, on_a):  # A has messages in flight
                    await trio.sleep(0.005)
            srv_a.drain()
            with trio.fail_after(10):
                await srv_a.all_closed.wait()
        assert metrics.DOWNSTREAM_REDELIVERED.labels("general").value() == redelivered
    a = [r["body"] for r in records(rec_a)]
    b = [r["body"] for r in records(rec_b)]
    assert len(sent) == 12 * 15
    assert sorted(a + b) == sorted(sent)  # each message at exactly one desk
    assert a and b
    lines = [r.getMessage() for r in caplog.records]
    assert any("downstream_link_draining" in m and str(pa) in m for m in lines)
    assert any("downstream_link_down" in m and "drained after" in m for m in lines), lines


async def test_stopping_worker_logs_its_links_down_as_routine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker stopping takes its links down with it: logged at info as
    such, not as a downstream failure (a warning on every restart would
    teach operators to ignore the real ones)."""
    import logging

    caplog.set_level(logging.INFO)
    async with desk(reply=False) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            await wait_links_up(gw.w.forwarder)
    downs = [r for r in caplog.records if "downstream_link_down" in r.getMessage()]
    assert downs and all(r.levelno == logging.INFO for r in downs)
    assert all("the worker is stopping" in r.getMessage() for r in downs)


async def test_endpoint_latency_and_outstanding_are_exported(tmp_path: Path) -> None:
    """The balancer's view of each endpoint (its moving average of the
    answer time, the messages outstanding) is on /metrics: a desk that acks
    after 60 ms shows about that."""
    async with desk(reply=False, latency_ms=60) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [port]))) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            async with gc.connect(gw.url, token=gw.token("lat"), reconnect=False) as s:
                for i in range(5):
                    await s.send(f"m{i}")
            await trio.sleep(0.3)  # a forwarder tick
            key = fw.links[0].key
            lat = metrics.DOWNSTREAM_ENDPOINT_LATENCY.labels("general", key).value()
            out = metrics.DOWNSTREAM_ENDPOINT_OUTSTANDING.labels("general", key).value()
    assert 0.05 <= lat <= 0.5
    assert out == 0


async def test_desk_sim_ignores_a_link_request_reset_with_itself(tmp_path: Path) -> None:
    """A link request and its reset in one read: desk-sim does not answer it
    (h2 refuses to send on the closed stream; that used to end the whole
    connection as "an HTTP/2 error from a gateway"), and the next link on
    the same connection is served."""
    import struct

    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import msgpack

    head = [(":method", "POST"), (":path", "/v1/link"), (":scheme", "http"), (":authority", "d")]
    async with desk(think_ms=0) as (port, srv, _):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.send_headers(1, head)
        c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        c.send_headers(3, head)
        frames = [{"t": "open", "sid": "s1", "tenant": "t", "visitor": "v", "tags": {},
                   "group": "general", "stage": "human", "agent": None},
                  {"t": "msg", "sid": "s1", "n": 1, "id": 1, "body": "hi",
                   "group": "general", "stage": "human"}]  # fmt: skip
        for f in frames:
            b = msgpack.packb(f)
            c.send_data(3, struct.pack(">I", len(b)) + b)
        await s.send_all(c.data_to_send())
        got = b""
        statuses: dict[int, bytes] = {}
        with trio.fail_after(5):
            while b"acks" not in got:  # desk-sim's batched ack frame
                data = await s.receive_some(65536)
                assert data, "desk-sim closed the connection"
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        statuses[ev.stream_id] = dict(ev.headers)[b":status"]
                    elif isinstance(ev, h2.events.DataReceived):
                        got += ev.data
                        c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    assert not isinstance(ev, h2.events.ConnectionTerminated)
                await s.send_all(c.data_to_send())
        assert statuses == {3: b"200"}
        assert srv.desk.stats["acks"] == 1
        await s.aclose()
