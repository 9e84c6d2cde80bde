"""What the WebSocket and HTTP/2 connection shells share: being read by the
worker's reactor (plain TCP), the heartbeat check (:func:`heartbeat_step`)
and the end of a connection.

The end matters most: a reactor-driven connection must leave the reactor's
epoll set before its descriptor is closed or sent to another process, and
give its slot in the worker's connection count back exactly once.
:meth:`ConnShell._finish` does both, whichever way the connection ends
(the pipe closing calls it through ``RawPipe.on_closed``; a task-driven TLS
connection calls it when its task ends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

import trio

from gateway.server.pipe import RawPipe

if TYPE_CHECKING:
    from gateway.server.pipe import TlsPipe
    from gateway.server.reactor import Reactor
    from gateway.server.worker import Worker

__all__ = ["HB_PING", "HB_TIMEOUT", "HB_WAIT", "ConnShell", "heartbeat_step"]

#: What a connection's heartbeat timer does now (:func:`heartbeat_step`).
HB_WAIT: Final = 0
HB_PING: Final = 1
HB_TIMEOUT: Final = 2


def heartbeat_step(
    now: float, last_rx: float, pinged: float, hb: float, limit: float
) -> tuple[int, float]:
    """One heartbeat check of a connection (sans-IO): ``last_rx`` is when
    the peer last sent anything, ``pinged`` when we last pinged it, ``hb``
    the heartbeat interval and ``limit`` the silence allowed (the interval
    times the misses, plus any grace). Returns what to do now
    (:data:`HB_WAIT`, :data:`HB_PING` or :data:`HB_TIMEOUT`) and when to
    check again.

    The peer times out only with a ping of ours unanswered (sent after the
    last thing it sent, at least half an interval ago) and ``limit`` of
    silence: a check that comes late (the worker's timer wheel ticks every
    0.25 s, and a busy loop delays it more) pings again instead of blaming
    a peer that answered every ping. While a ping is unanswered, the next
    one goes out an interval after it."""
    idle = now - last_rx
    outstanding = pinged > last_rx
    if outstanding and idle >= limit and now - pinged >= hb * 0.5:
        return HB_TIMEOUT, now
    act = HB_WAIT
    if idle >= hb * 0.5 and (not outstanding or now - pinged >= hb):
        act = HB_PING
        pinged = now
    return act, min(now + hb, max(last_rx + limit, pinged + hb * 0.5))


class ConnShell:
    """Base of :class:`~gateway.server.ws.WsConn` and
    :class:`~gateway.server.h2conn.H2Conn`."""

    __slots__ = ("finished", "held", "last_rx", "pinged", "pipe", "reactor", "w")

    #: The counter of bytes received.
    BYTES_IN: ClassVar[str]

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe) -> None:
        self.w = w
        self.pipe = pipe
        # the pipe was made with the write bounds of its accept; the
        # connection's are those of the terms it opens with now (a reload
        # may have come between: gateway.session.terms)
        terms = w.hub.terms
        pipe.bound(terms.out_max_bytes, terms.out_max_frames)
        self.last_rx = trio.current_time()
        self.pinged = 0.0  # when the heartbeat last pinged the peer
        self.finished = False
        self.held = False  # holds one of the worker's connection slots
        self.reactor: Reactor | None = None

    def _got(self, data: bytes) -> None:
        """Bytes received (from the reactor's read)."""
        raise NotImplementedError

    def _lost(self, now: float) -> None:
        """The connection is over: let its sessions go."""
        raise NotImplementedError

    def on_failure(self) -> None:
        raise NotImplementedError

    def _bind(self, reactor: Reactor) -> int:
        """Makes ``reactor`` read this connection (taking the descriptor over
        from the handshake's handler); returns the descriptor."""
        pipe = self.pipe
        assert isinstance(pipe, RawPipe)
        self.reactor = reactor
        pipe.on_closed = self._finish
        fd = pipe.sock.fileno()
        reactor.add(fd, self)
        return fd

    def on_readable(self) -> None:
        data = self.pipe.recv_ready()  # type: ignore[union-attr]
        if data:
            self.w.hub.stats[self.BYTES_IN] += len(data)
            self.last_rx = self.reactor.now  # type: ignore[union-attr]
            self._got(data)

    def _finish(self) -> None:
        """The connection is over (idempotent)."""
        if self.finished:
            return
        self.finished = True
        w = self.w
        if self.reactor is not None:
            self.reactor.remove(self.pipe.sock.fileno())  # type: ignore[union-attr]
        w.conns.discard(self)
        w.wheel.cancel(self)
        self._lost(trio.current_time())
        self.pipe.close()
        if self.held:
            self.held = False
            w._released(self.pipe.ip)
