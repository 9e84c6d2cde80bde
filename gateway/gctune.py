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

A collection stops the event loop for as long as it scans, and it scans
every object of its generations that is still alive: with the
first-generation threshold at 20,000 (before 2026-11-24) the ~13,000
young objects of a few hundred new connections and sessions took 7 ms,
and a second-generation collection (every 50 of those) could scan a
million. The thresholds now bound what one collection
scans while the live set grows: the young generation is collected after
``gc_young`` net allocations (:data:`GEN0_THRESHOLD` by default; 2,000
scan in well under 1 ms), the middle one after :data:`GEN1_THRESHOLD` of
those (at most ``(GEN1_THRESHOLD + 2) * gc_young`` objects: CPython
collects a generation once its count exceeds the threshold), and
long-lived objects (connections, sessions) reach the oldest generation
after two scans, which is collected only after :data:`GEN2_THRESHOLD`
middle collections. Objects that replace others (a session's replay
frames) are young while the count of net allocations stands still, so a
young collection can scan more than ``gc_young`` of them: with 100,000
sessions held the longest pause was <= 25 ms, against <= 50-100 ms with
the thresholds before (docs/benchmarks.md, "Garbage-collector
thresholds"). :func:`watch_pauses` times every collection, so the workers
export them (``gateway_gc_pause_seconds``, docs/operations.md).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["GEN0_THRESHOLD", "retune_gc", "tune_gc", "watch_pauses"]

#: Allocations (net of deallocations) between first-generation collections:
#: the default of the gateway's ``gc_young`` setting, and desk-sim's.
GEN0_THRESHOLD: Final = 2_000
#: First-generation collections between second-generation ones.
GEN1_THRESHOLD: Final = 5
#: Second-generation collections between full ones (CPython also waits until
#: the objects that survived since the last full collection are 25% of the
#: long-lived ones). A full collection scans every object the sessions hold,
#: the longest pause there is, so it stays as rare as before 2026-11-24:
#: after 5,000 first-generation collections.
GEN2_THRESHOLD: Final = 1000


def tune_gc(young: int = GEN0_THRESHOLD) -> None:
    """Freezes what is alive now and sets the collection thresholds, the
    young generation's to ``young``. Call once, after start-up and before
    serving."""
    retune_gc(young)
    gc.freeze()


def retune_gc(young: int) -> None:
    """A reloaded ``gc_young``: the young generation's threshold only (the
    others, and what :func:`tune_gc` froze, stay)."""
    if young < 1:
        raise ValueError(f"young: must be >= 1 (got {young})")
    gc.set_threshold(young, GEN1_THRESHOLD, GEN2_THRESHOLD)


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
