"""Turns a pytest-benchmark JSON file into the markdown tables of
docs/benchmarks.md: msg/s, MB/s and the ratio to the peer of the same group.

usage: python bench/ratios.py .benchmarks/crypto.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict[str, object]]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}")
    print("| group | impl | median | msg/s | MB/s | vs peer |")
    print("|---|---|---|---|---|---|")
    for g, rows in sorted(groups.items()):
        peer = next((r for r in rows if "pyca" in r["name"]), None)
        base = peer["stats"]["median"] if peer else None
        first = rows[0]["stats"]["median"]
        for r in sorted(rows, key=lambda r: r["name"]):
            med = r["stats"]["median"]
            ex = r["extra_info"]
            msgs = ex.get("messages", 0) / med
            mbs = ex.get("bytes", 0) / med / 1e6
            ref = base if base is not None else first
            ratio = f"{ref / med:.2f}x"
            name = r["name"].split("[")[-1].rstrip("]")
            print(f"| {g} | {name} | {med * 1e3:.3f} ms | {msgs:,.0f} | {mbs:,.0f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
