"""`gateway serve` as users run it: supervisor + worker processes sharing the
port (SO_REUSEPORT), and the SIGTERM drain (goaway, then 1001, exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import DEMO_TENANT, load_config
from gateway.protocol.tokens import mint
from tests.gwserver import RawWs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def wait_workers_listening(proc: subprocess.Popen[bytes], n: int = 2) -> list[str]:
    """Reads ``proc``'s output until ``n`` workers logged ``listening``
    (the supervisor's banner comes before they bind); the lines read."""
    assert proc.stdout is not None
    lines: list[str] = []
    seen: set[str] = set()
    while len(seen) < n:
        raw = proc.stdout.readline()
        if not raw:
            raise AssertionError("gateway exited before its workers listened:\n" + "".join(lines))
        line = raw.decode(errors="replace")
        lines.append(line)
        if '"event":"listening"' in line:
            seen.add(json.loads(line[line.index("{") :])["component"])
    return lines


def serve_two_workers(
    state: Path, port: int, new_session: bool = False, args: tuple[str, ...] = (), **env: str
) -> subprocess.Popen[bytes]:
    """`gateway serve --workers 2` on ``port`` (no ops listener), output
    (stdout and stderr) on its stdout pipe."""
    e = dict(os.environ, GATEWAY_STATE_DIR=str(state), GATEWAY_OPS_LISTEN="", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--workers", "2", *args],
        env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=new_session,
    )  # fmt: skip


async def test_serve_two_workers_and_sigterm_drain(tmp_path: Path) -> None:
    port = free_port()
    proc = serve_two_workers(tmp_path, port, GATEWAY_DRAIN_S="3")
    head: list[str] = []
    try:
        with trio.fail_after(20):
            head = await trio.to_thread.run_sync(wait_workers_listening, proc)
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]
        clients = []
        for i in range(6):  # spread over both workers by the kernel
            c = await RawWs.connect(port)
            tok = mint(DEMO_TENANT, f"v{i}", t.secrets[t.primary_kid], 600, time.time())
            assert (await c.hello(tok))["t"] == "welcome"
            await c.send({"t": "msg", "id": 1, "body": "hi"})
            clients.append(c)
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            code, frames = await c.until_close(timeout=10)
            kinds = [f["t"] for f in frames]
            assert "goaway" in kinds
            ga = frames[kinds.index("goaway")]
            assert 0 <= ga["reconnect_after"] <= 1500
            assert code == 1001
        rc = await trio.to_thread.run_sync(proc.wait, 15)
        assert rc == 0, proc.stdout.read().decode() if proc.stdout else ""
        # nothing listens any more
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            listening = True
        except OSError:
            listening = False
        assert not listening
    finally:
        if proc.poll() is None:
            proc.kill()
        out = "".join(head) + (proc.stdout.read().decode() if proc.stdout else "")
        proc.wait()
    assert "2 worker(s) listening" in out
    # each worker drained with the configured 3 s (not the 10 s default:
    # the clients never close by themselves, so the drain lasts until its
    # deadline) and had no connection left when it ended
    events = [json.loads(ln[ln.index("{") :]) for ln in out.splitlines() if '"event":"drain' in ln]
    events = [e for e in events if e["component"] != "supervisor"]
    draining = [e for e in events if e["event"] == "draining"]
    drained = [e for e in events if e["event"] == "drained"]
    assert sorted(e["component"] for e in draining) == ["worker-0", "worker-1"], out
    assert all(e["drain_s"] == 3.0 for e in draining), draining
    assert sum(e["connections"] for e in draining) == 6, draining
    assert len(drained) == 2 and all(e["left"] == 0 for e in drained), drained


async def test_sigterm_to_the_whole_process_group(tmp_path: Path) -> None:
    """Ctrl-C or `kill -TERM -PGID` reaches the supervisor and every worker,
    and each worker gets a second SIGTERM forwarded by the supervisor: the
    drain still ends cleanly (exit 0, no traceback)."""
    port = free_port()
    proc = serve_two_workers(tmp_path, port, new_session=True, GATEWAY_DRAIN_S="2")
    try:
        await trio.to_thread.run_sync(wait_listening, port)
        await trio.sleep(0.5)  # the workers are in their trio loops
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]
        c = await RawWs.connect(port)
        tok = mint(DEMO_TENANT, "v", t.secrets[t.primary_kid], 600, time.time())
        assert (await c.hello(tok))["t"] == "welcome"
        os.killpg(proc.pid, signal.SIGTERM)
        rc = await trio.to_thread.run_sync(proc.wait, 20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.stdout.read().decode() if proc.stdout else ""
        proc.wait()
    assert "Traceback" not in out and "TrioInternalError" not in out, out
    assert rc == 0, out


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM (SIGKILL after 15 s); returns everything it printed."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    out = proc.stdout.read().decode() if proc.stdout else ""
    proc.wait()
    return out


async def test_resume_on_another_worker_is_handed_to_the_owner(tmp_path: Path) -> None:
    """SO_REUSEPORT sends a reconnect to any worker; a resume that lands on a
    worker without the session is handed (socket and hello) to the worker
    that holds it. Ten sessions, each resumed four times while the bot's
    replies are in flight: every resume is a real resume and every reply
    arrives exactly once, in order."""
    port = free_port()
    proc = serve_two_workers(tmp_path, port, GATEWAY_BOT_THINK_MS="100")
    try:
        await trio.to_thread.run_sync(wait_listening, port)
        await trio.sleep(0.5)  # both workers listening
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]
        resumed = 0
        for i in range(10):
            tok = mint(DEMO_TENANT, f"r{i}", t.secrets[t.primary_kid], 600, time.time())
            c = await RawWs.connect(port)
            w = await c.hello(tok)
            sid, last, seen = w["sid"], 0, []
            for k in range(4):
                await c.send({"t": "msg", "id": k + 1, "body": f"m{k}"})
                while True:  # the ack (the reply comes 100 ms later)
                    f = await c.recv()
                    if f["t"] == "deliver":
                        last = f["seq"]
                        seen.append(f["body"])
                    if f["t"] == "ack":
                        break
                await c.aclose()  # drop it with the reply still pending
                c = await RawWs.connect(port)
                w = await c.hello(tok, resume={"sid": sid, "last": last})
                assert w["t"] == "welcome" and w["sid"] == sid, w
                assert w["resumed"] is True and w["resync"] is False
                resumed += 1
            while len(seen) < 5:  # the greeting and four replies
                f = await c.recv()
                if f["t"] == "deliver":
                    assert f["seq"] == last + 1
                    last = f["seq"]
                    seen.append(f["body"])
            assert seen == ["Hi! I'm the demo bot. Say something and I'll answer.",
                            *(f"You said: m{k}" for k in range(4))]  # fmt: skip
            await c.aclose()
        assert resumed == 40
    finally:
        out = stop(proc)
    assert "Traceback" not in out, out


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2-tls"])
async def test_http2_resume_on_another_worker_moves_the_session(tmp_path: Path, tls: bool) -> None:
    """An HTTP/2 (or TLS) connection cannot move to the worker that holds
    its session, so the session moves to the connection: six sessions, each
    resumed four times over fresh connections while the bot's replies are
    in flight; every resume is a real one (a fresh session would say
    resumed: false, about half the time with two workers) and every reply
    arrives exactly once, in order, wherever it was produced."""
    from tests.test_server_h2 import H2Client, _tls

    port = free_port()
    env = {"GATEWAY_BOT_THINK_MS": "100"}
    ctx = None
    if tls:
        cert, key, ctx = _tls(tmp_path)
        ctx.set_alpn_protocols(["h2"])
        env.update(GATEWAY_TLS_CERT=cert, GATEWAY_TLS_KEY=key)
    proc = serve_two_workers(tmp_path, port, **env)
    try:
        await trio.to_thread.run_sync(wait_listening, port)
        await trio.sleep(0.5)  # both workers listening
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]

        async def open_stream(hello: dict[str, object]) -> tuple[H2Client, int, dict[str, Any]]:
            cl = await H2Client.connect(port, ctx)
            st = await cl.open()
            await cl.send(st, hello)
            return cl, st, await cl.recv(st)

        resumed = 0
        for i in range(6):
            tok = mint(DEMO_TENANT, f"h{i}", t.secrets[t.primary_kid], 600, time.time())
            hello: dict[str, object] = {"t": "hello", "v": 1, "token": tok}
            cl, st, w = await open_stream(hello)
            sid, last, seen = w["sid"], 0, []
            for k in range(4):
                await cl.send(st, {"t": "msg", "id": k + 1, "body": f"m{k}"})
                while True:  # the ack (the reply comes 100 ms later)
                    f = await cl.recv(st)
                    if f["t"] == "deliver":
                        last = f["seq"]
                        seen.append(f["body"])
                    if f["t"] == "ack":
                        break
                await cl.stream.aclose()  # drop it with the reply still pending
                cl, st, w = await open_stream({**hello, "resume": {"sid": sid, "last": last}})
                assert w["t"] == "welcome" and w["sid"] == sid, w
                assert w["resumed"] is True and w["resync"] is False
                resumed += 1
            while len(seen) < 5:  # the greeting and four replies
                f = await cl.recv(st)
                if f["t"] == "deliver":
                    assert f["seq"] == last + 1
                    last = f["seq"]
                    seen.append(f["body"])
            assert seen == ["Hi! I'm the demo bot. Say something and I'll answer.",
                            *(f"You said: m{k}" for k in range(4))]  # fmt: skip
            await cl.stream.aclose()
        assert resumed == 24
    finally:
        out = stop(proc)
    assert "Traceback" not in out, out


async def test_moved_sessions_keep_their_desk_agent_and_replies(tmp_path: Path) -> None:
    """The same over HTTP/2 with desk-sim behind two workers: sessions move
    between the workers while the desk's replies are in flight (100 ms think
    time). Every message reaches the desk once, every reply reaches the
    visitor once and in order (replies sent to the old worker's link are
    passed on), and the agent stays the same across moves (close "moved"
    keeps it at the desk, the new worker re-opens with the agent hint)."""
    from tests.test_server_h2 import H2Client

    dport, port = free_port(), free_port()
    rec = tmp_path / "desk.jsonl"
    desk = subprocess.Popen(
        [sys.executable, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{dport}",
         "--think-ms", "100", "--record", str(rec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    proc = serve_two_workers(tmp_path, port, args=("--downstream", f"support=127.0.0.1:{dport}"))
    try:
        await trio.to_thread.run_sync(wait_listening, dport)
        await trio.to_thread.run_sync(wait_listening, port)
        await trio.sleep(1.0)  # links up
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]

        async def open_stream(hello: dict[str, object]) -> tuple[H2Client, int, dict[str, Any]]:
            cl = await H2Client.connect(port)
            st = await cl.open()
            await cl.send(st, hello)
            return cl, st, await cl.recv(st)

        sids = []
        for i in range(4):
            tok = mint(DEMO_TENANT, f"d{i}", t.secrets[t.primary_kid], 600, time.time())
            hello: dict[str, object] = {"t": "hello", "v": 1, "token": tok}
            cl, st, w = await open_stream(hello)
            sid, last, seen = w["sid"], 0, []
            sids.append(sid)
            for k in range(3):
                await cl.send(st, {"t": "msg", "id": k + 1, "body": f"m{k}"})
                while True:
                    f = await cl.recv(st)
                    if f["t"] == "deliver":
                        assert f["seq"] == last + 1
                        last = f["seq"]
                        seen.append(f)
                    if f["t"] == "ack":
                        break
                await cl.stream.aclose()
                cl, st, w = await open_stream({**hello, "resume": {"sid": sid, "last": last}})
                assert w["resumed"] is True and w["sid"] == sid, w
            with trio.fail_after(10):
                while sum(1 for f in seen if "noted" in str(f["body"])) < 3:
                    f = await cl.recv(st)
                    if f["t"] == "deliver":
                        assert f["seq"] == last + 1
                        last = f["seq"]
                        seen.append(f)
            agents = {f["from"]["name"] for f in seen if f["from"]["kind"] == "agent"}
            assigned = [f for f in seen if f["from"]["kind"] == "system"]
            assert len(agents) == 1 and len(assigned) == 1, seen
            said = [str(f["body"]).split(": ", 1)[1] for f in seen if f["from"]["kind"] == "agent"]
            assert said == ["noted 'm0'", "noted 'm1'", "noted 'm2'"]
            await cl.stream.aclose()
        lines = [json.loads(x) for x in rec.read_text().splitlines()]
        got = sorted((x["sid"], x["id"]) for x in lines)
        assert got == sorted((sid, k + 1) for sid in sids for k in range(3))
    finally:
        out = stop(proc)
        desk.terminate()
        desk.wait(10)
    assert "Traceback" not in out, out


async def test_wss_resume_on_another_worker_moves_the_session(tmp_path: Path) -> None:
    """WebSocket over TLS: the connection cannot be handed over either, so
    the session moves. Eight sessions, each resumed over a new connection
    (half of them land on the other worker): all resumed."""
    import ssl

    from tests.test_server_h2 import _ca_pem, _tls

    port = free_port()
    cert, key, ctx = _tls(tmp_path)
    ws_ctx = ssl.create_default_context()
    ws_ctx.load_verify_locations(cadata=_ca_pem(ctx))
    proc = serve_two_workers(tmp_path, port, GATEWAY_TLS_CERT=cert, GATEWAY_TLS_KEY=key)
    try:
        await trio.to_thread.run_sync(wait_listening, port)
        await trio.sleep(0.5)
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]

        # (our trio client: websockets' threaded sync client can lose its
        # upgrade request over TLS 1.3 when its reader thread takes the
        # session tickets at the same moment, and then waits 10 s)
        for i in range(8):
            tok = mint(DEMO_TENANT, f"w{i}", t.secrets[t.primary_kid], 600, time.time())
            ws = await RawWs.connect(port, ssl_context=ws_ctx)
            w = await ws.hello(tok, text=True)
            assert (await ws.recv())["seq"] == 1  # greeting
            await ws.send({"t": "msg", "id": 1, "body": "before"}, text=True)
            got = [await ws.recv() for _ in range(2)]
            assert {f["t"] for f in got} == {"ack", "deliver"}
            await ws.aclose()
            resume = {"sid": w["sid"], "last": 1}  # the reply (seq 2) not seen
            ws = await RawWs.connect(port, ssl_context=ws_ctx)
            w2 = await ws.hello(tok, text=True, resume=resume)
            replayed = await ws.recv()
            await ws.aclose()
            assert w2["sid"] == w["sid"], w2
            assert w2["resumed"] is True and w2["resync"] is False
            assert [replayed["body"]] == ["You said: before"]
    finally:
        out = stop(proc)
    assert "Traceback" not in out, out
