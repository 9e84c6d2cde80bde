"""The load test's HTML report: one self-contained page (inline SVG, no
scripts, no network) with latency over time, the round-trip percentile
curve, connections and throughput over time, and the result tables."""

from __future__ import annotations

import html
import itertools
import json
import math
from typing import Any, Final

from gateway.loadtest import gwmetrics

__all__ = ["html_report", "nice_ticks"]

W: Final = 720
H: Final = 260
PAD_L: Final = 64
PAD_R: Final = 16
PAD_T: Final = 16
PAD_B: Final = 40
COLOURS: Final = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")

Series = tuple[str, list[tuple[float, float]]]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    mag = 10 ** math.floor(math.log10((hi - lo) / n))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (m * mag) <= n + 1)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def chart(
    title: str,
    series: list[Series],
    xlabel: str,
    ylabel: str,
    xlog_percentile: bool = False,
) -> str:
    """A line chart as an inline SVG. With ``xlog_percentile`` the x values
    are percentiles drawn on a 1/(1-p) log scale (the usual latency
    percentile plot)."""
    pts = [p for _, s in series for p in s]
    if not pts:
        return (
            f"<figure><figcaption>{html.escape(title)}</figcaption>"
            '<p class="muted">no data</p></figure>'
        )

    def xv(x: float) -> float:
        if xlog_percentile:
            return math.log10(1.0 / max(1e-6, 1.0 - min(x, 99.9999) / 100.0))
        return x

    xs = [xv(x) for x, _ in pts]
    ys = [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = 0.0, max(ys) * 1.08 or 1.0
    if x1 <= x0:
        x1 = x0 + 1
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (xv(x) - x0) / (x1 - x0) * iw

    def sy(y: float) -> float:
        return PAD_T + ih - (y - y0) / (y1 - y0) * ih

    out = [
        f"<figure><figcaption>{html.escape(title)}</figcaption>",
        f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{iw}" height="{ih}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + iw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
        )
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    if xlog_percentile:
        xticks = [(p, f"{p:g}") for p in (0, 90, 99, 99.9, 99.99, 99.999) if x0 <= xv(p) <= x1]
    else:
        xticks = [(t, _fmt(t)) for t in nice_ticks(x0, x1, 8)]
    for t, label in xticks:
        x = sx(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ih}" stroke="#eee"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{PAD_T + ih + 16}" text-anchor="middle">{label}</text>')
    out.append(
        f'<text x="{PAD_L + iw / 2}" y="{H - 4}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="12" y="{PAD_T + ih / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {PAD_T + ih / 2})">{html.escape(ylabel)}</text>'
    )
    for i, (name, s) in enumerate(series):
        if not s:
            continue
        colour = COLOURS[i % len(COLOURS)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        lx = PAD_L + 10 + i * 130
        out.append(f'<rect x="{lx}" y="{PAD_T + 6}" width="12" height="3" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="{PAD_T + 11}">{html.escape(name)}</text>')
    out.append("</svg></figure>")
    return "\n".join(out)


#: A client process busier than this (its CPU while sending over the
#: sending time, 1.0 = one core) may have limited the rate it measured:
#: the reports say so.
CLIENT_BUSY_WARN: Final = 0.9


def client_cpu(r: dict[str, Any]) -> tuple[str, bool]:
    """The client processes' CPU time as text ("-" when not measured), and
    whether one of them was busy enough to have been the limit."""
    cpu = r.get("client_cpu_s", 0.0)
    if not cpu:
        return "-", False
    acked = r["counts"].get("acked", 0)
    per = f", {cpu / acked * 1e6:,.1f} µs per acked message" if acked else ""
    busy = r.get("client_busy_max", 0.0)
    return f"{cpu:,.2f} s{per}; busiest client process {busy:.0%} of a core", (
        busy >= CLIENT_BUSY_WARN
    )


#: What the reports add when :func:`client_cpu` says a client was the limit.
CLIENT_BUSY_ADVICE: Final = (
    "a client process was nearly saturated, so the client may have limited the"
    " measured rate: add --processes, use --engine native, or run clients on another machine"
)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def _lat_rows(r: dict[str, Any]) -> str:
    cols = ("", "count", "p50", "p90", "p99", "p99.9", "max")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = []
    for key, label in (
        ("connect", "connect (TCP + handshake + welcome)"),
        ("rtt", "message round trip (send to ack)"),
        ("deliver", "delivery (server stamp to client)"),
        ("resume", "resume after a storm drop"),
    ):
        p = r.get(key) or {}
        if not p.get("count"):
            continue
        cells = "".join(
            f"<td>{p.get(k, 0):.2f} ms</td>"
            for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
        )
        body.append(f"<tr><th>{label}</th><td>{p['count']:,}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _gateway_rows(g: dict[str, Any]) -> str:
    """The gateway's side (``gateway loadtest --metrics``), or nothing."""
    if not g:
        return ""
    rows = [
        ("window", f"{g['seconds']:.1f} s"),
        ("messages acked by the gateway", f"{g['acked']:,}"),
        ("worker CPU", gwmetrics.cpu_text(g)),
        ("event loops", gwmetrics.loop_text(g)),
        ("gateway ack latency (received to acked)", gwmetrics.latency_text(g.get("ack"))),
        ("downstream's share (sent to its ack)", gwmetrics.latency_text(g.get("downstream"))),
        ("garbage-collector pauses", gwmetrics.gc_text(g)),
        ("error frames sent / worker restarts", f"{g['errors_sent']:,} / {g['worker_restarts']}"),
    ]
    return "<h2>Gateway side (its /metrics)</h2>" + _table(rows)


def html_report(r: dict[str, Any], title: str = "gateway load test") -> str:
    plan = r.get("plan", {})
    cpu_text, saturated = client_cpu(r)
    tl = r.get("timeline", [])
    conns = [(row[0], row[1]) for row in tl]
    rates = [
        (b[0], max(0.0, (b[2] - a[2]) / max(1e-3, b[0] - a[0]))) for a, b in itertools.pairwise(tl)
    ]
    lat = r.get("latency_timeline", [])
    charts = [
        chart(
            "Message round trip over time",
            [("p50", [(x[0], x[1]) for x in lat]), ("p99", [(x[0], x[2]) for x in lat])],
            "seconds since start",
            "ms",
        ),
        chart(
            "Round-trip percentile curve",
            [("round trip", [(q, v) for q, v in r.get("rtt_percentiles", [])])],
            "percentile",
            "ms",
            xlog_percentile=True,
        ),
        chart(
            "Open connections over time", [("open", conns)], "seconds since start", "connections"
        ),
        chart(
            "Acknowledged messages per second", [("acked/s", rates)], "seconds since start", "msg/s"
        ),
    ]
    summary = [
        (
            "target",
            plan.get("url") or f"{plan.get('host')}:{plan.get('port')}{plan.get('path', '')}",
        ),
        ("transport", plan.get("transport", "ws")),
        (
            "connections planned / connected",
            f"{plan.get('connections', 0):,} / {r['counts'].get('connected', 0):,}",
        ),
        ("open at end", f"{r.get('open_at_end', 0):,}"),
        ("client processes", r.get("processes", 1)),
        (
            "ramp",
            f"{r['ramp_seconds']:.1f} s ({r.get('connects_per_s', 0):,.0f} connects/s)"
            if r.get("ramp_seconds")
            else "-",
        ),
        ("messages acked", f"{r['counts'].get('acked', 0):,} ({r.get('msgs_per_s', 0):,.0f}/s)"),
        ("deliveries received", f"{r['counts'].get('delivered', 0):,}"),
        ("client CPU", cpu_text),
        ("encryption", plan.get("encrypt") or "none"),
        ("wall time", f"{r.get('wall_seconds', 0):.1f} s"),
    ]
    errors = sorted(r.get("errors", {}).items()) + [
        (f"close {k}", v) for k, v in sorted(r.get("closes", {}).items())
    ]
    counts = sorted(r.get("counts", {}).items())
    fatal = "".join(
        f"<p class=bad>client process failed: {html.escape(f)}</p>" for f in r.get("fatal", [])
    )
    if saturated:
        fatal += f"<p class=bad>{html.escape(CLIENT_BUSY_ADVICE)}</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1500px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #eee;
  font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 8px 16px 8px 0; }} figcaption {{ font-weight: 600; }}
svg text {{ font-size: 11px; fill: #444; }} .muted {{ color: #888; }}
.bad {{ color: #b00; font-weight: 600; }}
pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{fatal}
{_table(summary)}
<h2>Latency</h2>
{_lat_rows(r)}
{_gateway_rows(r.get("gateway") or {})}
<h2>Plots</h2>
{"".join(charts)}
<h2>Errors and closes</h2>
{_table(errors) if errors else '<p class="muted">none</p>'}
<h2>Counters</h2>
{_table(counts)}
<h2>Plan</h2>
<pre>{html.escape(json.dumps(plan, indent=1, default=str))}</pre>
</body></html>
"""
