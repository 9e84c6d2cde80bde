"""HTTP/2 connection shell: h2 streams <-> visitor protocol.

Every ``POST /v1/stream`` stream is one visitor session; both bodies are
sequences of ``u32 length || msgpack map`` frames (docs/protocol.md,
"Transports"). Backpressure uses HTTP/2 flow control: received bytes of a
paused stream are not acknowledged, so the client runs out of window.
Outbound data waits for window in a per-stream queue bounded by
``outbound_max_bytes`` (over it: 4002, stream reset). Heartbeats are HTTP/2
PINGs driven by the worker's timer wheel.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from gateway import h2repr
from gateway.downstream.h2data import h2_output, send_headers_if_open
from gateway.protocol.codec import (
    Encoding,
    LengthPrefixedDecoder,
    encode_ack,
    encode_frame,
    length_prefix,
)
from gateway.protocol.codes import Code, ProtocolError
from gateway.ratelimit import TokenBucket
from gateway.server.h2compact import SmallDeque, compact, release
from gateway.server.pipe import RawPipe
from gateway.server.shell import HB_PING, HB_TIMEOUT, ConnShell, heartbeat_step
from gateway.session.terms import Terms
from gateway.session.visitor import VisitorProtocol

h2repr.install()  # h2 formats every received frame eagerly: make DATA frames cheap

if TYPE_CHECKING:
    from gateway.server.pipe import TlsPipe
    from gateway.server.reactor import Reactor
    from gateway.server.worker import Worker

__all__ = ["H2Conn"]

_log = logging.getLogger("gateway.h2")

MAX_STREAMS: Final = 32
#: Streams a client may open on one connection: FREE_OPENS without counting,
#: then OPEN_BURST more at once and OPEN_RATE a second. A visitor opens one
#: per session; a client that opens and resets streams in a loop (the
#: "rapid reset" attack, which stays under MAX_STREAMS while each stream
#: costs the worker a request's work) gets GOAWAY ENHANCE_YOUR_CALM instead
#: of a core.
FREE_OPENS: Final = 8
OPEN_BURST: Final = 64.0
OPEN_RATE: Final = 8.0
CONN_WINDOW: Final = 1 << 22
#: one configuration for every visitor connection of the process (h2 only
#: reads it; a copy per connection was ~0.4 KB of its idle memory)
H2_CONFIG: Final = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
#: h2 reset codes for transport-level violations (docs/protocol.md "Codes").
_RESET: Final = {
    int(Code.TOO_BIG): h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
    int(Code.PROTOCOL_ERROR): h2.errors.ErrorCodes.PROTOCOL_ERROR,
    int(Code.SLOW_CONSUMER): h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
}


class H2Stream:
    """Sink of one visitor session over one HTTP/2 stream."""

    __slots__ = (
        "backlog",
        "conn",
        "decoder",
        "ended",
        "paused",
        "pending",
        "pending_bytes",
        "proto",
        "sid",
        "unacked",
    )

    def __init__(self, conn: H2Conn, stream_id: int, origin: str | None) -> None:
        self.conn = conn
        self.sid = stream_id
        self.decoder = LengthPrefixedDecoder(conn.terms.max_frame)
        self.proto = VisitorProtocol(conn.w.hub, self, origin, conn.pipe.ip, "h2")
        # the connection's terms (one heartbeat and set of limits for all
        # its streams), not a reloaded one's: what each stream's welcome says
        self.proto.terms = conn.terms
        # lists, not deques (760 bytes each even when empty, as they usually are)
        self.pending: SmallDeque = SmallDeque()
        self.pending_bytes = 0
        # decoded frames not yet handled because the session paused
        self.backlog: SmallDeque = SmallDeque()
        self.unacked = 0
        self.paused = False
        self.ended = False

    # -- Sink ------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        if self.ended:
            return
        payload = encode_frame(frame, Encoding.MSGPACK)
        assert isinstance(payload, bytes)
        if frame["t"] == "deliver":
            self.conn.w.hub.stats["messages_out_h2"] += 1
        self._queue(payload)

    def send_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        if not self.ended:
            self._queue(encode_ack(msg_id, n, dup))

    def _queue(self, payload: bytes) -> None:
        """Queues one encoded frame for the stream (or resets a stream whose
        peer does not read)."""
        data = length_prefix(payload)
        if self.pending_bytes + len(data) > self.conn.terms.out_max_bytes:
            self.conn.w.hub.stats["slow_consumer_disconnects"] += 1
            self.proto.state = self.proto.CLOSED
            self.conn.reset(self, int(Code.SLOW_CONSUMER))
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.conn.flush_stream(self)

    def close(self, code: int, reason: str) -> None:
        if self.ended:
            return
        if code in _RESET:
            self.conn.reset(self, code)
        else:
            self.conn.end(self)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.conn.w.hub.stats["reads_paused"] += 1

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.conn.run_backlog(self)
            if not self.paused:
                self.conn.ack_data(self)

    def handoff(self, owner: int, hello: dict[str, Any]) -> bool:
        return False  # one stream of a multiplexed connection cannot move

    def rehello(self, hello: dict[str, Any]) -> None:
        if self.ended:
            return
        self.backlog.appendleft(hello)
        self.resume()

    def goaway(self, reconnect_after_ms: int) -> None:
        self.proto.goaway(reconnect_after_ms)

    def on_timer(self, now: float) -> None:
        if self.proto.state == self.proto.HELLO and not self.ended:
            self.conn.w.hub.stats["hello_timeouts"] += 1
            self.proto.fail(ProtocolError(Code.HELLO_TIMEOUT))
            self.conn.write_out()


class H2Conn(ConnShell):
    """One HTTP/2 connection: read by the worker's reactor when it is plain
    TCP (h2c, :meth:`attach`), by its own task over TLS (:meth:`run`)."""

    BYTES_IN = "bytes_in_h2"

    __slots__ = ("closing", "deferred", "h2", "opened", "opens", "streams", "terms")

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe) -> None:
        super().__init__(w, pipe)
        self.h2 = h2.connection.H2Connection(config=H2_CONFIG)
        self.streams: dict[int, H2Stream] = {}
        self.closing = False
        self.deferred = False  # output waits for the end of the reactor batch
        self.opened = 0  # streams the client opened (requests)
        self.opens: TokenBucket | None = None  # from the FREE_OPENS-th on
        # the heartbeat and limits it was opened with (a reload changes
        # them for connections opened after it)
        self.terms: Terms = w.hub.terms

    def _start(self) -> None:
        w = self.w
        c = self.h2
        c.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
                # no HPACK dynamic table either way: a stream sends one
                # header block per direction, so a table would only hold
                # those headers in memory for the connection's lifetime
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0,
            },
        )
        c.initiate_connection()
        c.encoder.header_table_size = 0
        c.increment_flow_control_window(CONN_WINDOW)
        compact(c)
        self.write_out()
        w.conns.add(self)
        hb = self.terms.hb_s
        w.wheel.schedule(self.last_rx + hb * (0.1 + 0.9 * random.random()), self)
        w.hub.stats["h2_connections"] += 1

    def _lost(self, now: float) -> None:
        for st in list(self.streams.values()):
            self._drop(st, now)
        release(self.h2)

    # -- driven by the reactor (h2c) ---------------------------------------------
    def attach(self, reactor: Reactor, initial: bytes) -> None:
        """Serves the connection from ``reactor`` from now on (see
        :meth:`gateway.server.ws.WsConn.attach`)."""
        self._bind(reactor)
        try:
            self._start()
            if initial:
                self.feed(initial)
        except Exception:  # a bug must not take down the worker
            _log.exception("http/2 connection failed")
            self.on_failure()

    def _got(self, data: bytes) -> None:
        self.feed(data)

    def on_failure(self) -> None:
        self.w.hub.stats["internal_errors"] += 1
        self.pipe.close()

    # -- driven by its own task (TLS) --------------------------------------------
    async def run(self, initial: bytes) -> None:
        w = self.w
        stats = w.hub.stats
        try:
            self._start()
            data = initial
            while True:
                if data:
                    self.feed(data)
                if self.pipe.closed:
                    break
                data = await self.pipe.recv()
                if not data:
                    break
                stats["bytes_in_h2"] += len(data)
                self.last_rx = trio.current_time()
        except Exception:  # a bug must not take down the worker
            _log.exception("http/2 connection failed")
            self.on_failure()
        finally:
            self._finish()

    def feed(self, data: bytes) -> None:
        c = self.h2
        try:
            events = c.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued its GOAWAY and sends nothing after it
            self.w.count_error(int(Code.PROTOCOL_ERROR))
            self.w.hub.stats["h2_protocol_errors"] += 1
            self.w.event("info", "h2_protocol_error", error=str(e)[:100])
            self._h2_closed()
            return
        for ev in events:
            if type(ev) is h2.events.ConnectionTerminated:
                # the peer's GOAWAY: h2 sends nothing after it, not even
                # for the requests and data that came with it (a visitor
                # resends unacknowledged messages when it resumes)
                self._h2_closed()
                return
        settings_changed = False
        for ev in events:
            t = type(ev)
            if t is h2.events.DataReceived:
                self._on_data(ev)  # type: ignore[arg-type]
            elif t is h2.events.RequestReceived:
                if not self._may_open():
                    return
                self._on_request(ev)  # type: ignore[arg-type]
            elif t is h2.events.StreamEnded:
                st = self.streams.get(ev.stream_id)  # type: ignore[attr-defined]
                if st is not None:
                    self.end(st)
            elif t is h2.events.StreamReset:
                st = self.streams.get(ev.stream_id)  # type: ignore[attr-defined]
                if st is not None:
                    st.ended = True
                    self._drop(st, trio.current_time())
            elif t is h2.events.WindowUpdated:
                sid = ev.stream_id  # type: ignore[attr-defined]
                if sid:
                    st = self.streams.get(sid)
                    if st is not None:
                        self.flush_stream(st)
                else:
                    for st in list(self.streams.values()):
                        if st.pending:
                            self.flush_stream(st)
            elif t is h2.events.RemoteSettingsChanged or t is h2.events.SettingsAcknowledged:
                settings_changed = True
        if settings_changed:
            compact(c)  # new setting keys came with fresh deques
            if c.encoder.header_table_size:  # h2 follows the peer's limit
                c.encoder.header_table_size = 0
        self.write_out()

    def _may_open(self) -> bool:
        """Counts a stream the client opened; past the budget (see
        OPEN_RATE) the connection ends with GOAWAY ENHANCE_YOUR_CALM."""
        self.opened += 1
        if self.opened <= FREE_OPENS:
            return True
        now = trio.current_time()
        if self.opens is None:
            self.opens = TokenBucket(OPEN_RATE, OPEN_BURST, now)
        if self.opens.take(now) == 0.0:
            return True
        w = self.w
        w.hub.stats["h2_stream_flood_closes"] += 1
        w.count_error(int(Code.PROTOCOL_ERROR))
        w.event("info", "h2_stream_flood", opened=self.opened)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._h2_closed()
        return False

    def _h2_closed(self) -> None:
        """h2's connection is closed (a GOAWAY either way): its streams end
        here, their sessions detached for a resume, so that no delivery
        meanwhile writes to it; the connection closes once its output (our
        GOAWAY, if any) is written."""
        now = trio.current_time()
        for st in list(self.streams.values()):
            self._drop(st, now)
        self._close_after_flush()

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers: dict[str, str] = {}
        # str or bytes, whatever h2's annotations say (header_encoding)
        raw: list[tuple[Any, Any]] = list(ev.headers or [])
        for k, v in raw:
            ks = k.decode("latin-1") if isinstance(k, bytes) else k
            headers[ks] = v.decode("latin-1") if isinstance(v, bytes) else v
        method = headers.get(":method")
        path = (headers.get(":path") or "").partition("?")[0]
        if path != "/v1/stream" or method != "POST":
            status = "404" if path != "/v1/stream" else "405"
            self.w.hub.stats[f"http_{status}"] += 1
            self._answer(sid, [(":status", status), ("content-length", "0")], end=True)
            return
        if self.w.draining:
            self._answer(sid, [(":status", "503"), ("retry-after", "1")], end=True)
            return
        origin = headers.get("origin")
        if origin is not None and not self.w._origin_known(origin):
            self.w.hub.stats["origin_refused"] += 1
            self._answer(sid, [(":status", "403"), ("content-length", "0")], end=True)
            return
        if not self._answer(
            sid, [(":status", "200"), ("content-type", "application/x-gateway-frames")], end=False
        ):
            return
        st = H2Stream(self, sid, origin)
        self.streams[sid] = st
        self.w.hub.stats["h2_streams"] += 1
        self.w.wheel.schedule(trio.current_time() + self.w.cfg.hello_timeout_s, st)

    def _answer(self, sid: int, headers: list[tuple[str, str]], end: bool) -> bool:
        """Response headers for a request; False when h2 has closed the
        stream already (the client reset it in the same read as its
        request: h2 then refuses to send on it)."""
        if send_headers_if_open(self.h2, sid, headers, end):
            return True
        self.w.hub.stats["h2_requests_reset_early"] += 1
        return False

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        st = self.streams.get(ev.stream_id)
        n = ev.flow_controlled_length or 0
        if st is None or st.ended:
            if n:
                self.h2.acknowledge_received_data(n, ev.stream_id)
            return
        try:
            st.backlog.extend(st.decoder.feed(ev.data or b""))
        except ProtocolError as e:
            self.w.count_error(e.code)
            st.proto.fail(e)
        self.run_backlog(st)
        st.unacked += n
        if not st.paused:
            self.ack_data(st)

    def run_backlog(self, st: H2Stream) -> None:
        """Hands decoded frames to the session until it pauses or ends."""
        proto = st.proto
        backlog = st.backlog
        try:
            while backlog and not st.paused and not st.ended:
                frame = backlog.popleft()
                was_hello = proto.state == proto.HELLO
                proto.on_frame(frame)
                if was_hello and proto.state == proto.OPEN:
                    self.w.wheel.cancel(st)
        except ProtocolError as e:
            self.w.count_error(e.code)
            proto.fail(e)
        if st.ended:
            backlog.clear()

    def ack_data(self, st: H2Stream) -> None:
        n = st.unacked
        st.unacked = 0
        if n and not st.ended:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # closed meanwhile
                self.h2.acknowledge_received_data(n, st.sid)
            self.write_out()

    def flush_stream(self, st: H2Stream) -> None:
        c = self.h2
        pend = st.pending
        while pend:
            try:
                window = c.local_flow_control_window(st.sid)
            except h2.exceptions.StreamClosedError:
                pend.clear()
                st.pending_bytes = 0
                return
            if window <= 0:
                break
            chunk = pend[0]
            size = min(window, c.max_outbound_frame_size, len(chunk))
            try:
                c.send_data(st.sid, chunk[:size])
            except h2.exceptions.ProtocolError:
                # closed by the client in the read being handled (its
                # reset or end comes after this data among h2's events)
                pend.clear()
                st.pending_bytes = 0
                return
            st.pending_bytes -= size
            if size == len(chunk):
                pend.popleft()
            else:
                pend[0] = chunk[size:]
        self.write_out()

    def end(self, st: H2Stream) -> None:
        """Ends our side of the stream after what is queued (best effort)."""
        if st.ended:
            return
        self.flush_stream(st)
        st.ended = True
        try:
            if st.pending:
                self.h2.reset_stream(st.sid, h2.errors.ErrorCodes.CANCEL)
            else:
                self.h2.end_stream(st.sid)
        except h2.exceptions.ProtocolError:
            pass
        self._drop(st, trio.current_time())
        self.write_out()

    def reset(self, st: H2Stream, code: int) -> None:
        if st.ended:
            return
        st.ended = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(st.sid, _RESET.get(code, h2.errors.ErrorCodes.CANCEL))
        self._drop(st, trio.current_time())
        self.write_out()

    def _drop(self, st: H2Stream, now: float) -> None:
        if self.streams.pop(st.sid, None) is None:
            return
        self.w.wheel.cancel(st)
        st.ended = True
        st.pending.clear()
        st.pending_bytes = 0
        st.proto.connection_lost(now)

    def write_out(self) -> None:
        """Writes h2's output; inside a reactor batch, once at its end (so
        an ack and the replies of the same batch leave in one send)."""
        r = self.reactor
        if r is not None and r.in_batch:
            if not self.deferred:
                self.deferred = True
                r.defer(self)
            return
        self._write_now()

    def write_deferred(self) -> None:
        self.deferred = False
        self._write_now()

    def _close_after_flush(self) -> None:
        self._write_now()
        self.pipe.close_after_flush()

    def _write_now(self) -> None:
        data = h2_output(self.h2)
        if not data:
            return
        stats = self.w.hub.stats
        stats["bytes_out_h2"] += len(data)
        if not self.pipe.write(data):
            stats["slow_consumer_disconnects"] += 1
            self.pipe.abort()

    # -- worker hooks ----------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        if self.closing:
            self.pipe.close()
            return
        hb = self.terms.hb_s
        grace = max((st.proto.grace_s for st in self.streams.values()), default=0.0)
        limit = hb * self.terms.hb_misses + grace
        act, nxt = heartbeat_step(now, self.last_rx, self.pinged, hb, limit)
        if act == HB_TIMEOUT:
            self.w.hub.stats["heartbeat_timeouts"] += 1
            for st in list(self.streams.values()):
                st.proto.fail(ProtocolError(Code.HEARTBEAT_TIMEOUT))
            self.h2.close_connection()
            self.write_out()
            self._close_after_flush()
            return
        wall = self.w.hub.wall()
        for st in list(self.streams.values()):
            if st.proto.token_expired(wall):
                st.proto.fail(ProtocolError(Code.TOKEN_EXPIRED))
        if act == HB_PING:
            self.h2.ping(random.randbytes(8))
            self.pinged = now
            self.w.hub.stats["heartbeats_sent"] += 1
        self.write_out()
        self.w.wheel.schedule(nxt, self)

    def goaway(self, reconnect_after_ms: int) -> None:
        for st in list(self.streams.values()):
            st.goaway(reconnect_after_ms)
        self.write_out()

    def shutdown(self) -> None:
        for st in list(self.streams.values()):
            self.end(st)
        self.h2.close_connection()
        self.write_out()
        self.closing = True
        self._close_after_flush()
        self.w.wheel.schedule(trio.current_time() + 1.0, self)
