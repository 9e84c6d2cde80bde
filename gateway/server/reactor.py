"""One readiness loop per worker for its established plain-TCP connections:
visitors' WebSocket and h2c connections, handshakes, and the downstream
links.

A trio task per connection costs a task object and its coroutine frames
while the connection idles, and on every message a scheduler round: the
task's wakeup, an ``epoll_ctl`` to re-arm its file descriptor and the
switch into the coroutine. Here the connections' sockets sit in one
level-triggered epoll set whose own file descriptor trio watches; one task
wakes when any of them is readable, takes up to :data:`BATCH` ready
connections and calls each one's ``on_readable`` synchronously (the
protocol layers below are sans-IO and never block). An idle connection
costs one epoll entry and no task.

A connection that pauses its reading (backpressure) is taken out of the
set and put back when it resumes. Writes are non-blocking ``send`` calls,
and only a connection whose kernel buffer is full gets a short-lived
flusher task (see :mod:`gateway.server.pipe`). What the handlers of one
batch write is gathered and sent when the batch ends (:meth:`Reactor.defer`,
``after_batch``): frames for a downstream link first, then one ``send`` per
connection for everything the batch produced for it (a visitor's ack and
the replies that came over a link in the same batch).

Between batches, while no other trio task has anything to do, the reactor
waits for its set itself instead of through trio's scheduler
(:mod:`gateway.trioidle`).

The reactor counts its own work (:attr:`Reactor.busy_s`, ``batches``,
``events``, ``direct``): the operator endpoint turns them into the event loop's busy
share and the time one ready connection costs (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable
from typing import Final, Protocol

import trio

from gateway import trioidle

__all__ = ["Deferred", "Reactor", "Readable"]

#: Ready connections handled per wakeup before trio runs its other tasks.
BATCH: Final = 256

_log = logging.getLogger("gateway.reactor")


class Readable(Protocol):
    def on_readable(self) -> None:
        """The descriptor is readable (or at end of stream, or failed)."""

    def on_failure(self) -> None:
        """``on_readable`` raised: count it and close the connection."""


class Deferred(Protocol):
    def write_deferred(self) -> None:
        """The batch is over: write what was gathered during it."""


class Reactor:
    __slots__ = (
        "after_batch",
        "batches",
        "busy_s",
        "deferred",
        "direct",
        "ep",
        "events",
        "handlers",
        "idle",
        "in_batch",
        "now",
    )

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, Readable] = {}
        # True while handlers run: work they cause elsewhere (a downstream
        # link's frames) can wait for the end of the batch and go out in one
        # write, from here, with no task hand-off (``after_batch``)
        self.in_batch = False
        # trio.current_time() when the current batch began: the clock of
        # everything the batch does (read once per batch, not per message)
        self.now = 0.0
        self.after_batch: list[Callable[[], None]] = []
        # connections whose writes wait for the end of the batch: one send
        # for all a batch produced for each (see :meth:`defer`)
        self.deferred: list[Deferred] = []
        # the loop's own accounting: seconds spent handling batches (their
        # end-of-batch writes included), batches run, ready connections
        # handled, and the batches that began from the direct wait
        self.busy_s = 0.0
        self.batches = 0
        self.events = 0
        self.direct = 0
        # the direct wait between batches, once ``run`` has started (None:
        # every wakeup goes through trio)
        self.idle: trioidle.IdleWait | None = None

    def __len__(self) -> int:
        return len(self.handlers)

    def add(self, fd: int, handler: Readable) -> None:
        """Watches ``fd`` for reading (again), for ``handler`` (which takes
        over from the previous one if ``fd`` is watched already, without a
        system call: a handshake handing its connection on)."""
        if fd not in self.handlers:
            self.ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stops watching ``fd``; must come before the descriptor is closed
        or sent to another process (an epoll entry belongs to the open file,
        which outlives this descriptor number when it was duplicated)."""
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):  # fd or epoll closed already
                self.ep.unregister(fd)

    def defer(self, w: Deferred) -> None:
        """Calls ``w.write_deferred()`` when the current batch ends (after
        the ``after_batch`` work: downstream links first)."""
        self.deferred.append(w)

    async def run(self) -> None:
        ep = self.ep
        idle = trioidle.probe(ep.fileno())
        self.idle = idle
        try:
            while True:
                await trio.lowlevel.wait_readable(ep.fileno())
                self.batch()
                # while no other trio task has anything to do, wait for the
                # next ready connection here rather than through trio's
                # scheduler (see gateway.trioidle)
                if idle is not None:
                    while idle.wait():
                        self.direct += 1
                        self.batch()
        finally:
            ep.close()

    def batch(self) -> None:
        """Handles the connections ready now (up to :data:`BATCH`), then
        writes what they gathered (:meth:`end_batch`)."""
        t0 = time.perf_counter()
        idle = self.idle
        off = idle.offset if idle is not None else None
        self.now = t0 + off if off is not None else trio.current_time()
        self.in_batch = True
        ready = self.ep.poll(0, BATCH)
        handlers = self.handlers
        for fd, _ in ready:
            h = handlers.get(fd)
            if h is None:
                continue
            try:
                h.on_readable()
            except Exception:  # a bug must not take down the worker
                _log.exception("connection failed")
                self.remove(fd)
                try:
                    h.on_failure()
                except Exception:
                    _log.exception("connection cleanup failed")
        self.end_batch()
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.events += len(ready)

    def end_batch(self) -> None:
        """The batch is over: the ``after_batch`` work (the downstream
        links' writes), then the deferred connections' writes."""
        self.in_batch = False
        for cb in self.after_batch:
            try:
                cb()
            except Exception:
                _log.exception("after-batch work failed")
        if self.deferred:
            deferred, self.deferred = self.deferred, []
            for w in deferred:
                try:
                    w.write_deferred()
                except Exception:
                    _log.exception("deferred write failed")
