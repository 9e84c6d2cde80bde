"""The operator endpoint of a real `gateway serve` (supervisor + 2 workers):
/metrics aggregated across workers and parsed with prometheus_client (and
promtool when installed), counters monotonic across a killed worker,
/readyz during a drain, and the dashboard in headless Chromium showing live
numbers that change under load (with a screenshot)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import gateway.client as gc
from gateway.config import DEMO_TENANT, load_config
from gateway.protocol.tokens import mint
from tests.browser import CHROMIUM, chromium_page
from tests.gwserver import RawWs
from tests.test_server_h2 import H2Client
from tests.test_server_process import free_port, wait_listening

OPS_TOKEN = "ops-test-token-0123456789"


class Gw:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, ops: int, state: Path) -> None:
        self.proc = proc
        self.port = port
        self.ops = ops
        cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state)}, {})
        self.tenant = cfg.tenants[DEMO_TENANT]

    def token(self, visitor: str) -> str:
        t = self.tenant
        return mint(DEMO_TENANT, visitor, t.secrets[t.primary_kid], 600, time.time())

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        r = urllib.request.Request(f"http://127.0.0.1:{self.ops}{path}")
        if auth:
            r.add_header("Authorization", f"Bearer {OPS_TOKEN}")
        try:
            with urllib.request.urlopen(r, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def api(self) -> dict[str, Any]:
        import json

        status, text = self.get("/api/stats")
        assert status == 200
        return json.loads(text)  # type: ignore[no-any-return]


@asynccontextmanager
async def serving(tmp_path: Path, workers: int, extra: tuple[str, ...] = ()) -> AsyncIterator[Gw]:
    port, ops = free_port(), free_port()
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_DRAIN_S="4")
    env.update(GATEWAY_OPS_TOKEN=OPS_TOKEN, GATEWAY_BOT_THINK_MS="0", GATEWAY_LOG_LEVEL="warning")
    log = open(tmp_path / "gw.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--workers", str(workers), "--ops-listen", f"127.0.0.1:{ops}", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    gw = Gw(proc, port, ops, tmp_path)
    try:
        await trio.to_thread.run_sync(wait_listening, ops)
        await wait_until(lambda: gw.get("/readyz", auth=False)[0] == 200, 15)
        yield gw
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


async def wait_until(ok: Any, timeout: float) -> None:
    deadline = trio.current_time() + timeout
    while not await trio.to_thread.run_sync(ok):
        if trio.current_time() > deadline:
            raise AssertionError("condition not reached in time")
        await trio.sleep(0.2)


WS_IN = ("gateway_messages_in_total", (("transport", "ws"),))
H2_IN = ("gateway_messages_in_total", (("transport", "h2"),))


async def check_metrics_and_restart(gw: Gw, sent: list[int]) -> None:
    await wait_until(lambda: sent[0] == 8, 10)
    h2c = await H2Client.connect(gw.port)
    sid = await h2c.open()
    await h2c.send(sid, {"t": "hello", "v": 1, "token": gw.token("h2v")})
    assert (await h2c.recv(sid))["t"] == "welcome"
    for k in range(3):
        await h2c.send(sid, {"t": "msg", "id": k + 1, "body": "x"})
    acks = 0
    while acks < 3:
        acks += (await h2c.recv(sid))["t"] == "ack"

    def counted() -> bool:
        m = gw.metrics()
        return (m.get(WS_IN), m.get(H2_IN), m.get(("gateway_connections_open", ()))) == (40, 3, 9)

    await wait_until(counted, 10)
    m = gw.metrics()
    assert m[("gateway_messages_acked_total", ())] == 43
    assert m[("gateway_message_ack_seconds_count", ())] == 43
    assert m[("gateway_handshakes_total", (("transport", "ws"),))] >= 8
    assert m[("gateway_handshakes_total", (("transport", "h2"),))] == 1
    assert m[("gateway_connections_open", ())] == 9
    assert m[("gateway_sessions_opened_total", ())] == 9
    assert m[("gateway_bytes_in_total", (("transport", "ws"),))] > 40 * 2
    assert m[("gateway_bytes_out_total", (("transport", "h2"),))] > 0
    assert m[("gateway_messages_out_total", (("transport", "ws"),))] >= 8 * 6  # greeting+5
    assert m[("gateway_workers_up", ())] == 2
    assert m[("gateway_worker_restarts_total", ())] == 0
    # the event loops counted their work: every connection was ready at
    # least once, and each batch handled one or more of them
    events = m[("gateway_loop_events_total", ())]
    batches = m[("gateway_loop_batches_total", ())]
    assert events >= 9 and 1 <= batches <= events
    assert 0 <= m[("gateway_loop_direct_wakeups_total", ())] < batches
    assert 0 < m[("gateway_loop_busy_seconds_total", ())] < m[("gateway_cpu_seconds_total", ())]
    per_worker = [m[("gateway_worker_cpu_seconds_total", (("worker", i),))] for i in "01"]
    assert all(c > 0 for c in per_worker)
    assert sum(per_worker) == pytest.approx(m[("gateway_cpu_seconds_total", ())], rel=0.05)
    for w in gw.api()["workers"]:
        assert 0 <= w["loop_busy_pct"] <= 100 and 0 <= w["cpu_pct"] <= 200
    # garbage-collector pauses: a series per generation from the start
    for g in "012":
        n = m[("gateway_gc_pause_seconds_count", (("generation", g),))]
        assert n == m[("gateway_gc_pause_seconds_bucket", (("generation", g), ("le", "+Inf")))]

    promtool = shutil.which("promtool")
    if promtool is not None:
        text = gw.get("/metrics")[1]
        r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()

    # kill one worker: it is restarted, and no counter goes down
    pids = [w["pid"] for w in gw.api()["workers"]]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)

    def restarted() -> bool:
        m = gw.metrics()
        return (
            m.get(("gateway_worker_restarts_total", ())) == 1
            and m.get(("gateway_workers_up", ())) == 2
        )

    await wait_until(restarted, 15)
    m = gw.metrics()
    assert m[WS_IN] == 40 and m[H2_IN] == 3
    assert m[("gateway_messages_acked_total", ())] == 43
    assert gw.get("/readyz", auth=False)[0] == 200
    assert sorted(w["pid"] for w in gw.api()["workers"]) != sorted(pids)


async def test_metrics_across_workers_restart_and_drain(tmp_path: Path) -> None:
    async with serving(tmp_path, workers=2) as gw:
        assert gw.get("/healthz", auth=False)[0] == 200
        assert gw.get("/metrics", auth=False)[0] == 401
        url = f"ws://127.0.0.1:{gw.port}/v1/ws"
        release = trio.Event()
        sent = [0]

        async def visitor(i: int) -> None:
            # reconnect=True: the worker killed below takes some of these along
            async with gc.connect(url, token=gw.token(f"v{i}")) as s:
                for k in range(5):
                    await s.send(f"m{k}")
                sent[0] += 1
                await release.wait()

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(visitor, i)
            await check_metrics_and_restart(gw, sent)
            release.set()

        # a raw connection that does not reconnect keeps a worker draining
        raw = await RawWs.connect(gw.port)
        assert (await raw.hello(gw.token("raw")))["t"] == "welcome"
        gw.proc.send_signal(signal.SIGTERM)
        status, body = await trio.to_thread.run_sync(gw.get, "/readyz", False)
        assert (status, body) == (503, "draining\n")
        assert gw.get("/healthz", auth=False)[0] == 200
        assert gw.api()["draining"] is True
        code = await trio.to_thread.run_sync(gw.proc.wait, 20)
        assert code == 0


def col(name: str, v: dict[str, Any]) -> int:
    """Index of the dashboard workers table's column ``name``."""
    return list(v["head"]).index(name)


def rate(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0  # "-" before the first numbers


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps)")
async def test_dashboard_in_chromium_shows_live_numbers(tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    numbers = (
        "({updates: Number(document.body.dataset.updates),"
        " ready: document.getElementById('ready').textContent,"
        " connections: document.getElementById('connections').textContent,"
        " msgs: document.getElementById('msgs').textContent,"
        " p99: document.getElementById('p99').textContent,"
        " workers: [...document.querySelectorAll('#workers tbody tr')].map(r => r.textContent),"
        " cells: [...document.querySelectorAll('#workers tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent)),"
        " head: [...document.querySelectorAll('#workers thead th')].map(c => c.textContent),"
        " shades: [95, 90, 89, 67, 66, 10].map(loopClass)})"
    )
    async with serving(tmp_path, workers=2) as gw:
        url = f"http://127.0.0.1:{gw.ops}/?token={OPS_TOKEN}"
        go = trio.Event()
        stop = trio.Event()
        opened = trio.Event()

        async def load() -> None:
            await go.wait()  # once the page has shown the idle gateway
            ws = f"ws://127.0.0.1:{gw.port}/v1/ws"
            async with trio.open_nursery() as n:
                count = [0]

                async def visitor(i: int) -> None:
                    async with gc.connect(ws, token=gw.token(f"d{i}"), reconnect=False) as s:
                        count[0] += 1
                        if count[0] == 12:
                            opened.set()
                        while not stop.is_set():
                            await s.send("hello")
                            await trio.sleep(0.02)

                for i in range(12):
                    n.start_soon(visitor, i)

        def drive() -> tuple[Any, Any]:
            with chromium_page(url, tmp_path / "profile") as cdp:
                idle = cdp.poll(numbers, lambda v: bool(v) and v["updates"] >= 2 and v["workers"])
                trio.from_thread.run_sync(go.set)
                trio.from_thread.run(opened.wait)
                busy = cdp.poll(
                    numbers,
                    lambda v: (
                        v["connections"] == "12"
                        and rate(v["msgs"]) > 50
                        and any(rate(c[col("loop busy %", v)]) > 0 for c in v["cells"])
                    ),
                    timeout=20,
                )
                cdp.screenshot(shot)
                return idle, busy

        async with trio.open_nursery() as n:
            n.start_soon(load)
            idle, busy = await trio.to_thread.run_sync(drive)
            stop.set()
        assert idle["ready"] == "ready" and idle["connections"] == "0"
        assert len(idle["workers"]) == 2 and all("up" in w for w in idle["workers"])
        # a worker's loop busy share is shaded from two thirds, red from 90%
        assert idle["shades"] == ["bad", "bad", "warn", "warn", "", ""]
        assert busy["connections"] == "12"
        assert rate(busy["msgs"]) > 50
        assert busy["p99"] != "-"
        assert busy["updates"] > idle["updates"]
        # each worker's event-loop and CPU shares: numbers, and a worker
        # that handled the visitors shows both above zero
        loop, cpu = col("loop busy %", busy), col("CPU %", busy)
        assert all(rate(c[cpu]) >= rate(c[loop]) - 5 for c in busy["cells"])
        assert any(rate(c[loop]) > 0 and rate(c[cpu]) > 0 for c in busy["cells"])
        assert all(c[col("µs/event", busy)] != "" for c in busy["cells"])
        # pauses of each worker's garbage collector over the last 5 s
        gc_col = col("GC pauses", busy)
        assert all(c[gc_col].split(" ")[0].isdigit() for c in busy["cells"]), busy["cells"]
        assert all(c[col("last report", busy)].endswith(" s ago") for c in busy["cells"])
        assert all(len(c) == len(busy["head"]) for c in busy["cells"])
        assert shot.stat().st_size > 5000 and shot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps)")
async def test_dashboard_in_chromium_shows_downstream_endpoints(tmp_path: Path) -> None:
    """Two endpoints, one desk-sim up and one port nothing listens on: the
    dashboard's endpoint table shows each with its breaker, its links up,
    and the failed connection attempts of the dead one."""
    from tests.test_downstream import desk

    dead = free_port()
    rows_js = (
        "({rows: [...document.querySelectorAll('#breakers tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))})"
    )

    def seen(v: Any) -> bool:
        rows = v["rows"] if v else []
        return (
            len(rows) == 2
            and all(len(r) == 8 for r in rows)
            and any(r[4] == "1" for r in rows)
            and any(r[5] not in ("0", "-") for r in rows)
        )

    async with desk(reply=False) as (dport, _, _):
        spec = f"general=127.0.0.1:{dport},127.0.0.1:{dead}"
        async with serving(tmp_path, workers=1, extra=("--downstream", spec)) as gw:
            url = f"http://127.0.0.1:{gw.ops}/?token={OPS_TOKEN}"

            def drive() -> Any:
                with chromium_page(url, tmp_path / "profile") as cdp:
                    return cdp.poll(rows_js, seen, timeout=20)

            v = await trio.to_thread.run_sync(drive)
    rows = {r[1]: r for r in v["rows"]}
    up, down = rows[f"127.0.0.1:{dport}"], rows[f"127.0.0.1:{dead}"]
    assert up[0] == "general" and up[2] == "0" and up[3:6] == ["closed", "1", "0"]
    assert float(up[6]) >= 0 and up[7] == "0"  # latency (ms), nothing outstanding
    assert down[4] == "0" and int(down[5].replace(",", "")) >= 1
