"""The worker's reactor: what a batch of handlers writes leaves when the
batch ends, links first, one send per connection."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import msgpack
import trio

from gateway.server.reactor import Reactor
from gateway.server.ws import WsConn
from tests.gwserver import RawWs, running


class _Reader:
    def __init__(self, sock: socket.socket, reactor: Reactor, log: list[str], w: _Writer) -> None:
        self.sock = sock
        self.reactor = reactor
        self.log = log
        self.w = w

    def on_readable(self) -> None:
        self.log.append("read " + self.sock.recv(100).decode())
        assert self.reactor.in_batch
        self.reactor.defer(self.w)

    def on_failure(self) -> None:
        self.log.append("failure")


class _Writer:
    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail

    def write_deferred(self) -> None:
        self.log.append("write" + (" (fails)" if self.fail else ""))
        if self.fail:
            raise RuntimeError("a bug in one connection's write")


async def test_deferred_writes_run_once_the_batch_is_over_after_the_links() -> None:
    log: list[str] = []
    r = Reactor()
    r.after_batch.append(lambda: log.append("links"))
    pairs = [socket.socketpair() for _ in range(2)]
    bad, good = _Writer(log, fail=True), _Writer(log)
    for (a, _), w in zip(pairs, (bad, good), strict=True):
        a.setblocking(False)
        r.add(a.fileno(), _Reader(a, r, log, w))
    async with trio.open_nursery() as n:
        n.start_soon(r.run)
        for _, b in pairs:
            b.send(b"x")
        with trio.fail_after(5):
            while log.count("write") < 1:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    # both reads in one batch, then the links, then each connection's write;
    # a failing write does not keep the others from going out
    assert log == ["read x", "read x", "links", "write (fails)", "write"]
    assert not r.in_batch and r.deferred == []
    for a, b in pairs:
        a.close()
        b.close()


class _SlowReader:
    """Takes ``cost`` seconds of wall time per readiness (as handling a
    message would), so the reactor's busy time has a known floor."""

    def __init__(self, sock: socket.socket, cost: float, seen: list[int]) -> None:
        self.sock = sock
        self.cost = cost
        self.seen = seen

    def on_readable(self) -> None:
        self.seen.append(len(self.sock.recv(100)))
        t = time.perf_counter() + self.cost
        while time.perf_counter() < t:
            pass

    def on_failure(self) -> None:
        pass


async def test_the_reactor_counts_its_batches_ready_connections_and_busy_time() -> None:
    r = Reactor()
    pairs = [socket.socketpair() for _ in range(3)]
    seen: list[int] = []
    for a, _ in pairs:
        a.setblocking(False)
        r.add(a.fileno(), _SlowReader(a, 0.002, seen))
    assert (r.batches, r.events, r.busy_s) == (0, 0, 0.0)
    async with trio.open_nursery() as n:
        n.start_soon(r.run)
        # three connections ready at once: one batch of three
        for _, b in pairs:
            b.send(b"x")
        with trio.fail_after(5):
            while len(seen) < 3:
                await trio.sleep(0.01)
        assert (r.batches, r.events) == (1, 3)
        # then one alone: a second batch of one
        pairs[0][1].send(b"y")
        with trio.fail_after(5):
            while len(seen) < 4:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert (r.batches, r.events) == (2, 4)
    # each readiness spun 2 ms; the sleeps between batches are not counted
    assert 0.008 <= r.busy_s < 0.5
    for a, b in pairs:
        a.close()
        b.close()


async def test_websocket_writes_in_a_batch_leave_together_when_it_ends(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        c = await RawWs.connect(gw.port)
        assert (await c.hello(gw.token()))["t"] == "welcome"
        assert (await c.recv())["t"] == "deliver"  # the greeting
        (conn,) = [x for x in gw.w.conns if isinstance(x, WsConn)]
        r = gw.w.reactor
        r.in_batch = True  # as while the reactor's handlers run
        conn.send({"t": "deliver", "seq": 90, "body": "one"})
        conn.send({"t": "deliver", "seq": 91, "body": "two"})
        with trio.move_on_after(0.2):
            got = await c.stream.receive_some(65536)
            raise AssertionError(f"written before the batch ended: {got!r}")
        r.end_batch()
        with trio.fail_after(5):
            data = await c.stream.receive_some(65536)  # one send: both frames
        bodies = [msgpack.unpackb(p)["body"] for _, p in c.reader.feed(data)]
        assert bodies == ["one", "two"]
        await c.aclose()
