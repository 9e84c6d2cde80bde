"""Counting what a gateway worker leaves in reference cycles, with
``cycles_site/sitecustomize.py`` on the worker's ``PYTHONPATH`` (see its
docstring): start the gateway with :func:`env_for`, call :func:`collect` to
have each worker collect once, read the counts with :func:`counts`. Used by
``bench/soak.py --count-cycles`` and ``tests/test_no_cycles.py``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

SITE = Path(__file__).resolve().parent / "cycles_site"


def env_for(env: dict[str, str], out: Path) -> dict[str, str]:
    """``env`` for a `gateway serve` whose workers count into ``out``.*"""
    path = os.pathsep.join([str(SITE), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "PYTHONPATH": path, "GATEWAY_CYCLES_OUT": str(out)}


def workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes that handle SIGUSR1 (its default
    action would end a worker that has not loaded the hook yet)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"gateway.server.worker" not in f.read():
                    continue
            with open(f"/proc/{entry}/status") as f:
                fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
        except OSError:
            continue
        if int(fields["PPid"]) != supervisor:
            continue
        if int(fields["SigCgt"], 16) >> (signal.SIGUSR1 - 1) & 1:
            found.append(int(entry))
    return sorted(found)


def collect(supervisor: int) -> int:
    """Asks each of the supervisor's workers to collect once; how many were asked."""
    pids = workers(supervisor)
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    return len(pids)


def lines(out: Path) -> dict[int, list[dict[str, Any]]]:
    """Each worker's collections so far (pid -> in order)."""
    got: dict[int, list[dict[str, Any]]] = {}
    for p in sorted(out.parent.glob(out.name + ".*")):
        pid = int(p.suffix[1:])
        got[pid] = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return got


def counts(out: Path) -> tuple[list[int], dict[str, int]]:
    """Per collection round, the unreachable objects all workers found; and
    the types found over all rounds."""
    per_round: list[int] = []
    types: dict[str, int] = {}
    for rows in lines(out).values():
        for i, r in enumerate(rows):
            per_round.extend([0] * (i + 1 - len(per_round)))
            per_round[i] += r["found"]
            for k, v in r["types"].items():
                types[k] = types.get(k, 0) + v
    return per_round, types
