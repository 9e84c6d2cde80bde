"""Lets a task that has just handled a read wait for the next one itself
while trio has nothing else to do, instead of going back to trio's
scheduler after every read: the worker's reactor between its batches, and
desk-sim's link readers.

A trio task that waits on a file descriptor pays a round of the scheduler
on every wakeup: the descriptor re-armed in trio's epoll (``epoll_ctl``),
trio's ``epoll_wait``, its run loop and the switch back into the task's
coroutine. The reactor wakes once per batch of ready connections, and at a
moderate load a batch is one or two connections, so those rounds are a
large part of a worker's CPU per message (docs/benchmarks.md).

:class:`IdleWait` asks trio's run loop, after each batch, whether another
task is runnable and when its next timer is due. If nothing is runnable, the
caller blocks in ``poll(2)`` on two descriptors: its own (the reactor's
epoll set, a link's socket) and trio's epoll (so any descriptor another
task waits on, a signal, or a ``run_sync_soon`` from a thread still wakes
the thread), no longer than until trio's next deadline. It goes back to trio as soon as trio's epoll
has something, a task is runnable, or the wait timed out.

This reads trio's run loop's internals (its run queue, deadlines, clock and
epoll object), which trio does not promise to keep. :func:`probe` returns
None when they are not what this module knows (another trio version, a
non-epoll backend, guest mode) or when ``GATEWAY_DIRECT_WAIT=0``; the
callers then wait through trio every time, as before.
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import Any, Final

import trio

__all__ = ["ENV", "IdleWait", "probe"]

#: Set to ``0`` to turn the direct wait off (every wait then goes through
#: trio, as before).
ENV: Final = "GATEWAY_DIRECT_WAIT"

#: With more trio tasks than this alive (a connection storm's handshakes,
#: many blocked writers), looking for one that is scheduled costs more than
#: the direct wait saves: the caller goes back to trio.
MAX_TASKS: Final = 64

#: Longest direct wait, in ms, even with no trio timer due: trio's own
#: bookkeeping (its ``run_sync_soon`` queue, instruments) gets a round at
#: least this often.
MAX_WAIT_MS: Final = 250


class IdleWait:
    """Waits on one descriptor (the reactor's epoll set, a desk-sim link's
    socket) while trio is idle (see the module docstring). Made by
    :func:`probe` inside ``trio.run``."""

    __slots__ = ("_clock", "_deadlines", "_fd", "_poll", "_runq", "_tasks", "offset")

    def __init__(self, runner: Any, fd: int, trio_fd: int) -> None:
        self._runq = runner.runq
        self._tasks = runner.tasks
        self._deadlines = runner.deadlines
        self._clock = runner.clock
        #: trio's clock is ``time.perf_counter()`` plus this (its
        #: ``SystemClock``, whose offset is fixed for the run): reading it
        #: so is one C call instead of three Python frames. None with any
        #: other clock (a test's ``MockClock``), which is then asked.
        self.offset: float | None = system_clock_offset(runner.clock)
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(trio_fd, select.POLLIN)

    def wait(self) -> bool:
        """Blocks until ``fd`` is readable (True) or trio has
        something to do (False: go back to trio). Returns False at once if
        a trio task is runnable or a timer is due."""
        if self._runq:  # the cheap test first; the loop below covers it too
            return False
        # trio runs the tasks that were runnable when it last looked at its
        # epoll as one batch, off its run queue: the ones of the caller's
        # batch not run yet are only known by their pending resume (a
        # scheduled task has ``_next_send_fn`` set until it runs)
        tasks = self._tasks
        if len(tasks) > MAX_TASKS:
            return False
        for t in tasks:
            if t._next_send_fn is not None:
                return False
        off = self.offset
        now = time.perf_counter() + off if off is not None else self._clock.current_time()
        # the earliest live deadline: the head of trio's heap when it is
        # live (as ``next_deadline`` does, without its Python frame)
        dl = self._deadlines
        heap = dl._heap
        if heap:
            head = heap[0]
            due = head[0] if head[0] == head[2]._registered_deadline else dl.next_deadline()
        else:
            due = math.inf
        left = due - now
        if left <= 0:
            return False
        ms = MAX_WAIT_MS if left * 1000 >= MAX_WAIT_MS else math.ceil(left * 1000)
        ready = self._poll.poll(ms)
        # False: timed out (a timer is due), or trio's epoll has events
        return len(ready) == 1 and ready[0][0] == self._fd


def system_clock_offset(clock: Any) -> float | None:
    """``offset`` of trio's ``SystemClock`` (its time is
    ``perf_counter() + offset``); None for any other clock."""
    if type(clock) is not trio._core._run.SystemClock:
        return None
    off = clock.offset
    return off if isinstance(off, float) else None


def probe(fd: int) -> IdleWait | None:
    """An :class:`IdleWait` for the running trio loop, or None when the
    direct wait is turned off or trio's internals are not as expected."""
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        io = runner.io_manager
        epoll = io._epoll
        if not isinstance(epoll, select.epoll) or getattr(runner, "is_guest", False):
            return None
        if not hasattr(runner.runq, "__len__") or not callable(runner.deadlines.next_deadline):
            return None
        if not isinstance(runner.deadlines._heap, list):
            return None
        runner.clock.current_time()
        return IdleWait(runner, fd, epoll.fileno())
    except (AttributeError, OSError, TypeError):
        return None
