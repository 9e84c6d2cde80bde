"""What still runs as interpreted Python on a forwarded message's path.

The hot path's modules are compiled with mypyc (gateway/compiled.py);
a call into code that is not (trio's clock, the metrics registry before it
was compiled, a library's method) costs a Python frame per message. This
counts them: it starts desk-sim and a one-worker gateway forwarding to it
(as ``core_bench.py forwarding``), loads it open loop with the native
client, and has the worker count every Python-level call during a window
in the middle of the run (``bench/pycalls_site/sitecustomize.py``, put on
the worker's ``PYTHONPATH``; compiled functions make no profiler events).
It prints the calls per acked message, most frequent first::

    python bench/pycalls.py [--rate 5000] [--seconds 8] [--connections 200] [--top 25]
                            [--in desk-sim]

``--in desk-sim`` counts in desk-sim instead of the gateway's worker.

The profiler slows the worker; the rate is kept low enough for it.

With ``--perf`` it counts nothing and samples instead: the same load, the
gateway on the first CPU and desk-sim and the client on the others (as
``core_bench.py forwarding --isolate``), ``perf record -F 2000`` on the
worker for three seconds in the middle of the run, and prints where the
worker's samples are by shared object (the kernel, CPython, the compiled
hot path, ...)::

    python bench/pycalls.py --perf --rate 24000

With ``--under SYMBOL`` (repeatable) it records call stacks too (``perf
record --call-graph dwarf``) and prints, for each symbol, the share of
the worker's samples taken inside it or anything it called: a compiled
function (``CPyDef_hub___Hub___deliver``), a CPython one
(``slot_mp_ass_subscript``: a store into a dict subclass that defines
``__setitem__`` or ``__delitem__`` in Python)::

    python bench/pycalls.py --perf --rate 19000 --under slot_mp_ass_subscript
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import core_bench as cb  # noqa: E402

from gateway.loadtest.engine import Plan  # noqa: E402
from gateway.loadtest.runner import run  # noqa: E402

SITE = ROOT / "bench" / "pycalls_site"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=5000.0, help="messages/s offered")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the load")
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--top", type=int, default=25, help="how many call sites to print")
    ap.add_argument("--perf", action="store_true", help="sample the worker with perf instead")
    ap.add_argument("--under", action="append", default=[], metavar="SYMBOL",
                    help="--perf: the share of samples inside SYMBOL and its callees")  # fmt: skip
    ap.add_argument("--in", dest="where", choices=("worker", "desk-sim"), default="worker",
                    help="the process to count in")  # fmt: skip
    args = ap.parse_args()
    if args.perf:
        sample(args)
        return
    # two seconds in the middle of the load, which begins ~2 s after the
    # worker started (the gateway up, the links up, the clients connected)
    window = (2.0 + max(1.0, args.seconds / 2 - 1.0), 2.0)
    out = Path(tempfile.mkdtemp(prefix="pycalls-")) / "calls"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.environ["GATEWAY_PYCALLS_OUT"] = str(out)
    os.environ["GATEWAY_PYCALLS_IN"] = {"worker": "gateway.server.worker"}.get(
        args.where, "desk-sim"
    )
    os.environ["GATEWAY_PYCALLS_WINDOW"] = f"{window[0]},{window[1]}"
    r = forwarding_load(args)
    files = glob.glob(f"{out}.*")
    if not files:
        raise SystemExit(f"{args.where} wrote no counts (did the load run past the window?)")
    with open(files[0]) as f:
        got = json.load(f)
    msgs = r["msgs_per_s"] * got["seconds"]  # acked in the window (an open loop's rate is even)
    if msgs <= 0:
        raise SystemExit("no message was acked")
    calls = sorted(got["calls"].items(), key=lambda kv: -kv[1])
    total = sum(n for _, n in calls)
    print(f"{args.where}: {args.rate:,.0f} msg/s offered, {r['msgs_per_s']:,.0f} acked; "
          f"{got['seconds']:.0f} s counted: {total:,} Python-level calls, "
          f"{total / msgs:.2f} per message")  # fmt: skip
    print("| calls per message | call site |")
    print("|---|---|")
    for name, n in calls[: args.top]:
        print(f"| {n / msgs:.3f} | `{name}` |")


def forwarding_load(
    args: argparse.Namespace, during: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """desk-sim and a one-worker gateway forwarding to it, loaded open loop
    at ``--rate`` for ``--seconds``; ``during(worker pid)`` runs in a thread
    meanwhile, with the gateway on the first CPU and desk-sim and the
    client on the others. Returns the load's results."""
    toks = cb.tokens(args.connections)
    mine = os.sched_getaffinity(0)
    desk = cb.start_desk(processes=1)
    gw = cb.start_gateway(1, downstream=[f"general=127.0.0.1:{desk.port}"], conns=args.connections)
    t: threading.Thread | None = None
    try:
        if during is not None:
            cb._isolate((gw,), desk)
            time.sleep(1.0)  # links up
            t = threading.Thread(target=during, args=(cb.tree_pids(gw.proc.pid)[-1],))
            t.start()
        r: dict[str, Any] = run(Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks,
                                     connections=args.connections, active=args.connections,
                                     duration=args.seconds, size=230, max_runtime=120,
                                     rate=args.rate, engine="native"), 1)  # type: ignore[arg-type]  # fmt: skip
    finally:
        if t is not None:
            t.join()
        os.sched_setaffinity(0, mine)
        gw.stop()
        desk.stop()
    return r


def sample(args: argparse.Namespace) -> None:
    """``--perf``: the worker's samples by shared object."""
    if shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (the Debian package linux-perf)")
    data = Path(tempfile.mkdtemp(prefix="pycalls-")) / "perf.data"

    stacks = ["--call-graph", "dwarf,16384"] if args.under else []

    def record(worker: int) -> None:
        time.sleep(max(0.5, args.seconds / 2 - 1.5))
        subprocess.run(["perf", "record", "-q", "-F", "2000", *stacks, "-o", str(data),
                        "-p", str(worker), "--", "sleep", "3"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    r = forwarding_load(args, record)
    if args.under:
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym"],
                                capture_output=True, text=True, check=True)  # fmt: skip
        samples = perf_stacks(script.stdout)
        print(f"{args.rate:,.0f} msg/s offered, {r['msgs_per_s']:,.0f} acked; "
              f"{len(samples):,} samples of the worker")  # fmt: skip
        print("| share of the worker's samples inside it or its callees | symbol |")
        print("|---|---|")
        for sym in args.under:
            print(f"| {share_under(samples, sym):.1%} | `{sym}` |")
        return
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    print(f"{args.rate:,.0f} msg/s offered, {r['msgs_per_s']:,.0f} acked, round trip "
          f"p50 {r['rtt']['p50_ms']:.2f} / p99 {r['rtt']['p99_ms']:.2f} ms")  # fmt: skip
    print("| share of the worker's samples | shared object |")
    print("|---|---|")
    for line in rep.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%") and float(parts[0][:-1]) >= 0.1:
            print(f"| {parts[0]} | `{parts[1]}` |")


def perf_stacks(text: str) -> list[set[str]]:
    """The symbols on each sample's stack, from ``perf script -F ip,sym``
    output (a sample is its frames, one per line, then a blank line)."""
    samples: list[set[str]] = []
    cur: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            if cur:
                samples.append(cur)
                cur = set()
        elif len(parts) >= 2:
            cur.add(parts[1].split("+0x")[0])
    if cur:
        samples.append(cur)
    return samples


def share_under(samples: list[set[str]], sym: str) -> float:
    """The share of ``samples`` with ``sym`` anywhere on their stack."""
    return sum(sym in s for s in samples) / len(samples) if samples else 0.0


if __name__ == "__main__":
    main()
