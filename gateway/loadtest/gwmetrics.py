"""The gateway's side of a load test: its ``/metrics`` read before and after
the run (``gateway loadtest --metrics URL``), turned into what the gateway
did for the load: its CPU per acknowledged message, how busy its event
loops were, and its own ack latency next to the round trip the client saw.

Parsing and the arithmetic are sans-IO (:func:`parse`, :func:`gateway_side`);
:func:`fetch` is the one HTTP GET. The numbers cover everything the gateway
did between the two reads (other traffic included), and each read is up to
a second behind, as workers report once a second (docs/operations.md).
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from typing import Any, Final

from gateway.ops.aggregate import quantile

__all__ = [
    "MetricsError",
    "Samples",
    "cpu_text",
    "fetch",
    "gateway_side",
    "gc_text",
    "latency_text",
    "loop_text",
    "parse",
    "summary_lines",
]

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

#: A /metrics answer larger than this is refused (the gateway's own stays
#: far below: its label children are bounded).
MAX_METRICS_BYTES: Final = 16 << 20
#: Workers push their counters once a second; a read this long after the
#: run has them all.
SETTLE_S: Final = 1.5

_ACK: Final = "gateway_message_ack_seconds"
_DOWN: Final = "gateway_downstream_latency_seconds"
_GC: Final = "gateway_gc_pause_seconds"


class MetricsError(ValueError):
    pass


def _labels(text: str, line: str) -> Labels:
    """``k="v",k2="v2"`` (the inside of the braces), with Prometheus escapes."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            raise MetricsError(f"bad labels in {line!r}")
        key = text[i:eq].strip()
        j = eq + 2
        val: list[str] = []
        while True:
            if j >= n:
                raise MetricsError(f"unterminated label value in {line!r}")
            c = text[j]
            if c == "\\" and j + 1 < n:
                nxt = text[j + 1]
                val.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
                j += 2
            elif c == '"':
                j += 1
                break
            else:
                val.append(c)
                j += 1
        out.append((key, "".join(val)))
        while j < n and text[j] in ", ":
            j += 1
        i = j
    return tuple(sorted(out))


def parse(text: str) -> Samples:
    """Samples of a Prometheus text exposition (format 0.0.4): ``(name,
    sorted labels) -> value``. Comments and blank lines are skipped; a
    line that is not a sample raises :class:`MetricsError`."""
    out: Samples = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            close = line.rfind("}")
            if close < brace:
                raise MetricsError(f"bad sample line {line!r}")
            name, labels, rest = (
                line[:brace],
                _labels(line[brace + 1 : close], line),
                line[close + 1 :],
            )
        else:
            name, labels, rest = line[:space], (), line[space:]
        fields = rest.split()
        if not name or not fields:
            raise MetricsError(f"bad sample line {line!r}")
        try:
            value = float(fields[0])  # "+Inf", "-Inf" and "NaN" included
        except ValueError:
            raise MetricsError(f"bad value in {line!r}") from None
        out[(name, labels)] = value
    return out


def fetch(url: str, token: str | None = None, timeout: float = 10.0) -> Samples:
    """GETs and parses ``url`` (the gateway's ``/metrics``), with ``Authorization:
    Bearer`` when a token is given. Failures raise :class:`MetricsError` with
    a message for the user."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(MAX_METRICS_BYTES + 1)
    except urllib.error.HTTPError as e:
        hint = " (set --ops-token or GATEWAY_OPS_TOKEN)" if e.code == 401 else ""
        raise MetricsError(f"{url}: HTTP {e.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MetricsError(f"{url}: {getattr(e, 'reason', e)}") from None
    if len(body) > MAX_METRICS_BYTES:
        raise MetricsError(f"{url}: answer over {MAX_METRICS_BYTES} bytes")
    return parse(body.decode("utf-8", "replace"))


def _total(s: Samples, name: str) -> float:
    """The sum of a metric's samples over all label sets."""
    return sum(v for (n, _), v in s.items() if n == name and math.isfinite(v))


def _delta(before: Samples, after: Samples, name: str) -> float:
    return max(0.0, _total(after, name) - _total(before, name))


def _buckets(s: Samples, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram by upper bound, summed over
    its other labels (clusters)."""
    out: dict[float, float] = {}
    for (n, labels), v in s.items():
        if n != name + "_bucket":
            continue
        le = dict(labels).get("le")
        if le is None:
            continue
        try:
            bound = float(le)
        except ValueError:
            continue
        out[bound] = out.get(bound, 0.0) + v
    return out


def _window(
    before: Samples, after: Samples, name: str
) -> tuple[list[float], list[float], dict[float, float], dict[float, float]]:
    """A histogram's finite bucket bounds, in order, and what each
    cumulative bucket gained between the two reads; then both reads'
    buckets (the +Inf one included)."""
    a, b = _buckets(after, name), _buckets(before, name)
    bounds = sorted(x for x in a if math.isfinite(x))
    return bounds, [max(0.0, a[x] - b.get(x, 0.0)) for x in bounds], a, b


def _percentiles(before: Samples, after: Samples, name: str) -> dict[str, float] | None:
    """p50/p99 (ms) of what a histogram observed between the two reads;
    None when it observed nothing."""
    bounds, cum, a, b = _window(before, after, name)
    if not bounds:
        return None
    inf = max(0.0, a.get(math.inf, cum[-1]) - b.get(math.inf, 0.0))
    counts = [round(c - p) for c, p in zip(cum, [0.0, *cum[:-1]], strict=True)]
    counts.append(round(max(0.0, inf - cum[-1])))
    if sum(counts) <= 0:
        return None
    out = {}
    for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        v = quantile(tuple(bounds), [max(0, c) for c in counts], q)
        out[key] = round((v or 0.0) * 1000, 3)
    out["count"] = float(sum(counts))
    return out


def _pauses(before: Samples, after: Samples) -> dict[str, Any]:
    """The garbage collector's pauses between the two reads: how many, their
    total (ms) and the bucket bound the longest fits in (ms; None when it
    exceeded every bound, or there were none)."""
    n = _delta(before, after, _GC + "_count")
    bounds, cum, _, _ = _window(before, after, _GC)
    longest = None
    for bound, got in zip(bounds, cum, strict=True):
        if n > 0 and got >= n:
            longest = round(bound * 1000, 3)
            break
    return {
        "count": int(n),
        "total_ms": round(_delta(before, after, _GC + "_sum") * 1000, 3),
        "longest_ms": longest,
    }


def gateway_side(before: Samples, after: Samples, seconds: float) -> dict[str, Any]:
    """What the gateway did between two reads ``seconds`` apart: messages it
    acked, its workers' CPU (seconds, cores, µs per acked message), its event
    loops' busy time (cores, the busiest worker's share of a core, µs per
    ready connection, ready connections per wakeup, the share of wakeups
    from the loops' own wait rather than trio's), its ack latency and
    the downstream's share of it (p50/p99 ms, None without traffic), its
    garbage collector's pauses, the error frames it sent and worker
    restarts."""
    dt = max(seconds, 1e-9)
    acked = _delta(before, after, "gateway_messages_acked_total")
    cpu = _delta(before, after, "gateway_cpu_seconds_total")
    busy = _delta(before, after, "gateway_loop_busy_seconds_total")
    events = _delta(before, after, "gateway_loop_events_total")
    batches = _delta(before, after, "gateway_loop_batches_total")
    direct = _delta(before, after, "gateway_loop_direct_wakeups_total")
    busiest = 0.0
    for (n, labels), v in after.items():
        if n == "gateway_worker_loop_busy_seconds_total":
            # a restarted worker starts again from zero: no share for it
            d = v - before.get((n, labels), 0.0)
            busiest = max(busiest, d / dt if d >= 0 else 0.0)
    return {
        "seconds": round(seconds, 3),
        "acked": int(acked),
        "cpu_s": round(cpu, 3),
        "cpu_cores": round(cpu / dt, 3),
        "cpu_us_per_msg": round(cpu / acked * 1e6, 1) if acked > 0 else None,
        "loop_busy_cores": round(busy / dt, 3),
        "loop_busiest_worker": round(busiest, 3),
        "loop_us_per_event": round(busy / events * 1e6, 1) if events > 0 else None,
        "events_per_wakeup": round(events / batches, 2) if batches > 0 else None,
        "direct_wakeups": round(direct / batches, 3) if batches > 0 else None,
        "ack": _percentiles(before, after, _ACK),
        "downstream": _percentiles(before, after, _DOWN),
        "gc": _pauses(before, after),
        "errors_sent": int(_delta(before, after, "gateway_errors_sent_total")),
        "worker_restarts": int(_delta(before, after, "gateway_worker_restarts_total")),
    }


def cpu_text(g: dict[str, Any]) -> str:
    """The workers' CPU of :func:`gateway_side` in words (summary and HTML)."""
    per_msg = g["cpu_us_per_msg"]
    return f"{g['cpu_s']:.2f} s, {g['cpu_cores']:.2f} cores" + (
        f", {per_msg:.1f} µs per acked message" if per_msg is not None else ""
    )


def loop_text(g: dict[str, Any]) -> str:
    """The event loops' load of :func:`gateway_side` in words."""
    text = (
        f"{g['loop_busy_cores']:.2f} cores busy, busiest worker"
        f" {g['loop_busiest_worker'] * 100:.0f}% of a core"
    )
    if g["loop_us_per_event"] is not None:
        text += (
            f", {g['loop_us_per_event']:.1f} µs per ready connection,"
            f" {g['events_per_wakeup']:.2f} per wakeup"
        )
    return text


def latency_text(p: dict[str, float] | None) -> str:
    """A latency of :func:`gateway_side` (``ack``, ``downstream``) in words."""
    if not p:
        return "-"
    return (
        f"p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms"
        f" (n={int(p['count']):,}, to a histogram bucket)"
    )


def gc_text(g: dict[str, Any]) -> str:
    """The garbage collector's pauses of :func:`gateway_side` in words."""
    p = g.get("gc") or {}
    if not p.get("count"):
        return "none"
    longest = p["longest_ms"]
    return f"{p['count']:,}, {p['total_ms']:.1f} ms in all, the longest " + (
        f"<= {longest:g} ms" if longest is not None else "over every bucket"
    )


def summary_lines(g: dict[str, Any]) -> list[str]:
    """The gateway's side for the load test's text summary."""
    lines = [
        f"gateway (its /metrics over {g['seconds']:.1f} s): acked {g['acked']:,},"
        f" CPU {cpu_text(g)}",
        f"   event loops: {loop_text(g)}",
    ]
    for key, label in (("ack", "gateway ack"), ("downstream", "downstream")):
        if g.get(key):
            lines.append(f"{label:>13}: {latency_text(g[key])}")
    lines.append(f"    GC pauses: {gc_text(g)}")
    if g["errors_sent"] or g["worker_restarts"]:
        lines.append(
            f"   gateway sent {g['errors_sent']:,} error frames;"
            f" {g['worker_restarts']} worker restarts"
        )
    return lines
