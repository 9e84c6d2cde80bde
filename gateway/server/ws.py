"""WebSocket connection shell: wsproto frames <-> visitor protocol.

One task per connection (:meth:`WsConn.run`) reads, feeds wsproto, decodes
messages and hands frames to the :class:`VisitorProtocol`. Heartbeats, the
hello timeout and the closing grace come from the worker's timer wheel
(:meth:`WsConn.on_timer`), never from a sleeping task.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from gateway.protocol.codec import Encoding, decode_frame, encode_frame
from gateway.protocol.codes import Code, ProtocolError
from gateway.server.pipe import RawPipe
from gateway.session.visitor import VisitorProtocol

if TYPE_CHECKING:
    from gateway.server.pipe import TlsPipe
    from gateway.server.worker import Worker

__all__ = ["WsConn"]


class _SmallQueue(list[Any]):
    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


_log = logging.getLogger("gateway.ws")

#: Seconds a closing connection waits for the peer's close before dropping.
CLOSE_GRACE_S = 2.0


class WsConn:
    """Sink of a :class:`VisitorProtocol` over one WebSocket connection."""

    __slots__ = (
        "closing",
        "cork",
        "enc",
        "handoff_to",
        "last_rx",
        "msg_len",
        "msg_parts",
        "pipe",
        "proto",
        "resume_ev",
        "w",
        "ws",
    )

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe, origin: str | None) -> None:
        self.w = w
        self.pipe = pipe
        self.ws = ws = Connection(ConnectionType.SERVER)
        # wsproto keeps a deque for events it queues itself (760 bytes even
        # when empty); it only ever appends, pops from the left and tests
        # emptiness, which a small list subclass does in 56 bytes.
        if type(getattr(ws, "_events", None)) is deque and not ws._events:
            ws._events = _SmallQueue()  # type: ignore[assignment]
        self.proto = VisitorProtocol(w.hub, self, origin, pipe.ip)
        self.enc = Encoding.MSGPACK
        self.last_rx = trio.current_time()
        self.msg_parts: list[Any] | None = None
        self.msg_len = 0
        self.closing = False
        self.handoff_to: tuple[int, dict[str, Any]] | None = None
        self.resume_ev: trio.Event | None = None
        # while handling one read, outbound frames are gathered here and
        # written with one send() at the end (half the syscalls per message)
        self.cork: list[bytes] | None = None

    # -- the connection task ------------------------------------------------
    async def run(self, trailing: bytes, hello: dict[str, Any] | None = None) -> None:
        """Serves the connection; ``hello`` is a hello frame already read
        (by the worker that handed this connection over)."""
        w = self.w
        pipe = self.pipe
        w.wheel.schedule(self.last_rx + w.cfg.hello_timeout_s, self)
        w.conns.add(self)
        stats = w.hub.stats
        try:
            if hello is not None:
                self.cork = []
                try:
                    self._frame(hello)
                finally:
                    self._uncork()
            data = trailing
            while True:
                self.feed(data)
                data = b""  # not kept alive while waiting
                if self.handoff_to is not None and await self._handoff():
                    break  # the connection lives on in another worker
                while self.resume_ev is not None and not self.closing and not pipe.closed:
                    await self.resume_ev.wait()
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
            w.hub.stats["internal_errors"] += 1
            self._send_close(int(Code.INTERNAL), "internal error")
        finally:
            w.conns.discard(self)
            w.wheel.cancel(self)
            self.proto.connection_lost(trio.current_time())
            pipe.close()

    def feed(self, data: bytes) -> None:
        self.cork = []
        try:
            self._feed(data)
        finally:
            self._uncork()

    def _uncork(self) -> None:
        cork = self.cork
        self.cork = None
        if cork:
            self._write(cork[0] if len(cork) == 1 else b"".join(cork))

    def _feed(self, data: bytes) -> None:
        ws = self.ws
        if data:
            try:
                ws.receive_data(data)
            except LocalProtocolError:
                return  # data after our close: ignore
        proto = self.proto
        for event in ws.events():
            if self.closing:
                if isinstance(event, CloseConnection):
                    self.pipe.close()
                    return
                continue
            t = type(event)
            if t is TextMessage or t is BytesMessage:
                payload = self._assemble(event)  # type: ignore[arg-type]
                if payload is None:
                    continue
                if t is TextMessage and proto.state == proto.HELLO:
                    self.enc = Encoding.JSON
                try:
                    frame = decode_frame(payload, self.w.cfg.max_frame)
                except ProtocolError as e:
                    self.w.count_error(e.code)
                    proto.fail(e)
                    return
                if not self._frame(frame) or self.handoff_to is not None:
                    return
                if self.resume_ev is not None:
                    return  # paused: the rest stays in wsproto's buffer
            elif t is Ping:
                self._write(ws.send(event.response()))  # type: ignore[attr-defined]
            elif t is CloseConnection:
                code = event.code  # type: ignore[attr-defined]
                if code in (1002, 1007, 1009, 1008):  # wsproto found a violation
                    self.w.count_error(code)
                    self.w.hub.stats[f"closed_{code}"] += 1
                    self._send_close(code, str(event.reason or "")[:100])  # type: ignore[attr-defined]
                else:
                    self._send_close(1000, "")
                    self.pipe.close_after_flush()
                return
            elif t is Pong:
                pass

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
        if not isinstance(pipe, RawPipe) or pipe.pending or self.cork or self.msg_parts:
            return False
        dec = getattr(getattr(self.ws, "_proto", None), "_frame_decoder", None)
        buf = getattr(dec, "buffer", None)
        if buf is None or len(buf) or getattr(dec, "header", None) is not None:
            return False
        self.handoff_to = (owner, hello)  # done by run() (it may have to wait)
        return True

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
        self.cork = []
        try:
            self._frame(hello)
        finally:
            self._uncork()
        return False

    def _assemble(self, event: TextMessage | BytesMessage) -> Any:
        data = event.data
        limit = self.w.cfg.max_frame
        parts = self.msg_parts
        if parts is None:
            if event.message_finished:
                return data
            parts = self.msg_parts = []
            self.msg_len = 0
        n = len(data) if type(data) is not str else len(data) * 1  # chars; bytes checked later
        self.msg_len += n
        if self.msg_len > limit:
            self.msg_parts = None
            self.w.count_error(int(Code.TOO_BIG))
            self.w.hub.stats["closed_1009"] += 1
            self._send_close(int(Code.TOO_BIG), "message too big")
            return None
        parts.append(data)
        if not event.message_finished:
            return None
        self.msg_parts = None
        if type(data) is str:
            return "".join(parts)
        return b"".join(parts)

    # -- Sink -----------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        if self.closing:
            return
        payload = encode_frame(frame, self.enc)
        if isinstance(payload, str):
            out = self.ws.send(TextMessage(data=payload))
        else:
            out = self.ws.send(BytesMessage(data=payload))
        if frame["t"] == "deliver":
            self.w.hub.stats["messages_out_ws"] += 1
        self._write(out)

    def _write(self, data: bytes) -> None:
        cork = self.cork
        if cork is not None:
            cork.append(data)
            return
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
        try:
            data = self.ws.send(CloseConnection(code=code, reason=reason[:100]))
        except LocalProtocolError:
            data = b""
        self._uncork()
        self.closing = True
        if self.resume_ev is not None:
            self.resume_ev.set()
            self.resume_ev = None
        if data:
            self.w.hub.stats["bytes_out_ws"] += len(data)
            self.pipe.write(data)
        self.pipe.close_after_flush()
        self.w.wheel.schedule(trio.current_time() + CLOSE_GRACE_S, self)

    def pause(self) -> None:
        if self.resume_ev is None:
            self.resume_ev = trio.Event()
            self.w.hub.stats["reads_paused"] += 1

    def resume(self) -> None:
        ev = self.resume_ev
        if ev is not None:
            self.resume_ev = None
            # silence while we were not reading is not the visitor's: a fresh
            # heartbeat period starts now
            self.last_rx = trio.current_time()
            ev.set()

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
        hb = w.cfg.heartbeat_s
        if self.resume_ev is not None:
            # paused by us (window full or the downstream cannot take more):
            # its pongs wait unread in the socket, so silence proves nothing
            w.wheel.schedule(now + hb, self)
            return
        limit = hb * w.cfg.heartbeat_misses + proto.grace_s
        idle = now - self.last_rx
        if idle >= limit:
            w.hub.stats["heartbeat_timeouts"] += 1
            proto.fail(ProtocolError(Code.HEARTBEAT_TIMEOUT))
            return
        if proto.token_expired(w.hub.wall()):
            w.hub.stats["tokens_expired_live"] += 1
            proto.fail(ProtocolError(Code.TOKEN_EXPIRED))
            return
        if idle >= hb * 0.5:
            self._write(self.ws.send(Ping(b"")))
            w.hub.stats["heartbeats_sent"] += 1
        w.wheel.schedule(min(now + hb, self.last_rx + limit), self)

    def opened(self) -> None:
        """Called once the session is open: first heartbeat, jittered."""
        hb = self.w.cfg.heartbeat_s
        self.w.wheel.schedule(trio.current_time() + hb * (0.1 + 0.9 * random.random()), self)

    def goaway(self, reconnect_after_ms: int) -> None:
        self.proto.goaway(reconnect_after_ms)

    def shutdown(self) -> None:
        """End of the drain: close with 1001."""
        self._send_close(int(Code.GOING_AWAY), "going away")
