"""Python SDK for the visitor protocol (docs/protocol.md), on trio.

    async with gateway.client.connect("ws://127.0.0.1:8080/v1/ws", token=tok) as s:
        n = await s.send("hello")        # returns once the gateway acknowledged
        d = await s.receive()            # the next delivered message, in order
        print(d.body, d.sender)

The client reconnects by itself after a dropped connection or a reconnect
class code (4000-4499, 1001, 1011, ``goaway``): it waits a backoff with full
jitter, says ``hello`` with ``resume {sid, last}``, re-sends every message not
yet acknowledged with its original id (the gateway deduplicates) and skips
deliveries it has already seen, so nothing is lost or duplicated. Terminal
codes (4500+, 1002, 1007-1009) raise :class:`GatewayError` from ``send`` and
``receive``.

Heartbeats and acks: the reader answers WebSocket Pings and ``ping`` frames,
sends its own ``ping`` when it has sent nothing for ``hb`` (from ``welcome``),
treats ``2 * hb + 5`` seconds without a byte received as a dead link, and
acknowledges deliveries cumulatively (every ``ack_every`` deliveries, and at
the latest ``ack_delay`` seconds after the last one).

Bounds: at most ``window`` (from ``welcome``, default 64) messages in flight
(``pending``); ``send`` waits beyond that, and ``results`` / ``retry`` never
hold more than that. At most ``max_inbox`` (default 1,024) delivered messages
wait for ``receive``, plus what one 64 KiB read decodes to; beyond that the
client stops reading, which holds the gateway back through TCP backpressure.

The protocol logic is :class:`ClientCore` (sans-IO); :class:`Session` is the
trio shell over WebSocket (wsproto).
"""

from __future__ import annotations

import contextlib
import math
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from gateway.protocol.codec import Encoding, decode_frame, encode_frame
from gateway.protocol.codes import ProtocolError, is_reconnect

__all__ = ["ClientCore", "Delivery", "GatewayError", "Session", "backoff_delay", "connect"]

MAX_FRAME = 16 * 1024 * 1024


class GatewayError(Exception):
    """A terminal refusal from the gateway (do not retry as is)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Delivery:
    seq: int
    body: str | bytes
    sender_kind: str
    sender_name: str
    ts: int


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0.0, min(cap, base * math.pow(2.0, min(attempt, 30))))


class ClientCore:
    """Client protocol state, no I/O. Frames in through :meth:`on_frame`,
    frames out as return values."""

    def __init__(
        self,
        token: str,
        tags: dict[str, str] | None = None,
        platform: str = "desktop",
        max_inbox: int = 1024,
        ack_every: int = 8,
        ack_delay: float = 0.2,
    ) -> None:
        self.token = token
        self.tags = dict(tags or {})
        self.platform = platform
        self.sid: str | None = None
        self.last_seq = 0  # highest seq delivered to the inbox
        self.acked_seq = 0  # highest seq acknowledged to the gateway
        self.next_id = 1
        self.pending: dict[int, str | bytes] = {}  # id -> body, not yet acked
        self.results: dict[int, int] = {}  # id -> n, acked, not yet collected
        self.inbox: deque[Delivery] = deque()
        self.max_inbox = max_inbox
        self.ack_every = ack_every
        self.ack_delay = ack_delay
        self.ack_due: float | None = None  # when unacked deliveries must be acked
        self.retry: dict[int, float] = {}  # id -> when to send again (4409, 4029, 4429)
        self.last_rx = 0.0  # clock of the last bytes received
        self.last_tx = 0.0  # clock of the last frame sent
        self.refreshed = 0  # number of ``refreshed`` frames seen
        self.exp: int | None = None  # token expiry, from welcome / refreshed
        self.window = 64
        self.heartbeat_s = 25.0
        self.terminal: GatewayError | None = None
        self.reconnect_after: float | None = None  # set by goaway / retry_after
        self.resync = False
        self.open = False
        # the gateway's latest sticky ticket (who served this visitor): sent
        # in every hello, so that a new session goes back to them
        self.sticky: str | None = None

    def hello(self) -> dict[str, Any]:
        f: dict[str, Any] = {"t": "hello", "v": 1, "token": self.token, "platform": self.platform}
        if self.tags:
            f["tags"] = self.tags
        if self.sticky is not None:
            f["sticky"] = self.sticky
        if self.sid is not None:
            f["resume"] = {"sid": self.sid, "last": self.last_seq}
        return f

    def new_message(self, body: str | bytes) -> tuple[int, dict[str, Any]]:
        i = self.next_id
        self.next_id += 1
        self.pending[i] = body
        return i, {"t": "msg", "id": i, "body": body}

    def resend(self) -> list[dict[str, Any]]:
        """Every unacknowledged message, oldest first (after a welcome)."""
        self.retry.clear()
        return [{"t": "msg", "id": i, "body": b} for i, b in self.pending.items()]

    def lost(self) -> None:
        self.open = False
        self.ack_due = None

    def refresh(self, token: str) -> dict[str, Any]:
        """The new token is used for this connection and every later hello."""
        self.token = token
        return {"t": "refresh", "token": token}

    def dead(self, now: float) -> bool:
        """Nothing received for two heartbeat intervals (plus slack)."""
        return now - self.last_rx > self.heartbeat_s * 2 + 5

    def next_tick(self, now: float) -> float:
        """When :meth:`tick` has something to do next (at the latest)."""
        t = self.last_rx + self.heartbeat_s * 2 + 5
        if not self.open:  # before welcome: only the dead-link check
            return max(t, now)
        t = min(t, self.last_tx + self.heartbeat_s)
        if self.ack_due is not None:
            t = min(t, self.ack_due)
        if self.retry:
            t = min(t, min(self.retry.values()))
        return max(t, now)

    def tick(self, now: float) -> list[dict[str, Any]]:
        """Timed frames: overdue ack, retried messages, heartbeat ping."""
        if not self.open:
            return []
        out: list[dict[str, Any]] = []
        if self.ack_due is not None and now >= self.ack_due:
            out.append(self.ack())
        for i, at in list(self.retry.items()):
            if now >= at:
                del self.retry[i]
                if i in self.pending:
                    out.append({"t": "msg", "id": i, "body": self.pending[i]})
        if not out and now - self.last_tx >= self.heartbeat_s:
            out.append({"t": "ping", "ts": int(now * 1000)})
        return out

    def on_frame(self, f: dict[str, Any], now: float = 0.0) -> list[dict[str, Any]]:
        t = f.get("t")
        out: list[dict[str, Any]] = []
        if t == "welcome":
            self.open = True
            self.reconnect_after = None
            if not f.get("resumed"):
                self.last_seq = 0
                self.acked_seq = 0
            self.resync = bool(f.get("resync"))
            if self.resync:
                # frames after last_seq are gone: continue from what is replayed
                self.last_seq = max(self.last_seq, int(f.get("first", 1)) - 1)
            self.sid = str(f["sid"])
            limits = f.get("limits") or {}
            self.window = int(limits.get("window", self.window))
            self.heartbeat_s = max(0.05, int(f.get("hb", 25000)) / 1000.0)
            if "exp" in f:
                self.exp = int(f["exp"])
            out.extend(self.resend())
        elif t == "ack":
            i = f.get("id")
            if isinstance(i, int) and self.pending.pop(i, None) is not None:
                self.results[i] = int(f.get("n", 0))
        elif t == "deliver":
            seq = int(f.get("seq", 0))
            if seq > self.last_seq:  # older seqs were seen already: skip
                self.last_seq = seq
                frm = f.get("from") or {}
                self.inbox.append(
                    Delivery(
                        seq,
                        f.get("body", b""),
                        str(frm.get("kind", "")),
                        str(frm.get("name", "")),
                        int(f.get("ts", 0)),
                    )
                )
            if self.last_seq - self.acked_seq >= self.ack_every:
                out.append(self.ack())
            elif self.last_seq > self.acked_seq and self.ack_due is None:
                self.ack_due = now + self.ack_delay
        elif t == "ping":
            out.append({"t": "pong", "ts": f.get("ts", 0)})
        elif t == "sticky":
            ticket = f.get("ticket")
            if isinstance(ticket, str):
                self.sticky = ticket
        elif t == "refreshed":
            self.refreshed += 1
            self.exp = int(f.get("exp", 0))
        elif t == "goaway":
            self.reconnect_after = int(f.get("reconnect_after", 0)) / 1000.0
        elif t == "error":
            code = int(f.get("code", 0))
            reason = str(f.get("reason", ""))
            i = f.get("id")
            if code in (4409, 4029, 4429) and isinstance(i, int):
                # the message was refused, not the connection: send it again
                if i in self.pending:
                    self.retry[i] = now + int(f.get("retry_after", 100)) / 1000.0
            elif not is_reconnect(code):
                self.terminal = GatewayError(code, reason)
            elif "retry_after" in f:
                self.reconnect_after = int(f["retry_after"]) / 1000.0
        return out

    def ack(self) -> dict[str, Any]:
        self.ack_due = None
        self.acked_seq = self.last_seq
        return {"t": "ack", "seq": self.last_seq}

    def on_close(self, code: int, reason: str) -> None:
        self.open = False
        if code not in (1000, 1005, 1006) and not is_reconnect(code) and self.terminal is None:
            self.terminal = GatewayError(code, reason)


class Session:
    """One visitor session, kept alive across connections."""

    def __init__(
        self,
        url: str,
        core: ClientCore,
        encoding: str,
        origin: str | None,
        ssl_context: ssl.SSLContext | None,
        reconnect: bool,
        max_backoff: float,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError("url must be ws:// or wss://")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "wss" else 80)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.tls = u.scheme == "wss"
        self.ssl_context = ssl_context
        self.core = core
        self.enc = Encoding.JSON if encoding == "json" else Encoding.MSGPACK
        self.origin = origin
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.changed = trio.Event()  # set whenever core state moves
        self.connected = trio.Event()
        self._stream: trio.abc.Stream | None = None
        self._ws: WSConnection | None = None
        self._send_lock = trio.Lock()
        self._closed = False
        self._rng = random.Random()
        self.connections = 0

    @property
    def session_id(self) -> str | None:
        return self.core.sid

    @property
    def sticky(self) -> str | None:
        """The gateway's latest sticky ticket for this visitor (or the one
        given to :func:`connect`): keep it, and pass it to the next
        :func:`connect` of the same visitor, so that its new session goes
        back to the desk and agent that served it, on any gateway worker or
        node."""
        return self.core.sticky

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- public API -------------------------------------------------------------------
    async def send(self, body: str | bytes) -> int:
        """Sends a message; returns the gateway's number ``n`` for it once
        acknowledged. Raises GatewayError on a terminal refusal."""
        core = self.core
        while len(core.pending) >= core.window:
            self._check()
            await self.changed.wait()
        i, frame = core.new_message(body)
        if core.open:
            await self._send(frame)
        while i not in core.results:
            self._check()
            await self.changed.wait()
        return core.results.pop(i)

    async def receive(self) -> Delivery:
        core = self.core
        while not core.inbox:
            self._check()
            await self.changed.wait()
        d = core.inbox.popleft()
        self._poke()  # room in the inbox: the reader may continue
        return d

    async def refresh(self, token: str) -> None:
        """Replaces the session token; returns once the gateway confirmed it
        (``refreshed``) or, while disconnected, at once (the next ``hello``
        carries it). A rejected token raises GatewayError."""
        core = self.core
        frame = core.refresh(token)
        if not core.open:
            return
        seen = core.refreshed
        await self._send(frame)
        while core.refreshed == seen and core.open:
            self._check()
            await self.changed.wait()
        self._check()

    async def close(self) -> None:
        self._closed = True
        ws, stream = self._ws, self._stream
        if ws is not None and stream is not None and self.core.open:
            self.core.open = False
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if self.core.last_seq > self.core.acked_seq:
                    await self._send(self.core.ack())
                async with self._send_lock:
                    await stream.send_all(ws.send(CloseConnection(code=1000)))
        if stream is not None:
            await trio.aclose_forcefully(stream)
        self._poke()

    def _check(self) -> None:
        if self.core.terminal is not None:
            raise self.core.terminal
        if self._closed:
            raise trio.ClosedResourceError("session closed")

    # -- I/O ------------------------------------------------------------------------
    async def _send(self, frame: dict[str, Any]) -> None:
        ws, stream = self._ws, self._stream
        if ws is None or stream is None:
            return  # sent again after the next welcome
        payload = encode_frame(frame, self.enc)
        event = TextMessage(data=payload) if isinstance(payload, str) else BytesMessage(payload)
        # a broken stream is noticed by the reader, which reconnects
        async with self._send_lock:  # frames leave in the order they are encoded
            self.core.last_tx = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(ws.send(event))

    async def _open(self) -> None:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        if self.tls:
            ctx = self.ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(stream, ctx, server_hostname=self.host)
        ws = WSConnection(ConnectionType.CLIENT)
        extra = [(b"Origin", self.origin.encode())] if self.origin else []
        await stream.send_all(
            ws.send(Request(host=self.host, target=self.path, extra_headers=extra))
        )
        with trio.fail_after(10):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionError("closed during the upgrade")
                ws.receive_data(bytes(data))
                for ev in ws.events():
                    if isinstance(ev, AcceptConnection):
                        self._ws, self._stream = ws, stream
                        return
                    if isinstance(ev, RejectConnection):
                        raise ConnectionError(f"upgrade refused: HTTP {ev.status_code}")

    async def run(self) -> None:
        """Connects, reads, reconnects; returns once closed or terminal."""
        core = self.core
        attempt = 0
        while not self._closed and core.terminal is None:
            try:
                await self._open()
                self.connections += 1
                await self._send(core.hello())
                attempt = await self._read_loop(attempt)
            except (
                OSError,
                ConnectionError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
            ):
                pass
            core.lost()
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)
            self._ws = self._stream = None
            self._poke()
            if self._closed or core.terminal is not None or not self.reconnect:
                if not self.reconnect and core.terminal is None and not self._closed:
                    core.terminal = GatewayError(1006, "connection lost")
                    self._poke()
                return
            delay = core.reconnect_after
            if delay is None:
                delay = backoff_delay(attempt, 0.2, self.max_backoff, self._rng)
            core.reconnect_after = None
            attempt += 1
            await trio.sleep(delay)

    async def _read_loop(self, attempt: int) -> int:
        """The one reader of a connection; also sends what :meth:`ClientCore.tick`
        asks for (acks, retries, pings) between reads. Returns the backoff
        attempt count when the connection ends."""
        ws, stream, core = self._ws, self._stream, self.core
        assert ws is not None and stream is not None
        core.last_rx = core.last_tx = trio.current_time()
        while True:
            while len(core.inbox) >= core.max_inbox:
                await self.changed.wait()  # backpressure: stop reading
                core.last_rx = trio.current_time()  # our pause, not a dead link
            data: bytes | bytearray | None = None
            with trio.move_on_at(core.next_tick(trio.current_time())):
                data = await stream.receive_some(65536)
            now = trio.current_time()
            if data is None:  # timer: nothing read
                if core.dead(now):
                    raise ConnectionError("no data from the gateway: dead link")
                for f in core.tick(now):
                    await self._send(f)
                continue
            if not data:
                return attempt
            core.last_rx = now
            ws.receive_data(bytes(data))
            out: list[dict[str, Any]] = []
            for ev in ws.events():
                if isinstance(ev, TextMessage | BytesMessage):
                    raw = ev.data if isinstance(ev.data, str) else bytes(ev.data)
                    try:
                        frame = decode_frame(raw, MAX_FRAME)
                    except ProtocolError as e:  # a broken gateway: drop the link
                        raise ConnectionError(f"bad frame from the gateway: {e}") from None
                    was_open = core.open
                    out.extend(core.on_frame(frame, now))
                    if core.open and not was_open:
                        attempt = 0
                        self.connected.set()
                    if frame.get("t") == "goaway":
                        for f in out:
                            await self._send(f)
                        self._poke()
                        return attempt
                elif isinstance(ev, Ping):
                    async with self._send_lock:
                        await stream.send_all(ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    core.on_close(ev.code, ev.reason or "")
                    self._poke()
                    return attempt
            for f in out:
                await self._send(f)
            self._poke()


@asynccontextmanager
async def connect(
    url: str,
    token: str,
    tags: dict[str, str] | None = None,
    platform: str = "desktop",
    encoding: str = "msgpack",
    origin: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    reconnect: bool = True,
    max_backoff: float = 30.0,
    max_inbox: int = 1024,
    sticky: str | None = None,
) -> AsyncIterator[Session]:
    """Opens a session and waits for the first ``welcome``. A terminal code
    raises :class:`GatewayError`; with ``reconnect=False`` a failed first
    attempt raises ``GatewayError(1006, ...)``, otherwise it keeps retrying
    with backoff (wrap in ``trio.fail_after`` to bound the wait). On exit the
    pending deliveries are acknowledged and the socket closed with 1000."""
    core = ClientCore(token, tags, platform, max_inbox)
    core.sticky = sticky
    s = Session(url, core, encoding, origin, ssl_context, reconnect, max_backoff)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run)
            try:
                while not s.connected.is_set():
                    if core.terminal is not None:
                        raise core.terminal
                    if s.connections and not core.open and not reconnect:
                        raise ConnectionError("could not connect")
                    await s.changed.wait()
                yield s
            finally:
                await s.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        raise _single(eg) from None


def _single(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside (nested) single-exception groups, else the
    group itself: callers see GatewayError, not an ExceptionGroup."""
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e
