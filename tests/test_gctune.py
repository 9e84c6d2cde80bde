"""gateway.gctune: the collector settings the server processes start with."""

from __future__ import annotations

import subprocess
import sys


def test_tune_gc_freezes_startup_objects_and_raises_thresholds() -> None:
    code = (
        "import gc\n"
        "from gateway.gctune import GEN0_THRESHOLD, tune_gc\n"
        "before = gc.get_freeze_count()\n"
        "tune_gc()\n"
        "assert gc.get_threshold()[0] == GEN0_THRESHOLD > 700, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()\n"
        "a = []; a.append(a); del a\n"  # a cycle is still collected
        "assert gc.collect() >= 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
