"""A large `gateway loadtest` run against a local `gateway serve`, with the
gateway's memory and its own /metrics sampled while the connections are held.

    .venv/bin/python bench/loadtest_run.py --connections 250000 --ramp 1200 \\
        --duration 60 --rate 2000 --active 20000 --out /tmp/lt250k

    .venv/bin/python bench/loadtest_run.py --connections 100000 --ramp 2000 \\
        --duration 30 --rate 0 --active 2000 --desk-processes 2 --engine native

(``--rate 0``: closed loop, ``--window`` messages in flight per active
connection; ``--engine native``: the Rust client; ``--log-level info``
shows the gateway's link and breaker events in ``OUT/gateway.log``.)

Starts `gateway serve --max-connections N` (the worker count follows N and
the 20,000 open-file limit per process), runs `gateway loadtest` with the
given flags (writing JSON and HTML into --out), samples every 5 s the
gateway's total RSS (supervisor + workers) and `gateway_connections_open`
from the operator endpoint, then drains the gateway and prints a summary.
The load test reads the same endpoint before and after its run (`--metrics`),
so its summary and reports include the gateway's side (docs/loadtest.md).
Bounded: the load test stops itself (--max-runtime) and the gateway is killed
if it outlives its drain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.core_bench import free_port, rss_bytes, terminate, tune_loopback
from gateway.loadtest import gwmetrics


def metric(ops: int, name: str) -> float | None:
    """One unlabelled sample of the gateway's /metrics; None while it is
    not up or has no such sample."""
    try:
        return gwmetrics.fetch(f"http://127.0.0.1:{ops}/metrics", timeout=5).get((name, ()))
    except gwmetrics.MetricsError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=250_000)
    ap.add_argument("--ramp", type=float, default=1200.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--active", type=int, default=20_000)
    ap.add_argument("--url-kind", choices=["ws", "h2"], default="ws")
    ap.add_argument(
        "--engine",
        choices=["python", "native"],
        default="python",
        help="load client engine (native: gw-loadgen, ws only)",
    )
    ap.add_argument(
        "--window",
        type=int,
        default=1,
        help="messages in flight per active connection (closed loop with --rate 0)",
    )
    ap.add_argument("--desk-processes", type=int, default=0,
                    help="forward to a `gateway desk-sim` with this many processes "
                         "(0: the in-process demo bot)")  # fmt: skip
    ap.add_argument("--log-level", default="warning", help="gateway and desk-sim log level")
    ap.add_argument("--out", type=Path, default=Path("/tmp/loadtest-run"))
    args = ap.parse_args()
    tune_loopback()
    args.out.mkdir(parents=True, exist_ok=True)
    port, ops = free_port(), free_port()
    env = dict(
        os.environ, GATEWAY_STATE_DIR=str(args.out / "state"), GATEWAY_LOG_LEVEL=args.log_level
    )
    gw_log = open(args.out / "gateway.log", "wb")  # noqa: SIM115
    serve = [
        *(sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}"),
        *("--max-connections", str(args.connections), "--ops-listen", f"127.0.0.1:{ops}"),
    ]
    desk = None
    if args.desk_processes:
        dport = free_port()
        desk = subprocess.Popen(
            [sys.executable, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{dport}",
             "--processes", str(args.desk_processes)],
            env=env, stdout=gw_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(2.0)
        serve += ["--downstream", f"general=127.0.0.1:{dport}"]
    gw = subprocess.Popen(serve, env=env, stdout=gw_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        up, want = metric(ops, "gateway_workers_up"), metric(ops, "gateway_workers")
        if up and up == want:
            break
        time.sleep(0.5)
    workers = metric(ops, "gateway_workers_up")
    base_rss = rss_bytes(gw.pid) // 1024
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.wait(5.0):
            conns = metric(ops, "gateway_connections_open") or 0.0
            samples.append((round(time.monotonic() - t0, 1), conns, rss_bytes(gw.pid) // 1024))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    url = (
        f"ws://127.0.0.1:{port}/v1/ws"
        if args.url_kind == "ws"
        else f"http://127.0.0.1:{port}/v1/stream"
    )
    lt = [
        sys.executable, "-m", "gateway", "loadtest", "--url", url,
        "--connections", str(args.connections), "--ramp", str(args.ramp),
        "--duration", str(args.duration), "--rate", str(args.rate),
        "--active", str(args.active), "--max-runtime", "1500",
        "--engine", args.engine, "--window", str(args.window),
        "--json", str(args.out / "result.json"), "--html", str(args.out / "report.html"),
        "--metrics", f"http://127.0.0.1:{ops}/metrics",
    ]  # fmt: skip
    t_start = time.monotonic()
    code = subprocess.call(lt, env=env)
    wall = time.monotonic() - t_start
    stop.set()
    th.join()
    terminate(gw, 60)
    if desk is not None:
        terminate(desk, 20)
    gw_log.close()
    peak = max(samples, key=lambda s: s[1]) if samples else (0, 0, 0)
    held = int(peak[1])
    summary = {
        "loadtest_exit": code,
        "downstream": f"desk-sim x{args.desk_processes}" if desk is not None else "demo bot",
        "workers": workers,
        "wall_s": round(wall, 1),
        "peak_connections_open": held,
        "rss_base_mib": round(base_rss / 1024, 1),
        "rss_at_peak_mib": round(peak[2] / 1024, 1),
        "rss_per_conn_kib": round((peak[2] - base_rss) / held, 2) if held else None,
        "samples": samples,
    }
    (args.out / "gateway-samples.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
