"""gateway.gctune: the collector settings the server processes start with."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> None:
    """Runs ``code`` in a fresh interpreter (the collector's state is
    process-wide); it prints ``ok`` when its assertions held."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_tune_gc_freezes_startup_objects_and_raises_thresholds() -> None:
    code = (
        "import gc\n"
        "from gateway.gctune import GEN0_THRESHOLD, tune_gc\n"
        "before = gc.get_freeze_count()\n"
        "tune_gc()\n"
        "assert gc.get_threshold()[0] == GEN0_THRESHOLD > 700, gc.get_threshold()\n"
        "tune_gc(5000)\n"
        "assert gc.get_threshold()[0] == 5000, gc.get_threshold()\n"
        "try:\n"
        "    tune_gc(0)\n"
        "    raise AssertionError('tune_gc(0) accepted')\n"
        "except ValueError as e:\n"
        "    assert 'young' in str(e), e\n"
        "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()\n"
        "a = []; a.append(a); del a\n"  # a cycle is still collected
        "assert gc.collect() >= 1\n"
        "print('ok')\n"
    )
    _run(code)


def test_collections_scan_a_bounded_number_of_objects_while_the_live_set_grows() -> None:
    """With the workers' settings, objects that stay alive (connections and
    sessions opening) are scanned by a young collection at most ~2,000 at a
    time, and by a middle one at most ``(GEN1_THRESHOLD + 2) * 2,000``
    (~14,000): the pauses stay short however many arrive. With the
    thresholds before (20,000 and 50) both bounds failed, by ten and by
    fifty times."""
    code = (
        "import gc\n"
        "from gateway.gctune import GEN0_THRESHOLD, GEN1_THRESHOLD, tune_gc\n"
        "young = GEN0_THRESHOLD\n"
        "tune_gc()\n"
        "scanned = {0: [], 1: [], 2: []}\n"
        "def cb(phase, info):\n"
        "    if phase == 'start':\n"
        "        g = info['generation']\n"
        "        scanned[g].append(sum(len(gc.get_objects(i)) for i in range(g + 1)))\n"
        "gc.callbacks.append(cb)\n"
        "keep = []\n"
        "for i in range(100_000):\n"  # 200,000 tracked objects that stay
        "    keep.append({'n': [i]})\n"
        "gc.callbacks.remove(cb)\n"
        "slack = 300\n"  # what the interpreter allocates itself meanwhile
        "assert len(scanned[0]) >= 50, scanned\n"
        "assert young <= 2000 and max(scanned[0]) <= young + slack, max(scanned[0])\n"
        "assert scanned[1], scanned\n"
        "bound = (GEN1_THRESHOLD + 2) * young\n"
        "assert bound <= 15_000 and max(scanned[1]) <= bound + slack, max(scanned[1])\n"
        "assert not scanned[2], scanned[2]\n"  # full ones wait for GEN2_THRESHOLD
        "print('ok')\n"
    )
    _run(code)


def test_watch_pauses_times_every_collection_by_generation() -> None:
    code = (
        "import gc, time\n"
        "from gateway.gctune import tune_gc, watch_pauses\n"
        "tune_gc()\n"
        "seen = []\n"
        "cb = watch_pauses(lambda g, s: seen.append((g, s)))\n"
        "gc.disable()\n"  # only the collections asked for below
        "junk = [[] for _ in range(200_000)]\n"  # a young generation to scan
        "t = time.perf_counter(); gc.collect(0); took = time.perf_counter() - t\n"
        "gc.collect(1); gc.collect(2)\n"
        "gc.callbacks.remove(cb)\n"
        "gc.collect(2)\n"  # not watched any more
        "assert [g for g, _ in seen] == [0, 1, 2], seen\n"
        "assert 0 < seen[0][1] <= took, (seen, took)\n"
        "assert all(s >= 0 for _, s in seen)\n"
        "print('ok')\n"
    )
    _run(code)


def test_worker_exports_its_collections_as_a_histogram() -> None:
    code = (
        "import gc\n"
        "gc.disable()\n"  # only the collections asked for below
        "from gateway.ops.names import GC_PAUSE\n"
        "from gateway.server.worker import _export_gc_pauses\n"
        "_export_gc_pauses()\n"
        "gc.collect(1); gc.collect(2); gc.collect(2)\n"
        "counts = {k[0]: v.count for k, v in GC_PAUSE._children.items()}\n"
        "assert counts == {'0': 0, '1': 1, '2': 2}, counts\n"
        "print('ok')\n"
    )
    _run(code)
