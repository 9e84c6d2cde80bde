"""Byte pipes under the protocol handlers: the only code that touches sockets.

:class:`RawPipe` (plain TCP) reads by waiting for readability and writes
synchronously with non-blocking ``send``; only when the kernel buffer is
full does the rest go into a queue bounded in bytes and chunks, flushed by a
short-lived task that exits once the queue is empty. An idle connection thus
costs no writer task (and no reader task either once the worker's reactor
reads it: see :mod:`gateway.server.reactor`). :class:`TlsPipe` does the same
over ``trio.SSLStream``, whose writes always go through the flusher.

``write`` never blocks and never buffers beyond the bounds: over them it
returns False and the caller closes the connection as a slow consumer.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["Pipe", "RawPipe", "TlsPipe"]

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


class RawPipe(Pipe):
    __slots__ = ("on_closed", "sock")

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
