"""Turns a pytest-benchmark JSON file of bench/test_crypto_bench.py into the
markdown tables of docs/benchmarks.md: msg/s, GB/s and the ratio to
pyca/cryptography measured in the same run (medians).

usage: python bench/ratios.py out/crypto.json [more runs...]   # doc tables
       python bench/ratios.py out/crypto.json --raw    # one row per benchmark

With several files the first run gives the numbers and every run adds its
own ratio (or value) so the spread between runs is visible; each ratio
still compares gateway and pyca from the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

Bench = dict[str, Any]


def _rate(b: Bench) -> tuple[float, float]:
    """(messages/s, bytes/s) from the median round."""
    med = b["stats"]["median"]
    ex = b["extra_info"]
    return ex.get("messages", 0) / med, ex.get("bytes", 0) / med


def _msgs(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k"
    return f"{x:.0f}"


def _gbs(x: float) -> str:
    return f"{x / 1e9:.2f}" if x >= 1e9 else f"{x / 1e9:.3f}"


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def raw(data: dict[str, Any]) -> None:
    groups: dict[str, list[Bench]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print("| group | impl | median | msg/s | MB/s | vs peer |")
    print("|---|---|---|---|---|---|")
    for g, rows in sorted(groups.items()):
        peer = next((r for r in rows if "pyca" in r["name"]), None)
        ref = (peer or rows[0])["stats"]["median"]
        for r in sorted(rows, key=lambda r: r["name"]):
            med = r["stats"]["median"]
            msgs, bps = _rate(r)
            name = r["name"].split("[")[-1].rstrip("]")
            print(
                f"| {g} | {name} | {med * 1e3:.3f} ms | {msgs:,.0f} | {bps / 1e6:,.0f} "
                f"| {ref / med:.2f}x |"
            )


def _index(data: dict[str, Any]) -> dict[tuple[Any, ...], Bench]:
    by: dict[tuple[Any, ...], Bench] = {}
    for b in data["benchmarks"]:
        ex = b["extra_info"]
        if "op" in ex:
            key = (
                ex["op"],
                ex["suite"],
                ex["impl"],
                ex["size"],
                ex.get("batch"),
                ex.get("threads"),
            )
            by[key] = b
    return by


def _ratio(by: dict[tuple[Any, ...], Bench], op: str, suite: str, size: int) -> str:
    g = by.get((op, suite, "gateway", size, None, None))
    p = by.get((op, suite, "pyca", size, None, None))
    if g is None or p is None:
        return ""
    return f"{_rate(g)[0] / _rate(p)[0]:.2f}x"


def tables(runs: list[dict[str, Any]]) -> None:
    idx = [_index(d) for d in runs]
    by = idx[0]
    many = len(runs) > 1
    for i, d in enumerate(runs, 1):
        cpu = d["machine_info"].get("cpu", {}).get("brand_raw", "?")
        print(f"run {i}: {cpu}, {d.get('datetime', '?')}")
    print()

    extra = "".join(f" run {i} |" for i in range(2, len(runs) + 1))
    print(
        "| suite | op | size x count | gateway msg/s | gateway GB/s | pyca msg/s | ratio |" + extra
    )
    print("|---|---|---|---|---|---|---|" + "---|" * (len(runs) - 1))
    for suite in ("aes-128-gcm", "aes-256-gcm", "sm4-gcm"):
        for op in ("seal", "open"):
            sizes = sorted({k[3] for k in by if k[0] == op and k[1] == suite})
            for size in sizes:
                g = by.get((op, suite, "gateway", size, None, None))
                p = by.get((op, suite, "pyca", size, None, None))
                if g is None:
                    continue
                gm, gb = _rate(g)
                n = g["extra_info"]["messages"]
                pms = _msgs(_rate(p)[0]) if p else ""
                others = "".join(f" {_ratio(o, op, suite, size)} |" for o in idx[1:])
                print(
                    f"| {suite.upper()} | {op} | {_size(size)} x {n:,} | {_msgs(gm)} | {_gbs(gb)} "
                    f"| {pms} | **{_ratio(by, op, suite, size)}** |{others}"
                )

    def val(o: dict[tuple[Any, ...], Bench], key: tuple[Any, ...]) -> float | None:
        r = o.get(key)
        return _rate(r)[0] if r else None

    def cell(key: tuple[Any, ...]) -> str:
        vs = [val(o, key) for o in idx]
        return " / ".join(_msgs(v) if v else "-" for v in vs)

    mg = ("mixed", "mixed", "gateway", 256, None, None)
    mp = ("mixed", "mixed", "pyca", 256, None, None)
    if mg in by:
        print("\nMixed keys (1,024 x 256 B seal, 64 keys of the three suites interleaved):\n")
        print("| gateway msg/s | pyca msg/s | ratio |")
        print("|---|---|---|")
        ratios = []
        for o in idx:
            g, p = val(o, mg), val(o, mp)
            ratios.append(f"{g / p:.2f}x" if g and p else "-")
        print(f"| {cell(mg)} | {cell(mp)} | {' / '.join(ratios)} |")

    batches = sorted({k[4] for k in by if k[0] == "batch"})
    if batches:
        print(
            "\nBatch size (256 B seal, 4,096 messages per round in calls of `batch` items),"
            " msg/s:\n"
        )
        print("| suite | " + " | ".join(f"{b:,}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for suite in ("aes-128-gcm", "sm4-gcm"):
            cells = [cell(("batch", suite, "gateway", 256, b, None)) for b in batches]
            print(f"| {suite.upper()} | " + " | ".join(cells) + " |")

    k1 = ("threads", "aes-128-gcm", "gateway", 1024, None, 1)
    k2 = ("threads", "aes-128-gcm", "gateway", 1024, None, 2)
    if k1 in by and k2 in by:
        print("\nThreads (AES-128-GCM 1 KiB seal, 64 batches of 1,024 per round):\n")
        print("| 1 thread msg/s | 2 threads msg/s | speedup |")
        print("|---|---|---|")
        sp = []
        for o in idx:
            a, b = val(o, k1), val(o, k2)
            sp.append(f"{b / a:.2f}x" if a and b else "-")
        print(f"| {cell(k1)} | {cell(k2)} | {' / '.join(sp)} |")
    if many:
        print("\n(`a / b`: run 1 / run 2 ...)")


def main(argv: list[str]) -> None:
    files = [a for a in argv if not a.startswith("--")]
    runs = []
    for path in files:
        with open(path) as f:
            runs.append(json.load(f))
    if "--raw" in argv:
        raw(runs[0])
    else:
        tables(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
