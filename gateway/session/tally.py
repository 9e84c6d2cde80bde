"""A worker's event counters (``Hub.stats``): a ``dict`` of key -> count
whose missing keys read as 0, so ``stats[key] += 1`` needs no set-up.

``collections.Counter`` does the same, but it defines ``__delitem__`` in
Python, and CPython then routes every store into the dict (``c[k] = v``,
so every ``+= 1``) through a Python-level method lookup and call: about
2.5 times the cost of a plain dict's, on ~8 increments per forwarded
message (docs/benchmarks.md, "Event counters"). Only ``__missing__`` is
defined here, which CPython consults after a failed lookup alone, so reads
and stores of present keys run at a plain dict's speed.

Not compiled with mypyc (a compiled class cannot subclass ``dict``); the
compiled modules use it through ``dict``'s own C slots.
"""

from __future__ import annotations

__all__ = ["Tally"]


class Tally(dict[str, int]):
    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0
