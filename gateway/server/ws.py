"""WebSocket connection shell: RFC 6455 frames <-> visitor protocol.

Received bytes go through :class:`~gateway.protocol.wsframe.FrameReader`,
messages are decoded and handed to the :class:`VisitorProtocol`, and what it
sends back is framed and written. A plain-TCP connection is read by the
worker's reactor (no task of its own); a TLS connection by its own task
(:meth:`WsConn.run`). Heartbeats, the hello timeout and the closing grace
come from the worker's timer wheel (:meth:`WsConn.on_timer`), never from a
sleeping task.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, Final

import trio

from gateway.protocol import wsframe
from gateway.protocol.codec import Encoding, ack_frame, decode_frame, encode_ack, encode_frame
from gateway.protocol.codes import Code, ProtocolError
from gateway.server.pipe import RawPipe
from gateway.server.shell import HB_PING, HB_TIMEOUT, ConnShell, heartbeat_step
from gateway.session.visitor import VisitorProtocol

if TYPE_CHECKING:
    from gateway.server.pipe import TlsPipe
    from gateway.server.reactor import Reactor
    from gateway.server.worker import Worker

__all__ = ["WsConn"]


_log = logging.getLogger("gateway.ws")

#: Seconds a closing connection waits for the peer's close before dropping.
CLOSE_GRACE_S = 2.0

_PING: Final = wsframe.frame(wsframe.OP_PING, b"")


class WsConn(ConnShell):
    """Sink of a :class:`VisitorProtocol` over one WebSocket connection.

    Driven in one of two ways: a plain-TCP connection is attached to the
    worker's :class:`~gateway.server.reactor.Reactor` (:meth:`attach`; no
    task of its own), a TLS one runs :meth:`run` in its own task. Both feed
    received bytes through :meth:`feed`.
    """

    BYTES_IN = "bytes_in_ws"

    __slots__ = (
        "closing",
        "cork",
        "enc",
        "handoff_to",
        "paused",
        "proto",
        "reader",
        "wake",
    )

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe, origin: str | None) -> None:
        super().__init__(w, pipe)
        self.proto = VisitorProtocol(w.hub, self, origin, pipe.ip)
        terms = self.proto.terms
        self.reader = wsframe.FrameReader(terms.max_frame, frame_max=terms.max_frame)
        self.enc = Encoding.MSGPACK
        self.closing = False
        self.paused = False
        self.wake: trio.Event | None = None  # run(): set when reading resumes
        self.handoff_to: tuple[int, dict[str, Any]] | None = None
        # while handling one read, outbound frames are gathered here and
        # written with one send() at the end (half the syscalls per message)
        self.cork: list[bytes] | None = None

    def _start(self, hello: dict[str, Any] | None) -> None:
        w = self.w
        w.wheel.schedule(self.last_rx + w.cfg.hello_timeout_s, self)
        w.conns.add(self)
        if hello is not None:
            self._hello(hello)

    def _hello(self, hello: dict[str, Any]) -> None:
        """A hello read earlier (handed over, or waiting for its session)."""
        if self._batch_cork() is not None:
            self._frame(hello)
            return
        self.cork = []
        try:
            self._frame(hello)
        finally:
            self._uncork()

    def _lost(self, now: float) -> None:
        self.proto.connection_lost(now)

    # -- driven by the reactor (plain TCP) ---------------------------------------
    def attach(
        self, reactor: Reactor, trailing: bytes, hello: dict[str, Any] | None = None
    ) -> None:
        """Serves the connection from ``reactor`` from now on; ``trailing``
        are bytes read past the upgrade, ``hello`` a hello frame already
        read (by the worker that handed this connection over). The
        connection releases its slot itself when it ends (``held``)."""
        fd = self._bind(reactor)
        try:
            self._start(hello)
            if self.paused or self.handoff_to is not None:
                reactor.remove(fd)
            if trailing:
                self._got(trailing)
        except Exception:  # a bug must not take down the worker
            _log.exception("websocket connection failed")
            self.on_failure()

    def on_failure(self) -> None:
        self.w.hub.stats["internal_errors"] += 1
        self._send_close(int(Code.INTERNAL), "internal error")

    def _got(self, data: bytes) -> None:
        self.feed(data)
        if self.handoff_to is not None:
            assert self.reactor is not None
            self.reactor.remove(self.pipe.sock.fileno())  # type: ignore[union-attr]
            self.w.spawn(self._handoff_later)

    async def _handoff_later(self) -> None:
        try:
            if not await self._handoff():
                self._read_again()
        except Exception:
            _log.exception("websocket hand-off failed")
            self.on_failure()

    def _read_again(self) -> None:
        pipe = self.pipe
        if self.reactor is not None and not pipe.closed and not self.paused:
            self.reactor.add(pipe.sock.fileno(), self)  # type: ignore[union-attr]

    async def _feed_buffered(self) -> None:
        """Frames read before a pause, once reading resumes."""
        try:
            if not self.paused and not self.pipe.closed:
                self._got(b"")
        except Exception:
            _log.exception("websocket connection failed")
            self.on_failure()

    # -- driven by its own task (TLS) ----------------------------------------------
    async def run(self, trailing: bytes, hello: dict[str, Any] | None = None) -> None:
        """Serves the connection until it ends."""
        pipe = self.pipe
        stats = self.w.hub.stats
        try:
            self._start(hello)
            data = trailing
            while True:
                self.feed(data)
                data = b""  # not kept alive while waiting
                if self.handoff_to is not None and await self._handoff():
                    break  # the connection lives on in another worker
                while self.paused and not self.closing and not pipe.closed:
                    ev = self.wake = trio.Event()
                    await ev.wait()
                    self.feed(b"")  # frames read before the pause
                if pipe.closed:
                    break
                data = await pipe.recv()
                if not data:
                    break
                stats["bytes_in_ws"] += len(data)
                self.last_rx = trio.current_time()
        except Exception:  # a bug must not take down the worker
            _log.exception("websocket connection failed")
            self.on_failure()
        finally:
            self._finish()

    # -- bytes in -------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._batch_cork() is not None:
            self._feed(data)
            return
        self.cork = []
        try:
            self._feed(data)
        finally:
            self._uncork()

    def _batch_cork(self) -> list[bytes] | None:
        """Inside a reactor batch: gathers this connection's writes until
        the batch ends (the reactor then calls :meth:`write_deferred`), so
        what a batch produces for one connection (an ack, the replies that
        came over a downstream link in the same batch) leaves in one send.
        Returns the list gathering them, None outside a batch."""
        r = self.reactor
        if r is None or not r.in_batch:
            return None
        cork = self.cork
        if cork is None:
            cork = self.cork = []
            r.defer(self)
        return cork

    def write_deferred(self) -> None:
        self._uncork()

    def _uncork(self) -> None:
        cork = self.cork
        self.cork = None
        if cork:
            self._put(cork[0] if len(cork) == 1 else b"".join(cork))

    def _feed(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        proto = self.proto
        while True:
            try:
                got = reader.next()
            except wsframe.WsViolation as e:
                if self.closing:
                    self.pipe.close()
                else:
                    self._violation(e)
                return
            if got is None:
                return
            op, payload = got
            if self.closing:
                if op == wsframe.OP_CLOSE:
                    self.pipe.close()
                    return
                continue
            if op <= wsframe.OP_BINARY or op == wsframe.OP_FRAME:
                if op == wsframe.OP_FRAME:
                    frame = payload  # decoded and checked by the native scan
                else:
                    if op == wsframe.OP_TEXT and proto.state == proto.HELLO:
                        self.enc = Encoding.JSON
                    try:
                        frame = decode_frame(payload, proto.terms.max_frame)
                    except ProtocolError as pe:
                        self.w.count_error(pe.code)
                        proto.fail(pe)
                        return
                if not self._frame(frame) or self.handoff_to is not None:
                    return
                if self.paused:
                    return  # the rest stays in the reader
            elif op == wsframe.OP_PING:
                self._write(wsframe.frame(wsframe.OP_PONG, payload))
            elif op == wsframe.OP_CLOSE:
                try:
                    wsframe.parse_close(payload)
                except wsframe.WsViolation as e:
                    self._violation(e)
                    return
                self._send_close(1000, "")
                return

    def _violation(self, e: wsframe.WsViolation) -> None:
        self.w.count_error(e.code)
        self.w.hub.stats[f"closed_{e.code}"] += 1
        self._send_close(e.code, e.reason)

    def _frame(self, frame: dict[str, Any]) -> bool:
        """One decoded frame to the protocol; False when it failed the
        connection."""
        proto = self.proto
        was_hello = proto.state == proto.HELLO
        try:
            proto.on_frame(frame)
        except ProtocolError as e:
            self.w.count_error(e.code)
            proto.fail(e)
            return False
        if was_hello and proto.state == proto.OPEN:
            self.opened()
        return True

    def handoff(self, owner: int, hello: dict[str, Any]) -> bool:
        """Agrees to move this connection to worker ``owner`` (which holds
        the session being resumed): its socket, the hello, the encoding; the
        connection task does it (:meth:`_handoff`). Only a plain-TCP
        connection with nothing written since the upgrade and nothing read
        past the hello can move."""
        pipe = self.pipe
        if (
            not isinstance(pipe, RawPipe)
            or not pipe.movable
            or pipe.pending
            or self.cork
            or self.reader.buffered
        ):
            return False
        self.handoff_to = (owner, hello)  # done once the read is handled (it may wait)
        return True

    def rehello(self, hello: dict[str, Any]) -> None:
        if self.closing or self.pipe.closed:
            return
        self._hello(hello)
        self.resume()

    async def _handoff(self) -> bool:
        """Sends the connection to its owner; if that fails, answers the
        hello here after all (a fresh session). True when it moved."""
        assert self.handoff_to is not None
        owner, hello = self.handoff_to
        self.handoff_to = None
        pipe = self.pipe
        assert isinstance(pipe, RawPipe)
        meta = {"hello": hello, "enc": self.enc.name, "ip": pipe.ip, "origin": self.proto.origin}
        if await self.w.send_handoff(owner, pipe.sock, meta):
            self.closing = True
            pipe.detach()
            return True
        proto = self.proto
        proto.state = proto.HELLO
        proto.adopted = True  # do not try again
        self._hello(hello)
        return False

    # -- Sink -----------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        if self.closing:
            return
        payload = encode_frame(frame, self.enc)
        if type(payload) is str:
            out = wsframe.frame(wsframe.OP_TEXT, payload.encode("utf-8"))
        else:
            out = wsframe.frame(wsframe.OP_BINARY, payload)  # type: ignore[arg-type]
        if frame["t"] == "deliver":
            self.w.hub.stats["messages_out_ws"] += 1
        self._write(out)

    def send_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        if self.enc is not Encoding.MSGPACK:
            self.send(ack_frame(msg_id, n, dup))
        elif not self.closing:
            self._write(wsframe.frame(wsframe.OP_BINARY, encode_ack(msg_id, n, dup)))

    def _write(self, data: bytes) -> None:
        cork = self.cork
        if cork is None:
            cork = self._batch_cork()
        if cork is not None:
            cork.append(data)
        else:
            self._put(data)

    def _put(self, data: bytes) -> None:
        stats = self.w.hub.stats
        stats["bytes_out_ws"] += len(data)
        if not self.pipe.write(data):
            stats["slow_consumer_disconnects"] += 1
            self.closing = True
            self.proto.state = self.proto.CLOSED
            self.pipe.abort()

    def close(self, code: int, reason: str) -> None:
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        data = wsframe.close_frame(code, reason[:100])
        self._uncork()
        self.closing = True
        if self.paused:  # read the peer's close (or the task's end of stream)
            self.paused = False
            self._wake()
        self.w.hub.stats["bytes_out_ws"] += len(data)
        self.pipe.write(data)
        self.pipe.close_after_flush()
        self.w.wheel.schedule(trio.current_time() + CLOSE_GRACE_S, self)

    def pause(self) -> None:
        """Stops reading (TCP backpressure) until :meth:`resume`."""
        if self.paused or self.closing:
            return
        self.paused = True
        self.w.hub.stats["reads_paused"] += 1
        if self.reactor is not None and not self.pipe.closed:
            self.reactor.remove(self.pipe.sock.fileno())  # type: ignore[union-attr]

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        # silence while we were not reading is not the visitor's: a fresh
        # heartbeat period starts now
        self.last_rx = trio.current_time()
        self._wake()

    def _wake(self) -> None:
        """Reading goes on: the task's wait ends, or the reactor watches the
        socket again (and frames read before the pause are handled soon, not
        from inside whatever called resume())."""
        ev = self.wake
        if ev is not None:
            self.wake = None
            ev.set()
        if self.reactor is not None and self.handoff_to is None:
            self._read_again()
            if self.reader.buffered:
                self.w.spawn(self._feed_buffered)

    # -- timers -----------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        if self.closing:
            self.pipe.close()
            return
        proto = self.proto
        w = self.w
        if proto.state == proto.HELLO:
            w.hub.stats["hello_timeouts"] += 1
            proto.fail(ProtocolError(Code.HELLO_TIMEOUT))
            return
        if proto.state != proto.OPEN:
            return
        terms = proto.terms
        hb = terms.hb_s
        if self.paused:
            # paused by us (window full or the downstream cannot take more):
            # its pongs wait unread in the socket, so silence proves nothing
            w.wheel.schedule(now + hb, self)
            return
        limit = hb * terms.hb_misses + proto.grace_s
        act, nxt = heartbeat_step(now, self.last_rx, self.pinged, hb, limit)
        if act == HB_TIMEOUT:
            w.hub.stats["heartbeat_timeouts"] += 1
            proto.fail(ProtocolError(Code.HEARTBEAT_TIMEOUT))
            return
        if proto.token_expired(w.hub.wall()):
            w.hub.stats["tokens_expired_live"] += 1
            proto.fail(ProtocolError(Code.TOKEN_EXPIRED))
            return
        if act == HB_PING:
            self._write(_PING)
            self.pinged = now
            w.hub.stats["heartbeats_sent"] += 1
        w.wheel.schedule(nxt, self)

    def opened(self) -> None:
        """Called once the session is open: first heartbeat, jittered."""
        hb = self.proto.terms.hb_s
        self.w.wheel.schedule(trio.current_time() + hb * (0.1 + 0.9 * random.random()), self)

    def goaway(self, reconnect_after_ms: int) -> None:
        self.proto.goaway(reconnect_after_ms)

    def shutdown(self) -> None:
        """End of the drain: close with 1001."""
        self._send_close(int(Code.GOING_AWAY), "going away")
