"""A worker's event counters, side by side: ``stats[key] += 1`` on a
``Tally`` (gateway.session.tally: a dict with ``__missing__`` only) against
the ``collections.Counter`` it replaced and a plain ``dict``, for the
counters one forwarded message moves (about eight).

    .venv/bin/pytest bench/test_tally_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q
"""

from __future__ import annotations

import collections
from typing import Any

import pytest

from gateway.session.tally import Tally

#: what one forwarded message and its reply count in a worker
KEYS = (
    "messages_in_ws",
    "bytes_in_ws",
    "messages_acked",
    "messages_delivered",
    "messages_out_ws",
    "bytes_out_ws",
    "messages_out_ws",
    "bytes_out_ws",
)
MESSAGES = 1000


@pytest.mark.parametrize(
    "make", [Tally, collections.Counter, dict], ids=["Tally", "Counter", "dict"]
)
def test_counts_per_message(benchmark: Any, make: Any) -> None:
    stats = make()
    for k in KEYS:
        stats[k] = 0  # a plain dict needs its keys first; the others start the same way

    def run() -> None:
        for _ in range(MESSAGES):
            for k in KEYS:
                stats[k] += 1

    benchmark(run)
    assert stats["messages_acked"] > 0 and stats["messages_acked"] % MESSAGES == 0
    assert stats["messages_out_ws"] == 2 * stats["messages_acked"]
