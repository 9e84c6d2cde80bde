"""A worker's event counters (``Hub.stats``): a ``dict`` of key -> count
whose missing keys read as 0, so ``stats[key] += 1`` needs no set-up.

``collections.Counter`` does the same, but it defines ``__delitem__`` in
Python, and CPython then routes every store into the dict (``c[k] = v``,
so every ``+= 1``) through a Python-level method lookup and call, on ~8 increments per
forwarded message (docs/benchmarks.md, "Event counters"). Only ``__missing__`` is
defined here, which CPython consults only after a failed lookup: stores go
straight to dict's own slot. Reads still take CPython's generic route for
a dict subclass, so a ``+= 1`` costs ~1.2 times a plain dict's, against
~2.4 times with ``Counter`` (``bench/test_tally_bench.py``).

Left as Python (not in gateway.compiled.MODULES): the compiled modules
reach it through dict's own C slots.
"""

from __future__ import annotations

__all__ = ["Tally"]


class Tally(dict[str, int]):
    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0
