"""`gateway serve --downstream` and `gateway desk-sim` as users run them: a
desk crashes under load and no message the visitors saw acknowledged is lost
(every acked message is in the desks' --record files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

import gateway.client as gc
from gateway.config import DEMO_TENANT, load_config
from gateway.protocol.tokens import mint
from tests.test_server_process import free_port, wait_listening

SESSIONS = 16
PER_SESSION = 40
# low enough that desk A reaches it whatever share of the 16 sessions the
# balancer gives it (at least 2 of them; 5-12 in practice)
CRASH_AFTER = 60


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _recorded(*paths: Path) -> list[tuple[str, int, str]]:
    out = []
    for p in paths:
        if p.exists():
            for line in p.read_text().splitlines():
                r = json.loads(line)
                out.append((r["sid"], r["n"], r["body"]))
    return out


class TwoDesks:
    """desk-sim A (``a_args`` added) and B, recording, behind `gateway serve
    --workers 2 --downstream general=A,B`, as separate processes."""

    def __init__(self, tmp: Path, a_args: list[str], ops: bool = False) -> None:
        self.pa, self.pb, self.port = free_port(), free_port(), free_port()
        self.rec_a, self.rec_b = tmp / "a.jsonl", tmp / "b.jsonl"
        self.tmp = tmp
        # the operator endpoint (/metrics) on ops_port when asked for
        self.ops_port = free_port() if ops else 0
        listen = f"127.0.0.1:{self.ops_port}" if ops else ""
        env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp), GATEWAY_OPS_LISTEN=listen)
        self.desk_a = _spawn(
            ["desk-sim", "--listen", f"127.0.0.1:{self.pa}", "--no-reply", *a_args,
             "--record", str(self.rec_a)],
            env, tmp / "desk-a.log",
        )  # fmt: skip
        self.desk_b = _spawn(
            ["desk-sim", "--listen", f"127.0.0.1:{self.pb}", "--no-reply",
             "--record", str(self.rec_b)],
            env, tmp / "desk-b.log",
        )  # fmt: skip
        self.gw = _spawn(
            ["serve", "--listen", f"127.0.0.1:{self.port}", "--workers", "2",
             "--downstream", f"general=127.0.0.1:{self.pa},127.0.0.1:{self.pb}"],
            env, tmp / "gw.log",
        )  # fmt: skip
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    async def ready(self) -> None:
        for p in (self.pa, self.pb, self.port):
            await trio.to_thread.run_sync(wait_listening, p)

    def token(self, visitor: str) -> str:
        return _token(self.tmp, visitor)

    async def visitor(self, name: str, n: int, acked: list[tuple[str, str]]) -> None:
        """Sends ``n`` messages one after the other (each acked first)."""
        async with gc.connect(self.url, token=self.token(name)) as s:
            for k in range(n):
                body = f"{name} #{k}"
                with trio.fail_after(30):
                    await s.send(body)
                acked.append((s.session_id or "", body))

    def stop(self) -> None:
        _stop([self.desk_a, self.desk_b, self.gw])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _token(state_dir: Path, visitor: str) -> str:
    """A demo-tenant token for the gateways sharing ``state_dir``."""
    t = load_config(None, {"GATEWAY_STATE_DIR": str(state_dir)}, {}).tenants[DEMO_TENANT]
    return mint(DEMO_TENANT, visitor, t.secrets[t.primary_kid], 600, time.time())


async def test_desk_crash_under_load_loses_no_acked_message(tmp_path: Path) -> None:
    run = TwoDesks(tmp_path, ["--crash-after", str(CRASH_AFTER)])
    desk_a, rec_a, rec_b = run.desk_a, run.rec_a, run.rec_b
    try:
        await run.ready()
        acked: list[tuple[str, str]] = []
        # links come up right after the workers start; new sessions are
        # refused (4003, retried by the SDK) until then
        async with trio.open_nursery() as n:
            for i in range(SESSIONS):
                n.start_soon(run.visitor, f"v{i}", PER_SESSION, acked)
        try:
            rc_a = await trio.to_thread.run_sync(desk_a.wait, 10)
        except subprocess.TimeoutExpired:
            rc_a = None
        assert rc_a == 3, (
            f"desk A should have crashed (--crash-after): rc {rc_a}, "
            f"A recorded {len(_recorded(rec_a))}, B {len(_recorded(rec_b))}"
        )
        got = _recorded(rec_a, rec_b)
        bodies = {b for _, _, b in got}
        lost = [b for _, b in acked if b not in bodies]
        assert len(acked) == SESSIONS * PER_SESSION
        assert lost == []
        # A recorded what it took before crashing (it exits after the read in
        # which it passed CRASH_AFTER), B the rest and the redeliveries
        assert len(_recorded(rec_a)) >= CRASH_AFTER
        assert len(_recorded(rec_b)) >= len(acked) - CRASH_AFTER
    finally:
        run.stop()


async def test_mutual_tls_link_between_processes(tmp_path: Path) -> None:
    """`gateway desk-sim --tls-cert --tls-key --tls-client-ca` and `gateway
    serve --config` with a TLS cluster presenting a client certificate: a
    conversation goes through, and the desk records it."""
    import trustme

    ca, clients = trustme.CA(), trustme.CA()
    files = {
        "ca.pem": ca.cert_pem,
        "clients-ca.pem": clients.cert_pem,
        "desk.pem": (desk := ca.issue_cert("desk.internal")).private_key_and_cert_chain_pem,
        "desk.key": desk.private_key_pem,
        "gw.pem": (gwc := clients.issue_cert("gateway-1")).private_key_and_cert_chain_pem,
        "gw.key": gwc.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    pd, port = free_port(), free_port()
    rec = tmp_path / "rec.jsonl"
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f"""
[downstream.clusters.general]
endpoints = ["127.0.0.1:{pd}"]
tls = true
ca_file = "{tmp_path / "ca.pem"}"
server_name = "desk.internal"
cert_file = "{tmp_path / "gw.pem"}"
key_file = "{tmp_path / "gw.key"}"
"""
    )
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_OPS_LISTEN="")
    desk_p = _spawn(
        ["desk-sim", "--listen", f"127.0.0.1:{pd}", "--think-ms", "0", "--record", str(rec),
         "--tls-cert", str(tmp_path / "desk.pem"), "--tls-key", str(tmp_path / "desk.key"),
         "--tls-client-ca", str(tmp_path / "clients-ca.pem")],
        env, tmp_path / "desk.log",
    )  # fmt: skip
    gw = _spawn(
        ["serve", "--config", str(conf), "--listen", f"127.0.0.1:{port}", "--workers", "1"],
        env, tmp_path / "gw.log",
    )  # fmt: skip
    try:
        for p in (pd, port):
            await trio.to_thread.run_sync(wait_listening, p)
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]
        tok = mint(DEMO_TENANT, "dana", t.secrets[t.primary_kid], 600, time.time())
        with trio.fail_after(20):
            # refused with 4003 (retried by the SDK) until the link is up
            async with gc.connect(f"ws://127.0.0.1:{port}/v1/ws", token=tok) as s:
                assert await s.send("over mutual TLS") == 1
                assert (await s.receive()).sender_kind == "system"  # agent assigned
                assert (await s.receive()).body.endswith("noted 'over mutual TLS'")
        assert [b for _, _, b in _recorded(rec)] == ["over mutual TLS"]
        assert b"TLS" in (tmp_path / "desk.log").read_bytes()  # "listening on ... (TLS, ...)"
    finally:
        for p in (desk_p, gw):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_desk_sim_tls_options_are_checked(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "desk-sim", "--listen", "127.0.0.1:0", *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    r = run("--tls-cert", str(tmp_path / "c.pem"))
    assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr
    r = run("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert r.returncode == 2 and "cannot set up TLS" in r.stderr


async def test_desk_sigterm_drains_without_duplicates(tmp_path: Path) -> None:
    """SIGTERM to a desk-sim under load (a rolling restart of the desks):
    it sends GOAWAY, answers what it has, and exits once the gateway's
    workers closed their drained links; every message is acked and was
    processed by exactly one desk."""
    import signal as sig

    run = TwoDesks(tmp_path, ["--latency-ms", "50"])
    try:
        await run.ready()
        acked: list[tuple[str, str]] = []
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(run.visitor, f"d{i}", 30, acked)
            with trio.fail_after(30):
                while len(_recorded(run.rec_a)) < 20:
                    await trio.sleep(0.01)
            run.desk_a.send_signal(sig.SIGTERM)
            rc_a = await trio.to_thread.run_sync(run.desk_a.wait, 15)
        assert rc_a == 0
        a = [b for _, _, b in _recorded(run.rec_a)]
        b = [b for _, _, b in _recorded(run.rec_b)]
        assert len(acked) == 8 * 30
        assert sorted(a + b) == sorted(body for _, body in acked)  # each at one desk
    finally:
        run.stop()


async def test_two_nodes_share_one_desk(tmp_path: Path) -> None:
    """Two gateway nodes (node ids 1 and 2, two workers each) link to one
    desk-sim: every visitor's replies come back through the node and
    worker that holds its session, none to another visitor; a visitor
    that reconnects to the other node with its old session id gets a new
    session there (sessions are per node) and chats on."""
    desk_port, ports = free_port(), (free_port(), free_port())
    rec = tmp_path / "desk.jsonl"
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_OPS_LISTEN="")
    desk = ["desk-sim", "--listen", f"127.0.0.1:{desk_port}", "--think-ms", "0"]
    procs = [_spawn([*desk, "--record", str(rec)], env, tmp_path / "desk.log")]
    for i, port in enumerate(ports, 1):
        serve = ["serve", "--listen", f"127.0.0.1:{port}", "--workers", "2"]
        node = {**env, "GATEWAY_NODE_ID": str(i)}
        downstream = ["--downstream", f"general=127.0.0.1:{desk_port}"]
        procs.append(_spawn([*serve, *downstream], node, tmp_path / f"gw{i}.log"))

    def token(visitor: str) -> str:
        return _token(tmp_path, visitor)

    async def chat(s: gc.Session, name: str, n: int) -> list[str]:
        bodies = [f"{name} says {k}" for k in range(n)]
        for b in bodies:
            await s.send(b)
        quoted: list[str] = []
        while len(quoted) < len(bodies):
            r = str((await s.receive()).body)
            own = [b for b in bodies if repr(b) in r]
            # a reply quotes one of this visitor's own messages; other
            # deliveries (an agent joining) quote none
            assert own or " says " not in r, (name, r)
            quoted += own
        assert sorted(quoted) == sorted(bodies), (name, quoted)
        return bodies

    sent: list[str] = []

    async def visitor(name: str, port: int) -> None:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with gc.connect(url, token=token(name)) as s:
            sent.extend(await chat(s, name, 10))

    try:
        for p in (desk_port, *ports):
            await trio.to_thread.run_sync(wait_listening, p)
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for i in range(12):
                    n.start_soon(visitor, f"v{i}", ports[i % 2])
            # a visitor of node 1 reconnects to node 2 with its session id
            async with gc.connect(f"ws://127.0.0.1:{ports[0]}/v1/ws", token=token("mover")) as s:
                sent.extend(await chat(s, "mover@1", 5))
                first = s.session_id
                s.port = ports[1]
                assert s._stream is not None
                await trio.aclose_forcefully(s._stream)
                while s.connections < 2 or not s.connected.is_set() or s.session_id == first:
                    await s.changed.wait()
                assert s.session_id not in (None, first)
                sent.extend(await chat(s, "mover@2", 5))
        recorded = [b for _, _, b in _recorded(rec)]
        assert sorted(recorded) == sorted(sent)  # each message reached the desk once
        for p in procs:
            assert p.poll() is None, "a process died"
    finally:
        _stop(procs)
