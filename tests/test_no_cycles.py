"""`gateway serve` forwarding to `gateway desk-sim`, as users run them, with
its worker's cyclic garbage collector off (bench/cycles_site): WebSocket
and HTTP/2 visitors connect, chat, leave, and their sessions expire, and
the worker has left nothing in a reference cycle. Closed connections once
did (a protocol and its connection referred to each other, as did h2's
state and its handler table), and waited for the collector's rare full
collections: under churn they piled up (bench/soak.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from bench import cyclecount
from gateway.loadtest import gwmetrics
from tests.test_downstream_process import _spawn
from tests.test_server_process import free_port, wait_listening


def _rounds(out: Path, n: int, timeout: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        per_round, _ = cyclecount.counts(out)
        if len(per_round) >= n:
            return per_round
        time.sleep(0.05)
    raise TimeoutError(f"the worker did not report collection {n}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("tls", [False, True], ids=["ws-h2c", "wss-h2-tls"])
def test_churn_leaves_no_cycles_in_the_worker(tmp_path: Path, tls: bool) -> None:
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_LOG_LEVEL="warning")
    desk_port, port, ops = free_port(), free_port(), free_port()
    out = tmp_path / "cycles"
    desk = _spawn(["desk-sim", "--listen", f"127.0.0.1:{desk_port}"], env, tmp_path / "desk.log")
    gw_env = cyclecount.env_for({**env, "GATEWAY_SESSION_TTL_S": "1"}, out)
    client_tls: list[str] = []
    if tls:  # the reactor's TLS path, WebSocket and HTTP/2 (ALPN h2)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        gw_env["GATEWAY_TLS_CERT"] = str(tmp_path / "cert.pem")
        gw_env["GATEWAY_TLS_KEY"] = str(tmp_path / "key.pem")
        client_tls = ["--ca-file", str(tmp_path / "ca.pem")]
    s = "s" if tls else ""
    gw = _spawn(
        ["serve", "--listen", f"127.0.0.1:{port}", "--workers", "1",
         "--ops-listen", f"127.0.0.1:{ops}", "--downstream", f"general=127.0.0.1:{desk_port}"],
        gw_env, tmp_path / "gw.log",
    )  # fmt: skip
    metrics = f"http://127.0.0.1:{ops}/metrics"

    def gauge(name: str) -> float:  # summed over its labels
        m = gwmetrics.fetch(metrics, timeout=5)
        return sum(v for (k, _), v in m.items() if k == name)

    try:
        for p in (desk_port, port, ops):
            wait_listening(p)
        end = time.monotonic() + 15
        while gauge("gateway_downstream_links_up") < 1 and time.monotonic() < end:
            time.sleep(0.1)
        # the first collection takes what the worker's start left
        end = time.monotonic() + 10
        while cyclecount.collect(gw.pid) == 0 and time.monotonic() < end:
            time.sleep(0.05)
        _rounds(out, 1)
        for url in (f"ws{s}://127.0.0.1:{port}/v1/ws", f"http{s}://127.0.0.1:{port}/v1/stream"):
            run = subprocess.run(
                [sys.executable, "-m", "gateway", "loadtest", "--url", url, "--no-progress",
                 *client_tls,
                 "--connections", "60", "--ramp", "0", "--rate", "300", "--duration", "2",
                 "--max-runtime", "60"],
                env=env, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
            assert "messages acked 0 " not in run.stdout
        # every connection closed and every session expired (ttl 1 s)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if gauge("gateway_connections_open") == 0 and gauge("gateway_sessions_detached") == 0:
                break
            time.sleep(0.2)
        assert gauge("gateway_connections_open") == 0
        assert gauge("gateway_sessions_detached") == 0
        assert gauge("gateway_messages_acked_total") >= 600
        cyclecount.collect(gw.pid)
        per_round = _rounds(out, 2)
        _, types = cyclecount.counts(out)
        # 120 connections and sessions, ~1,200 messages: a cycle per
        # connection, session or message would leave hundreds of objects
        assert per_round[1] == 0, f"left in cycles: {per_round[1]} objects, {types}"
    finally:
        for proc in (gw, desk):
            proc.terminate()
        for proc in (gw, desk):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
