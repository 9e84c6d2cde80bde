"""The reactor's direct wait (gateway.trioidle): between batches, while
no other trio task has anything to do, the reactor waits for its
connections itself; every other task's timer, descriptor, thread callback
and cancellation still gets through."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from gateway import trioidle
from gateway.server.reactor import Reactor


class _Counter:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def on_readable(self) -> None:
        self.sock.recv(100)
        self.reads += 1

    def on_failure(self) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


@contextlib.asynccontextmanager
async def _running(sock: socket.socket) -> AsyncIterator[tuple[Reactor, _Counter]]:
    """A reactor reading ``sock`` (counting its reads), started and given
    time to reach its first wait; ended when the block ends."""
    r = Reactor()
    c = _Counter(sock)
    r.add(sock.fileno(), c)
    async with trio.open_nursery() as n:
        n.start_soon(r.run)
        await trio.sleep(0.05)
        yield r, c
        n.cancel_scope.cancel()


def _send_later(sock: socket.socket, delays: list[float]) -> threading.Thread:
    """Sends one byte after each delay, from a thread (the trio thread may be
    blocked in the reactor's own wait meanwhile)."""
    stop = threading.Event()

    def run() -> None:
        for d in delays:
            if stop.wait(d):
                return
            sock.send(b"x")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def test_the_reactor_waits_for_its_connections_itself_while_trio_is_idle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    async with _running(a) as (r, c):
        assert r.idle is not None, "trio's internals changed: the direct wait is off"
        # ten messages 20 ms apart, while the only other task waits on an
        # Event: after the first, each one is read without a trio round
        t = _send_later(b, [0.02] * 10)
        with trio.fail_after(10):
            while c.reads < 10:
                await trio.sleep(0.3)  # wakes rarely: most reads come in between
        t.join()
    assert c.reads == 10
    assert r.direct >= 5  # fails if every wakeup went through trio
    assert r.batches == 10


async def test_timers_of_other_tasks_are_not_held_up(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    async with _running(a) as (r, c):
        # a message while this task sleeps: after its batch the reactor
        # waits by itself, and must give the thread back when the sleep ends
        _send_later(b, [0.01])
        t0 = trio.current_time()
        await trio.sleep(0.1)
        slept = trio.current_time() - t0
    assert c.reads == 1
    assert r.idle is not None and r.direct == 0
    assert slept < 0.2  # not the reactor's 250 ms cap


async def test_another_tasks_socket_wakes_the_thread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    plain_a, other_b = socket.socketpair()
    other_a = trio.socket.from_stdlib_socket(plain_a)
    with other_a, other_b:
        async with _running(a) as (_, c):
            # the reactor gets a message while this task waits on its own
            # socket (no timer due for 5 s), then that socket gets one
            _send_later(b, [0.01])
            _send_later(other_b, [0.06])
            t0 = trio.current_time()
            with trio.fail_after(5):
                got = await other_a.recv(10)
            waited = trio.current_time() - t0
    assert c.reads == 1
    assert got == b"x"
    assert waited < 0.2  # not the reactor's 250 ms cap


async def test_a_thread_callback_and_a_cancellation_get_through(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    token = trio.lowlevel.current_trio_token()
    ran = trio.Event()
    with trio.fail_after(5):
        async with _running(a) as (_, c):  # ends by cancelling the reactor
            _send_later(b, [0.01])
            threading.Timer(0.06, lambda: token.run_sync_soon(ran.set)).start()
            t0 = trio.current_time()
            await ran.wait()
            waited = trio.current_time() - t0
    assert c.reads == 1
    assert waited < 0.2  # not the reactor's 250 ms cap


async def test_turned_off_every_wakeup_goes_through_trio(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(trioidle.ENV, "0")
    a, b = pair
    async with _running(a) as (r, c):
        for i in range(3):
            b.send(b"x")
            with trio.fail_after(5):
                while c.reads < i + 1:
                    await trio.sleep(0.01)
    assert r.idle is None
    assert c.reads == 3


def test_no_direct_wait_outside_a_trio_run() -> None:
    assert trioidle.probe(0) is None


async def test_a_task_woken_with_the_reactor_is_not_held_up(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Trio runs the tasks its epoll woke together as one batch, off its run
    queue: a task woken in the same round as the reactor must not wait for
    the reactor's own wait to end."""
    a, b = pair
    plain_a, other_b = socket.socketpair()
    other_a = trio.socket.from_stdlib_socket(plain_a)
    waits: list[float] = []
    with other_a, other_b:
        async with _running(a) as (_, c):
            for i in range(10):
                # both sockets readable at once: in some rounds the reactor
                # runs first (trio reverses half of its batches)
                t = threading.Timer(0.01, lambda: (other_b.send(b"o"), b.send(b"r")))
                t.start()
                t0 = trio.current_time()
                with trio.fail_after(5):
                    assert await other_a.recv(10) == b"o"
                waits.append(trio.current_time() - t0)
                with trio.fail_after(5):
                    while c.reads < i + 1:
                        await trio.sleep(0.001)
    assert max(waits) < 0.2, waits  # not the reactor's 250 ms cap


async def test_with_many_tasks_alive_every_wakeup_goes_through_trio(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Past MAX_TASKS live tasks (a worker with many TLS connections, each a
    task) looking for a scheduled one would cost more than it saves."""
    a, b = pair
    async with trio.open_nursery() as crowd:
        for _ in range(trioidle.MAX_TASKS):
            crowd.start_soon(trio.sleep_forever)
        async with _running(a) as (r, c):
            t = _send_later(b, [0.02] * 5)
            with trio.fail_after(10):
                while c.reads < 5:
                    await trio.sleep(0.3)
            t.join()
        crowd.cancel_scope.cancel()
    assert c.reads == 5
    assert r.idle is not None and r.direct == 0


class _Clocked(_Counter):
    """Records the reactor's batch clock and trio's, at each read."""

    def __init__(self, sock: socket.socket, r: Reactor) -> None:
        super().__init__(sock)
        self.r = r
        self.seen: list[tuple[float, float]] = []

    def on_readable(self) -> None:
        super().on_readable()
        self.seen.append((self.r.now, trio.current_time()))


async def _batch_clock(a: socket.socket, b: socket.socket) -> tuple[Reactor, _Clocked]:
    r = Reactor()
    c = _Clocked(a, r)
    r.add(a.fileno(), c)
    async with trio.open_nursery() as n:
        n.start_soon(r.run)
        await trio.sleep(0.05)
        b.send(b"x")  # read in a batch begun from trio's wakeup
        await trio.sleep(0.05)
        # and from the reactor's own wait (after a batch, while this task sleeps)
        t = _send_later(b, [0.02] * 3)
        while c.reads < 4:
            await trio.sleep(0.3)  # rarely: the read comes in between
        t.join()
        n.cancel_scope.cancel()
    return r, c


async def test_the_batch_clock_is_trios_clock(pair: tuple[socket.socket, socket.socket]) -> None:
    """With trio's system clock the reactor reads the time as
    ``perf_counter()`` plus the clock's offset (no Python call): it must be
    trio's time, taken when the batch began."""
    r, c = await _batch_clock(*pair)
    assert r.idle is not None and r.idle.offset is not None and r.direct >= 1
    for now, trio_now in c.seen:
        assert 0.0 <= trio_now - now < 0.05


def test_with_another_clock_the_batch_clock_asks_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A clock that is not trio's system clock (a test's MockClock) has no
    offset to add: the reactor asks the clock itself."""
    from trio.testing import MockClock

    clock = MockClock(rate=1.0)  # starts at 0: far from perf_counter() plus an offset
    r, c = trio.run(_batch_clock, *pair, clock=clock)
    assert r.idle is not None and r.idle.offset is None
    assert len(c.seen) == 4 and r.direct >= 1
    for now, trio_now in c.seen:
        assert 0.0 <= trio_now - now < 0.05 and trio_now < 60.0
