"""The connection handling of ``gateway desk-sim``
(:mod:`gateway.downstream.desksim`): an HTTP/2 server (h2c, or TLS with
ALPN ``h2`` given a certificate, optionally requiring client certificates)
speaking the downstream link protocol around
:class:`~gateway.downstream.desk.Desk`. Compiled with the gateway's hot
path (:mod:`gateway.compiled`): desk-sim shares the machine with the
gateway and the load clients in the benchmarks, and its cost per message
is part of every forwarded message's round trip there.

Every ``POST /v1/link`` stream is one link from a gateway worker. Frames
are handled as they arrive; answers due now are written with the other
output of the same read, delayed ones (``--latency-ms``, think time) wait in
one timer heap. Output per connection is bounded (``MAX_OUT_BYTES``; over
it the connection is dropped, the gateway reconnects and redelivers).
``--record FILE`` appends one JSON line per accepted visitor message, written
before its ack is sent, so a test can count what arrived even if this
process is killed right after.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import socket
import ssl
import sys
from typing import Any, Final, TextIO

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from gateway import h2repr, trioidle
from gateway.downstream.desk import Desk, DeskConfig
from gateway.downstream.h2data import (
    DATA_FRAME,
    DataSplitter,
    FlowError,
    SendWindow,
    goaway,
    h2_output,
    send_headers_if_open,
)
from gateway.downstream.h2data import WINDOW as WINDOW_UPDATE_KIND
from gateway.downstream.proto import (
    FEATURES_HEADER,
    LINK_PATH,
    MAX_LINK_FRAME,
    MOVED_MARK,
    check_from_gateway,
    encode,
    encode_acks,
)
from gateway.downstream.tls import ALPN, TlsBio
from gateway.downstream.tls import handshake as tls_handshake
from gateway.netio import write_some
from gateway.protocol.codec import MAX_ENTRIES, LengthPrefixedDecoder
from gateway.protocol.codes import ProtocolError

h2repr.install()  # h2 formats every received frame eagerly: make DATA frames cheap

__all__ = ["DRAIN_S", "DeskServer"]

MAX_OUT_BYTES: Final = 32 << 20
READ_SIZE: Final = 1 << 18
WINDOW: Final = 1 << 24
MAX_CONNS: Final = 4096
MAX_FRAME: Final = 1 << 20
#: DATA frames we send are at most the RFC 7540 default size: a peer only
#: enforces a larger SETTINGS_MAX_FRAME_SIZE once it saw our ACK of it.
SAFE_FRAME: Final = 16384
#: Seconds a connection has for its TLS handshake.
HANDSHAKE_S: Final = 10.0
#: After SIGTERM: seconds the gateways have to close their drained links.
DRAIN_S: Final = 10.0


class _Conn:
    __slots__ = (
        "acks", "busy", "carry", "extra", "fd", "h2", "links", "out", "reading", "send", "sock",
        "split", "srv", "tls", "wake",
    )  # fmt: skip

    def __init__(self, srv: DeskServer, sock: trio.SocketStream, tls: TlsBio | None) -> None:
        self.srv = srv
        self.sock = sock
        self.fd = sock.socket.fileno()
        # over TLS: the connection's records, opened after each read and
        # sealed before each write (gateway.downstream.tls.TlsBio)
        self.tls = tls
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 64,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
            },
        )
        self.links: dict[int, tuple[int, LengthPrefixedDecoder]] = {}  # stream -> link
        self.out: dict[int, bytearray] = {}  # stream -> bytes waiting for window
        # stream -> the acks not packed yet, and the other answers made
        # after the first of them: written as one ``acks`` frame, then those
        # answers in their order, when the read's answers are written (an
        # ack moves ahead of replies, never behind: a reply never overtakes
        # the ack of the message it answers)
        self.acks: dict[int, _AckBatch] = {}
        self.wake = trio.Event()
        self.busy = False  # the writer task is in a send
        self.carry = b""  # packed (and sealed) by the reader, not taken by the socket yet
        self.reading = False  # the reader writes the answers itself when done
        # the first link stream's DATA frames both ways without h2
        # (gateway.downstream.h2data): the ones read, the WINDOW_UPDATEs
        # giving them back, and the gateway's windows for the ones sent
        self.split = DataSplitter(0, WINDOW, server=True, windows=True)
        self.send = SendWindow(0)
        self.extra = b""


class _AckBatch:
    """Acks waiting to go out as one ``acks`` frame, and the other frames
    queued after the first of them (they follow it)."""

    __slots__ = ("acks", "entries", "later", "later_bytes")

    #: Map entries plus list items at which a batch is packed: the
    #: gateway's link decoder takes maps and lists of at most MAX_ENTRIES
    #: (256) items each, so ``sids`` and every list stay under it. (With
    #: session ids of at most 128 characters the frame also stays under
    #: MAX_LINK_FRAME.)
    LIMIT: Final = MAX_ENTRIES - 16

    def __init__(self) -> None:
        self.acks: dict[str, list[int]] = {}
        self.entries = 0
        self.later: list[bytes] = []
        self.later_bytes = 0

    def hold(self, frame: bytes) -> None:
        """A frame to send after the acks."""
        self.later.append(frame)
        self.later_bytes += len(frame)

    def add(self, sid: str, n: int) -> bool:
        """Adds one ack; True when the batch should be packed now."""
        ns = self.acks.get(sid)
        if ns is None:
            self.acks[sid] = [n]
            self.entries += 2
        else:
            ns.append(n)
            self.entries += 1
        return self.entries >= self.LIMIT

    def take(self) -> bytes:
        """The ``acks`` frame (length-prefixed), then the frames held;
        empties the batch."""
        acks, self.acks, self.entries = self.acks, {}, 0
        later, self.later, self.later_bytes = self.later, [], 0
        head = encode_acks(acks) if acks else b""
        return head + b"".join(later) if later else head


class DeskServer:
    def __init__(
        self,
        cfg: DeskConfig,
        record: TextIO | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.tls_failures = 0  # handshakes that failed or timed out
        self._tls_last = ""
        self.draining = False
        self._conns: set[_Conn] = set()
        self.all_closed = trio.Event()
        self.record_file = record
        self.desk = Desk(cfg, random.Random(), self._record if record else None)
        self.links: dict[int, tuple[_Conn, int]] = {}  # link id -> (conn, stream)
        self._ids = itertools.count(1)
        self._heap: list[tuple[float, int, str, dict[str, Any]]] = []
        self._tick = itertools.count()
        self._timer_wake = trio.Event()
        self.conns = 0
        # the link response's feature header (none with the "no-moved" violation)
        self.features: list[tuple[str, str]] = (
            [] if "no-moved" in cfg.violate else [(FEATURES_HEADER, MOVED_MARK)]
        )

    def _record(self, rec: dict[str, Any]) -> None:
        f = self.record_file
        assert f is not None
        body = rec.get("body")
        if type(body) is bytes:
            rec = dict(rec, body=body.hex(), body_hex=True)
        f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        f.flush()

    # -- connections --------------------------------------------------------
    async def handle(self, sock: trio.SocketStream) -> None:
        """Serves one gateway connection until it ends. Its errors come out
        of here (after the connection is cleaned up): the shell's
        :func:`~gateway.downstream.desksim.contain` keeps them from ending
        the other connections."""
        if self.conns >= MAX_CONNS or self.draining:
            await sock.aclose()
            return
        self.conns += 1
        c: _Conn | None = None
        try:
            tls = None
            if self.ssl_context is not None:
                tls = await self._handshake(sock, self.ssl_context)
                if tls is None:
                    return
            c = _Conn(self, sock, tls)
            self._conns.add(c)
            with _nodelay(sock):
                c.h2.initiate_connection()
                c.h2.increment_flow_control_window(WINDOW - 65535)
                async with trio.open_nursery() as n:
                    n.start_soon(self._writer, c)
                    await self._reader(c)
                    n.cancel_scope.cancel()
        finally:
            self.conns -= 1
            if c is not None:
                self._conns.discard(c)
            if self.draining and not self.conns:
                self.all_closed.set()
            for link, _ in c.links.values() if c is not None else ():
                self.links.pop(link, None)
                self.desk.link_closed(link)
            await trio.aclose_forcefully(sock)

    def drain(self) -> None:
        """Graceful shutdown: a GOAWAY (NO_ERROR, keeping every link stream)
        to every gateway, and no new connections. Messages that still
        arrive on the links are taken and answered as before; each gateway
        closes its link once its messages are answered (``all_closed``)."""
        self.draining = True
        for c in self._conns:
            last = max(c.links, default=0)
            # written by hand: h2 would refuse to send anything after its
            # own GOAWAY, and the answers still go out through it
            c.extra += goaway(last)
            c.wake.set()
        if not self.conns:
            self.all_closed.set()

    async def _handshake(self, sock: trio.SocketStream, ctx: ssl.SSLContext) -> TlsBio | None:
        """The TLS handshake (ALPN ``h2`` required); None when it failed,
        timed out or chose another protocol (counted, and said on stderr
        when the reason differs from the last one)."""
        tls = TlsBio(ctx, None)
        why = ""
        with trio.move_on_after(HANDSHAKE_S) as scope:
            try:
                if not await tls_handshake(tls, sock):
                    why = "the client closed the connection"
            except ssl.SSLError as tls_err:
                why = str(tls_err)
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await sock.send_all(tls.seal(b""))  # the alert saying why
            except (trio.BrokenResourceError, OSError) as lost:
                why = f"connection lost: {lost}"
        if scope.cancelled_caught:
            why = f"no TLS handshake in {HANDSHAKE_S:g} s"
        elif not why and tls.obj.selected_alpn_protocol() != ALPN:
            why = "the client did not offer ALPN h2"
        if not why:
            return tls
        self.tls_failures += 1
        if why != self._tls_last:
            self._tls_last = why
            print(f"desk-sim: TLS handshake failed: {why}", file=sys.stderr)
        return None

    async def _reader(self, c: _Conn) -> None:
        fd = c.fd
        tls = c.tls
        # between reads, while no other task has anything to do, wait for
        # the next one here rather than through trio's scheduler
        idle = trioidle.probe(fd)
        # over TLS, the gateway's first bytes (the connection preface and the
        # link's request) may have come in the same read as the end of its
        # handshake: they are in the TLS buffer already, and no new read
        # would come for them (the gateway waits for the answer)
        early = b""
        if tls is not None:
            try:
                early = tls.open()
            except (EOFError, ssl.SSLError):
                return
        while True:
            if early:
                data, early = early, b""
            else:
                if idle is not None and idle.wait():
                    data = os.read(fd, READ_SIZE)
                else:
                    data = await c.sock.receive_some(READ_SIZE)
                if not data:
                    return
                if tls is not None:
                    tls.feed(data)
                    try:
                        data = tls.open()
                    except (EOFError, ssl.SSLError):
                        return  # the gateway ended the session, or broke it
                    if not data:
                        continue  # no complete record yet
            sp = c.split
            sp.feed(data)
            c.reading = True
            try:
                while (item := sp.next(sp.stream in c.links)) is not None:
                    kind, chunk = item
                    if kind == DATA_FRAME:
                        self._data(c, sp.stream, chunk)
                        continue
                    if kind == WINDOW_UPDATE_KIND:
                        c.send.update(chunk)
                        continue
                    for ev in c.h2.receive_data(chunk):
                        self._event(c, ev)
                c.extra += sp.window_updates()
            except (h2.exceptions.ProtocolError, FlowError) as e:
                print(f"desk-sim: HTTP/2 error from a gateway: {e}", file=sys.stderr)
                return
            finally:
                c.reading = False
            if self.desk.crashed:
                os._exit(3)  # simulated crash: no goodbye, no flush of anything
            self._write_now(c)

    def _write_now(self, c: _Conn) -> None:
        """Writes the answers to a read with one non-blocking send from the
        reader (no hand-off to the writer task, which only gets what the
        socket did not take, or everything while it is sending itself)."""
        if c.busy or c.carry:
            c.wake.set()
            return
        data = self._sealed(c)
        if not data:
            return
        rest = write_some(c.fd, data)
        if rest:
            c.carry = rest
            c.wake.set()

    def _event(self, c: _Conn, ev: Any) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            headers: dict[Any, Any] = dict(ev.headers)
            sid = ev.stream_id
            if headers.get(":path") != LINK_PATH or headers.get(":method") != "POST":
                send_headers_if_open(c.h2, sid, [(":status", "404")], True)
                return
            if any(headers.get(k) != v for k, v in self.cfg.require_headers):
                send_headers_if_open(c.h2, sid, [(":status", "401")], True)
                return
            accepted = [(":status", "200"), ("content-type", "application/msgpack"), *self.features]
            if not send_headers_if_open(c.h2, sid, accepted, False):
                return  # reset by the gateway in the same read: no link
            link = next(self._ids)
            if not c.split.stream:
                # its DATA frames are read and written without h2
                c.split.stream = c.send.stream_id = sid
            c.links[sid] = (link, LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_gateway))
            self.links[link] = (c, sid)
            c.out[sid] = bytearray()
        elif isinstance(ev, h2.events.DataReceived):
            if ev.flow_controlled_length:
                c.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            self._data(c, ev.stream_id, ev.data)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            c.send.settings_changed(ev.changed_settings)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            self._drop_stream(c, ev.stream_id)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            raise trio.BrokenResourceError("peer sent GOAWAY")

    def _data(self, c: _Conn, stream: int, data: bytes) -> None:
        """A link stream's bytes: its frames to the desk."""
        entry = c.links.get(stream)
        if entry is None:
            return
        link, dec = entry
        try:
            desk = self.desk
            for f in dec.feed(data):
                self._actions(desk.on_frame(link, f))
                if desk.marks:
                    for old, sid in desk.take_marks():
                        self._send_on(old, {"t": "moved", "sid": sid})
        except ProtocolError as e:
            print(f"desk-sim: bad frame on link {link}: {e}", file=sys.stderr)
            c.h2.reset_stream(stream)
            self._drop_stream(c, stream)

    def _drop_stream(self, c: _Conn, stream: int) -> None:
        entry = c.links.pop(stream, None)
        c.out.pop(stream, None)
        c.acks.pop(stream, None)
        if entry is not None:
            self.links.pop(entry[0], None)
            self.desk.link_closed(entry[0])

    def _actions(self, actions: list[tuple[float, str, dict[str, Any]]]) -> None:
        now: float | None = None
        for delay, sid, frame in actions:
            if delay <= 0:
                self._send(sid, frame)
            else:
                if now is None:
                    now = trio.current_time()
                heapq.heappush(self._heap, (now + delay, next(self._tick), sid, frame))
                self._timer_wake.set()

    def _send(self, sid: str, frame: dict[str, Any]) -> None:
        link = self.desk.link_of(sid)
        if link is not None:
            self._send_on(link, frame)
        # else the session's link is gone; the gateway re-opens it

    def _send_on(self, link: int, frame: dict[str, Any]) -> None:
        target = self.links.get(link)
        if target is None:
            return  # that link is gone
        c, stream = target
        buf = c.out.get(stream)
        if buf is None:
            return
        batch = c.acks.get(stream)
        if self.cfg.batch_acks and frame["t"] == "ack" and not frame.get("dup"):
            if batch is None:
                batch = c.acks[stream] = _AckBatch()
            if batch.add(frame["sid"], frame["n"]):
                buf += batch.take()  # full (see _AckBatch.LIMIT)
        elif batch is not None:
            batch.hold(encode(frame))
        else:
            buf += encode(frame)
        if len(buf) + (batch.later_bytes if batch is not None else 0) > MAX_OUT_BYTES:
            print("desk-sim: gateway not reading, dropping its connection", file=sys.stderr)
            c.sock.socket.close()
            return
        if not c.reading:
            c.wake.set()

    async def _writer(self, c: _Conn) -> None:
        while True:
            await c.wake.wait()
            c.wake = trio.Event()
            data, c.carry = c.carry + self._sealed(c), b""
            if data:
                c.busy = True
                try:
                    await c.sock.send_all(data)
                finally:
                    c.busy = False

    def _sealed(self, c: _Conn) -> bytes:
        """:meth:`_pack`'s bytes as they go to the socket (over TLS: sealed
        into records)."""
        data = self._pack(c)
        return c.tls.seal(data) if c.tls is not None else data

    def _pack(self, c: _Conn) -> bytes:
        """Moves queued answers into DATA frames as far as the windows
        allow; returns the bytes to send."""
        if c.acks:
            for stream, batch in c.acks.items():
                buf = c.out.get(stream)
                if buf is not None:
                    buf += batch.take()
            c.acks.clear()
        fast = b""
        for stream, buf in list(c.out.items()):
            if not buf:
                continue
            if stream == c.send.stream_id:
                # the first link: DATA frames built here within the
                # gateway's windows (SendWindow), as the gateway does
                fast, k = c.send.frames(buf, SAFE_FRAME)
                del buf[:k]
                continue
            try:
                room = min(c.h2.local_flow_control_window(stream), len(buf))
                mx = min(c.h2.max_outbound_frame_size, SAFE_FRAME)
                pos = 0
                while pos < room:
                    k = min(mx, room - pos)
                    c.h2.send_data(stream, bytes(buf[pos : pos + k]))
                    pos += k
                del buf[:pos]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._drop_stream(c, stream)
        # h2's frames first: a stream's response headers before its DATA
        data = h2_output(c.h2) + fast
        if c.extra:
            data, c.extra = data + c.extra, b""
        return data

    async def timers(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._timer_wake = trio.Event()
                await self._timer_wake.wait()
                continue
            now = trio.current_time()
            due = heap[0][0]
            if due > now:
                with trio.move_on_after(due - now):
                    self._timer_wake = trio.Event()
                    await self._timer_wake.wait()
                continue
            while heap and heap[0][0] <= now:
                _, _, sid, frame = heapq.heappop(heap)
                self._send(sid, frame)


class _nodelay:
    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock

    def __enter__(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __exit__(self, *exc: object) -> None:
        return None
