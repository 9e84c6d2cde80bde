"""A bounded soak: steady traffic, connection churn and downstream crashes
for ``--minutes``, with the gateway's memory sampled throughout and every
acknowledged message looked for at the desks at the end.

    python bench/soak.py --minutes 5 --connections 2000 --rate 4000 --churn 400 --kill-every 60

- `gateway serve --workers 2` forwarding group ``general`` to two
  `gateway desk-sim` endpoints, each recording what it receives
  (``--record``);
- steady load: the native client (gw-loadgen) holds ``--connections``
  WebSocket sessions for the whole soak, sending ``--rate`` messages/s in
  all;
- churn: one Python `gateway loadtest` after another, each opening
  ``--churn`` new sessions, sending 2 messages/s on each for 4 s and
  closing them (so connections and sessions are made and dropped all along;
  with ``--churn-h2`` every other round over HTTP/2);
- faults: every ``--kill-every`` seconds one desk-sim (A, then B, ...) is
  killed with SIGKILL and started again 3 s later on its port (its
  in-flight messages are redelivered to the other one);
- every 10 s: the RSS of the gateway (supervisor and workers) and of the
  desks, connections open, messages acknowledged and redelivered (the
  gateway's /metrics).

At the end: the messages the load clients saw acknowledged, against the
distinct (session, message id) pairs the desks recorded: an acknowledged
message missing at the desks would be a lost one.

``--count-cycles``: the workers run with their cyclic garbage collector
off and, at every sample, collect once and count what they found
(``bench/cycles_site/sitecustomize.py``): objects left in reference cycles,
which in a normal worker would wait for the collector (the oldest
generation's collections are rare). A column per sample and, at the end,
the types found. Bounded: every client
stops itself, and everything started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_bench as cb
import cyclecount

from gateway.loadtest import gwmetrics

SAMPLE_S = 10.0


class Desk:
    """A desk-sim on a fixed port that can be killed and started again."""

    def __init__(self, port: int, record: Path, log: Path, env: dict[str, str]) -> None:
        self.argv = [sys.executable, "-m", "gateway", "desk-sim", "--listen",
                     f"127.0.0.1:{port}", "--record", str(record)]  # fmt: skip
        self.port, self.log, self.env = port, log, env
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as f:
            p = subprocess.Popen(self.argv, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        cb.wait_port(self.port)
        return p

    def crash_and_restart(self, down_s: float = 3.0) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        time.sleep(down_s)
        self.proc = self._start()

    def rss(self) -> int:
        return cb.rss_bytes(self.proc.pid) if self.proc.poll() is None else 0


def recorded(paths: list[Path]) -> int:
    """Distinct (session, message id) pairs in desk-sim record files."""
    seen: set[tuple[str, Any]] = set()
    for p in paths:
        if not p.exists():
            continue
        for line in p.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            seen.add((r["sid"], r["id"]))
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=2000, help="steady sessions")
    ap.add_argument("--rate", type=float, default=4000.0, help="steady messages/s in all")
    ap.add_argument("--churn", type=int, default=400, help="sessions per churn round")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between desk crashes")
    ap.add_argument("--session-ttl", type=float, default=300.0,
                    help="the gateway's session_ttl_s: how long a closed session waits "
                    "for its visitor to resume (and holds its memory)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=cb.OUT / "soak")
    ap.add_argument(
        "--churn-h2",
        action="store_true",
        help="every other churn round over HTTP/2 (h2c) instead of WebSocket",
    )
    ap.add_argument("--count-cycles", action="store_true",
                    help="workers without their cyclic collector: count what each sample's "
                    "collection finds")  # fmt: skip
    args = ap.parse_args()
    if not 0.5 <= args.minutes <= 60:
        raise SystemExit("--minutes: between 0.5 and 60")
    cb.tune_loopback()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        if old.is_file():
            old.unlink()
    env = dict(os.environ, GATEWAY_STATE_DIR=str(out / "state"), GATEWAY_LOG_LEVEL="warning")
    pa, pb = cb.free_port(), cb.free_port()
    records = [out / "desk-a.jsonl", out / "desk-b.jsonl"]
    desks = [
        Desk(p, r, out / f"desk-{n}.log", env)
        for p, r, n in zip((pa, pb), records, "ab", strict=True)
    ]
    port, ops = cb.free_port(), cb.free_port()
    gw_log = open(out / "gateway.log", "wb")  # noqa: SIM115
    gw_env = {**env, "GATEWAY_VISITOR_MSG_RATE": "0", "GATEWAY_MAX_CONNS_PER_IP": "100000",
              "GATEWAY_SESSION_TTL_S": str(args.session_ttl)}  # fmt: skip
    if args.count_cycles:
        gw_env = cyclecount.env_for(gw_env, out / "cycles")
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--workers", "2", "--max-connections", str(2 * (args.connections + args.churn)),
         "--ops-listen", f"127.0.0.1:{ops}",
         "--downstream", f"general=127.0.0.1:{pa},127.0.0.1:{pb}"],
        env=gw_env, stdout=gw_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    cb.wait_port(port)
    time.sleep(2.0)  # both workers' links up
    url = f"ws://127.0.0.1:{port}/v1/ws"
    h2_url = f"http://127.0.0.1:{port}/v1/stream"
    seconds = args.minutes * 60
    samples: list[dict[str, Any]] = []
    crashes: list[float] = []
    stop = threading.Event()
    t0 = time.monotonic()
    metrics_url = f"http://127.0.0.1:{ops}/metrics"

    def sampler() -> None:
        while True:
            if args.count_cycles:
                cyclecount.collect(gw.pid)
            try:
                m = gwmetrics.fetch(metrics_url, timeout=5)
            except gwmetrics.MetricsError:
                m = {}
            samples.append({
                "t": round(time.monotonic() - t0), "gateway_rss": cb.rss_bytes(gw.pid),
                "desk_rss": sum(d.rss() for d in desks),
                "open": m.get(("gateway_connections_open", ()), 0.0),
                "detached": m.get(("gateway_sessions_detached", ()), 0.0),
                "acked": m.get(("gateway_messages_acked_total", ()), 0.0),
                "redelivered": sum(v for (k, _), v in m.items()
                                   if k == "gateway_downstream_redelivered_total"),
            })  # fmt: skip
            if stop.wait(SAMPLE_S):
                return

    def faults() -> None:
        i = 0
        while not stop.wait(args.kill_every):
            if time.monotonic() - t0 > seconds - 10:
                return
            crashes.append(round(time.monotonic() - t0))
            desks[i % 2].crash_and_restart()
            i += 1

    def loadtest(name: str, *flags: str, target: str = url) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "gateway", "loadtest", "--url", target, "--no-progress",
                "--json", str(out / f"{name}.json"), *flags]  # fmt: skip
        with open(out / f"{name}.log", "ab") as f:
            return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)

    threads = [threading.Thread(target=sampler), threading.Thread(target=faults)]
    for t in threads:
        t.start()
    steady = loadtest(
        "steady", "--engine", "native", "--connections", str(args.connections),
        "--ramp", "2000", "--rate", str(args.rate), "--duration", str(seconds - 5),
        "--max-runtime", str(seconds + 120),
    )  # fmt: skip
    rounds = 0
    try:
        while time.monotonic() - t0 < seconds - 12:
            churn = loadtest(
                f"churn-{rounds}", "--connections", str(args.churn), "--ramp", "2000",
                "--rate", str(2 * args.churn), "--duration", "4", "--max-runtime", "60",
                target=h2_url if args.churn_h2 and rounds % 2 else url,
            )  # fmt: skip
            churn.wait(90)
            rounds += 1
        steady.wait(seconds + 180)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for p in (steady,):
            if p.poll() is None:
                p.kill()
        cb.terminate(gw, 60)
        for d in desks:
            cb.terminate(d.proc, 10)
    report(args, out, samples, crashes, rounds, records)


def report(
    args: argparse.Namespace,
    out: Path,
    samples: list[dict[str, Any]],
    crashes: list[float],
    rounds: int,
    records: list[Path],
) -> None:
    acked = sent = 0
    runs = sorted(out.glob("*.json"))
    for p in runs:
        r = json.loads(p.read_text())
        acked += int(r["counts"].get("acked", 0))
        sent += int(r["counts"].get("sent", 0))
    got = recorded(records)
    cycles, cycle_types = cyclecount.counts(out / "cycles") if args.count_cycles else ([], {})
    print(f"{args.minutes:g} min, session_ttl_s {args.session_ttl:g}: {args.connections} "
          f"steady sessions at {args.rate:,.0f} msg/s, "
          f"{rounds} churn rounds of {args.churn} sessions, desk crashes at {crashes} s"
          )  # fmt: skip
    extra = " cyclic garbage found (objects) |" if args.count_cycles else ""
    print("| t s | gateway RSS MiB | desks RSS MiB | connections open | sessions waiting to "
          f"resume | acked (gateway) | redelivered |{extra}")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for i, s in enumerate(samples):
        col = f" {cycles[i]:,} |" if i < len(cycles) else (" - |" if extra else "")
        print(f"| {s['t']} | {s['gateway_rss'] / 2**20:.1f} | {s['desk_rss'] / 2**20:.1f} | "
              f"{s['open']:,.0f} | {s['detached']:,.0f} | {s['acked']:,.0f} | "
              f"{s['redelivered']:,.0f} |{col}")  # fmt: skip
    if args.count_cycles:
        top = sorted(cycle_types.items(), key=lambda kv: -kv[1])[:12]
        print(f"cyclic garbage over the run: {sum(cycles):,} objects; most common types: "
              + ", ".join(f"{k} {v:,}" for k, v in top))  # fmt: skip
    late = [s["gateway_rss"] for s in samples if s["t"] >= 60]
    if len(late) >= 2:
        print(f"gateway RSS from 60 s to the end: {late[0] / 2**20:.1f} -> "
              f"{late[-1] / 2**20:.1f} MiB (max {max(late) / 2**20:.1f})")  # fmt: skip
    lost = max(0, acked - got)
    print(f"messages sent {sent:,}, acknowledged to the clients {acked:,}, distinct messages "
          f"recorded by the desks {got:,}: {lost:,} acknowledged and not recorded")  # fmt: skip
    (out / "summary.json").write_text(json.dumps({
        "samples": samples, "crashes": crashes, "rounds": rounds, "sent": sent,
        "acked": acked, "recorded": got, "lost": lost, "cycles": cycles}))  # fmt: skip
    if lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
