"""One HTTP/2 link from a gateway worker to a downstream endpoint.

:class:`LinkCore` is the sans-IO part: an h2 client connection carrying one
long-lived ``POST /v1/link`` stream, an outbound byte queue that drains as
the peer's flow-control window allows, and the frame decoder for the
downstream's answers. :class:`Link` is the trio shell: connect (h2c, or TLS
with ALPN ``h2``), run, health-check with HTTP/2 PINGs, and reconnect with
jittered exponential backoff for ever; it reports up/down and every frame to
its owner (:class:`gateway.downstream.forwarder.Forwarder`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from gateway import h2repr
from gateway.downstream import h2data
from gateway.downstream.h2data import (
    DATA_FRAME,
    WINDOW,
    DataSplitter,
    FlowError,
    SendWindow,
    h2_output,
)
from gateway.downstream.proto import (
    FEATURES_HEADER,
    LINK_PATH,
    MAX_LINK_FRAME,
    MOVED_MARK,
    check_from_downstream,
)
from gateway.downstream.tls import ALPN, TlsBio
from gateway.downstream.tls import handshake as tls_handshake
from gateway.netio import write_some
from gateway.protocol.codec import LengthPrefixedDecoder
from gateway.protocol.codes import ProtocolError

h2repr.install()  # h2 formats every received frame eagerly: make DATA frames cheap

__all__ = ["Link", "LinkCore", "LinkError", "LinkOwner"]

_log = logging.getLogger("gateway.downstream")

#: Our receive window (per stream and connection): deliveries in flight.
RECV_WINDOW: Final = 1 << 22
READ_SIZE: Final = 1 << 18
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_MAX_S: Final = 5.0
#: How often a draining link looks whether its messages were all answered.
DRAIN_POLL_S: Final = 0.02

DOWN, CONNECTING, UP, DRAINING = 0, 1, 2, 3

#: The reason given to ``link_down`` when the link's task is cancelled
#: (the worker is stopping): not a downstream failure.
STOPPING: Final = "the worker is stopping"


class LinkError(Exception):
    """The link cannot go on (protocol error, refused stream, GOAWAY...)."""


class BadFrame(LinkError):
    """A link frame from the downstream that is not the protocol's (its
    ``__cause__``: the decoder's ProtocolError)."""


class LinkCore:
    """Sans-IO link state. Frames go in with :meth:`queue` (already encoded)
    and come out of :meth:`receive` (validated dicts)."""

    __slots__ = (
        "decoder",
        "extra",
        "features",
        "goaway",
        "h2",
        "out",
        "ping_received",
        "ping_sent",
        "received",
        "send",
        "split",
        "status",
        "stream",
    )

    def __init__(self) -> None:
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECV_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
            },
        )
        self.decoder = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream)
        self.out = bytearray()
        self.stream = 0
        self.status: int | None = None
        # the downstream's protocol features (its FEATURES_HEADER), once
        # the response headers came
        self.features: frozenset[str] = frozenset()
        self.ping_sent = 0.0  # time of the unanswered PING, 0 when none
        self.received = 0  # reads handed to receive(): any of them shows the peer alive
        self.ping_received = 0  # ``received`` when the unanswered PING went out
        # the link stream's DATA frames both ways without h2
        # (gateway.downstream.h2data): the ones read, the WINDOW_UPDATEs
        # that give their window back, and the peer's windows for ours
        self.split = DataSplitter(0, RECV_WINDOW, windows=True)
        self.extra = b""
        self.send = SendWindow(0)
        # the downstream sent a graceful GOAWAY (NO_ERROR) that keeps the
        # link stream: it answers what it has, takes nothing new (see
        # Link.received). h2 is closed from then on: any frame that would
        # go through it ends the link
        self.goaway = False

    def start(self, authority: str, headers: list[tuple[str, str]]) -> None:
        h = self.h2
        h.initiate_connection()
        h.increment_flow_control_window(RECV_WINDOW - 65535)
        self.stream = self.split.stream = self.send.stream_id = h.get_next_available_stream_id()
        h.send_headers(
            self.stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", authority),
                (":path", LINK_PATH),
                ("content-type", "application/msgpack"),
                *headers,
            ],
        )

    def queue(self, data: bytes) -> None:
        self.out += data

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet handed to h2 (waiting for window)."""
        return len(self.out)

    def flush(self) -> bytes:
        """Moves queued bytes into DATA frames as far as the peer's windows
        allow and returns the bytes to write to the socket: h2's own frames
        (the request headers first of all), then the DATA frames, then our
        WINDOW_UPDATEs."""
        data = h2_output(self.h2)
        out = self.out
        if out and self.stream:
            # the RFC 9113 default size: a peer enforces a larger
            # SETTINGS_MAX_FRAME_SIZE only once it saw our ACK of it
            frames, k = self.send.frames(out, min(self.h2.max_outbound_frame_size, 16384))
            if k:
                data += frames
                del out[:k]
        if self.extra:
            data, self.extra = data + self.extra, b""
        return data

    def ping(self, now: float) -> None:
        self.ping_sent = now
        self.ping_received = self.received
        self.h2.ping(b"gwhealth")

    def healthy(self, now: float, timeout: float) -> bool:
        """One health-check round: sends a PING when none is outstanding
        (the caller flushes it). False when the downstream sent nothing at
        all for ``timeout`` after the outstanding PING: the link is dead.
        Its PING ACK is the usual proof of life, but any bytes count (as
        gRPC's keepalive counts any activity): a downstream busy answering
        a backlog, its ACK queued behind the answers, keeps its link, and
        the wait for the ACK starts again."""
        if not self.ping_sent:
            self.ping(now)
            return True
        if now - self.ping_sent <= timeout:
            return True
        if self.received == self.ping_received:
            return False
        self.ping_sent, self.ping_received = now, self.received
        return True

    def receive(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        self.received += 1
        sp = self.split
        sp.feed(bytes(data))
        frames: list[dict[str, Any]] = []
        try:
            # the link stream's DATA frames once its response is in, the
            # rest through h2, in the order they came
            while (item := sp.next(self.status == 200)) is not None:
                kind, chunk = item
                if kind == DATA_FRAME:
                    frames += self.decoder.feed(chunk)
                elif kind == WINDOW:
                    self.send.update(chunk)
                elif self.goaway:
                    _after_goaway(chunk)
                else:
                    frames += self._receive_h2(chunk)
            self.extra += sp.window_updates()
        except ProtocolError as e:
            raise BadFrame(f"bad frame from downstream: {e}") from e
        except FlowError as fe:
            raise LinkError(f"HTTP/2 flow control: {fe}") from None
        return frames

    def _receive_h2(self, data: bytes) -> list[dict[str, Any]]:
        """Frames for h2: its events, and the link stream's frames in the
        DATA it passed on."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            raise LinkError(f"HTTP/2 protocol error: {e}") from None
        frames: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id != self.stream:
                    continue
                frames += self.decoder.feed(ev.data)
            elif isinstance(ev, h2.events.ResponseReceived):
                hdrs: dict[Any, Any] = dict(ev.headers)
                status = str(hdrs.get(":status", ""))
                self.status = int(status) if status.isdigit() else 0
                if self.status != 200:
                    raise LinkError(f"link refused with HTTP status {status}")
                feats = hdrs.get(FEATURES_HEADER, "")
                if type(feats) is str and feats:
                    self.features = frozenset(x.strip() for x in feats.split(",")[:16])
            elif isinstance(ev, h2.events.PingAckReceived):
                self.ping_sent = 0.0
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.send.settings_changed(ev.changed_settings)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                if ev.stream_id == self.stream:
                    raise LinkError("downstream ended the link stream")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                last = ev.last_stream_id
                if ev.error_code != 0 or last is None or last < self.stream:
                    raise LinkError(f"downstream sent GOAWAY ({ev.error_code!r})")
                self.goaway = True
        return frames


#: Frame types a draining link lets pass without h2 (closed by the GOAWAY);
#: PING: a late answer to our last health check.
_IGNORED_AFTER_GOAWAY: Final = frozenset((h2data.PRIORITY, h2data.SETTINGS, h2data.PING))


def _after_goaway(run: bytes) -> None:
    """Frames other than the link stream's plain DATA after a graceful
    GOAWAY: the harmless ones are dropped, anything else ends the link."""
    pos = 0
    while pos + 9 <= len(run):
        ftype = run[pos + 3]
        if ftype not in _IGNORED_AFTER_GOAWAY:
            raise LinkError(f"downstream sent an HTTP/2 frame of type {ftype} after its GOAWAY")
        pos += 9 + int.from_bytes(run[pos : pos + 3], "big")


_LINK_ERRORS: Final = (LinkError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _first_link_error(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The exception to handle from a link's task group: a link failure if
    there is one (the sibling tasks were just cancelled), else the group."""
    group, _ = eg.split(_LINK_ERRORS)
    found: BaseException | None = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found if found is not None else eg


class LinkOwner(Protocol):
    #: The worker's reactor (:class:`gateway.server.reactor.Reactor`), or
    #: None: a plain-TCP link is read from it, with no task of its own.
    reactor: Any

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link, why: str) -> None: ...

    def link_draining(self, link: Link) -> None:
        """The downstream sent a graceful GOAWAY: the link takes nothing new
        (it is no longer ``up``) and ends once its messages in flight are
        answered (then ``link_down``)."""

    def link_connect_failed(self, link: Link, why: str) -> None:
        """A connection attempt failed (refused, timed out, TLS
        handshake or certificate rejected); the link tries again after its
        backoff."""

    def link_frames(self, link: Link, frames: list[dict[str, Any]]) -> None: ...

    def link_drained(self, link: Link) -> None:
        """The link's backlog fell below its low watermark."""
        ...

    def link_dirty(self, link: Link) -> bool:
        """Frames were queued on ``link``: True when the owner will call
        :meth:`Link.flush_now` soon (then the writer task is not woken)."""
        ...


class Link:
    """A link to ``host:port`` kept up for ever by :meth:`run`."""

    __slots__ = (
        "_busy",
        "_carry",
        "_draining",
        "_fd",
        "_scope",
        "_seal",
        "_stream",
        "_wake",
        "_watch",
        "connect_timeout_s",
        "core",
        "drain_timeout_s",
        "endpoint",
        "headers",
        "health_interval_s",
        "health_timeout_s",
        "high_water",
        "host",
        "index",
        "inflight",
        "owner",
        "port",
        "retired",
        "rng",
        "server_name",
        "sessions",
        "ssl_context",
        "state",
    )

    def __init__(
        self,
        owner: LinkOwner,
        endpoint: Any,
        host: str,
        port: int,
        index: int,
        headers: list[tuple[str, str]],
        ssl_context: ssl.SSLContext | None = None,
        high_water: int = 1 << 20,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 3.0,
        connect_timeout_s: float = 2.0,
        server_name: str | None = None,
        drain_timeout_s: float = 5.0,
    ) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.index = index
        self.headers = headers
        self.ssl_context = ssl_context
        # over TLS: the name the endpoint's certificate must carry (SNI too)
        self.server_name = server_name or host
        self.high_water = high_water
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.connect_timeout_s = connect_timeout_s
        # after a graceful GOAWAY: how long the messages in flight on the
        # link may take to be answered before it is closed (and they are
        # redelivered elsewhere)
        self.drain_timeout_s = drain_timeout_s
        self._draining = trio.Event()
        self.state = DOWN
        self.core: LinkCore | None = None
        self.sessions: set[Any] = set()  # sessions opened on this link
        self.inflight = 0  # messages sent on this link and not answered
        self.rng = random.Random()
        self._wake = trio.Event()
        # the connection's TCP stream (what flush_now writes to), and what
        # turns the link's bytes into the bytes for it (TLS records, or as is)
        self._stream: trio.SocketStream | None = None
        self._fd = -1  # its descriptor (trio's fileno() is a Python call)
        self._seal: Callable[[bytes], bytes] = _as_is
        self._busy = False  # the writer task is in a send
        self._carry = b""  # flushed by flush_now, not taken by the socket yet
        self._watch: _ReactorRead | None = None  # read by the reactor
        # its endpoint left the configuration (retire): no reconnecting
        self.retired = False
        self._scope: trio.CancelScope | None = None  # run()'s, while it runs

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self.state == UP

    @property
    def marks(self) -> bool:
        """The downstream answers a session's re-binding to another link
        with ``moved`` on this one (docs/protocol.md)."""
        c = self.core
        return c is not None and MOVED_MARK in c.features

    @property
    def room(self) -> int:
        """Bytes that may still be queued before the link is :attr:`full`."""
        c = self.core
        return 0 if c is None else self.high_water - c.backlog

    @property
    def full(self) -> bool:
        return self.room <= 0

    def send(self, data: bytes) -> None:
        """Queues encoded frames (only while up)."""
        c = self.core
        if c is not None and self.state == UP:
            c.queue(data)
            if not self.owner.link_dirty(self):
                self._wake.set()

    def flush_now(self) -> None:
        """Writes what is queued with one non-blocking send, from the
        caller (the worker's reactor, at the end of a batch): no hand-off
        to the writer task, which only gets what the socket did not take
        (or everything while it is sending itself). Over TLS, the records
        sealed from it."""
        c = self.core
        st = self._stream
        if c is None or (self.state != UP and self.state != DRAINING):
            return
        if self._busy or self._carry or st is None:
            self._wake.set()
            return
        was_full = self.full
        data = self._seal(c.flush())
        if not data:
            return
        rest = write_some(self._fd, data)
        if rest:
            self._carry = rest
            self._wake.set()
        elif was_full and not self.full:
            self.owner.link_drained(self)

    def retire(self) -> None:
        """Ends the link for good (its endpoint was removed by a
        configuration reload). A link that is up drains as after a graceful
        GOAWAY: nothing new goes out on it, and it ends once every message in
        flight on it was answered, or ``drain_timeout_s`` later (the rest are
        redelivered elsewhere); one that is not up ends now. :meth:`run`
        then returns instead of reconnecting."""
        if self.retired:
            return
        self.retired = True
        if self.state == UP:
            self.state = DRAINING
            self._draining.set()
            self.owner.link_draining(self)
        elif self.state != DRAINING and self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Connects, serves, and reconnects with backoff, until cancelled or
        retired (:meth:`retire`)."""
        with trio.CancelScope() as self._scope:
            if not self.retired:
                await self._run()
        self._scope = None
        self.state = DOWN

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            why = "closed"
            self.state = CONNECTING
            try:
                stream = await self._connect()
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
                why = f"connect failed: {_reason(e)}"
                stream = None
                self.owner.link_connect_failed(self, why)
            if stream is not None:
                ended = True  # False: cancelled (the worker is stopping)
                try:
                    await self._serve(stream)
                except LinkError as le:
                    why = str(le)
                except trio.TooSlowError:
                    why = f"no response headers in {self.connect_timeout_s} s"
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as oe:
                    why = f"connection lost: {_reason(oe)}"
                except Exception as xe:  # a bug here must not take the worker down
                    _log.exception("downstream link failed")
                    why = f"internal error: {xe!r}"
                except BaseException:
                    ended = False
                    why = STOPPING
                    raise
                finally:
                    was_up = self.state == UP or self.state == DRAINING
                    if self.state == DRAINING and "GOAWAY" not in why and not self.retired:
                        why += " (draining after the downstream's GOAWAY)"
                    self.state = DOWN
                    self.core = None
                    self._stream = None
                    self._fd = -1
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
                    if was_up:
                        self.owner.link_down(self, why)
                        backoff = BACKOFF_FIRST_S  # it worked: come back quickly
                    elif ended:
                        # connected, but never up: a downstream that refuses
                        # the link (a client certificate it does not accept,
                        # a 404, no HTTP/2) is retried with growing backoff
                        self.owner.link_connect_failed(self, why)
            self.state = DOWN
            if self.retired:
                return
            await trio.sleep(backoff * (0.5 + self.rng.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connect(self) -> trio.SocketStream | _TlsStream:
        with trio.fail_after(self.connect_timeout_s):
            tcp = await trio.open_tcp_stream(self.host, self.port)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is None:
                return tcp
            tls = _TlsStream(tcp, TlsBio(self.ssl_context, self.server_name))
            try:
                await tls.handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            if tls.tls.obj.selected_alpn_protocol() != ALPN:
                await trio.aclose_forcefully(tcp)
                raise ssl.SSLError("downstream did not select ALPN h2")
            return tls

    async def _serve(self, stream: trio.SocketStream | _TlsStream) -> None:
        core = LinkCore()
        core.start(f"{self.host}:{self.port}", self.headers)
        self.core = core
        tls = stream.tls if isinstance(stream, _TlsStream) else None
        raw = stream.tcp if isinstance(stream, _TlsStream) else stream
        self._stream = raw
        self._fd = raw.socket.fileno()
        self._seal = tls.seal if tls is not None else _as_is
        self._carry = b""
        self._busy = False
        self._draining = trio.Event()
        await raw.send_all(self._seal(core.flush()))
        # wait for the response headers before declaring the link up
        early: list[dict[str, Any]] = []
        with trio.fail_after(self.connect_timeout_s):
            while core.status is None:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    raise LinkError("downstream closed during link setup")
                # frames that came with the headers (or, from a sloppy
                # downstream, before them) are handled once the link is up
                early += core.receive(data)
        self.state = UP
        self.owner.link_up(self)
        if early:
            self.owner.link_frames(self, early)
        reactor = self.owner.reactor
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._writer, raw, core)
                n.start_soon(self._health, core)
                if reactor is not None:
                    await self._reactor_reads(reactor, raw, core, tls)
                else:
                    await self._reader(stream, core)
                n.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            raise _first_link_error(eg) from None

    async def _reader(self, stream: trio.abc.Stream, core: LinkCore) -> None:
        """Reads the link in this task (no reactor)."""
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise LinkError("downstream closed the connection")
            self.received(core, data)

    async def _reactor_reads(
        self, reactor: Any, stream: trio.SocketStream, core: LinkCore, tls: TlsBio | None
    ) -> None:
        """Lets the worker's reactor read the link until it ends: the
        frames are handled in the reactor's batch, next to the visitor
        connections they answer, and what they cause (acks and replies to
        visitors, more frames for this link, h2's own frames) is written
        once at the end of the batch."""
        fd = stream.socket.fileno()
        watch = self._watch = _ReactorRead(self, core, reactor, fd, tls)
        reactor.add(fd, watch)
        try:
            await watch.done.wait()
        finally:
            reactor.remove(fd)  # before the descriptor is closed
            self._watch = None
        assert watch.error is not None
        raise watch.error

    def received(self, core: LinkCore, data: bytes | bytearray) -> None:
        """Bytes read from the link: frames to the owner, and whatever they
        queued (and h2's own answers: WINDOW_UPDATE, PING ACK) written at
        the end of the reactor batch, or by the writer task."""
        owner = self.owner
        was_full = self.full
        frames = core.receive(data)
        if frames:
            owner.link_frames(self, frames)
        if core.goaway and self.state == UP:
            # a graceful GOAWAY: nothing new goes out on this link; it stays
            # open while the downstream answers what it has (see _drain)
            self.state = DRAINING
            self._draining.set()
            owner.link_draining(self)
        if not owner.link_dirty(self):
            self._wake.set()
        if was_full and not self.full:
            owner.link_drained(self)

    async def _writer(self, stream: trio.SocketStream, core: LinkCore) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            was_full = self.full
            # what flush_now left (already sealed), then the rest
            data = self._carry + self._seal(core.flush())
            self._carry = b""
            if data:
                self._busy = True
                try:
                    await stream.send_all(data)
                finally:
                    self._busy = False
            if was_full and not self.full:
                self.owner.link_drained(self)

    async def _drain(self) -> None:
        """After a graceful GOAWAY: ends the link once every message in
        flight on it was answered, or ``drain_timeout_s`` later (the rest
        are then redelivered elsewhere, as for a lost link)."""
        with trio.move_on_after(self.drain_timeout_s):
            while self.inflight > 0:
                await trio.sleep(DRAIN_POLL_S)
        why = "its removal from the configuration" if self.retired else "the downstream's GOAWAY"
        if self.inflight > 0:
            raise LinkError(
                f"{self.inflight} messages not answered {self.drain_timeout_s:g} s after {why}"
            )
        raise LinkError(f"drained after {why}")

    async def _health(self, core: LinkCore) -> None:
        """PINGs every ``health_interval_s``; after a graceful GOAWAY, the
        drain instead (in this task: a link's tasks count against the
        worker's direct wait, gateway.trioidle.MAX_TASKS)."""
        while True:
            with trio.move_on_after(self.health_interval_s):
                await self._draining.wait()
            if self._draining.is_set():
                await self._drain()  # h2 is closed: no more PINGs
            pinged = core.ping_sent
            if not core.healthy(trio.current_time(), self.health_timeout_s):
                raise LinkError(
                    f"health check: nothing from the downstream in {self.health_timeout_s} s "
                    "after a PING"
                )
            if not pinged:
                self._wake.set()  # the new PING goes out


def _reason(e: BaseException) -> str:
    """What went wrong, for a log line: the error's text (for trio's "all
    attempts to connect failed", the first refusal under it; otherwise what
    an error was raised from), or its type's name."""
    cause = e.__cause__ or e
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]  # trio's "all attempts to connect failed"
    return str(cause) or type(cause).__name__


def _as_is(data: bytes) -> bytes:
    """A plain link's bytes go to its socket as they are."""
    return data


class _TlsStream(trio.abc.Stream):
    """A link's TLS over its TCP stream with :class:`TlsBio`: the handshake
    and the link's setup (before the worker's event loop reads it), and the
    link's reads without an event loop. The TCP stream itself is what the
    link writes sealed records to."""

    def __init__(self, tcp: trio.SocketStream, tls: TlsBio) -> None:
        self.tcp = tcp
        self.tls = tls

    async def handshake(self) -> None:
        if not await tls_handshake(self.tls, self.tcp):
            raise trio.BrokenResourceError("downstream closed during the TLS handshake")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self.tls.seal(bytes(data))
        if out:
            await self.tcp.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext; b"" when the downstream closed the session or the
        connection (ssl.SSLError on a bad record or an alert)."""
        while True:
            try:
                plain = self.tls.open()
            except EOFError:
                return b""
            if plain:
                return plain
            data = await self.tcp.receive_some(READ_SIZE)
            # at the end of the connection, open() raises ssl.SSLEOFError
            # unless the session was closed cleanly (then b"")
            self.tls.feed(data)
            if not data:
                try:
                    return self.tls.open()
                except EOFError:
                    return b""

    async def aclose(self) -> None:
        await self.tcp.aclose()


class _ReactorRead:
    """The reactor's handler for a link: reads what is there (over TLS:
    opens the records) and hands it to :meth:`Link.received`; records why the link ended and wakes
    :meth:`Link._reactor_reads`, which raises it in the link's task."""

    __slots__ = ("core", "done", "error", "fd", "link", "reactor", "tls")

    def __init__(
        self, link: Link, core: LinkCore, reactor: Any, fd: int, tls: TlsBio | None = None
    ) -> None:
        self.link = link
        self.core = core
        self.reactor = reactor
        self.fd = fd
        self.tls = tls  # over TLS: what the socket reads are records to open
        self.done = trio.Event()
        self.error: BaseException | None = None

    def on_readable(self) -> None:
        if self.error is not None:
            return
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(e)
            return
        if not data:
            self._end(LinkError("downstream closed the connection"))
            return
        tls = self.tls
        if tls is not None:
            tls.feed(data)
            try:
                data = tls.open()
            except EOFError:
                self._end(LinkError("downstream ended the TLS session"))
                return
            except ssl.SSLError as se:
                self._end(LinkError(f"connection lost: {se}"))
                return
            if not data:
                return  # no complete record yet
        try:
            self.link.received(self.core, data)
        except LinkError as le:
            self._end(le)

    def on_failure(self) -> None:
        """A bug while handling the link's frames (the reactor logged it)."""
        self._end(LinkError("internal error while reading the link"))

    def _end(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.reactor.remove(self.fd)  # level-triggered: it would report again
        self.done.set()
