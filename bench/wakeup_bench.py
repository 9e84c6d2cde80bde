"""What one hop between two processes costs on this machine, without any
gateway code: two processes bounce a 32-byte message over a loopback TCP
connection (blocking sockets, TCP_NODELAY), each one asleep in ``recv``
while the other works. Reported per round trip: the wall time and each
side's CPU time (user + system), with the two processes on different
CPUs and on the same CPU.

Every message the gateway forwards makes such hops: load client ->
worker, worker -> desk-sim, desk-sim -> worker, worker -> load client.
When the receiver sleeps on another CPU, the send must wake that CPU; on
a virtual machine whose idle CPUs halt, that is the costly part
(docs/benchmarks.md, "What a hop costs here").

    python bench/wakeup_bench.py [--round-trips 20000] [--repeat 3] [--pause-us 0,500,2000]

``--pause-us``: the sender sleeps that long between round trips, so the
echo side's CPU wakes from idle each time, as at a low message rate (the
sender's CPU then includes waking from its own sleep).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time
from pathlib import Path

MSG = b"x" * 32


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def bounce(n: int, cpus: tuple[int, int], pause_s: float = 0.0) -> dict[str, float]:
    """``n`` round trips between this process (on ``cpus[0]``) and a child
    (on ``cpus[1]``), ``pause_s`` apart; µs per round trip (the wall time
    without the pauses)."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    before_children = cpu_s(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:  # the echo side
        try:
            os.sched_setaffinity(0, {cpus[1]})
            c = socket.create_connection(("127.0.0.1", port))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(n):
                c.sendall(c.recv(64))
        finally:
            os._exit(0)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        s, _ = lst.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c0, wall = cpu_s(resource.RUSAGE_SELF), 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(MSG)
            got = s.recv(64)
            while len(got) < len(MSG):
                got += s.recv(64)
            wall += time.perf_counter() - t0
            if pause_s:
                time.sleep(pause_s)
        c1 = cpu_s(resource.RUSAGE_SELF)
        os.waitpid(pid, 0)
        s.close()
    finally:
        os.sched_setaffinity(0, old)
        lst.close()
    child = cpu_s(resource.RUSAGE_CHILDREN) - before_children
    return {
        "rtt_us": wall / n * 1e6,
        "sender_cpu_us": (c1 - c0) / n * 1e6,
        "echo_cpu_us": child / n * 1e6,
    }


def halt_poll_ns() -> str:
    p = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return p.read_text().strip() if p.exists() else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pause-us", default="0", help="comma-separated pauses between round trips")
    args = ap.parse_args()
    pauses = [float(x) for x in args.pause_us.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    places = [("same CPU", (cpus[0], cpus[0]))]
    if len(cpus) > 1:
        places.insert(0, ("different CPUs", (cpus[0], cpus[1])))
    print(f"guest_halt_poll_ns: {halt_poll_ns()}, {args.round_trips:,} round trips per run")
    print("| processes on | pause µs | round trip µs | sender CPU µs | echo CPU µs |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeat):
        for pause in pauses:
            for name, pair in places:
                r = bounce(args.round_trips, pair, pause / 1e6)
                print(f"| {name} | {pause:.0f} | {r['rtt_us']:.1f} | {r['sender_cpu_us']:.1f} | "
                      f"{r['echo_cpu_us']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
