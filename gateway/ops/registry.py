"""A small per-process metrics registry (counters, gauges, histograms with
labels), cheap on the hot path: it is compiled with the hot path's modules
(:mod:`gateway.compiled`), so a child's ``inc`` or ``observe`` is a C call.
:meth:`Registry.snapshot` gives plain data that the supervisor merges
across workers and renders for Prometheus.

Label children per metric are bounded (:data:`MAX_CHILDREN`); beyond that,
new label sets all count into one child labelled ``"_overflow"``.
"""

from __future__ import annotations

import bisect
from typing import Any, Final

__all__ = [
    "MAX_CHILDREN",
    "REGISTRY",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "Registry",
]

MAX_CHILDREN: Final = 1000
#: Latency buckets in seconds (0.1 ms .. 30 s).
LATENCY_BUCKETS: tuple[float, ...] = (  # (not Final: mypyc cannot use a Final as a default)
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help
        self.labelnames = labels
        self._children: dict[tuple[str, ...], Any] = {}
        self.overflowed = 0

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        c = self._children.get(values)
        if c is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            if len(self._children) >= MAX_CHILDREN:
                self.overflowed += 1
                values = ("_overflow",) * len(self.labelnames)
                c = self._children.get(values)
                if c is not None:
                    return c
            c = self._children[values] = self._new()
        return c

    def _only(self) -> Any:
        return self.labels()

    def samples(self) -> list[tuple[tuple[str, ...], Any]]:
        return [(k, c.value()) for k, c in self._children.items()]


class CounterChild:
    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.v += n

    def value(self) -> float:
        return self.v


class GaugeChild(CounterChild):
    __slots__ = ()

    def set(self, v: float) -> None:
        self.v = float(v)

    def dec(self, n: float = 1.0) -> None:
        self.v -= n


class HistogramChild:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def value(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum, "count": self.count}


class Counter(_Metric):
    kind = "counter"

    def _new(self) -> CounterChild:
        return CounterChild()

    def inc(self, n: float = 1.0) -> None:
        self._only().inc(n)


class Gauge(_Metric):
    kind = "gauge"

    def _new(self) -> GaugeChild:
        return GaugeChild()

    def remove(self, *values: str) -> None:
        """Drops the child with these label values (a thing that is gone,
        such as an endpoint removed by a reload); no such child: nothing."""
        self._children.pop(values, None)

    def set(self, v: float) -> None:
        self._only().set(v)

    def inc(self, n: float = 1.0) -> None:
        self._only().inc(n)

    def dec(self, n: float = 1.0) -> None:
        self._only().dec(n)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        super().__init__(name, help, labels)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"{name}: buckets must be strictly increasing")
        self.buckets = tuple(float(b) for b in buckets)

    def _new(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, v: float) -> None:
        self._only().observe(v)


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def _add(self, m: _Metric) -> Any:
        old = self.metrics.get(m.name)
        if old is not None:
            if type(old) is not type(m) or old.labelnames != m.labelnames:
                raise ValueError(f"metric {m.name} already registered differently")
            return old
        self.metrics[m.name] = m
        return m

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labels))  # type: ignore[no-any-return]

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))  # type: ignore[no-any-return]

    def histogram(
        self,
        name: str,
        help: str,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
        labels: tuple[str, ...] = (),
    ) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        """``{name: {"kind", "help", "labels", "buckets"?, "samples": [[values, v]]}}``."""
        out: dict[str, Any] = {}
        for name, m in self.metrics.items():
            d: dict[str, Any] = {
                "kind": m.kind,
                "help": m.help,
                "labels": list(m.labelnames),
                "samples": [[list(k), v] for k, v in m.samples()],
            }
            if isinstance(m, Histogram):
                d["buckets"] = list(m.buckets)
            out[name] = d
        return out


REGISTRY: Final = Registry()
