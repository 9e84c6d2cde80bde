"""Garbage-collector settings for the long-running server processes (the
gateway's workers and desk-sim).

Almost everything a worker allocates per message (frames, dicts, bytes) is
freed by reference counting; the cyclic collector only has to find the rare
cycles (tracebacks, finished tasks). At CPython's default first-generation
threshold (700 allocations) it ran many times a second under load and cost
~5% of a worker's CPU per message (bench/core_bench.py throughput, native
client, A/B alternated: 34.6 -> 32.3, 27.8 -> 26.2, 25.3 -> 24.4 µs per
message). Objects alive at start (modules, configuration) are frozen out of
the collector's scans altogether.

A collection stops the event loop for as long as it scans: the young
generation's ~20,000 objects take 1.5-8 ms here when they are all still
alive (as when every forwarded message left one behind until its deadline,
the tail of the forwarding latency while load rose). :func:`watch_pauses`
times every collection, so the workers export them
(``gateway_gc_pause_seconds``, docs/operations.md).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["GEN0_THRESHOLD", "tune_gc", "watch_pauses"]

#: Allocations (net of deallocations) between first-generation collections.
GEN0_THRESHOLD: Final = 20_000
#: First-generation collections between second-generation ones, and those
#: between full collections (CPython also waits until the objects that
#: survived since the last full collection are 25% of the long-lived ones).
GEN1_THRESHOLD: Final = 50
GEN2_THRESHOLD: Final = 100


def tune_gc() -> None:
    """Freezes what is alive now and raises the collection thresholds.
    Call once, after start-up and before serving."""
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)


def watch_pauses(observe: Callable[[int, float], None]) -> Callable[[str, dict[str, Any]], None]:
    """Calls ``observe(generation, seconds)`` after every collection of the
    cyclic garbage collector, with the time it took (two clock reads per
    collection). Returns the callback installed (``gc.callbacks``)."""
    clock = time.perf_counter
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            observe(info["generation"], clock() - started[0])

    gc.callbacks.append(callback)
    return callback
