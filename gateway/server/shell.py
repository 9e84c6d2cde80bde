"""What the WebSocket and HTTP/2 connection shells share: being read by the
worker's reactor (plain TCP) and the end of a connection.

The end matters most: a reactor-driven connection must leave the reactor's
epoll set before its descriptor is closed or sent to another process, and
give its slot in the worker's connection count back exactly once.
:meth:`ConnShell._finish` does both, whichever way the connection ends
(the pipe closing calls it through ``RawPipe.on_closed``; a task-driven TLS
connection calls it when its task ends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import trio

from gateway.server.pipe import RawPipe

if TYPE_CHECKING:
    from gateway.server.pipe import TlsPipe
    from gateway.server.reactor import Reactor
    from gateway.server.worker import Worker

__all__ = ["ConnShell"]


class ConnShell:
    """Base of :class:`~gateway.server.ws.WsConn` and
    :class:`~gateway.server.h2conn.H2Conn`."""

    __slots__ = ("finished", "held", "last_rx", "pipe", "reactor", "w")

    #: The counter of bytes received.
    BYTES_IN: ClassVar[str]

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe) -> None:
        self.w = w
        self.pipe = pipe
        self.last_rx = trio.current_time()
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
