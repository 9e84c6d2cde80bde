"""Merges the workers' metric snapshots into one view (sans-IO).

Each worker pushes a snapshot every second (:mod:`gateway.ops.report`): its
event counters, its registry (:mod:`gateway.ops.registry`) and a few gauges.
The :class:`Aggregator` keeps the latest snapshot per worker and sums them:

- counters and histograms are summed, and stay monotonic across worker
  restarts: when a worker is replaced (new pid) or gone, its last snapshot is
  folded into a "retired" total. What a worker counted after its last push
  and before it died is lost (at most one push interval);
- gauges are summed over live workers, except breaker states, where the
  worst (highest) state over the workers is shown.

It also keeps one point per second of the totals for the dashboard's rates
and latency percentiles (:meth:`Aggregator.api`).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any, Final

from gateway.ops.statsmap import COUNTER_HELP, SEEDED, map_key

__all__ = ["RELOAD_RESULTS", "Aggregator", "Family", "families_of", "quantile"]

Labels = tuple[tuple[str, str], ...]

#: How long a worker may stay silent and still count as up.
STALE_S: Final = 5.0
#: Window of the dashboard's rates and percentiles.
RATE_WINDOW_S: Final = 5.0
LATENCY_WINDOW_S: Final = 10.0
HISTORY_POINTS: Final = 600
#: The results a configuration reload is counted under.
RELOAD_RESULTS: Final = ("applied", "unchanged", "refused", "failed")
ACK_HIST: Final = "gateway_message_ack_seconds"
GC_HIST: Final = "gateway_gc_pause_seconds"
MAX_GAUGES: Final = frozenset(
    {"gateway_breaker_state", "gateway_downstream_endpoint_latency_seconds"}
)
GAUGE_HELP: Final = {
    "gateway_connections_open": "Open visitor connections (TCP, after accept)",
    "gateway_sessions": "Sessions held (attached or waiting for a resume)",
    "gateway_sessions_detached": "Sessions waiting for their visitor to resume",
}


class Family:
    """One metric family: ``samples`` maps label pairs to a float, or for a
    histogram to ``[bucket counts (one per bound, then +Inf), sum, count]``."""

    __slots__ = ("buckets", "help", "kind", "name", "samples")

    def __init__(self, name: str, kind: str, help: str, buckets: tuple[float, ...] = ()) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.buckets = buckets
        self.samples: dict[Labels, Any] = {}

    def add(self, labels: Labels, value: Any, use_max: bool = False) -> None:
        old = self.samples.get(labels)
        if self.kind == "histogram":
            counts, total, n = value
            if old is None:
                self.samples[labels] = [list(counts), float(total), int(n)]
            elif len(old[0]) == len(counts):
                old[0] = [a + b for a, b in zip(old[0], counts, strict=True)]
                old[1] += total
                old[2] += n
        elif old is None:
            self.samples[labels] = float(value)
        else:
            self.samples[labels] = max(old, float(value)) if use_max else old + float(value)


def _family(out: dict[str, Family], name: str, kind: str, help: str, buckets: Any = ()) -> Family:
    f = out.get(name)
    if f is None:
        f = out[name] = Family(name, kind, help, tuple(float(b) for b in buckets))
    return f


def families_of(snap: dict[str, Any]) -> dict[str, Family]:
    """A worker snapshot as metric families."""
    out: dict[str, Family] = {}
    for key, v in (snap.get("stats") or {}).items():
        name, labels = map_key(str(key))
        _family(out, name, "counter", COUNTER_HELP.get(name, "")).add(labels, v)
    for name, v in (snap.get("gauges") or {}).items():
        _family(out, name, "gauge", GAUGE_HELP.get(name, "")).add((), v)
    for name, m in (snap.get("reg") or {}).items():
        kind = m.get("kind")
        if kind not in ("counter", "gauge", "histogram"):
            continue
        fam = _family(out, name, kind, m.get("help", ""), m.get("buckets", ()))
        names = m.get("labels", [])
        for values, v in m.get("samples", []):
            labels = tuple(zip(names, (str(x) for x in values), strict=False))
            if kind == "histogram":
                v = (v["counts"], v["sum"], v["count"])
            fam.add(labels, v, name in MAX_GAUGES)
    return out


def merge_into(dst: dict[str, Family], src: dict[str, Family], kinds: tuple[str, ...]) -> None:
    for name, f in src.items():
        if f.kind not in kinds:
            continue
        d = _family(dst, name, f.kind, f.help, f.buckets)
        for labels, v in f.samples.items():
            d.add(labels, v, name in MAX_GAUGES)


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a bucketed histogram (linear within a bucket,
    as Prometheus' ``histogram_quantile``); None when it is empty."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lo = bounds[i - 1] if i > 0 else 0.0
            return lo + (bounds[i] - lo) * max(0.0, rank - cum) / c
        cum += c
    return bounds[-1]


#: per-worker counters exported with a ``worker`` label: (name, source counter, help)
_PER_WORKER: Final = (
    (
        "gateway_worker_cpu_seconds_total",
        "gateway_cpu_seconds_total",
        "CPU time of each live worker process",
    ),
    (
        "gateway_worker_loop_busy_seconds_total",
        "gateway_loop_busy_seconds_total",
        "Seconds each live worker's event loop spent handling ready connections",
    ),
)


def _sum(fams: dict[str, Family], name: str) -> float:
    f = fams.get(name)
    return sum(f.samples.values()) if f is not None and f.kind != "histogram" else 0.0


def _hist_totals(fams: dict[str, Family], name: str) -> tuple[float, float]:
    """A histogram's sum and count over all its label sets."""
    f = fams.get(name)
    if f is None or f.kind != "histogram":
        return 0.0, 0.0
    return sum(v[1] for v in f.samples.values()), sum(v[2] for v in f.samples.values())


def point_of(fams: dict[str, Family], t: float) -> dict[str, Any]:
    """The dashboard's numbers at one instant."""
    ack = fams.get(ACK_HIST)
    counts: list[int] = []
    bounds: tuple[float, ...] = ()
    if ack is not None:
        bounds = ack.buckets
        counts = [0] * (len(bounds) + 1)
        for v in ack.samples.values():
            if len(v[0]) == len(counts):
                counts = [a + b for a, b in zip(counts, v[0], strict=True)]
    gc_s, gc_n = _hist_totals(fams, GC_HIST)
    return {
        "t": t,
        "connections": _sum(fams, "gateway_connections_open"),
        "sessions": _sum(fams, "gateway_sessions"),
        "msgs_in": _sum(fams, "gateway_messages_in_total"),
        "acked": _sum(fams, "gateway_messages_acked_total"),
        "delivered": _sum(fams, "gateway_messages_delivered_total"),
        "errors": _sum(fams, "gateway_errors_sent_total"),
        "accepted": _sum(fams, "gateway_connections_accepted_total"),
        "loop_busy": _sum(fams, "gateway_loop_busy_seconds_total"),
        "loop_events": _sum(fams, "gateway_loop_events_total"),
        "cpu": _sum(fams, "gateway_cpu_seconds_total"),
        "gc_s": gc_s,
        "gc_n": gc_n,
        "bounds": bounds,
        "ack_counts": counts,
    }


def _window(points: deque[dict[str, Any]], window: float) -> tuple[dict[str, Any], dict[str, Any]]:
    last = points[-1]
    first = last
    for p in reversed(points):
        first = p
        if last["t"] - p["t"] >= window:
            break
    return first, last


def summarize(points: deque[dict[str, Any]]) -> dict[str, Any]:
    """Rates over :data:`RATE_WINDOW_S` and ack-latency percentiles over
    :data:`LATENCY_WINDOW_S` from a series of points."""
    if not points:
        return {}
    first, last = _window(points, RATE_WINDOW_S)
    dt = last["t"] - first["t"]
    out: dict[str, Any] = {
        "connections": int(last["connections"]),
        "sessions": int(last["sessions"]),
        "msgs_in": int(last["msgs_in"]),
        "acked": int(last["acked"]),
    }
    for k in ("msgs_in", "acked", "delivered", "errors", "accepted"):
        out[f"{k}_per_s"] = round(max(0.0, last[k] - first[k]) / dt, 1) if dt > 0 else 0.0
    # shares of one core over the window: the event loops' handling of ready
    # connections, and the workers' CPU time (100 = one core busy)
    busy, cpu, events = (max(0.0, last[k] - first[k]) for k in ("loop_busy", "cpu", "loop_events"))
    out["loop_busy_pct"] = round(busy / dt * 100, 1) if dt > 0 else 0.0
    out["cpu_pct"] = round(cpu / dt * 100, 1) if dt > 0 else 0.0
    out["loop_us_per_event"] = round(busy / events * 1e6, 1) if events > 0 else None
    # the garbage collector's pauses over the window: how many, total ms
    out["gc_pauses"] = int(max(0.0, last["gc_n"] - first["gc_n"]))
    out["gc_ms"] = round(max(0.0, last["gc_s"] - first["gc_s"]) * 1000, 1)
    lf, ll = _window(points, LATENCY_WINDOW_S)
    delta = ll["ack_counts"]
    if len(lf["ack_counts"]) == len(delta):
        delta = [max(0, a - b) for a, b in zip(delta, lf["ack_counts"], strict=True)]
    for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        v = quantile(ll["bounds"], delta, q)
        out[key] = None if v is None else round(v * 1000, 3)
    return out


class _WorkerView:
    __slots__ = ("fams", "index", "pid", "points", "seen", "snap")

    def __init__(self, index: int, pid: int) -> None:
        self.index = index
        self.pid = pid
        self.snap: dict[str, Any] = {}
        self.fams: dict[str, Family] = {}
        self.seen = 0.0
        self.points: deque[dict[str, Any]] = deque(maxlen=30)


class Aggregator:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.live: dict[int, _WorkerView] = {}
        self.retired: dict[str, Family] = {}
        self.restarts = 0
        # configuration reloads (SIGHUP) by result: applied, unchanged,
        # refused (needs a restart), failed (the new configuration is invalid)
        self.reloads: dict[str, int] = {}
        # the generation of the configuration the supervisor runs (its
        # applied reloads): each worker reports the one it runs
        self.config_generation = 0
        self.draining = False
        self.bad_snapshots = 0
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)

    # -- input ---------------------------------------------------------------------
    def update(self, index: int, snap: dict[str, Any], now: float) -> None:
        pid = int(snap.get("pid", 0))
        v = self.live.get(index)
        if v is not None and v.pid != pid:
            self.worker_gone(index)
            v = None
        if v is None:
            v = self.live[index] = _WorkerView(index, pid)
        v.snap = snap
        v.fams = families_of(snap)
        v.seen = now
        v.points.append(point_of(v.fams, now))

    def worker_gone(self, index: int) -> None:
        """The worker exited: its counters and histograms move to the
        retired totals, its gauges disappear."""
        v = self.live.pop(index, None)
        if v is not None:
            merge_into(self.retired, v.fams, ("counter", "histogram"))

    # -- views ---------------------------------------------------------------------
    def up(self, now: float) -> list[_WorkerView]:
        return [v for v in self.live.values() if now - v.seen <= STALE_S]

    def behind(self, now: float) -> list[int]:
        """The workers up whose configuration generation is not the
        supervisor's: a reload they refused, failed or did not get."""
        gen = self.config_generation
        return sorted(v.index for v in self.up(now) if _generation(v.snap) != gen)

    def ready(self, now: float) -> bool:
        return not self.draining and any(v.snap.get("ready") for v in self.up(now))

    def merged(self, now: float) -> dict[str, Family]:
        out = copy.deepcopy(self.retired)
        for v in self.live.values():
            kinds = (
                ("counter", "histogram", "gauge")
                if now - v.seen <= STALE_S
                else ("counter", "histogram")
            )
            merge_into(out, v.fams, kinds)
        for name, labels in SEEDED:
            _family(out, name, "counter", COUNTER_HELP.get(name, "")).samples.setdefault(
                labels, 0.0
            )
        up = self.up(now)
        g = _family(out, "gateway_workers", "gauge", "Worker processes configured")
        g.add((), self.workers)
        g = _family(out, "gateway_workers_up", "gauge", "Worker processes reporting")
        g.add((), len(up))
        g = _family(out, "gateway_draining", "gauge", "1 while the gateway drains")
        g.add((), 1.0 if self.draining else 0.0)
        g = _family(out, "gateway_worker_restarts_total", "counter", "Worker processes restarted")
        g.add((), self.restarts)
        g = _family(out, "gateway_config_reloads_total", "counter",
                    "Configuration reloads (SIGHUP or POST /-/reload) by result")  # fmt: skip
        for result in RELOAD_RESULTS:
            g.add((("result", result),), self.reloads.get(result, 0))
        g = _family(out, "gateway_config_generation", "gauge",
                    "Reloads applied by the supervisor since it started")  # fmt: skip
        g.add((), self.config_generation)
        per = _family(out, "gateway_worker_config_generation", "gauge",
                      "The configuration generation each worker runs")  # fmt: skip
        for v in up:
            per.add((("worker", str(v.index)),), float(_generation(v.snap)))
        g = _family(out, "gateway_config_workers_behind", "gauge",
                    "Workers up that do not run the supervisor's configuration")  # fmt: skip
        g.add((), len(self.behind(now)))
        g = _family(out, "gateway_ops_bad_snapshots_total", "counter", "Worker snapshots refused")
        g.add((), self.bad_snapshots)
        per = _family(out, "gateway_worker_connections", "gauge", "Open connections per worker")
        for v in up:
            per.add((("worker", str(v.index)),), _sum(v.fams, "gateway_connections_open"))
        # per live worker, so a hot one stands out (they restart from zero
        # with the worker, as a process's counters do)
        for name, src, text in _PER_WORKER:
            per = _family(out, name, "counter", text)
            for v in up:
                per.add((("worker", str(v.index)),), _sum(v.fams, src))
        return out

    def tick(self, now: float) -> None:
        """Records one point of the totals (call once a second)."""
        self.history.append(point_of(self.merged(now), now))

    def api(self, now: float) -> dict[str, Any]:
        """The dashboard's JSON (``/api/stats``)."""
        workers = []
        breakers = []
        for v in sorted(self.live.values(), key=lambda v: v.index):
            row: dict[str, Any] = {"index": v.index, "pid": v.pid, "up": now - v.seen <= STALE_S}
            row["config_generation"] = _generation(v.snap)
            row["age_s"] = round(now - v.seen, 1)
            row.update(summarize(v.points))
            workers.append(row)
            breakers += _endpoints(v.index, v.fams)
        series = [
            {k: p[k] for k in ("t", "connections", "msgs_in", "acked")}
            for p in list(self.history)[-120:]
        ]
        return {
            "time": now,
            "ready": self.ready(now),
            "draining": self.draining,
            "workers_configured": self.workers,
            "workers_up": len(self.up(now)),
            "restarts": self.restarts,
            "config_generation": self.config_generation,
            "config_behind": self.behind(now),
            "totals": summarize(self.history),
            "workers": workers,
            "breakers": breakers,
            "series": series,
        }


def _generation(snap: dict[str, Any]) -> int:
    """The configuration generation in a worker's snapshot (0 if absent
    or not an integer)."""
    g = snap.get("config_generation")
    return g if type(g) is int else 0


def _endpoints(worker: int, fams: dict[str, Any]) -> list[dict[str, Any]]:
    """One worker's downstream endpoints for the dashboard: breaker state,
    links up, failed connection attempts so far, the balancer's moving
    average of the answer time and the messages outstanding (the worker's
    own metrics)."""
    bf = fams.get("gateway_breaker_state")
    if bf is None:
        return []
    up = fams.get("gateway_downstream_links_up")
    failed = fams.get("gateway_downstream_connect_failures_total")
    ewma = fams.get("gateway_downstream_endpoint_latency_seconds")
    pending = fams.get("gateway_downstream_endpoint_outstanding")
    out = []
    for labels, state in sorted(bf.samples.items()):
        d = dict(labels)
        out.append(
            {
                "worker": worker,
                "cluster": d.get("cluster", ""),
                "endpoint": d.get("endpoint", ""),
                "state": ("closed", "half-open", "open")[min(2, max(0, int(state)))],
                "links_up": int(up.samples.get(labels, 0)) if up is not None else None,
                "connect_failures": int(failed.samples.get(labels, 0)) if failed is not None else 0,
                "latency_ms": _ms(ewma, labels),
                "outstanding": int(pending.samples.get(labels, 0)) if pending is not None else None,
            }
        )
    return out


def _ms(fam: Family | None, labels: Labels) -> float | None:
    """A gauge in seconds as ms (2 decimals), None when it is not there."""
    if fam is None or labels not in fam.samples:
        return None
    return round(1000.0 * float(fam.samples[labels]), 2)
