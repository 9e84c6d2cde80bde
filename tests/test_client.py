"""gateway.client: the sans-IO core, then the SDK against a real worker."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import gateway.client as gc
from gateway.client import ClientCore, GatewayError, backoff_delay
from tests.gwserver import running
from tests.test_server_process import free_port


def welcome(sid: str = "s1", resumed: bool = False, **kw: object) -> dict[str, object]:
    return {"t": "welcome", "sid": sid, "hb": 25000, "resumed": resumed, "resync": False,
            "first": 1, "limits": {"window": 4}, **kw}  # fmt: skip


def deliver(seq: int, body: str = "b") -> dict[str, object]:
    return {"t": "deliver", "seq": seq, "body": body, "from": {"kind": "bot", "name": "x"}, "ts": 1}


def test_core_resends_pending_after_welcome_and_skips_seen_deliveries() -> None:
    c = ClientCore("tok", ack_every=2)
    assert "resume" not in c.hello()
    assert c.on_frame(welcome()) == []
    assert c.window == 4
    i1, _ = c.new_message("one")
    i2, _ = c.new_message("two")
    c.on_frame({"t": "ack", "id": i1, "n": 1, "dup": False})
    assert c.results == {i1: 1} and list(c.pending) == [i2]
    assert c.on_frame(deliver(1)) == []
    assert c.on_frame(deliver(2)) == [{"t": "ack", "seq": 2}]
    c.lost()
    assert c.hello()["resume"] == {"sid": "s1", "last": 2}
    out = c.on_frame(welcome(resumed=True))
    assert out == [{"t": "msg", "id": i2, "body": "two"}]  # same id again
    c.on_frame(deliver(2))  # replayed again: skipped
    c.on_frame(deliver(3))
    assert [d.seq for d in c.inbox] == [1, 2, 3]


def test_core_fresh_session_and_resync() -> None:
    c = ClientCore("tok")
    c.on_frame(welcome())
    c.on_frame(deliver(1))
    c.on_frame(welcome(sid="s2", resumed=False))
    assert c.last_seq == 0 and c.sid == "s2"
    c.on_frame(welcome(sid="s2", resumed=True, resync=True, first=40))
    assert c.resync and c.last_seq == 39


def test_core_error_classes() -> None:
    c = ClientCore("tok")
    c.on_frame({"t": "error", "code": 4003, "reason": "overloaded", "retry_after": 1500})
    assert c.terminal is None and c.reconnect_after == 1.5
    c.on_frame({"t": "goaway", "reason": "draining", "reconnect_after": 250})
    assert c.reconnect_after == 0.25
    c.on_frame({"t": "error", "code": 4409, "reason": "window", "id": 3})
    assert c.terminal is None
    c.on_frame({"t": "error", "code": 4501, "reason": "unauthorized"})
    assert isinstance(c.terminal, GatewayError) and c.terminal.code == 4501
    c2 = ClientCore("tok")
    c2.on_close(1009, "too big")
    assert c2.terminal is not None and c2.terminal.code == 1009
    c3 = ClientCore("tok")
    c3.on_close(4001, "heartbeat")
    assert c3.terminal is None


def test_backoff_full_jitter_is_bounded() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        d = backoff_delay(attempt, 0.2, 30.0, rng)
        assert 0.0 <= d <= min(30.0, 0.2 * 2**attempt)
    assert len({round(backoff_delay(5, 0.2, 30.0, rng), 6) for _ in range(20)}) > 10


def test_core_acks_stragglers_after_a_delay() -> None:
    c = ClientCore("tok", ack_every=8, ack_delay=0.2)
    c.on_frame(welcome(), now=10.0)
    c.last_rx = c.last_tx = 10.0
    assert c.on_frame(deliver(1), now=10.0) == []  # not yet: fewer than ack_every
    assert c.on_frame(deliver(2), now=10.1) == []
    assert c.next_tick(10.1) == pytest.approx(10.2)  # due 0.2 s after the first
    assert c.tick(10.15) == []
    assert c.tick(10.2) == [{"t": "ack", "seq": 2}]
    assert c.ack_due is None and c.tick(10.3) == []  # nothing new to ack
    c.on_frame(deliver(2), now=10.4)  # a replayed duplicate: already acked
    assert c.ack_due is None


def test_core_heartbeat_ping_and_dead_link() -> None:
    c = ClientCore("tok")
    assert c.tick(100.0) == []  # nothing before welcome
    c.on_frame(welcome(hb=1000), now=0.0)
    assert c.heartbeat_s == 1.0
    c.last_rx = c.last_tx = 0.0
    assert c.next_tick(0.0) == 1.0
    assert c.tick(0.5) == []
    assert c.tick(1.0) == [{"t": "ping", "ts": 1000}]
    assert not c.dead(6.9) and c.dead(7.1)  # 2 * hb + 5 s of silence
    assert c.on_frame({"t": "ping", "ts": 7}) == [{"t": "pong", "ts": 7}]
    c.lost()
    assert c.tick(50.0) == [] and c.next_tick(1.0) == 7.0  # closed: only the dead check


def test_core_retries_a_refused_message_with_the_same_id() -> None:
    c = ClientCore("tok")
    c.on_frame(welcome(), now=0.0)
    c.last_rx = c.last_tx = 0.0
    i, frame = c.new_message("x")
    out = c.on_frame(
        {"t": "error", "code": 4409, "reason": "window", "id": i, "retry_after": 100}, now=1.0
    )
    assert out == [] and c.terminal is None and c.retry == {i: pytest.approx(1.1)}
    assert c.next_tick(1.0) == pytest.approx(1.1)
    assert c.tick(1.05) == []
    assert c.tick(1.1) == [frame]
    c.on_frame({"t": "error", "code": 4029, "reason": "rate", "id": 999, "retry_after": 5})
    assert c.retry == {}  # not one of ours


def test_core_refresh_and_token_on_resume() -> None:
    c = ClientCore("old")
    c.on_frame(welcome(exp=100))
    assert c.exp == 100
    assert c.refresh("new") == {"t": "refresh", "token": "new"}
    c.on_frame({"t": "refreshed", "exp": 200})
    assert c.refreshed == 1 and c.exp == 200
    c.lost()
    assert c.hello()["token"] == "new"


def test_core_keeps_the_latest_sticky_ticket_for_every_hello() -> None:
    c = ClientCore("tok")
    assert "sticky" not in c.hello()
    c.on_frame({"t": "sticky", "ticket": "s1.a.b"})
    c.on_frame({"t": "sticky", "ticket": 7})  # not a ticket: ignored
    assert c.sticky == "s1.a.b" and c.hello()["sticky"] == "s1.a.b"
    c.on_frame({"t": "welcome", "sid": "s", "resumed": False})
    c.on_frame({"t": "sticky", "ticket": "s1.c.d"})
    h = c.hello()  # a resume carries it too (a new session if that one is gone)
    assert h["resume"]["sid"] == "s" and h["sticky"] == "s1.c.d"


def test_core_terminal_close_codes() -> None:
    for code in (1002, 1007, 1008, 4500, 4502, 4507):
        c = ClientCore("tok")
        c.on_close(code, "x")
        assert c.terminal is not None and c.terminal.code == code
    for code in (1000, 1001, 1005, 1006, 1011, 4002, 4005, 4499):
        c = ClientCore("tok")
        c.on_close(code, "x")
        assert c.terminal is None


async def test_send_receive_through_the_gateway(tmp_path: Path) -> None:
    async with running(tmp_path) as gw, gc.connect(gw.url, token=gw.token("sdk")) as s:
        assert s.session_id
        greet = await s.receive()
        assert greet.seq == 1 and greet.sender_kind == "bot"
        assert await s.send("hello") == 1
        reply = await s.receive()
        assert reply.body == "You said: hello" and reply.seq == 2
        assert await s.send(b"\x00bin") == 2
        assert (await s.receive()).body == b"\x00bin"


async def test_json_encoding(tmp_path: Path) -> None:
    async with (
        running(tmp_path) as gw,
        gc.connect(gw.url, token=gw.token("j"), encoding="json") as s,
    ):
        await s.receive()
        assert await s.send("hi") == 1
        assert (await s.receive()).body == "You said: hi"


async def test_reconnect_and_resume_lose_nothing(tmp_path: Path) -> None:
    async with (
        running(tmp_path, bot_think_ms=50) as gw,
        gc.connect(gw.url, token=gw.token("flaky"), max_backoff=0.2) as s,
    ):
        await s.receive()  # greeting
        got: list[str] = []
        sent = [f"m{i}" for i in range(30)]

        async def reader() -> None:
            while len(got) < len(sent):
                got.append(str((await s.receive()).body))

        async def breaker() -> None:
            for _ in range(3):  # cut the TCP connection under the client
                await trio.sleep(0.15)
                for c in list(gw.w.conns):
                    c.pipe.abort()

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(breaker)
            ns = [await s.send(b) for b in sent]
        assert ns == list(range(1, 31))  # every message acknowledged once, in order
        assert got == [f"You said: {b}" for b in sent]  # all replies, no duplicates
        assert s.connections >= 2
        assert gw.stats["sessions_resumed"] >= 1


async def test_terminal_error_raises(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        with pytest.raises(GatewayError) as e:
            async with gc.connect(gw.url, token="bad.token"):
                pass
        assert e.value.code == 4501


async def test_client_side_tcp_cut_resumes_without_loss(tmp_path: Path) -> None:
    async with (
        running(tmp_path, bot_think_ms=20) as gw,
        gc.connect(gw.url, token=gw.token("cut"), max_backoff=0.1) as s,
    ):
        sid = s.session_id
        await s.receive()  # greeting
        got: list[str] = []
        sent = [f"c{i}" for i in range(20)]

        async def reader() -> None:
            while len(got) < len(sent):
                got.append(str((await s.receive()).body))

        async def cutter() -> None:
            for _ in range(3):  # shut the client's own socket down under it
                await trio.sleep(0.1)
                stream = s._stream
                if isinstance(stream, trio.SocketStream):
                    stream.socket.shutdown(socket.SHUT_RDWR)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(cutter)
            ns = [await s.send(b) for b in sent]
        assert ns == list(range(1, 21))
        assert got == [f"You said: {b}" for b in sent]
        assert s.connections >= 2 and s.session_id == sid  # same session, resumed


async def test_deliveries_are_acked_without_waiting_for_more(tmp_path: Path) -> None:
    async with running(tmp_path) as gw, gc.connect(gw.url, token=gw.token("acks")) as s:
        await s.receive()
        await s.send("one")
        assert (await s.receive()).seq == 2
        session = gw.w.hub.sessions.get(s.session_id or "")
        assert session is not None
        with trio.fail_after(2):
            while session.replay:  # the client's delayed cumulative ack trims it
                await trio.sleep(0.02)
        assert s.core.acked_seq == 2


async def test_heartbeats_keep_an_idle_session_up(tmp_path: Path) -> None:
    async with (
        running(tmp_path, heartbeat_s=0.2) as gw,
        gc.connect(gw.url, token=gw.token("idle")) as s,
    ):
        assert s.core.heartbeat_s == pytest.approx(0.2)
        await s.receive()
        await trio.sleep(1.5)  # several heartbeat intervals, nothing to say
        assert s.connections == 1
        assert await s.send("still here") == 1


async def test_goaway_reconnects_after_the_delay_and_resumes(tmp_path: Path) -> None:
    async with running(tmp_path) as gw, gc.connect(gw.url, token=gw.token("ga")) as s:
        sid = s.session_id
        await s.receive()
        for c in list(gw.w.conns):
            c.goaway(50)
        with trio.fail_after(5):
            while s.connections < 2 or not s.core.open:
                await trio.sleep(0.02)
        assert s.session_id == sid and gw.stats["sessions_resumed"] >= 1
        assert await s.send("after") == 1
        d = await s.receive()
        assert d.seq == 2 and d.body == "You said: after"


async def test_refresh_and_a_rejected_refresh_is_terminal(tmp_path: Path) -> None:
    async with running(tmp_path) as gw, gc.connect(gw.url, token=gw.token("r")) as s:
        await s.refresh(gw.token("r", ttl=7200))
        assert s.core.refreshed == 1 and s.core.exp is not None
        with pytest.raises(GatewayError) as e:
            await s.refresh(gw.token("someone-else"))
        assert e.value.code == 4501
        with pytest.raises(GatewayError):
            await s.send("no")  # the session is over: every call raises


async def test_no_reconnect_raises_on_connection_loss(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        with pytest.raises(GatewayError) as e:
            async with gc.connect(gw.url, token=gw.token("nr"), reconnect=False) as s:
                await s.receive()
                for c in list(gw.w.conns):
                    c.pipe.abort()
                await s.receive()
        assert e.value.code == 1006


async def test_against_gateway_serve_process(tmp_path: Path) -> None:
    """The SDK against ``python -m gateway serve`` as users start it."""
    port = free_port()
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_BOT_THINK_MS="0")
    env["GATEWAY_OPS_LISTEN"] = ""
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--tenant", "demo", "--visitor", "proc"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        with trio.fail_after(20):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            async with gc.connect(url, token=token, encoding="json") as s:
                assert (await s.receive()).sender_kind == "bot"
                assert await s.send("over the process") == 1
                assert (await s.receive()).body == "You said: over the process"
            with pytest.raises(GatewayError) as e:
                async with gc.connect(url, token=token + "x"):
                    pass
            assert e.value.code == 4501
    finally:
        proc.terminate()
        proc.wait(15)
