"""How fast the gateway takes a failing downstream out of rotation and puts
it back: time from a failure to the breaker opening (or the link being
dropped) and from the repair to traffic flowing to it again.

    .venv/bin/python bench/breaker_bench.py [--timeout-s 1.0]

Two desk-sims (A, B) behind one gateway worker, 100 visitors sending 400
msg/s in total (the harness's engine); after the repair, a new visitor
arrives every 0.1 s and sends 3 messages (existing sessions stay where
they are: sticky; new ones are what a half-open breaker probes with).
Scenarios:

- stall: A stops answering after 1,500 messages (connection and PINGs
  still fine). Measured: stall -> breaker `open` (its requests time out
  after `request_timeout_s`, `consecutive_failures` of them trip it); then
  A is replaced by a healthy desk-sim: restart -> breaker `closed`.
- crash: A exits abruptly after 1,500 messages. Measured: exit -> link
  dropped (`downstream_link_down`); restart -> link up
  (`downstream_link_up`).

Times come from the gateway's JSON log events (`ts`, wall clock; a breaker
turns half-open at the forwarder's 0.1 s tick once its open time is up) and the wall clock of this
script (failure time: A's record file reaching 1,500 lines, or A's exit).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.core_bench import OUT, PY, Server, free_port, start_gateway, tokens
from gateway.loadtest.engine import Plan
from gateway.loadtest.runner import run

FAIL_AFTER = 1500


def desk(port: int, record: Path, *extra: str) -> Server:
    argv = [PY, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{port}", "--no-reply",
            "--record", str(record), *extra]  # fmt: skip
    return Server(argv, port)


def lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def events(log: Path, name: str, endpoint: str, since: float, **match: str) -> list[float]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") != name or e.get("endpoint") != endpoint or e.get("ts", 0) < since:
            continue
        if all(e.get(k) == v for k, v in match.items()):
            out.append(float(e["ts"]))
    return out


def wait_event(
    log: Path, name: str, endpoint: str, since: float, timeout: float, **m: str
) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = events(log, name, endpoint, since, **m)
        if got:
            return got[0]
        time.sleep(0.05)
    return None


def scenario(kind: str, timeout_s: float) -> dict[str, Any]:
    pa, pb = free_port(), free_port()
    rec_a, rec_b = OUT / f"brk-{kind}-a.jsonl", OUT / f"brk-{kind}-b.jsonl"
    for r in (rec_a, rec_b):
        r.unlink(missing_ok=True)
    fault = (
        ["--stall-after", str(FAIL_AFTER)]
        if kind == "stall"
        else ["--crash-after", str(FAIL_AFTER)]
    )
    a = desk(pa, rec_a, *fault)
    b = desk(pb, rec_b)
    cfg = OUT / f"brk-{kind}.toml"
    cfg.write_text(
        f"""[downstream]
request_timeout_s = {timeout_s}
[downstream.clusters.general]
endpoints = ["127.0.0.1:{pa}", "127.0.0.1:{pb}"]
[downstream.groups.general]
cluster = "general"
"""
    )
    gw = start_gateway(1, {"GATEWAY_CONFIG": str(cfg), "GATEWAY_LOG_LEVEL": "info"})
    log = OUT / f"server-{gw.port}.log"
    ep = f"127.0.0.1:{pa}"
    res: dict[str, Any] = {"scenario": kind, "request_timeout_s": timeout_s}
    plan = Plan(host="127.0.0.1", port=gw.port, connections=100, active=100, rate=400.0,
                duration=40.0, tokens=tokens(100), max_runtime=90)  # fmt: skip
    holder: dict[str, Any] = {}
    th = threading.Thread(target=lambda: holder.update(r=run(plan, 1)), daemon=True)
    th.start()
    try:
        t_fail = None
        deadline = time.time() + 30
        while time.time() < deadline:
            if kind == "stall" and lines(rec_a) >= FAIL_AFTER:
                t_fail = time.time()
                break
            if kind == "crash" and a.proc.poll() is not None:
                t_fail = time.time()
                break
            time.sleep(0.005)
        if t_fail is None:
            res["error"] = "the fault did not happen in time"
            return res
        if kind == "stall":
            t_open = wait_event(log, "breaker", ep, t_fail - 1, 20, to="open")
            res["fail_to_open_s"] = None if t_open is None else round(t_open - t_fail, 2)
            time.sleep(1.0)
        else:
            t_down = wait_event(log, "downstream_link_down", ep, t_fail - 1, 20)
            res["fail_to_link_down_s"] = None if t_down is None else round(t_down - t_fail, 3)
            time.sleep(2.0)
        a.stop()
        t_restart = time.time()
        a = desk(pa, rec_a)  # healthy now
        # existing sessions stay with B (sticky); new visitors arriving every
        # 0.1 s (3 messages each) are what the balancer can give A's probes
        toks = tokens(1100)[100:]
        stop_fresh = threading.Event()

        def arrivals() -> None:
            import trio

            import gateway.client as gc

            counts = {"connected": 0, "acked": 0}

            async def visitor(tok: str) -> None:
                url = f"ws://127.0.0.1:{gw.port}/v1/ws"
                with trio.move_on_after(10):
                    async with gc.connect(url, token=tok, reconnect=False) as v:
                        counts["connected"] += 1
                        for k in range(3):
                            await v.send(f"probe {k}")
                            counts["acked"] += 1

            async def main() -> None:
                async with trio.open_nursery() as n:
                    for tok in toks:
                        if stop_fresh.is_set():
                            break
                        n.start_soon(visitor, tok)
                        await trio.sleep(0.1)

            trio.run(main)
            holder["fresh"] = {"counts": counts}

        fresh_th = threading.Thread(target=arrivals, daemon=True)
        fresh_th.start()
        if kind == "stall":
            t_half = wait_event(log, "breaker", ep, t_restart, 40, to="half_open")
            res["restart_to_half_open_s"] = None if t_half is None else round(t_half - t_restart, 2)
            t_closed = wait_event(log, "breaker", ep, t_restart, 40, to="closed")
            res["restart_to_closed_s"] = (
                None if t_closed is None else round(t_closed - t_restart, 2)
            )
        else:
            t_up = wait_event(log, "downstream_link_up", ep, t_restart, 40)
            res["restart_to_link_up_s"] = None if t_up is None else round(t_up - t_restart, 3)
        th.join(timeout=120)
        r = holder.get("r", {})
        res["acked"] = r.get("counts", {}).get("acked")
        res["errors"] = r.get("errors")
        res["rtt_p99_ms"] = r.get("rtt", {}).get("p99_ms")
        stop_fresh.set()
        fresh_th.join(timeout=60)
        f = holder.get("fresh", {})
        res["new_visitors"] = f.get("counts", {}).get("connected")
        res["new_visitors_acked"] = f.get("counts", {}).get("acked")
        res["to_a_after_restart"] = lines(rec_a) - FAIL_AFTER if kind == "stall" else None
        return res
    finally:
        for s in (gw, a, b):
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout-s", type=float, action="append", default=None,
                    help="request_timeout_s (repeatable; default 1.0 and 5.0)")  # fmt: skip
    args = ap.parse_args()
    rows = []
    for t in args.timeout_s or [1.0, 5.0]:
        rows.append(scenario("stall", t))
    rows.append(scenario("crash", (args.timeout_s or [5.0])[-1]))
    for r in rows:
        print(json.dumps(r))
    (OUT / "breaker.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
