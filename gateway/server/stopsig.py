"""A worker's SIGTERM/SIGINT handler for whenever trio's signal receiver is
not in place (kept apart so the worker can install it before its heavy
imports).

While the worker starts there is nothing to drain: the handler exits
cleanly. Once the trio loop took a stop signal (:data:`STOP.requested`),
more signals (say, one to the whole process group plus the supervisor's
forward) change nothing: the drain runs to its end, and the supervisor
SIGKILLs a worker that outlives its deadline.
"""

from __future__ import annotations

import signal
import sys

__all__ = ["STOP", "ignore_from_now", "outside_trio"]


class STOP:
    requested = False  # set once the trio loop took a stop signal


def outside_trio(*_: object) -> None:
    if not STOP.requested:
        sys.exit(0)


def ignore_from_now() -> None:
    """For the very end: SIG_IGN, unlike a Python handler, survives the
    interpreter's shutdown (which resets Python handlers to the default,
    where a late SIGTERM would kill the process with -15)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
