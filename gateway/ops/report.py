"""Worker side of the metrics: a snapshot of this worker pushed to the
supervisor every second over an inherited pipe (fd in ``$GATEWAY_STATS_FD``),
and once more when the worker drains."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from gateway.ops.registry import REGISTRY
from gateway.ops.wire import encode_snapshot

__all__ = ["PUSH_INTERVAL_S", "STATS_FD_ENV", "Reporter", "worker_snapshot"]

STATS_FD_ENV: Final = "GATEWAY_STATS_FD"
PUSH_INTERVAL_S: Final = 1.0
#: A push that the supervisor does not take within this time is abandoned.
PUSH_TIMEOUT_S: Final = 5.0


def worker_snapshot(w: Any) -> dict[str, Any]:
    """``w`` is a :class:`gateway.server.worker.Worker`."""
    hub = w.hub
    stats = dict(hub.stats)
    r = w.reactor
    # the event loop's own accounting and the process's CPU time (counters)
    stats["loop_busy_s"] = r.busy_s
    stats["loop_batches"] = r.batches
    stats["loop_events"] = r.events
    stats["loop_direct"] = r.direct
    stats["cpu_s"] = time.process_time()
    return {
        "pid": os.getpid(),
        "index": w.index,
        "t": time.time(),
        "ready": w.listener is not None and not w.draining,
        "draining": w.draining,
        "config_generation": w.config_generation,
        "stats": stats,
        "gauges": {
            "gateway_connections_open": w.open_sockets,
            "gateway_sessions": len(hub.sessions),
            "gateway_sessions_detached": hub.sessions.detached,
        },
        "reg": REGISTRY.snapshot(),
    }


class Reporter:
    def __init__(self, fd: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.stream = trio.lowlevel.FdStream(fd)
        self.snapshot = snapshot
        self.broken = False
        self._lock = trio.Lock()

    async def push(self) -> None:
        if self.broken:
            return
        data = encode_snapshot(self.snapshot())
        async with self._lock:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.broken = True  # the supervisor is gone; the parent watch stops us

    async def run(self) -> None:
        while not self.broken:
            await self.push()
            await trio.sleep(PUSH_INTERVAL_S)
