"""Spreads a load plan over client processes and merges their results.

Each process holds at most ``per_process`` connections (the open-file limit
here is 20,000 per process). Towards a loopback target, every process binds
its own source addresses in 127.0.0.0/8, one per :data:`CONNS_PER_SRC_IP`
connections: that keeps clear of ephemeral-port exhaustion (about 64k ports
per source address and destination) and of the gateway's per-IP connection
limit (`max_conns_per_ip`, default 5,000), so hundreds of thousands of
connections fit on one machine.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from hdrh.histogram import HdrHistogram

from gateway.loadtest.engine import Engine, Plan, new_hist

PER_PROCESS = 18_000
CONNS_PER_SRC_IP = 4_000


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that
    were waited for (the native engine's ``gw-loadgen``)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _child(plan_d: dict[str, Any], q: Any, index: int = 0) -> None:
    def progress(row: dict[str, Any]) -> None:
        q.put({"progress": index, **row})

    try:
        plan = Plan(**plan_d)
        cpu0, t0 = cpu_seconds(), time.monotonic()
        if plan.engine == "native":
            from gateway.loadtest import native

            result = native.run(plan)
        else:
            result = Engine(plan).run(progress)
        # the process's own cost: on a machine shared with the server, the
        # share of the cores the measurement took from what it measured;
        # how busy it was while sending (else over the whole run)
        result["cpu_seconds"] = cpu = cpu_seconds() - cpu0
        send_s = result.get("send_seconds") or 0.0
        result["busy"] = (
            result.get("send_cpu_seconds", 0.0) / send_s
            if send_s > 0.05
            else cpu / max(1e-9, time.monotonic() - t0)
        )
        q.put(result)
    except BaseException as e:  # report, never hang the parent
        q.put({"fatal": repr(e)})


def src_ips_for(proc: int, conns: int, base: str = "127.0.0.1") -> list[str]:
    """Source addresses for one client process: towards loopback, addresses
    in its own /16 of 127/8; else ``base`` (usually 0.0.0.0, any)."""
    if not base.startswith("127."):
        return [base]
    n = max(1, math.ceil(conns / CONNS_PER_SRC_IP))
    return [f"127.{100 + proc}.{j}.{1 + (proc % 250)}" for j in range(n)]


def split(plan: Plan, processes: int | None = None, per_process: int = PER_PROCESS) -> list[Plan]:
    procs = processes or max(1, math.ceil(plan.connections / per_process))
    plans = []
    first = 0
    for i in range(procs):
        conns = plan.connections // procs + (1 if i < plan.connections % procs else 0)
        active = plan.active // procs + (1 if i < plan.active % procs else 0)
        plans.append(
            replace(
                plan,
                connections=conns,
                active=active,
                ramp=plan.ramp / procs if plan.ramp else 0.0,
                rate=plan.rate / procs if plan.rate else 0.0,
                storm=plan.storm // procs + (1 if i < plan.storm % procs else 0),
                max_pending=max(1, plan.max_pending // procs),
                # a small single-process run keeps the address it was given
                src_ips=plan.src_ips
                if procs == 1 and conns <= CONNS_PER_SRC_IP
                else src_ips_for(i, conns, plan.src_ips[0]),
                tokens=plan.tokens[i::procs] if plan.tokens else [],
                ready_file=f"{plan.ready_file}.{i}" if plan.ready_file else None,
                visitor_base=plan.visitor_base + first,
            )
        )
        first += conns
    return plans


def run(
    plan: Plan,
    processes: int | None = None,
    per_process: int = PER_PROCESS,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs ``plan`` over client processes; ``progress`` (if given) gets the
    summed running totals about once a second."""
    plans = split(plan, processes, per_process)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.monotonic()
    ps = [
        ctx.Process(target=_child, args=(asdict(p), q, i), daemon=True) for i, p in enumerate(plans)
    ]
    for p in ps:
        p.start()
    results: list[dict[str, Any]] = []
    latest: dict[int, dict[str, Any]] = {}
    deadline = t0 + plan.max_runtime + 60
    while len(results) < len(ps) and time.monotonic() < deadline:
        try:
            msg = q.get(timeout=1.0)
        except Exception:
            if not any(p.is_alive() for p in ps) and q.empty():
                break
            continue
        if "progress" in msg:
            latest[msg.pop("progress")] = msg
            if progress is not None and (len(latest) == len(ps) or msg["t"] > 3):
                total = {k: sum(r[k] for r in latest.values()) for k in msg if k != "t"}
                total["t"] = time.monotonic() - t0
                total["processes"] = len(ps)
                progress(total)
            continue
        results.append(msg)
    for p in ps:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    merged = merge(results)
    merged["processes"] = len(plans)
    merged["wall_seconds"] = time.monotonic() - t0
    merged["plan"] = {k: v for k, v in asdict(plan).items() if k not in ("tokens", "token_secret")}
    return merged


def _pct(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {"count": 0}
    return {
        "count": h.get_total_count(),
        "p50_ms": h.get_value_at_percentile(50) / 1000,
        "p90_ms": h.get_value_at_percentile(90) / 1000,
        "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p999_ms": h.get_value_at_percentile(99.9) / 1000,
        "max_ms": h.get_max_value() / 1000,
        "mean_ms": h.get_mean_value() / 1000,
    }


#: Percentiles of the percentile curve in the report (out to 99.999).
CURVE: tuple[float, ...] = (
    0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100,
)  # fmt: skip


def _curve(h: HdrHistogram) -> list[list[float]]:
    if h.get_total_count() == 0:
        return []
    return [[q, h.get_value_at_percentile(q) / 1000] for q in CURVE]


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    fatal = [r["fatal"] for r in results if "fatal" in r]
    ok = [r for r in results if "fatal" not in r]
    hists = {k: new_hist() for k in ("connect_us", "rtt_us", "resume_us", "deliver_us")}
    per_sec: dict[int, HdrHistogram] = {}
    timeline: dict[int, list[float]] = {}
    for r in ok:
        for src, dst in ((r["counts"], counts), (r["errors"], errors), (r["closes"], closes)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        for k, enc in r["hist"].items():
            hists[k].add(HdrHistogram.decode(enc.encode()))
        for sec, enc in r.get("sec_hists", []):
            h = per_sec.get(sec)
            if h is None:
                h = per_sec[sec] = new_hist()
            h.add(HdrHistogram.decode(enc.encode()))
        for t, open_, acked, delivered in r["timeline"]:
            row = timeline.setdefault(int(t), [int(t), 0, 0, 0])
            row[1] += open_
            row[2] += acked
            row[3] += delivered
    send_s = max((r["send_seconds"] for r in ok), default=0) or 0
    ramp = [r["ramp_seconds"] for r in ok if r["ramp_seconds"] is not None]
    out: dict[str, Any] = {
        "counts": counts,
        "errors": errors,
        "closes": closes,
        "fatal": fatal,
        "open_at_end": sum(r["open_at_end"] for r in ok),
        "ramp_seconds": max(ramp) if ramp else None,
        "send_seconds": send_s,
        "msgs_per_s": counts.get("acked", 0) / send_s if send_s else 0.0,
        "client_cpu_s": sum(r.get("cpu_seconds", 0.0) for r in ok),
        "client_busy_max": max((r.get("busy", 0.0) for r in ok), default=0.0),
        "connects_per_s": (counts.get("connected", 0) / max(ramp)) if ramp and max(ramp) else 0.0,
        "connect": _pct(hists["connect_us"]),
        "rtt": _pct(hists["rtt_us"]),
        "resume": _pct(hists["resume_us"]),
        "deliver": _pct(hists["deliver_us"]),
        "timeline": [timeline[k] for k in sorted(timeline)],
        "latency_timeline": [
            [sec, *(per_sec[sec].get_value_at_percentile(q) / 1000 for q in (50, 99, 100))]
            for sec in sorted(per_sec)
        ],
        "rtt_percentiles": _curve(hists["rtt_us"]),
        "hist": {k: h.encode().decode() for k, h in hists.items()},
    }
    return out
