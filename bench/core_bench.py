"""Gateway core benchmarks, side by side with the `websockets` library in the
same run, from the same raw-socket client (gateway.loadtest).

    python bench/core_bench.py throughput [--seconds 10] [--workers 1,2] [--clients 1] [--window 1]
        [--engine native|python]
    python bench/core_bench.py idle --connections 15000 [--workers 1] [--peer]
    python bench/core_bench.py idle --connections 250000 --workers 14 --hold 60
    python bench/core_bench.py idle --connections 5000 --workers 1 --tls
    python bench/core_bench.py e2e --workers 2 --connections 200 [--window 1]
        [--engine native|python]
    python bench/core_bench.py e2e-ratio --workers 2 --connections 200 [--window 8]
        [--no-desk-reply] [--repeat 5]
    python bench/core_bench.py forwarding --workers 2 --connections 200 --rate 10000 --repeat 5
        [--engine native|python]   (--rate 0: half the maximum measured first)
        [--isolate]   (the gateways on the first CPU, desk-sim and load clients on the others)
    python bench/core_bench.py rates --workers 1 --rates 2000,8000,16000,0 --seconds 6 [--isolate]
        (gateway CPU per message as the load rises, forwarding and bot side by side)
    python bench/core_bench.py wss --workers 1 --connections 200 --rate 3000 --repeat 2
        (visitors over TLS: read by the reactor or by a task each; --rate 0: closed loop)
    python bench/core_bench.py unloaded --workers 2 [--messages 400]
    python bench/core_bench.py clients --workers 2 --connections 1000 [--window 1]
    python bench/core_bench.py fastpaths --workers 2 --connections 200 --rate 12000 --repeat 3
        [--window 1] [--no-desk-reply]
    python bench/core_bench.py links --workers 1 --connections 200 --rate 8000 --repeat 2
        [--window 1] [--no-desk-reply]   (h2c and TLS downstream links; --rate 0: closed loop)

"idle" also reports new connections per second while the clients ramp up as
fast as they can (a reconnect storm from every client process at once).
Loopback limits are raised first when running as root (SYN backlog,
somaxconn, ephemeral port range).

Every mode prints a markdown table and writes JSON to out/bench-<mode>.json.
Servers are started and stopped by the script; runs are bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.loadtest import gwmetrics  # noqa: E402
from gateway.loadtest.engine import Plan  # noqa: E402
from gateway.loadtest.runner import run  # noqa: E402

PY = sys.executable
OUT = ROOT / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not come up")


def terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.extend(tree_pids(int(child)))
    except OSError:
        pass
    return out


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def tcp_mem_pages() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    return 0


class Server:
    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.ops_port: int | None = None  # a gateway's operator endpoint
        OUT.mkdir(exist_ok=True)
        self.log = open(OUT / f"server-{port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(port)
        time.sleep(1.0)  # let every worker bind

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):  # already gone (e.g. crashed)
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_peer() -> Server:
    port = free_port()
    return Server([PY, str(ROOT / "bench/peers/websockets_echo.py"), "127.0.0.1", str(port)], port)


def start_desk(
    processes: int = 1, think_ms: int = 0, reply: bool = True, tls: tuple[str, str] | None = None
) -> Server:
    """desk-sim; over TLS with ``tls`` = (certificate chain file, key file)."""
    port = free_port()
    argv = [PY, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{port}",
            "--think-ms", str(think_ms), "--processes", str(processes)]  # fmt: skip
    if not reply:
        argv.append("--no-reply")
    if tls is not None:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    return Server(argv, port)


def start_gateway(
    workers: int,
    extra: dict[str, str] | None = None,
    conns: int = 10000,
    downstream: list[str] | None = None,
    config: Path | None = None,
) -> Server:
    port, ops = free_port(), free_port()
    state = OUT / "bench-state"
    state.mkdir(parents=True, exist_ok=True)
    env = {
        "GATEWAY_STATE_DIR": str(state),
        "GATEWAY_BOT_THINK_MS": "0",
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_MAX_CONNS_PER_IP": "100000",
        "GATEWAY_VISITOR_MSG_RATE": "0",  # the load is many messages per connection
        **(extra or {}),
    }
    argv = [
        PY,
        "-m",
        "gateway",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--max-connections",
        str(conns),
        "--ops-listen",
        f"127.0.0.1:{ops}",
    ]
    for spec in downstream or []:
        argv += ["--downstream", spec]
    if config is not None:
        argv += ["--config", str(config)]
    srv = Server(argv, port, env)
    srv.ops_port = ops
    return srv


def tokens(n: int) -> list[str]:
    from gateway.config import load_config
    from gateway.protocol.tokens import mint

    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(OUT / "bench-state")}, {})
    tenant = cfg.tenants["demo"]
    secret = next(iter(tenant.secrets.values()))
    kid = next(iter(tenant.secrets))
    now = time.time()
    return [mint("demo", f"v{i}", secret, 7200, now, kid) for i in range(n)]


def row(name: str, r: dict[str, Any], extra: str = "") -> str:
    rtt = r["rtt"]
    return (
        f"| {name} | {r['msgs_per_s']:,.0f} | {rtt.get('p50_ms', 0):.2f} | "
        f"{rtt.get('p99_ms', 0):.2f} | {sum(r['errors'].values())} | {extra} |"
    )


def pin(pid: int, cpus: set[int]) -> None:
    """Restricts every thread of ``pid`` and of its live descendants to ``cpus``."""
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """Busy and total clock ticks of all CPUs since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # idle and iowait are not busy


def measured(srv: Server, plan: Plan, clients: int, desk: Server | None = None) -> dict[str, Any]:
    """``run`` plus the server's CPU time over the run: ``msgs_per_cpu_s`` is
    the server's work per message, whoever else shares the cores; with
    ``desk``, that downstream's CPU time too (``desk_cpu_s``).
    ``machine_busy``: how many of the machine's CPUs were busy on average,
    whoever used them (the clients' own share is ``client_cpu_s``)."""
    c0 = cpu_seconds(srv.proc.pid)
    d0 = cpu_seconds(desk.proc.pid) if desk is not None else 0.0
    b0, t0 = machine_ticks()
    r = run(plan, clients)
    b1, t1 = machine_ticks()
    r["machine_busy"] = (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)
    used = cpu_seconds(srv.proc.pid) - c0
    if desk is not None:
        r["desk_cpu_s"] = cpu_seconds(desk.proc.pid) - d0
    r["server_cpu_s"] = used
    r["msgs_per_cpu_s"] = r["counts"].get("acked", 0) / used if used > 0 else 0.0
    return r


def loop_counters(srv: Server) -> gwmetrics.Samples:
    """The gateway's /metrics (its event-loop counters, docs/operations.md),
    read once the workers' next report is in (they push every second)."""
    time.sleep(gwmetrics.SETTLE_S)
    return gwmetrics.fetch(f"http://127.0.0.1:{srv.ops_port}/metrics")


def loop_work(before: gwmetrics.Samples, after: gwmetrics.Samples, acked: int) -> dict[str, Any]:
    """Event-loop time per acknowledged message and per ready connection
    (µs), ready connections per wakeup, and the garbage collector's pauses,
    between two :func:`loop_counters` readings around a run that acked
    ``acked``."""
    g = gwmetrics.gateway_side(before, after, 1.0)  # loop_busy_cores: seconds
    busy = g["loop_busy_cores"]
    return {
        "loop_busy_s": busy,
        "loop_us_per_msg": busy / max(1, acked) * 1e6,
        "loop_us_per_event": g["loop_us_per_event"] or 0.0,
        "events_per_batch": g["events_per_wakeup"] or 0.0,
        "direct": g["direct_wakeups"] or 0.0,
        "gc": g["gc"],
    }


def cpu_us(r: dict[str, Any], key: str = "server_cpu_s") -> float:
    """CPU µs per acknowledged message of a :func:`measured` run
    (``desk_cpu_s``: the downstream's)."""
    return float(r[key]) / max(1, r["counts"].get("acked", 0)) * 1e6


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    n = args.connections
    plan = dict(connections=n, active=n, duration=args.seconds, size=230, max_runtime=120,
                window=args.window, engine=args.engine)  # fmt: skip
    peer = start_peer()
    try:
        res["websockets"] = measured(
            peer, Plan(host="127.0.0.1", port=peer.port, mode="echo", **plan), args.clients
        )
    finally:
        peer.stop()
    toks = tokens(n)
    for w in args.workers:
        gw = start_gateway(w)
        try:
            res[f"gateway-{w}w"] = measured(
                gw,
                Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks, **plan),
                args.clients,
            )
        finally:
            gw.stop()
    print_table(res, "server", "websockets", "vs websockets")
    base = res["websockets"]["msgs_per_cpu_s"]
    print()
    print("| server | server CPU s | msg per server CPU s | vs websockets |")
    print("|---|---|---|---|")
    for k, r in res.items():
        print(
            f"| {k} | {r['server_cpu_s']:.1f} | {r['msgs_per_cpu_s']:,.0f} | "
            f"{r['msgs_per_cpu_s'] / base if base else 0:.2f}x |"
        )
    return res


def print_table(res: dict[str, Any], first: str, base_key: str, ratio: str) -> dict[str, Any]:
    """Prints the runs as a markdown table, message rates as ratios to
    ``res[base_key]``; returns ``res``."""
    base = res[base_key]["msgs_per_s"]
    print(f"| {first} | msg/s | p50 ms | p99 ms | errors | {ratio} |")
    print("|---|---|---|---|---|---|")
    for k, r in res.items():
        print(row(k, r, f"{r['msgs_per_s'] / base:.2f}x"))
    return res


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    """visitor -> gateway -> desk-sim -> ack: the maximum (closed loop), then
    open-loop runs at 50% and 90% of it; the same gateway with the embedded
    demo bot (no network hop) at the same rates shows what forwarding adds;
    the websockets echo is the peer."""
    res: dict[str, Any] = {}
    conns = args.connections
    plan = dict(connections=conns, active=conns, duration=args.seconds, size=230, max_runtime=300,
                engine=args.engine, window=args.window)  # fmt: skip
    peer = start_peer()
    try:
        res["websockets echo (max)"] = run(
            Plan(host="127.0.0.1", port=peer.port, mode="echo", **plan), args.clients
        )
    finally:
        peer.stop()
    toks = tokens(conns)
    w = args.workers[-1]
    desk = start_desk(processes=1, reply=args.desk_reply)
    what = "desk-sim" if args.desk_reply else "desk-sim, acks only"
    try:
        gw = start_gateway(w, downstream=[f"general=127.0.0.1:{desk.port}"], conns=conns)
        try:
            time.sleep(1.0)  # links up
            mk = dict(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks, **plan)
            top: dict[str, Any] = {}
            for share in (1.0, 0.5, 0.9):
                extra = {"rate": top["msgs_per_s"] * share} if top else {}
                r = measured(gw, Plan(**{**mk, **extra}), args.clients, desk)  # type: ignore[arg-type]
                top = top or r
                label = "max" if share == 1.0 else f"@{int(share * 100)}%"
                res[f"gateway-{w}w + {what} ({label})"] = r
        finally:
            gw.stop()
    finally:
        desk.stop()
    gw = start_gateway(w, conns=conns)
    try:
        mk = dict(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks, **plan)
        res[f"gateway-{w}w + in-process bot (@50%)"] = measured(
            gw,
            Plan(**{**mk, "rate": top["msgs_per_s"] * 0.5}),  # type: ignore[arg-type]
            args.clients,
        )
    finally:
        gw.stop()
    print_table(res, "run", "websockets echo (max)", "vs websockets max")
    print()
    print("| run | gateway CPU µs/msg | desk-sim CPU µs/msg |")
    print("|---|---|---|")
    for k, r in res.items():
        if "server_cpu_s" in r:
            desk_us = f"{cpu_us(r, 'desk_cpu_s'):.1f}" if "desk_cpu_s" in r else "-"
            print(f"| {k} | {cpu_us(r):.1f} | {desk_us} |")
    return res


def e2e_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """The end-to-end maximum against the websockets echo, measured in
    alternation (echo, gateway + desk-sim, echo, ...; ``--repeat`` pairs,
    all three servers up throughout), so that each ratio compares two runs
    a few seconds apart on the same noisy machine; reports every pair and
    the median ratio."""
    conns = args.connections
    w = args.workers[-1]
    plan = dict(connections=conns, active=conns, duration=args.seconds, size=230, max_runtime=300,
                engine=args.engine, window=args.window)  # fmt: skip
    toks = tokens(conns)
    what = "desk-sim" if args.desk_reply else "desk-sim, acks only"
    pairs: list[dict[str, Any]] = []
    peer = start_peer()
    desk = start_desk(processes=1, reply=args.desk_reply)
    gw = start_gateway(w, downstream=[f"general=127.0.0.1:{desk.port}"], conns=conns)
    try:
        time.sleep(1.0)  # links up
        for _ in range(args.repeat):
            echo = measured(
                peer, Plan(host="127.0.0.1", port=peer.port, mode="echo", **plan), args.clients
            )
            fwd = measured(
                gw,
                Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks, **plan),  # type: ignore[arg-type]
                args.clients,
                desk,
            )
            for r in (echo, fwd):
                r.pop("hist", None)
            pairs.append({"echo": echo, "gateway": fwd})
    finally:
        gw.stop()
        desk.stop()
        peer.stop()
    print(f"{conns} connections x {args.window} in flight, {w} gateway workers, {what}")
    print("| pair | websockets echo msg/s | gateway + desk-sim msg/s | ratio | "
          "gateway CPU µs/msg | desk-sim CPU µs/msg |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ratios = []
    for i, p in enumerate(pairs, 1):
        e, g = p["echo"], p["gateway"]
        ratio = g["msgs_per_s"] / max(1.0, e["msgs_per_s"])
        ratios.append(ratio)
        print(f"| {i} | {e['msgs_per_s']:,.0f} | {g['msgs_per_s']:,.0f} | {ratio:.2f}x | "
              f"{cpu_us(g):.1f} | {cpu_us(g, 'desk_cpu_s'):.1f} |")  # fmt: skip
    median = sorted(ratios)[len(ratios) // 2]
    print(f"median ratio: {median:.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    return {"e2e-ratio": {"pairs": pairs, "median_ratio": median}}


def forwarding(args: argparse.Namespace) -> dict[str, Any]:
    """What the downstream hop adds to the round trip: two gateways side by
    side, one forwarding to desk-sim over HTTP/2, one answering with its
    in-process bot, loaded in alternation (A B A B ...) at the same rate,
    so both see the same machine noise; reports each pair's p50/p99 and the
    median of the differences. ``--rate 0``: half the forwarding gateway's
    closed-loop maximum, measured first in the same invocation."""
    conns = args.connections
    toks = tokens(conns)
    w = args.workers[-1]
    plan = dict(connections=conns, active=conns, duration=args.seconds, size=230,
                max_runtime=300, rate=args.rate, engine=args.engine)  # fmt: skip
    res: dict[str, Any] = {"pairs": []}
    with _side_by_side(w, conns, args.isolate, res) as (desk, fwd, bot):
        if not args.rate:
            before = loop_counters(fwd)
            top = run(Plan(host="127.0.0.1", port=fwd.port, mode="gateway", tokens=toks,
                           **{**plan, "rate": 0.0}), args.clients)  # type: ignore[arg-type]  # fmt: skip
            plan["rate"] = args.rate = round(top["msgs_per_s"] * 0.5)
            res["max_msgs_per_s"] = top["msgs_per_s"]
            res["max_loop"] = lw = loop_work(
                before, loop_counters(fwd), top["counts"].get("acked", 0)
            )
            print(f"maximum (desk-sim, closed loop): {top['msgs_per_s']:,.0f} msg/s; gateway "
                  f"event loop {lw['loop_us_per_msg']:.1f} µs per message, "
                  f"{lw['loop_us_per_event']:.1f} per ready connection, "
                  f"{lw['events_per_batch']:.2f} ready connections per wakeup")  # fmt: skip
        for _ in range(args.repeat):
            pair = {}
            for name, gw in (("desk-sim", fwd), ("bot", bot)):
                before = loop_counters(gw)
                r = measured(gw, Plan(host="127.0.0.1", port=gw.port, mode="gateway",
                                      tokens=toks, **plan), args.clients, desk)  # type: ignore[arg-type]  # fmt: skip
                lw = loop_work(before, loop_counters(gw), r["counts"].get("acked", 0))
                pair[name] = {"msgs_per_s": r["msgs_per_s"], **r["rtt"], **lw,
                              "gateway_cpu_us": cpu_us(r),
                              "desk_cpu_us": cpu_us(r, "desk_cpu_s"),
                              "client_cpu_us": cpu_us(r, "client_cpu_s"),
                              "machine_busy": r["machine_busy"]}  # fmt: skip
            res["pairs"].append(pair)
    print(f"{conns} connections, {args.rate:,.0f} msg/s offered, {w} workers")
    print("| pair | desk-sim p50 / p99 ms | in-process bot p50 / p99 ms | added p50 / p99 ms |")
    print("|---|---|---|---|")
    d50, d99 = [], []
    for i, p in enumerate(res["pairs"], 1):
        a, b = p["desk-sim"], p["bot"]
        d50.append(a["p50_ms"] - b["p50_ms"])
        d99.append(a["p99_ms"] - b["p99_ms"])
        print(f"| {i} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} | {b['p50_ms']:.2f} / "
              f"{b['p99_ms']:.2f} | {d50[-1]:+.2f} / {d99[-1]:+.2f} |")  # fmt: skip
    res["median_added_p50_ms"] = sorted(d50)[len(d50) // 2]
    res["median_added_p99_ms"] = sorted(d99)[len(d99) // 2]
    print(f"median added: p50 {res['median_added_p50_ms']:+.2f} ms, "
          f"p99 {res['median_added_p99_ms']:+.2f} ms")  # fmt: skip
    print()
    print("| pair | gateway CPU µs/msg, desk-sim / bot | desk-sim CPU µs/msg | "
          "load client CPU µs/msg, desk-sim / bot | CPUs busy, desk-sim / bot |")  # fmt: skip
    print("|---|---|---|---|---|")
    for i, p in enumerate(res["pairs"], 1):
        a, b = p["desk-sim"], p["bot"]
        print(f"| {i} | {a['gateway_cpu_us']:.1f} / {b['gateway_cpu_us']:.1f} | "
              f"{a['desk_cpu_us']:.1f} | {a['client_cpu_us']:.1f} / {b['client_cpu_us']:.1f} | "
              f"{a['machine_busy']:.2f} / {b['machine_busy']:.2f} of {os.cpu_count()} |"
              )  # fmt: skip
    print()
    print("| pair | gateway event loop µs per message, desk-sim / bot | µs per ready "
          "connection, desk-sim / bot | ready connections per wakeup, desk-sim / bot | "
          "wakeups from the loop's own wait, desk-sim / bot |")  # fmt: skip
    print("|---|---|---|---|---|")
    for i, p in enumerate(res["pairs"], 1):
        a, b = p["desk-sim"], p["bot"]
        print(f"| {i} | {a['loop_us_per_msg']:.1f} / {b['loop_us_per_msg']:.1f} | "
              f"{a['loop_us_per_event']:.1f} / {b['loop_us_per_event']:.1f} | "
              f"{a['events_per_batch']:.2f} / {b['events_per_batch']:.2f} | "
              f"{a['direct']:.0%} / {b['direct']:.0%} |")  # fmt: skip
    print()
    print("| pair | gateway GC pauses, desk-sim | gateway GC pauses, bot |")
    print("|---|---|---|")
    for i, p in enumerate(res["pairs"], 1):
        a, b = p["desk-sim"], p["bot"]
        print(f"| {i} | {gwmetrics.gc_text(a)} | {gwmetrics.gc_text(b)} |")
    return {"forwarding": res}


@contextlib.contextmanager
def _side_by_side(
    workers: int, conns: int, isolate: bool, res: dict[str, Any]
) -> Iterator[tuple[Server, Server, Server]]:
    """desk-sim, a gateway forwarding to it and a gateway with its bot
    (pinned as ``--isolate`` says, recorded in ``res``), stopped after."""
    mine = os.sched_getaffinity(0)
    desk = start_desk(processes=1)
    fwd = start_gateway(workers, downstream=[f"general=127.0.0.1:{desk.port}"], conns=conns)
    bot = start_gateway(workers, conns=conns)
    try:
        if isolate:
            res["isolate"] = _isolate((fwd, bot), desk)
        time.sleep(1.0)  # links up
        yield desk, fwd, bot
    finally:
        os.sched_setaffinity(0, mine)
        fwd.stop()
        bot.stop()
        desk.stop()


def _isolate(gateways: tuple[Server, ...], desk: Server) -> dict[str, Any]:
    """``--isolate``: as in production, where visitors and desks are other
    machines, the gateways get the first CPU to themselves; desk-sim and
    the load clients this process starts share the rest (undone by
    resetting this process's affinity)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--isolate needs at least 2 CPUs")
    gw_cpus, rest = set(cpus[:1]), set(cpus[1:])
    for srv in gateways:
        pin(srv.proc.pid, gw_cpus)
    pin(desk.proc.pid, rest)
    os.sched_setaffinity(0, rest)
    print(f"gateways on CPU {sorted(gw_cpus)}, desk-sim and load clients on {sorted(rest)}")
    return {"gateway_cpus": sorted(gw_cpus), "other_cpus": sorted(rest)}


def rates(args: argparse.Namespace) -> dict[str, Any]:
    """What a message costs the gateway as the load rises: the forwarding
    gateway (to desk-sim) and the one with its in-process bot, loaded in
    alternation at each of ``--rates`` (0: closed loop, the maximum). The
    gateway's CPU time per message, its event loop's time per message and
    ready connections per wakeup, and the round trip. CPU time is counted
    over each whole run (the 200 connections' handshakes included)."""
    conns = args.connections
    toks = tokens(conns)
    w = args.workers[-1]
    res: dict[str, Any] = {"runs": []}
    with _side_by_side(w, conns, args.isolate, res) as (desk, fwd, bot):
        for rate in args.rates:
            for name, gw in (("desk-sim", fwd), ("bot", bot)):
                before = loop_counters(gw)
                r = measured(gw, Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks,
                                      connections=conns, active=conns, duration=args.seconds,
                                      size=230, max_runtime=300, rate=rate, engine=args.engine),
                             args.clients, desk)  # fmt: skip
                lw = loop_work(before, loop_counters(gw), r["counts"].get("acked", 0))
                res["runs"].append({"rate": rate, "gateway": name, "msgs_per_s": r["msgs_per_s"],
                                    **r["rtt"], **lw, "gateway_cpu_us": cpu_us(r)})  # fmt: skip
    print(f"{conns} connections, {w} workers")
    print("| offered msg/s | gateway | acked msg/s | gateway CPU µs/msg | its cores | "
          "event loop µs/msg | ready connections per wakeup | p50 / p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for x in res["runs"]:
        offered = f"{x['rate']:,.0f}" if x["rate"] else "closed loop"
        cores = x["gateway_cpu_us"] * x["msgs_per_s"] / 1e6
        print(f"| {offered} | {x['gateway']} | {x['msgs_per_s']:,.0f} | "
              f"{x['gateway_cpu_us']:.1f} | {cores:.2f} | {x['loop_us_per_msg']:.1f} | "
              f"{x['events_per_batch']:.2f} | "
              f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f} |")  # fmt: skip
    return {"rates": res}


def _desk_run(
    gw: Server, desk: Server, toks: list[str], plan: dict[str, Any], clients: int
) -> dict[str, Any]:
    """One load of a fresh gateway forwarding to a fresh desk-sim (both
    stopped after): msg/s, p50/p99, both servers' CPU per message, errors."""
    try:
        time.sleep(1.0)  # links up
        r = measured(gw, Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks,
                              **plan), clients, desk)  # fmt: skip
    finally:
        gw.stop()
        desk.stop()
    return {"msgs_per_s": r["msgs_per_s"], **r["rtt"], "gateway_cpu_us": cpu_us(r),
            "desk_cpu_us": cpu_us(r, "desk_cpu_s"),
            "errors": sum(r["errors"].values())}  # fmt: skip


_FASTPATH_VARS = ("GATEWAY_WS_FASTPATH", "GATEWAY_MSGPACK_FASTPATH")


def fastpaths(args: argparse.Namespace) -> dict[str, Any]:
    """The native fast paths off and on (docs/operations.md), in
    alternation: desk-sim and a gateway started with the switches in their
    environment, loaded at ``--rate`` (0: closed loop); p50/p99 and both
    servers' CPU per message."""
    conns = args.connections
    toks = tokens(conns)
    w = args.workers[-1]
    plan = dict(connections=conns, active=conns, duration=args.seconds, size=230, max_runtime=300,
                rate=args.rate, engine=args.engine, window=args.window)  # fmt: skip
    runs: list[dict[str, Any]] = []
    saved = {k: os.environ.get(k) for k in _FASTPATH_VARS}
    try:
        for _ in range(args.repeat):
            for on in ("0", "1"):
                os.environ.update({k: on for k in _FASTPATH_VARS})
                desk = start_desk(processes=1, reply=args.desk_reply)
                gw = start_gateway(w, downstream=[f"general=127.0.0.1:{desk.port}"], conns=conns)
                runs.append({"fast_paths": on == "1",
                             **_desk_run(gw, desk, toks, plan, args.clients)})  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"{conns} connections x {args.window} in flight, {args.rate:,.0f} msg/s offered, "
          f"{w} workers, replies {'on' if args.desk_reply else 'off'}")  # fmt: skip
    print("| fast paths | msg/s | p50 ms | p99 ms | gateway CPU µs/msg | desk-sim CPU µs/msg |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {'on' if r['fast_paths'] else 'off'} | {r['msgs_per_s']:,.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['gateway_cpu_us']:.1f} | "
              f"{r['desk_cpu_us']:.1f} |")  # fmt: skip
    return {"fastpaths": {"runs": runs}}


def _tls_files(key_type: str = "ecdsa") -> tuple[str, str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 (trustme, a dev
    dependency) with an ``ecdsa`` (P-256) or ``rsa`` (2048-bit) key:
    (CA file, certificate chain file, key file)."""
    import trustme

    d = OUT / "bench-tls"
    d.mkdir(parents=True, exist_ok=True)
    kt = {"ecdsa": trustme.KeyType.ECDSA, "rsa": trustme.KeyType.RSA}[key_type]
    ca = trustme.CA(key_type=kt)
    leaf = ca.issue_cert("127.0.0.1", key_type=kt)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(d / "desk.pem"))
    leaf.private_key_pem.write_to_path(str(d / "desk.key"))
    return str(d / "ca.pem"), str(d / "desk.pem"), str(d / "desk.key")


def links(args: argparse.Namespace) -> dict[str, Any]:
    """Downstream links over h2c and over TLS, in alternation (a fresh
    desk-sim and gateway for each run), at ``--rate`` (0: closed loop):
    msg/s, p50/p99, and the gateway's and desk-sim's CPU per message. Over
    TLS both ends seal and open every link write and read (TlsBio)."""
    conns = args.connections
    toks = tokens(conns)
    w = args.workers[-1]
    ca, cert, key = _tls_files()
    plan = dict(connections=conns, active=conns, duration=args.seconds, size=230, max_runtime=300,
                rate=args.rate, engine=args.engine, window=args.window)  # fmt: skip
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        for tls in (False, True):
            desk = start_desk(processes=1, reply=args.desk_reply, tls=(cert, key) if tls else None)
            conf = None
            if tls:
                conf = OUT / "bench-tls" / "gateway.toml"
                conf.write_text(
                    "[downstream.clusters.general]\n"
                    f'endpoints = ["127.0.0.1:{desk.port}"]\n'
                    f'tls = true\nca_file = "{ca}"\n'
                )
            ds = None if tls else [f"general=127.0.0.1:{desk.port}"]
            gw = start_gateway(w, downstream=ds, conns=conns, config=conf)
            runs.append({"tls": tls, **_desk_run(gw, desk, toks, plan, args.clients)})
    replies = "on" if args.desk_reply else "off"
    print(f"{conns} connections x {args.window} in flight, {args.rate:,.0f} msg/s offered "
          f"(0: closed loop), {w} workers, replies {replies}")  # fmt: skip
    print("| links | msg/s | p50 ms | p99 ms | gateway CPU µs/msg | desk-sim CPU µs/msg | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {'TLS' if r['tls'] else 'h2c'} | {r['msgs_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['gateway_cpu_us']:.1f} | {r['desk_cpu_us']:.1f} | "
              f"{r['errors']} |")  # fmt: skip
    return {"links": {"runs": runs}}


def wss(args: argparse.Namespace) -> dict[str, Any]:
    """Visitors over TLS (wss://), the gateway's TLS read by its reactor
    (``GATEWAY_TLS_REACTOR=1``, a TlsRawPipe) against a task per connection
    over trio's SSLStream (``=0``), in alternation, a fresh gateway (with
    its bot) per run: msg/s, p50/p99, the gateway's CPU per message. The
    load client is the Python engine (the native one has no TLS)."""
    conns = args.connections
    toks = tokens(conns)
    w = args.workers[-1]
    ca, cert, key = _tls_files()
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        for reactor in ("1", "0"):
            extra = {"GATEWAY_TLS_CERT": cert, "GATEWAY_TLS_KEY": key,
                     "GATEWAY_TLS_REACTOR": reactor}  # fmt: skip
            gw = start_gateway(w, extra=extra, conns=conns)
            try:
                time.sleep(0.5)
                r = measured(gw, Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks,
                                      connections=conns, active=conns, duration=args.seconds,
                                      size=230, max_runtime=300, rate=args.rate,
                                      window=args.window, engine="python", tls=True, ca_file=ca),
                             args.clients)  # fmt: skip
            finally:
                gw.stop()
            runs.append({"reactor": reactor == "1", "msgs_per_s": r["msgs_per_s"], **r["rtt"],
                         "gateway_cpu_us": cpu_us(r),
                         "errors": sum(r["errors"].values())})  # fmt: skip
    print(f"{conns} wss connections x {args.window} in flight, {args.rate:,.0f} msg/s offered "
          f"(0: closed loop), {w} workers, Python load client")  # fmt: skip
    print("| visitors' TLS | msg/s | p50 ms | p99 ms | gateway CPU µs/msg | errors |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        how = "reactor (TlsRawPipe)" if r["reactor"] else "task + SSLStream"
        print(f"| {how} | {r['msgs_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['gateway_cpu_us']:.1f} | {r['errors']} |")  # fmt: skip
    return {"wss": {"runs": runs}}


def clients(args: argparse.Namespace) -> dict[str, Any]:
    """What the load client itself costs: both engines, closed loop, against
    a gateway answering with its in-process bot (``--window``: messages in
    flight per connection); the clients' CPU per acked message and the
    busiest client process's share of a core while sending."""
    conns = args.connections
    gw = start_gateway(args.workers[-1], conns=conns)
    res: dict[str, Any] = {}
    try:
        for engine in ("native", "python"):
            r = run(Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=tokens(conns),
                         connections=conns, active=conns, duration=args.seconds, size=230,
                         window=args.window, max_runtime=300, engine=engine), 1)  # fmt: skip
            res[engine] = {"msgs_per_s": r["msgs_per_s"],
                           "client_cpu_us": cpu_us(r, "client_cpu_s"),
                           "client_busy": r["client_busy_max"]}  # fmt: skip
    finally:
        gw.stop()
    print(f"{conns} connections x {args.window} in flight, {args.workers[-1]} gateway workers, bot")
    print("| engine | msg/s | client CPU µs/msg | busiest client process, share of a core |")
    print("|---|---|---|---|")
    for engine, r in res.items():
        print(f"| {engine} | {r['msgs_per_s']:,.0f} | {r['client_cpu_us']:.1f} | "
              f"{r['client_busy']:.2f} |")  # fmt: skip
    return {"clients": res}


def unloaded(args: argparse.Namespace) -> dict[str, Any]:
    """What the downstream hop adds with no load to speak of: one SDK client
    (`gateway.client`) sends one 200-byte message at a time, 5 ms apart, to a
    gateway forwarding to desk-sim and to one answering with its in-process
    bot, in alternating blocks of 50; the time is `send()` until the ack."""
    import trio

    import gateway.client as gc

    w = args.workers[-1]
    toks = tokens(2)
    times: dict[str, list[float]] = {"desk-sim": [], "bot": []}

    async def drain(s: Any) -> None:
        while True:
            await s.receive()

    async def measure(ports: dict[str, int]) -> None:
        async with (
            gc.connect(f"ws://127.0.0.1:{ports['desk-sim']}/v1/ws", token=toks[0],
                       reconnect=False) as a,
            gc.connect(f"ws://127.0.0.1:{ports['bot']}/v1/ws", token=toks[1],
                       reconnect=False) as b,
            trio.open_nursery() as n,
        ):  # fmt: skip
            n.start_soon(drain, a)
            n.start_soon(drain, b)
            sessions = {"desk-sim": a, "bot": b}
            for _ in range(max(1, args.messages // 50)):
                for name, s in sessions.items():
                    for _ in range(50):
                        t0 = time.perf_counter()
                        await s.send("x" * 200)
                        times[name].append((time.perf_counter() - t0) * 1000)
                        await trio.sleep(0.005)
            n.cancel_scope.cancel()

    desk = start_desk(processes=1)
    fwd = start_gateway(w, downstream=[f"general=127.0.0.1:{desk.port}"], conns=100)
    bot = start_gateway(w, conns=100)
    try:
        time.sleep(1.0)  # links up
        trio.run(measure, {"desk-sim": fwd.port, "bot": bot.port})
    finally:
        fwd.stop()
        bot.stop()
        desk.stop()
    res: dict[str, Any] = {}
    print(f"one message at a time, {len(times['bot'])} each, {w} workers")
    print("| gateway | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, ts in times.items():
        ts.sort()
        res[name] = {"p50_ms": ts[len(ts) // 2], "p99_ms": ts[int(len(ts) * 0.99)], "n": len(ts)}
        print(f"| {name} | {res[name]['p50_ms']:.2f} | {res[name]['p99_ms']:.2f} |")
    a, b = res["desk-sim"], res["bot"]
    print(
        f"added: p50 {a['p50_ms'] - b['p50_ms']:+.2f} ms, p99 {a['p99_ms'] - b['p99_ms']:+.2f} ms"
    )
    return res


def hold_and_measure(srv: Server, plan: Plan, procs: int) -> dict[str, Any]:
    """Runs `plan` in the background; once every client process has opened
    all its connections, samples the server's RSS and kernel TCP memory."""
    import threading

    ready = OUT / f"ready-{srv.port}"
    for old in OUT.glob(f"ready-{srv.port}.*"):
        old.unlink()
    plan.ready_file = str(ready)
    before = srv.rss()
    mem0 = tcp_mem_pages()
    holder: dict[str, Any] = {}
    th = threading.Thread(target=lambda: holder.update(r=run(plan, procs)))
    th.start()
    t0 = time.monotonic()
    while th.is_alive() and len(list(OUT.glob(f"ready-{srv.port}.*"))) < procs:
        time.sleep(0.2)
    ramp_wall = time.monotonic() - t0
    time.sleep(min(3.0, plan.duration / 2))
    after = srv.rss()
    mem1 = tcp_mem_pages()
    th.join()
    r = holder["r"]
    held = r["counts"].get("connected", 0)
    r["rss_before"] = before
    r["rss_held"] = after
    r["ramp_wall_s"] = ramp_wall
    r["bytes_per_conn"] = (after - before) / held if held else None
    r["kernel_tcp_bytes_per_conn"] = (mem1 - mem0) * 4096 / held if held else None
    return r


def idle(args: argparse.Namespace) -> dict[str, Any]:
    n = args.connections
    res: dict[str, Any] = {}
    procs = max(1, -(-n // 18000))
    toks = tokens(min(n, 50000)) if args.workers else []
    servers: list[tuple[str, Any, str]] = []
    if args.peer:
        servers.append(("websockets", start_peer, "echo"))
    tls: dict[str, Any] = {}
    for w in args.workers:
        if args.tls:
            # wss://: the visitors' TLS read by the reactor, or a task each
            ca, cert, key = _tls_files()
            tls = {"tls": True, "ca_file": ca, "engine": "python"}
            for how, on in (("reactor", "1"), ("task", "0")):
                env = {"GATEWAY_TLS_CERT": cert, "GATEWAY_TLS_KEY": key, "GATEWAY_TLS_REACTOR": on}
                servers.append((f"gateway-{w}w-tls-{how}",
                                lambda w=w, env=env: start_gateway(w, extra=env, conns=n),
                                "gateway"))  # fmt: skip
            continue
        servers.append((f"gateway-{w}w", lambda w=w: start_gateway(w, conns=n), "gateway"))
    for name, start, mode in servers:
        srv = start()
        try:
            time.sleep(1)
            plan = Plan(
                host="127.0.0.1",
                port=srv.port,
                mode=mode,
                connections=n,
                active=0,
                duration=args.hold,
                ramp=args.ramp,
                max_runtime=900,
                tokens=toks if mode == "gateway" else [],
                **tls,
            )
            res[name] = hold_and_measure(srv, plan, procs)
        finally:
            srv.stop()
    print(
        "| server | connections held | connects/s | connect p99 ms "
        "| RSS/conn KiB | kernel TCP/conn KiB |"
    )
    print("|---|---|---|---|---|---|")
    for k, r in res.items():
        bpc = r["bytes_per_conn"] or 0
        kpc = r["kernel_tcp_bytes_per_conn"] or 0
        print(
            f"| {k} | {r['counts'].get('connected', 0):,} | {r['connects_per_s']:,.0f} | "
            f"{r['connect'].get('p99_ms', 0):.1f} | {bpc / 1024:.2f} | {kpc / 1024:.2f} |"
        )
    return res


def tune_loopback() -> None:
    """Best effort (root only): room for connection storms on loopback."""
    for key, value in (
        ("net/ipv4/tcp_max_syn_backlog", "65535"),
        ("net/core/somaxconn", "65535"),
        ("net/ipv4/ip_local_port_range", "1024 65000"),
    ):
        try:
            Path("/proc/sys", key).write_text(value)
        except OSError as e:
            print(f"note: could not set {key}: {e}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    modes = {
        "throughput": throughput,
        "idle": idle,
        "e2e": e2e,
        "e2e-ratio": e2e_ratio,
        "forwarding": forwarding,
        "rates": rates,
        "fastpaths": fastpaths,
        "links": links,
        "wss": wss,
        "unloaded": unloaded,
        "clients": clients,
    }
    ap.add_argument("mode", choices=list(modes))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2])
    ap.add_argument(
        "--connections", type=int, default=0, help="default: 200 (throughput, e2e), 15000 (idle)"
    )
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--ramp", type=float, default=0.0)
    ap.add_argument("--peer", action="store_true")
    ap.add_argument(
        "--tls", action="store_true",
        help="idle: wss:// connections (the gateway's TLS read by its reactor, then by a task "
             "each), Python load client",
    )  # fmt: skip
    ap.add_argument(
        "--rate",
        type=float,
        default=10000.0,
        help="offered msg/s (forwarding: 0 is half the measured maximum; fastpaths, links: "
        "0 is closed loop)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="alternating pairs (forwarding, e2e-ratio, fastpaths, links)",
    )
    ap.add_argument("--messages", type=int, default=400, help="per gateway (unloaded)")
    ap.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",") if x],
        default=[2000.0, 8000.0, 16000.0, 0.0], help="rates: offered msg/s each (0: closed loop)",
    )  # fmt: skip
    ap.add_argument(
        "--engine", choices=["native", "python"], default="native",
        help="load client (throughput, e2e, e2e-ratio, forwarding): gw-loadgen or Python",
    )  # fmt: skip
    ap.add_argument(
        "--window",
        type=int,
        default=1,
        help="messages in flight per connection (throughput, e2e, e2e-ratio, fastpaths, links)",
    )
    ap.add_argument(
        "--desk-reply", action=argparse.BooleanOptionalAction, default=True,
        help="e2e, e2e-ratio, fastpaths, links: desk-sim answers every message with a reply "
             "(default) or only acks it",
    )  # fmt: skip
    ap.add_argument(
        "--clients", type=int, default=1, help="load-client processes (throughput, e2e)"
    )
    ap.add_argument(
        "--isolate", action="store_true",
        help="forwarding, rates: the gateways pinned to the first CPU, desk-sim and the load "
             "clients to the others (a gateway with a core to itself)",
    )  # fmt: skip
    args = ap.parse_args()
    if not args.connections:
        args.connections = 15000 if args.mode == "idle" else 200
    OUT.mkdir(exist_ok=True)
    tune_loopback()
    res = modes[args.mode](args)
    for r in res.values():
        r.pop("hist", None)
    (OUT / f"bench-{args.mode}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
