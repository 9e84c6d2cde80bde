"""Stand-in for gateway.server.worker in tests/test_supervisor.py.

Records its life in $FAKE_DIR/events ("start I PID PORT", "term I PID") and
behaves by $FAKE_MODE: "normal" drains on SIGTERM (exit 0); "crash_once"
makes worker 0 exit 3 right after its first start; "always_crash" exits 4
at once; "stubborn" ignores SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from gateway.config import config_from_env
from gateway.supervisor import watch_parent


def record(line: str) -> None:
    fd = os.open(Path(os.environ["FAKE_DIR"]) / "events", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, required=True)
    index = ap.parse_args().index
    cfg = config_from_env()
    watch_parent(0.1)
    mode = os.environ.get("FAKE_MODE", "normal")
    record(f"start {index} {os.getpid()} {cfg.listen_port}")
    if mode == "always_crash":
        sys.exit(4)
    marker = Path(os.environ["FAKE_DIR"]) / f"crashed-{index}"
    if mode == "crash_once" and index == 0 and not marker.exists():
        marker.touch()
        sys.exit(3)

    def on_term(signum: int, frame: object) -> None:
        record(f"term {index} {os.getpid()}")
        if mode != "stubborn":
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
    deadline = time.monotonic() + 60  # never outlive a broken test
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(9)


if __name__ == "__main__":
    main()
