"""The native engine (``gateway loadtest --engine native``): one client
process's share of a plan run by ``gw-loadgen`` (the Rust crate in
``native/loadgen``), its result returned in the Python engine's shape.

It covers plain WebSocket (``ws://``), in the gateway's protocol or against
any echo server, closed loop (``--window``) or open loop (``--rate`` over
``--active`` connections): what throughput and latency measurements need,
at 1.5-9 µs of client CPU per message closed loop instead of 15-21
(docs/loadtest.md). Everything else (HTTP/2, TLS, storms, sealing, size
mixes, ``--hold``) stays with the Python engine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from gateway.loadtest.engine import HIST_MAX_US, Plan, new_hist

__all__ = ["BINARY_ENV", "find_binary", "run", "unsupported"]

#: Environment variable naming the ``gw-loadgen`` binary to use.
BINARY_ENV: Final = "GATEWAY_LOADGEN"
_BUILT: Final = Path(__file__).resolve().parents[2] / "target" / "release" / "gw-loadgen"
#: Counters the Python engine reports that the native one never moves.
_ZERO_COUNTS: Final = (
    "resumes", "resume_fresh", "resyncs", "storm_dropped", "sealed", "opened", "open_failed",
)  # fmt: skip


def find_binary() -> str:
    """``$GATEWAY_LOADGEN``, else the build in this checkout's ``target/``,
    else ``gw-loadgen`` on PATH. Raises FileNotFoundError with how to build
    it."""
    named = os.environ.get(BINARY_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise FileNotFoundError(f"{BINARY_ENV}={named}: not an executable")
        return named
    if os.access(_BUILT, os.X_OK):
        return str(_BUILT)
    found = shutil.which("gw-loadgen")
    if found:
        return found
    raise FileNotFoundError(
        "gw-loadgen not found: build it with `make setup` (cargo build --release -p gw-loadgen)"
    )


def _ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def unsupported(plan: Plan) -> str | None:
    """Why the native engine cannot run ``plan``, or None when it can."""
    checks = (
        (plan.transport != "ws", "HTTP/2"),
        (plan.tls, "TLS"),
        (bool(plan.encrypt), "--encrypt"),
        (plan.storm > 0, "--storm"),
        (plan.hold_after > 0, "--hold"),
        (bool(plan.size_mix), "a size mix"),
        (not _ipv4(plan.host), "a host name (give an IPv4 address)"),
    )
    for bad, what in checks:
        if bad:
            return f"the native engine does not support {what}; use --engine python"
    return None


def _tokens(plan: Plan) -> list[str]:
    if plan.tokens:
        return [plan.tokens[i % len(plan.tokens)] for i in range(plan.connections)]
    if not plan.token_secret:
        return []
    from gateway.protocol.tokens import mint

    secret, now = plan.token_secret.encode(), time.time()
    return [
        mint(plan.tenant, f"{plan.visitor_prefix}-{plan.visitor_base + i}", secret, 24 * 3600,
             now, kid=plan.kid)
        for i in range(plan.connections)
    ]  # fmt: skip


def _encoded(pairs: list[list[int]]) -> str:
    h = new_hist()
    for value, count in pairs:
        h.record_value(min(max(int(value), 1), HIST_MAX_US), int(count))
    return str(h.encode().decode())


def run(plan: Plan) -> dict[str, Any]:
    """Runs ``plan`` (one process's share) with ``gw-loadgen``; the result
    as :meth:`gateway.loadtest.engine.Engine.run` returns it. Raises
    ValueError for a plan it does not support, RuntimeError when the
    binary fails."""
    why = unsupported(plan)
    if why:
        raise ValueError(why)
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="gw-loadgen-") as d:
        argv = [
            binary, "--host", plan.host, "--port", str(plan.port), "--path", plan.path,
            "--mode", "echo" if plan.mode == "echo" else "gateway",
            "--connections", str(plan.connections), "--window", str(plan.window),
            "--size", str(plan.size), "--duration", str(plan.duration),
            "--max-runtime", str(plan.max_runtime), "--max-pending", str(plan.max_pending),
            "--src-ips", ",".join(plan.src_ips), "--platform", plan.platform,
            "--ramp", str(plan.ramp), "--rate", str(plan.rate), "--active", str(plan.active),
        ]  # fmt: skip
        if plan.origin:
            argv += ["--origin", plan.origin]
        tokens = _tokens(plan)
        if tokens:
            path = Path(d) / "tokens"
            path.write_text("\n".join(tokens) + "\n")
            argv += ["--tokens", str(path)]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=plan.max_runtime + 60, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"gw-loadgen exited {done.returncode}: {done.stderr.strip()}")
    r = json.loads(done.stdout)
    counts = {**dict.fromkeys(_ZERO_COUNTS, 0), **r["counts"]}
    pairs = r["hist_pairs"]
    return {
        "counts": counts,
        "errors": r["errors"],
        "closes": r["closes"],
        "open_at_end": r["open_at_end"],
        "ramp_seconds": r["ramp_seconds"],
        "send_seconds": r["send_seconds"],
        "send_cpu_seconds": r["send_cpu_seconds"],
        "timeline": r["timeline"],
        "hist": {
            "connect_us": _encoded(pairs["connect_us"]),
            "rtt_us": _encoded(pairs["rtt_us"]),
            "resume_us": _encoded([]),
            "deliver_us": _encoded([]),
        },
        "sec_hists": [[sec, _encoded(p)] for sec, p in r["sec_pairs"]],
    }
