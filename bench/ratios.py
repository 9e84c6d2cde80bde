"""Turns a pytest-benchmark JSON file of bench/test_crypto_bench.py into the
markdown tables of docs/benchmarks.md: msg/s, GB/s and the ratio to
pyca/cryptography measured in the same run (medians).

usage: python bench/ratios.py out/crypto.json          # doc tables
       python bench/ratios.py out/crypto.json --raw    # one row per benchmark
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


def tables(data: dict[str, Any]) -> None:
    by: dict[tuple[Any, ...], Bench] = {}
    for b in data["benchmarks"]:
        ex = b["extra_info"]
        if "op" not in ex:
            continue
        key = (ex["op"], ex["suite"], ex["impl"], ex["size"], ex.get("batch"), ex.get("threads"))
        by[key] = b

    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, ", end="")
    print(f"run {data.get('datetime', '?')}\n")

    print("| suite | op | size x count | gateway msg/s | gateway GB/s | pyca msg/s | ratio |")
    print("|---|---|---|---|---|---|---|")
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
                pm = _rate(p)[0] if p else None
                ratio = f"{gm / pm:.2f}x" if pm else ""
                pms = _msgs(pm) if pm else ""
                print(
                    f"| {suite.upper()} | {op} | {_size(size)} x {n:,} | {_msgs(gm)} | {_gbs(gb)} "
                    f"| {pms} | {ratio} |"
                )

    g = by.get(("mixed", "mixed", "gateway", 256, None, None))
    p = by.get(("mixed", "mixed", "pyca", 256, None, None))
    if g:
        gm = _rate(g)[0]
        pm = _rate(p)[0] if p else None
        print("\nMixed keys (1,024 x 256 B seal, 64 keys of the three suites interleaved):\n")
        print("| gateway msg/s | pyca msg/s | ratio |")
        print("|---|---|---|")
        print(f"| {_msgs(gm)} | {_msgs(pm) if pm else ''} | {f'{gm / pm:.2f}x' if pm else ''} |")

    batches = sorted({k[4] for k in by if k[0] == "batch"})
    if batches:
        print(
            "\nBatch size (256 B seal, 4,096 messages per round in calls of `batch` items),"
            " msg/s:\n"
        )
        print("| suite | " + " | ".join(f"{b:,}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for suite in ("aes-128-gcm", "sm4-gcm"):
            cells = []
            for b in batches:
                r = by.get(("batch", suite, "gateway", 256, b, None))
                cells.append(_msgs(_rate(r)[0]) if r else "")
            print(f"| {suite.upper()} | " + " | ".join(cells) + " |")

    t1 = by.get(("threads", "aes-128-gcm", "gateway", 1024, None, 1))
    t2 = by.get(("threads", "aes-128-gcm", "gateway", 1024, None, 2))
    if t1 and t2:
        m1, m2 = _rate(t1)[0], _rate(t2)[0]
        print("\nThreads (AES-128-GCM 1 KiB seal, 64 batches of 1,024 per round):\n")
        print("| 1 thread msg/s | 2 threads msg/s | speedup |")
        print("|---|---|---|")
        print(f"| {_msgs(m1)} | {_msgs(m2)} | {m2 / m1:.2f}x |")


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        data = json.load(f)
    if "--raw" in argv[1:]:
        raw(data)
    else:
        tables(data)


if __name__ == "__main__":
    main(sys.argv[1:])
