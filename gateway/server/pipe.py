"""Byte pipes under the protocol handlers: the only code that touches sockets.

:class:`RawPipe` (plain TCP) reads by waiting for readability and writes
synchronously with non-blocking ``send``; only when the kernel buffer is
full does the rest go into a queue bounded in bytes and chunks, flushed by a
short-lived task that exits once the queue is empty. An idle connection thus
costs no writer task (and no reader task either once the worker's reactor
reads it: see :mod:`gateway.server.reactor`). :class:`TlsRawPipe` is a
:class:`RawPipe` over TLS, read by the reactor too: the TLS runs over
memory buffers (:class:`gateway.tlsbio.TlsBio`), the socket's bytes opened
as they are read, the writes sealed before the same non-blocking send.
:class:`TlsPipe` (``GATEWAY_TLS_REACTOR=0``, the task-per-connection path)
does the same over ``trio.SSLStream``, whose writes always go through the
flusher.

``write`` never blocks and never buffers beyond the bounds: over them it
returns False and the caller closes the connection as a slow consumer.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, ClassVar

import trio

from gateway.session.tally import Tally
from gateway.tlsbio import TlsBio

__all__ = ["Pipe", "RawPipe", "TlsPipe", "TlsRawPipe"]

RECV_SIZE = 65536


class Pipe:
    """Common bookkeeping for both pipe kinds."""

    __slots__ = (
        "closed",
        "flushing",
        "ip",
        "max_bytes",
        "max_chunks",
        "nursery",
        "out",
        "out_bytes",
        "shutdown_after_flush",
    )

    def __init__(self, nursery: trio.Nursery, max_bytes: int, max_chunks: int) -> None:
        self.nursery = nursery
        self.ip = ""  # the peer's address (set by the worker)
        self.out: list[bytes] = []  # not a deque: 56 bytes empty instead of 760
        self.out_bytes = 0
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.flushing = False
        self.closed = False
        self.shutdown_after_flush = False

    def _queue(self, data: bytes) -> bool:
        if self.out_bytes + len(data) > self.max_bytes or len(self.out) >= self.max_chunks:
            return False
        self.out.append(data)
        self.out_bytes += len(data)
        if not self.flushing:
            self.flushing = True
            self.nursery.start_soon(self._flush)
        return True

    async def _flush(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close_after_flush(self) -> None:
        """Closes once everything queued has been written (at once if
        nothing is queued)."""
        if self.closed:
            return
        if self.out:
            self.shutdown_after_flush = True
        else:
            self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def pending(self) -> int:
        return self.out_bytes

    def bound(self, max_bytes: int, max_chunks: int) -> None:
        """New write bounds (those of the connection that takes the pipe
        over: see :class:`gateway.server.shell.ConnShell`)."""
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks


class RawPipe(Pipe):
    __slots__ = ("on_closed", "sock")

    #: whether the connection can move to another worker (its socket sent
    #: over a unix socket): not when its TLS state lives in this process
    movable: ClassVar[bool] = True

    def __init__(
        self, sock: socket.socket, nursery: trio.Nursery, max_bytes: int, max_chunks: int
    ) -> None:
        super().__init__(nursery, max_bytes, max_chunks)
        self.sock = sock
        # called once when the pipe lets go of its socket, before the
        # descriptor is closed (a reactor-driven connection ends there)
        self.on_closed: Callable[[], None] | None = None

    async def recv(self) -> bytes:
        """The next bytes received; ``b""`` at end of stream or error."""
        sock = self.sock
        while True:
            if self.closed:
                return b""
            try:
                return sock.recv(RECV_SIZE)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                return b""

    def recv_ready(self) -> bytes | None:
        """For a reactor that saw the socket readable: the bytes received,
        or None (nothing to read after all, or the connection ended: then
        the pipe is closed, which calls ``on_closed``)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self.close()
            return None
        return data

    def write(self, data: bytes) -> bool:
        """Sends or queues ``data``; False when the queue bounds would be
        exceeded (nothing is queued then)."""
        if self.closed:
            return True
        if not self.flushing:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return True
            if n == len(data):
                return True
            data = data[n:]
        return self._queue(data)

    async def _flush(self) -> None:
        sock = self.sock
        out = self.out
        try:
            while out and not self.closed:
                try:
                    await trio.lowlevel.wait_writable(sock)
                except (trio.ClosedResourceError, OSError):
                    return
                while out:
                    chunk = out[0]
                    try:
                        n = sock.send(chunk)
                    except BlockingIOError:
                        break
                    except OSError:
                        self.close()
                        return
                    self.out_bytes -= n
                    if n == len(chunk):
                        del out[0]
                    else:
                        out[0] = chunk[n:]
                        break
        finally:
            self.flushing = False
        if self.shutdown_after_flush:
            self.close()

    def close(self) -> None:
        self._let_go(shutdown=True)

    def abort(self) -> None:
        """Closes at once with a TCP reset-free close (queued data dropped)."""
        self.close()

    def detach(self) -> None:
        """Lets go of the socket without shutting the connection down (its
        file descriptor now lives in another process)."""
        self._let_go(shutdown=False)

    def _let_go(self, shutdown: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self.out_bytes = 0
        cb = self.on_closed
        if cb is not None:
            self.on_closed = None
            cb()
        sock = self.sock
        trio.lowlevel.notify_closing(sock)
        if shutdown:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class TlsRawPipe(RawPipe):
    """A :class:`RawPipe` over TLS (server side): :meth:`recv_ready` feeds
    the socket's bytes to the connection's :class:`TlsBio`, runs the
    handshake until it is done (answering each step at once) and returns
    the plaintext of the complete records; :meth:`write` seals before the
    send. A failed handshake, or the peer leaving during it (counted in
    ``stats`` as ``tls_handshake_failures``, as on the task path), sends its
    alert and closes the pipe; so do a bad record and the peer's
    close_notify."""

    __slots__ = ("stats", "tls", "up")

    movable: ClassVar[bool] = False

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        max_bytes: int,
        max_chunks: int,
        tls: TlsBio,
        stats: Tally,
    ) -> None:
        super().__init__(sock, nursery, max_bytes, max_chunks)
        self.tls = tls
        self.stats = stats
        self.up = False  # the handshake is done

    async def recv(self) -> bytes:  # pragma: no cover - only the reactor reads it
        raise NotImplementedError("a TlsRawPipe is read by the reactor (recv_ready)")

    def recv_ready(self) -> bytes | None:
        raw = RawPipe.recv_ready(self)
        if raw is None:
            if self.closed and not self.up:  # the peer left during the handshake
                self.stats["tls_handshake_failures"] += 1
            return None
        tls = self.tls
        tls.feed(raw)
        if not self.up:
            try:
                done = tls.handshake()
            except ssl.SSLError:
                self.stats["tls_handshake_failures"] += 1
                self._send_pending()  # its alert
                self.close()
                return None
            self._send_pending()
            if not done:
                return None
            self.up = True
            self.stats["tls_resumed" if tls.resumed() else "tls_full"] += 1
        try:
            plain = tls.open()
        except (EOFError, ssl.SSLError):
            self.close()
            return None
        if tls.pending():  # e.g. the answer to a key update
            self._send_pending()
        return plain or None

    def _send_pending(self) -> None:
        out = self.tls.seal(b"")
        if out:
            RawPipe.write(self, out)

    def write(self, data: bytes) -> bool:
        if self.closed:
            return True
        return RawPipe.write(self, self.tls.seal(data))

    def close(self) -> None:
        if not self.closed and self.up:
            # best effort: our close_notify, if the socket takes it now
            with contextlib.suppress(OSError, ValueError, ssl.SSLError):
                out = self.tls.close_notify()
                if out and not self.out:
                    self.sock.send(out)
        RawPipe.close(self)


class TlsPipe(Pipe):
    __slots__ = ("stream",)

    def __init__(
        self, stream: trio.SSLStream[Any], nursery: trio.Nursery, max_bytes: int, max_chunks: int
    ) -> None:
        super().__init__(nursery, max_bytes, max_chunks)
        self.stream = stream

    async def recv(self) -> bytes:
        if self.closed:
            return b""
        try:
            return bytes(await self.stream.receive_some(RECV_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    def write(self, data: bytes) -> bool:
        if self.closed:
            return True
        return self._queue(data)

    async def _flush(self) -> None:
        out = self.out
        try:
            while out and not self.closed:
                chunk = b"".join(out)
                out.clear()
                self.out_bytes = 0
                try:
                    await self.stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.close()
                    return
        finally:
            self.flushing = False
        if self.shutdown_after_flush:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self.out_bytes = 0
        self.nursery.start_soon(self._aclose)

    async def _aclose(self) -> None:
        with trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)

    def abort(self) -> None:
        self.close()
