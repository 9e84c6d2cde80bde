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

    python bench/wakeup_bench.py --stalls 10

measures instead what the machine itself does to a process's timing, on
each CPU in turn, for that many seconds each: a process that never sleeps
(how often and how long it does not run: every gap over 50 µs between two
reads of the clock), and a process that sleeps 1 ms at a time (how late
it wakes). Nothing else of ours runs meanwhile; run it on an otherwise
idle machine.
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


def spin_gaps(cpu: int, seconds: float, gap_s: float = 50e-6) -> list[float]:
    """On ``cpu``, reads the clock in a loop for ``seconds``; returns every
    gap over ``gap_s`` between two reads (the time the process did not
    run), in seconds."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        clock = time.perf_counter
        gaps: list[float] = []
        start = last = clock()
        end = start + seconds
        while last < end:
            now = clock()
            if now - last > gap_s:
                gaps.append(now - last)
            last = now
        return gaps
    finally:
        os.sched_setaffinity(0, old)


def sleep_lateness(cpu: int, seconds: float, period_s: float = 1e-3) -> list[float]:
    """On ``cpu``, sleeps ``period_s`` at a time for ``seconds``; returns
    how late each wakeup was, in seconds, sorted."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        clock = time.perf_counter
        late: list[float] = []
        end = clock() + seconds
        while True:
            t0 = clock()
            if t0 >= end:
                break
            time.sleep(period_s)
            late.append(clock() - t0 - period_s)
        return sorted(late)
    finally:
        os.sched_setaffinity(0, old)


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def stalls(seconds: float) -> None:
    print(f"guest_halt_poll_ns: {halt_poll_ns()}, {seconds:g} s per CPU and measure")
    print("| CPU | spinning: gaps > 50 µs | time lost | gaps > 1 ms | longest gaps ms "
          "| 1 ms sleeps: late p50 / p99 / p99.9 / max µs |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for cpu in sorted(os.sched_getaffinity(0)):
        gaps = spin_gaps(cpu, seconds)
        late = sleep_lateness(cpu, seconds)
        longest = ", ".join(f"{g * 1e3:.2f}" for g in sorted(gaps)[-3:][::-1]) or "-"
        lq = " / ".join(f"{quantile(late, q) * 1e6:.0f}" for q in (0.5, 0.99, 0.999))
        print(f"| {cpu} | {len(gaps):,} | {100 * sum(gaps) / seconds:.2f}% "
              f"| {sum(1 for g in gaps if g > 1e-3)} | {longest} "
              f"| {lq} / {late[-1] * 1e6 if late else 0:.0f} |")  # fmt: skip


def halt_poll_ns() -> str:
    p = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return p.read_text().strip() if p.exists() else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pause-us", default="0", help="comma-separated pauses between round trips")
    ap.add_argument("--stalls", type=float, metavar="SECONDS",
                    help="measure the machine's own stalls instead (module docstring)")  # fmt: skip
    args = ap.parse_args()
    if args.stalls:
        stalls(args.stalls)
        return
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
