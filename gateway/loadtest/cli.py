"""``gateway loadtest``: options, the progress line, the summary and the
JSON/HTML outputs around :func:`gateway.loadtest.runner.run`
(docs/loadtest.md). The heavy modules are imported only when it runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Final, TextIO

from gateway.cli import _float_at_least, _int_at_least
from gateway.loadtest import gwmetrics
from gateway.loadtest.report import CLIENT_BUSY_ADVICE, client_cpu

__all__ = ["parse_size_mix", "parse_url", "run", "setup"]

DEFAULT_URL: Final = "ws://127.0.0.1:8080/v1/ws"
SUITES: Final = ("aes-128-gcm", "aes-256-gcm", "sm4-gcm")
MAX_CONNECTIONS: Final = 2_000_000
MAX_SIZE: Final = 16 << 20
MAX_WINDOW: Final = 1024


def parse_url(url: str) -> tuple[str, bool, str, int, str]:
    """``(transport, tls, host, port, path)``: ``ws://``/``wss://`` are
    WebSocket, ``http://`` is HTTP/2 with prior knowledge (h2c), ``https://``
    HTTP/2 over TLS (ALPN h2). Raises ValueError."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"unsupported URL scheme {u.scheme!r} (use ws, wss, http or https)")
    if not u.hostname:
        raise ValueError("the URL has no host")
    tls = u.scheme in ("wss", "https")
    try:
        port = u.port or (443 if tls else 80)
    except ValueError:
        raise ValueError("bad port in the URL") from None
    transport = "ws" if u.scheme in ("ws", "wss") else "h2"
    path = u.path or ("/v1/ws" if transport == "ws" else "/v1/stream")
    return transport, tls, u.hostname, port, path


def parse_size_mix(text: str) -> tuple[int, list[list[int]]]:
    """``"230"`` -> (230, []); ``"200:80,2000:15,16000:5"`` (bytes:weight)
    -> (mean size, [[200, 80], [2000, 15], [16000, 5]])."""
    text = text.strip()
    if ":" not in text and "," not in text:
        n = _int(text, "size")
        if not 1 <= n <= MAX_SIZE:
            raise ValueError(f"size must be between 1 and {MAX_SIZE}")
        return n, []
    mix = []
    for part in text.split(","):
        size_s, _, weight_s = part.partition(":")
        size = _int(size_s, "size")
        weight = _int(weight_s or "1", "weight")
        if not 1 <= size <= MAX_SIZE or weight < 1:
            raise ValueError(f"bad size mix entry {part!r} (bytes 1..{MAX_SIZE}, weight >= 1)")
        mix.append([size, weight])
    total = sum(w for _, w in mix)
    return round(sum(s * w for s, w in mix) / total), mix


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"{what}: not an integer: {text!r}") from None


def setup(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--url", default=DEFAULT_URL,
      help=f"gateway URL: ws[s]://HOST:PORT/v1/ws (WebSocket) or http[s]://HOST:PORT/v1/stream "
           f"(HTTP/2: h2c, or TLS with ALPN h2); default {DEFAULT_URL}")  # fmt: skip
    a("--ca-file", metavar="FILE", help="CA bundle to verify the gateway's certificate")
    a("--insecure", action="store_true",
      help="do not verify the gateway's certificate (test setups only)")  # fmt: skip
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token-secret", metavar="SECRET",
                     help="tenant secret to mint one token per connection "
                          "(default: the local demo tenant's secret file)")  # fmt: skip
    tok.add_argument("--tokens", metavar="FILE", help="file with one visitor token per line")
    a("--tenant", default="demo", help="tenant of minted tokens (default demo)")
    a("--kid", default=None, help="key id of minted tokens (default: none)")
    a("--connections", metavar="N", type=_int_at_least(1), default=100,
      help="connections to open (default 100)")  # fmt: skip
    a("--ramp", metavar="PER_S", type=_float_at_least(0.0), default=1000.0,
      help="new connections per second (0 = as fast as possible; default 1000)")  # fmt: skip
    a("--rate", metavar="MSGS_PER_S", type=_float_at_least(0.0), default=0.0,
      help="messages per second over all connections "
           "(0 = closed loop, --window in flight per active connection; default 0)")  # fmt: skip
    a("--engine", choices=("python", "native"), default="python",
      help="client engine: python (everything) or native (gw-loadgen, Rust: ws:// only, "
           "a few µs of client CPU per message; default python)")  # fmt: skip
    a("--window", metavar="N", type=_int_at_least(1), default=1,
      help="messages in flight per connection: kept in flight in a closed loop, "
           "at most this many with --rate (default 1; the gateway's own window, "
           "64 by default, holds back the rest)")  # fmt: skip
    a("--size", metavar="BYTES|MIX", default="230",
      help="message body size, or a mix BYTES:WEIGHT,... (default 230)")  # fmt: skip
    a("--duration", metavar="S", type=_float_at_least(0.0), default=10.0,
      help="seconds of sending once all connections are open (default 10)")  # fmt: skip
    a("--active", metavar="N", type=_int_at_least(0), default=None,
      help="connections that send (default: all)")  # fmt: skip
    a("--hold", metavar="S", type=_float_at_least(0.0), default=0.0,
      help="keep the connections open this long after sending stops")  # fmt: skip
    a("--storm", metavar="N", type=_int_at_least(0), default=0,
      help="drop N connections at once mid-run and resume them")  # fmt: skip
    a("--storm-at", metavar="F", type=_float_at_least(0.0), default=0.5,
      help="when the storm happens, as a fraction of --duration (default 0.5)")  # fmt: skip
    a("--encrypt", choices=SUITES, default=None,
      help="seal message bodies end to end with this suite (native core, batched)")  # fmt: skip
    a("--platform", default="web", help="hello platform hint (web, ios, android, ...)")
    a("--origin", default=None, help="Origin header of the WebSocket upgrade")
    a("--processes", metavar="N", type=_int_at_least(1), default=None,
      help="client processes (default: one per 18,000 connections)")  # fmt: skip
    a("--max-runtime", metavar="S", type=_float_at_least(1.0), default=None,
      help="hard stop (default: ramp + duration + hold + 120 s)")  # fmt: skip
    a("--metrics", metavar="URL",
      help="the gateway's operator /metrics (e.g. http://127.0.0.1:9090/metrics): read "
           "before and after the run to report the gateway's CPU per message, event-loop "
           "load and its own ack latency")  # fmt: skip
    a("--ops-token", metavar="TOKEN", default=os.environ.get("GATEWAY_OPS_TOKEN") or None,
      help="bearer token for --metrics (default: $GATEWAY_OPS_TOKEN)")  # fmt: skip
    a("--json", metavar="FILE", help="write the full result as JSON")
    a("--html", metavar="FILE", help="write an HTML report with plots")
    a("--no-progress", action="store_true", help="no progress line on stderr")


def _demo_secret() -> str:
    from gateway.config import ConfigError, demo_secret_path, load_config

    try:
        cfg = load_config(None, os.environ, {})
    except ConfigError as e:
        raise ValueError(f"cannot read the local configuration: {e}") from None
    path = demo_secret_path(cfg.state_dir)
    t = cfg.tenants.get("demo")
    if t is None or not path.is_file():
        raise ValueError("no --token-secret or --tokens given and no local demo tenant found")
    return t.secrets[t.primary_kid].decode()


class Progress:
    """One status line on stderr: redrawn in place on a terminal, a line
    every 5 s otherwise."""

    def __init__(self, expected_s: float, connections: int, out: TextIO) -> None:
        self.expected = max(1.0, expected_s)
        self.connections = connections
        self.out = out
        self.tty = out.isatty()
        self.last_print = -math.inf
        self.prev: tuple[float, float] | None = None
        self.rate = 0.0

    def __call__(self, row: dict[str, Any]) -> None:
        t = row["t"]
        if self.prev is None:
            self.prev = (t, row["acked"])
        elif t - self.prev[0] >= 1.0:  # rows come per client process: rate over >= 1 s
            self.rate = (row["acked"] - self.prev[1]) / (t - self.prev[0])
            self.prev = (t, row["acked"])
        rate = self.rate
        frac = min(1.0, t / self.expected)
        bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
        line = (
            f"[{bar}] {t:6.1f}s  open {row['open']:,}/{self.connections:,}"
            f"  acked {row['acked']:,} ({rate:,.0f}/s)  delivered {row['delivered']:,}"
            f"  errors {row['errors']:,}"
        )
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
        elif t - self.last_print >= 5.0:
            self.last_print = t
            self.out.write(line + "\n")
            self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def summary(r: dict[str, Any]) -> list[str]:
    c = r["counts"]
    lines = [
        f"connected {c.get('connected', 0):,} of {r['plan']['connections']:,}"
        f" in {r['ramp_seconds'] or 0:.1f} s ({r.get('connects_per_s', 0):,.0f}/s),"
        f" open at end {r.get('open_at_end', 0):,}, disconnects {c.get('disconnects', 0):,}",
        f"messages acked {c.get('acked', 0):,} ({r.get('msgs_per_s', 0):,.0f}/s),"
        f" deliveries {c.get('delivered', 0):,}",
    ]
    for key, label in (
        ("connect", "connect"),
        ("rtt", "round trip"),
        ("deliver", "delivery"),
        ("resume", "resume"),
    ):
        p = r.get(key) or {}
        if p.get("count"):
            lines.append(
                f"{label:>10}: p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms"
                f"  p99.9 {p['p999_ms']:.2f} ms  max {p['max_ms']:.2f} ms  (n={p['count']:,})"
            )
    if c.get("storm_dropped"):
        lines.append(
            f"storm: dropped {c['storm_dropped']:,}, resumed {c.get('resumes', 0):,},"
            f" fresh sessions {c.get('resume_fresh', 0):,}"
        )
    if r["plan"].get("encrypt"):
        lines.append(
            f"sealed {c.get('sealed', 0):,}, opened {c.get('opened', 0):,},"
            f" failed to open {c.get('open_failed', 0):,}"
        )
    cpu, saturated = client_cpu(r)
    if cpu != "-":
        lines.append(f"client CPU {cpu}")
    if saturated:
        lines.append(f"warning: {CLIENT_BUSY_ADVICE}")
    if r.get("gateway"):
        lines += gwmetrics.summary_lines(r["gateway"])
    errs = {**r.get("errors", {}), **{f"close:{k}": v for k, v in r.get("closes", {}).items()}}
    lines.append("errors: " + (", ".join(f"{k} {v:,}" for k, v in sorted(errs.items())) or "none"))
    lines += [f"client process failed: {f}" for f in r.get("fatal", [])]
    return lines


def run(args: argparse.Namespace) -> int:
    err = sys.stderr
    try:
        transport, tls, host, port, path = parse_url(args.url)
        size, mix = parse_size_mix(args.size)
        if args.connections > MAX_CONNECTIONS:
            raise ValueError(f"--connections at most {MAX_CONNECTIONS:,}")
        if args.window > MAX_WINDOW:
            raise ValueError(f"--window at most {MAX_WINDOW:,}")
        tokens: list[str] = []
        secret = ""
        if args.tokens:
            tokens = [t.strip() for t in Path(args.tokens).read_text().splitlines() if t.strip()]
            if not tokens:
                raise ValueError(f"{args.tokens}: no tokens")
        else:
            secret = args.token_secret or _demo_secret()
        ip = socket.gethostbyname(host)
        if args.ca_file and not Path(args.ca_file).is_file():
            raise ValueError(f"--ca-file {args.ca_file}: no such file")
    except (ValueError, OSError) as e:
        err.write(f"gateway loadtest: {e}\n")
        return 2

    from gateway.loadtest.engine import Plan
    from gateway.loadtest.runner import run as run_plan

    ramp_s = args.connections / args.ramp if args.ramp > 0 else 5.0
    max_runtime = args.max_runtime or ramp_s + args.duration + args.hold + 120.0
    plan = Plan(
        host=ip,
        port=port,
        path=path,
        transport=transport,
        tls=tls,
        tls_verify=not args.insecure,
        ca_file=args.ca_file,
        server_name=host,
        connections=args.connections,
        ramp=args.ramp,
        active=args.connections if args.active is None else min(args.active, args.connections),
        rate=args.rate,
        window=args.window,
        engine=args.engine,
        size=size,
        size_mix=mix,
        duration=args.duration,
        hold_after=args.hold,
        storm=args.storm,
        storm_at=args.storm_at,
        tokens=tokens,
        token_secret=secret,
        tenant=args.tenant,
        kid=args.kid,
        encrypt=args.encrypt or "",
        platform=args.platform,
        origin=args.origin,
        max_runtime=max_runtime,
        src_ips=["127.0.0.1"] if ip.startswith("127.") else ["0.0.0.0"],
    )
    if plan.engine == "native":
        from gateway.loadtest import native

        try:
            why = native.unsupported(plan)
            if why:
                raise ValueError(why)
            native.find_binary()
        except (ValueError, FileNotFoundError) as e:
            err.write(f"gateway loadtest: {e}\n")
            return 2
    gw_before = None
    if args.metrics:
        try:
            gw_before = gwmetrics.fetch(args.metrics, args.ops_token)
        except gwmetrics.MetricsError as e:
            err.write(f"gateway loadtest: --metrics: {e}; running without the gateway's side\n")
    m0 = time.monotonic()
    progress = None if args.no_progress else Progress(ramp_s + args.duration, args.connections, err)
    t0 = time.time()
    result = run_plan(plan, args.processes, progress=progress)
    if progress is not None:
        progress.done()
    result["plan"]["url"] = args.url
    result["started_at"] = t0
    if gw_before is not None:
        time.sleep(gwmetrics.SETTLE_S)  # the workers' last counts reach /metrics
        try:
            after = gwmetrics.fetch(args.metrics, args.ops_token)
            result["gateway"] = gwmetrics.gateway_side(gw_before, after, time.monotonic() - m0)
        except gwmetrics.MetricsError as e:
            err.write(f"gateway loadtest: --metrics: {e}\n")
    for line in summary(result):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"JSON result: {args.json}")
    if args.html:
        from gateway.loadtest.report import html_report

        Path(args.html).write_text(html_report(result, f"gateway load test: {args.url}"))
        print(f"HTML report: {args.html}")
    ok = not result["fatal"] and result["counts"].get("connected", 0) > 0
    return 0 if ok else 1
