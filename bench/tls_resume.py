"""What a visitor's TLS reconnect costs the gateway, with a full handshake
and with a resumed one (a session ticket), side by side in one run.

    python bench/tls_resume.py --workers 2 --handshakes 3000 --threads 8 --repeat 2 [--key rsa]

A gateway with ``--workers`` workers (its demo bot, TLS with a throwaway
CA) on the first CPU; this process's client threads on the others. Each
phase opens ``--handshakes`` TCP connections from source addresses spread
over 127.0.0.0/8 (so ``SO_REUSEPORT`` spreads them over the workers), does
the TLS handshake and closes: phase "full" offers no session, phase
"resumed" offers the session of one earlier connection. Phases alternate
(full, resumed, full, ...). Reported per phase: handshakes per second,
the client's connect + handshake time (p50, p99), the gateway's CPU per
handshake (its processes' user + system time over the phase), and the share
of the phase's handshakes that the gateway's ``/metrics`` counts as resumed
(``gateway_tls_handshakes_total{resumed="true"}``). Before 2026-11-24 each
worker sealed tickets with its own key, so a ticket resumed only on the
worker that issued it: about 1 / workers of the reconnects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_bench as cb


def handshakes(ops: int) -> dict[str, float]:
    """``gateway_tls_handshakes_total`` by its ``resumed`` label."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=5) as r:
        text = r.read().decode()
    pat = r'^gateway_tls_handshakes_total\{resumed="(\w+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pat, text, re.M)}


def first_session(port: int, ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A session with the gateway's tickets: one request answered."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(b"GET /widget.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while b"\r\n\r\n" not in s.recv(65536):
            pass
        sess = s.session
    assert sess is not None
    return sess


def phase(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None, n: int, threads: int, base: int
) -> dict[str, Any]:
    """``n`` connect + handshake + close, over ``threads`` threads; their
    times (seconds), the phase's wall time and the failures."""
    times: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker(t: int) -> None:
        mine: list[float] = []
        bad = 0
        for k in range(t, n, threads):
            i = base + k
            src = f"127.{1 + i // 62500 % 250}.{i // 250 % 250}.{1 + i % 250}"
            t0 = time.perf_counter()
            try:
                raw = socket.create_connection(("127.0.0.1", port), 10, (src, 0))
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as s:
                    mine.append(time.perf_counter() - t0)
                    if session is not None and not s.session_reused:
                        bad += 1
            except OSError:
                bad += 1
        with lock:
            times.extend(mine)
            failures[0] += bad

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    times.sort()
    return {"times": times, "wall_s": wall, "failures": failures[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--handshakes", type=int, default=3000, help="per phase")
    ap.add_argument("--threads", type=int, default=8, help="client threads")
    ap.add_argument("--repeat", type=int, default=2, help="(full, resumed) pairs")
    ap.add_argument("--key", choices=("ecdsa", "rsa"), default="ecdsa",
                    help="the certificate's key: P-256 or RSA 2048")  # fmt: skip
    args = ap.parse_args()
    cb.tune_loopback()
    ca, cert, key = cb._tls_files(args.key)
    ctx = ssl.create_default_context(cafile=ca)
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs (the gateway on one, the clients on the rest)")
    extra = {"GATEWAY_TLS_CERT": cert, "GATEWAY_TLS_KEY": key,
             "GATEWAY_HANDSHAKE_RATE": "1000000", "GATEWAY_HANDSHAKE_BURST": "100000"}  # fmt: skip
    gw = cb.start_gateway(args.workers, extra=extra, conns=20000)
    rows: list[dict[str, Any]] = []
    base = 0
    try:
        cb.pin(gw.proc.pid, {cpus[0]})
        os.sched_setaffinity(0, set(cpus[1:]))
        assert gw.ops_port is not None
        sess = first_session(gw.port, ctx)
        time.sleep(1.5)
        for _ in range(args.repeat):
            for name, s in (("full", None), ("resumed", sess)):
                before, cpu0 = handshakes(gw.ops_port), cb.cpu_seconds(gw.proc.pid)
                r = phase(gw.port, ctx, s, args.handshakes, args.threads, base)
                cpu = cb.cpu_seconds(gw.proc.pid) - cpu0
                base += args.handshakes
                time.sleep(1.5)  # the workers' counters reach the supervisor
                after = handshakes(gw.ops_port)
                done = sum(after.values()) - sum(before.values())
                resumed = after.get("true", 0) - before.get("true", 0)
                t = r["times"]
                rows.append({
                    "phase": name, "handshakes": len(t), "per_s": len(t) / r["wall_s"],
                    "p50_ms": t[len(t) // 2] * 1e3, "p99_ms": t[int(len(t) * 0.99)] * 1e3,
                    "gateway_cpu_us": cpu / max(1, len(t)) * 1e6,
                    "resumed_share": resumed / done if done else 0.0,
                    "failures": r["failures"],
                })  # fmt: skip
    finally:
        os.sched_setaffinity(0, mine)
        gw.stop()
    print(
        f"{args.workers} workers on CPU {cpus[0]}, {args.threads} client threads on "
        f"{cpus[1:]}, {args.handshakes} handshakes per phase, {args.key} certificate"
    )
    print("| phase | handshakes/s | connect + handshake p50 / p99 ms | gateway CPU µs per "
          "handshake | counted resumed | failures |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['per_s']:,.0f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
            f"{r['gateway_cpu_us']:.0f} | {r['resumed_share']:.1%} | {r['failures']} |"
        )
    full = [r["gateway_cpu_us"] for r in rows if r["phase"] == "full"]
    res = [r["gateway_cpu_us"] for r in rows if r["phase"] == "resumed"]
    ratio = (sum(full) / len(full)) / (sum(res) / len(res))
    print(f"gateway CPU per handshake, full / resumed: {ratio:.2f}x")
    cb.OUT.mkdir(exist_ok=True)
    (cb.OUT / "bench-tls-resume.json").write_text(json.dumps({"rows": rows, "ratio": ratio}))


if __name__ == "__main__":
    main()
