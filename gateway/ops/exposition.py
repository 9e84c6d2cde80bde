"""Renders metric families in the Prometheus text exposition format 0.0.4
(sans-IO)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

from gateway.ops.aggregate import Family, Labels

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


def _family_lines(f: Family) -> list[str]:
    lines = []
    if f.help:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
    lines.append(f"# TYPE {f.name} {f.kind}")
    items: list[tuple[Labels, Any]] = sorted(f.samples.items())
    for labels, value in items:
        if f.kind == "histogram":
            counts: list[int] = value[0]
            total: float = value[1]
            n: int = value[2]
            cum = 0
            for bound, c in zip((*f.buckets, math.inf), counts, strict=False):
                cum += c
                lines.append(f"{f.name}_bucket{_labels((*labels, ('le', _num(bound))))} {cum}")
            lines.append(f"{f.name}_sum{_labels(labels)} {_num(total)}")
            lines.append(f"{f.name}_count{_labels(labels)} {int(n)}")
        else:
            lines.append(f"{f.name}{_labels(labels)} {_num(float(value))}")
    return lines


def render(families: dict[str, Family]) -> str:
    out: list[str] = []
    for name in sorted(families):
        f = families[name]
        if f.samples:
            out += _family_lines(f)
    return "\n".join(out) + "\n"
