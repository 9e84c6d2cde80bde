"""Loaded by every Python process started with this directory on
``PYTHONPATH`` (see bench/pycalls.py); does something only with
``GATEWAY_PYCALLS_OUT`` set, in a process whose command line has
``GATEWAY_PYCALLS_IN`` in it (a gateway worker by default): counts the Python-level calls the
worker makes (interpreted functions, and C functions called from
interpreted code) during a window of ``GATEWAY_PYCALLS_WINDOW`` =
"start,seconds" after it started, and writes them to
``$GATEWAY_PYCALLS_OUT.<pid>`` as JSON. Compiled (mypyc) functions make no
profiler events, so what it counts is what still runs as Python."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any

_OUT = os.environ.get("GATEWAY_PYCALLS_OUT")


def _install(out: str) -> None:
    start, length = (float(x) for x in os.environ["GATEWAY_PYCALLS_WINDOW"].split(","))
    t0 = time.monotonic() + start
    t1 = t0 + length
    counts: Counter[str] = Counter()
    done = False

    def prof(frame: Any, event: str, arg: Any) -> None:
        nonlocal done
        if event != "call" and event != "c_call":
            return
        t = time.monotonic()
        if t < t0 or done:
            return
        if t > t1:
            done = True
            sys.setprofile(None)
            with open(f"{out}.{os.getpid()}", "w") as f:
                json.dump({"seconds": length, "calls": dict(counts)}, f)
            return
        if event == "call":
            c = frame.f_code
            parts = c.co_filename.replace("\\", "/").split("/")
            counts[f"{'/'.join(parts[-2:])}:{c.co_firstlineno} {c.co_name}"] += 1
        else:
            counts[f"C {getattr(arg, '__qualname__', repr(arg))}"] += 1

    sys.setprofile(prof)


if _OUT:
    _IN = os.environ.get("GATEWAY_PYCALLS_IN", "gateway.server.worker").encode()
    with open("/proc/self/cmdline", "rb") as _f:
        if _IN in _f.read():
            _install(_OUT)
