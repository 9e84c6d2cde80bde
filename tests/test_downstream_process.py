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


async def test_desk_crash_under_load_loses_no_acked_message(tmp_path: Path) -> None:
    pa, pb, port = free_port(), free_port(), free_port()
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_OPS_LISTEN="")
    desk_a = _spawn(
        ["desk-sim", "--listen", f"127.0.0.1:{pa}", "--no-reply", "--crash-after",
         str(CRASH_AFTER), "--record", str(rec_a)],
        env, tmp_path / "desk-a.log",
    )  # fmt: skip
    desk_b = _spawn(
        ["desk-sim", "--listen", f"127.0.0.1:{pb}", "--no-reply", "--record", str(rec_b)],
        env, tmp_path / "desk-b.log",
    )  # fmt: skip
    gw = _spawn(
        ["serve", "--listen", f"127.0.0.1:{port}", "--workers", "2",
         "--downstream", f"general=127.0.0.1:{pa},127.0.0.1:{pb}"],
        env, tmp_path / "gw.log",
    )  # fmt: skip
    procs = [desk_a, desk_b, gw]
    try:
        for p in (pa, pb, port):
            await trio.to_thread.run_sync(wait_listening, p)
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {})
        t = cfg.tenants[DEMO_TENANT]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        acked: list[tuple[str, str]] = []

        async def visitor(i: int) -> None:
            tok = mint(DEMO_TENANT, f"v{i}", t.secrets[t.primary_kid], 600, time.time())
            async with gc.connect(url, token=tok) as s:
                for k in range(PER_SESSION):
                    body = f"v{i} #{k}"
                    with trio.fail_after(30):
                        await s.send(body)
                    acked.append((s.session_id or "", body))

        # links come up right after the workers start; new sessions are
        # refused (4003, retried by the SDK) until then
        async with trio.open_nursery() as n:
            for i in range(SESSIONS):
                n.start_soon(visitor, i)
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
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


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
