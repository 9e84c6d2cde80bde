"""Loaded by every Python process started with this directory on
``PYTHONPATH`` (see ``bench/soak.py --count-cycles``); does something only
in a gateway worker, and only with ``GATEWAY_CYCLES_OUT`` set: turns the
worker's cyclic garbage collector off, and on each SIGUSR1 collects once,
appending to ``$GATEWAY_CYCLES_OUT.<pid>`` one JSON line: how many
unreachable objects it found (what reference counting alone did not free
since the last signal) and the most common of their types.

With the collector off, anything the worker leaves in a reference cycle
stays until the next signal, so a soak shows whether connections,
sessions or messages leave cycles behind (before ``d9161b1`` every closed
connection did)."""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from collections import Counter
from typing import Any

_OUT = os.environ.get("GATEWAY_CYCLES_OUT")


def _collect(_sig: int, _frame: Any) -> None:
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep them for a moment, to name their types
    try:
        found = gc.collect()
        types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    gc.collect()  # now free them
    line = {"t": time.time(), "found": found, "types": dict(types.most_common(12))}
    with open(f"{_OUT}.{os.getpid()}", "a") as f:
        f.write(json.dumps(line) + "\n")


def _install() -> None:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            if b"gateway.server.worker" not in f.read():
                return
    except OSError:
        return
    gc.disable()
    signal.signal(signal.SIGUSR1, _collect)


if _OUT:
    _install()
