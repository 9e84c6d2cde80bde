"""A session's dedup window, side by side: the int-id window
(gateway.recent.IdWindow, 16 bytes per id) against the map it replaced
(gateway.recent.RecentMap), on what a session does per message: the new id
looked up (``classify``), then put (``accept``), in a full window of 1,024.
And the rare lookup of an old id (a resend after a reconnect).

    .venv/bin/pytest bench/test_recent_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q

Memory per full window (1,024 int ids), tracemalloc, printed by
``.venv/bin/python bench/test_recent_bench.py``.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from gateway.recent import IdWindow, RecentMap

CAP = 1024
MESSAGES = 1000


def _full(cls: Any) -> Any:
    w = cls(CAP)
    for i in range(CAP):
        w.put(10_000 + i, i + 1)
    return w


@pytest.mark.parametrize("cls", [IdWindow, RecentMap], ids=["IdWindow", "RecentMap"])
def test_new_ids_in_a_full_window(benchmark: Any, cls: Any) -> None:
    w = _full(cls)
    nxt = [20_000]

    def run() -> None:
        base = nxt[0]
        get, put = w.get, w.put
        for i in range(base, base + MESSAGES):
            if get(i) is None:
                put(i, i)
        nxt[0] = base + MESSAGES

    benchmark(run)
    assert len(w) == CAP


@pytest.mark.parametrize("cls", [IdWindow, RecentMap], ids=["IdWindow", "RecentMap"])
def test_old_id_lookup(benchmark: Any, cls: Any) -> None:
    w = _full(cls)
    old = [10_000 + i for i in range(0, CAP, CAP // 64)]  # a reconnect's resends

    def run() -> int:
        return sum(1 for k in old if w.get(k) is not None)

    assert benchmark(run) == len(old)


def memory_per_window(cls: Any, windows: int = 200) -> float:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = [_full(cls) for _ in range(windows)]
    for w in held:  # churned, as a chatting session's window is
        for i in range(3 * CAP):
            w.put(50_000 + i, i)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(d.size_diff for d in after.compare_to(before, "filename")) / windows


if __name__ == "__main__":
    for cls in (IdWindow, RecentMap):
        b = memory_per_window(cls)
        print(f"{cls.__name__}: {b:,.0f} bytes per full window of {CAP} ids ({b / CAP:.1f} per id)")
