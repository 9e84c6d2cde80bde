"""One gateway worker process: ``python -m gateway.server.worker --index I``.

Reads its configuration from ``$GATEWAY_WORKER_CONFIG`` (set by the
supervisor), binds the shared port with SO_REUSEPORT and serves WebSocket,
HTTP/2 and the static widget files on it. Tasks: the accept loop, one task
per TLS connection, the reactor that reads every plain-TCP connection
(handshakes, WebSocket and h2c connections, downstream links),
the timer-wheel task (heartbeats, hello/handshake timeouts, closing grace,
session expiry), the demo bot and the signal task (SIGTERM: drain). See docs/architecture.md.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # Installed before the heavier imports below (see main()).
    from gateway.server.stopsig import outside_trio

    signal.signal(signal.SIGTERM, outside_trio)

import argparse
import array
import contextlib
import json
import logging
import math
import os
import random
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Final

import msgpack
import trio

from gateway.config import CONFIG_GENERATION_ENV, Config, config_from_env, effective_workers
from gateway.gctune import retune_gc, tune_gc, watch_pauses
from gateway.protocol.codec import Encoding
from gateway.ratelimit import TokenBucket
from gateway.server.bot import DemoBot
from gateway.server.clientkey import client_key
from gateway.server.http1 import HttpError, check_upgrade, parse_head, response, upgrade_response
from gateway.server.migrator import WorkerMigrator
from gateway.server.pipe import RawPipe, TlsPipe, TlsRawPipe
from gateway.server.reactor import Reactor
from gateway.server.stopsig import STOP, ignore_from_now, outside_trio
from gateway.server.tlsconf import config_context
from gateway.server.ws import WsConn
from gateway.session.hub import Hub
from gateway.supervisor import watch_parent
from gateway.timerwheel import TimerWheel
from gateway.tlsbio import TlsBio

__all__ = ["Worker", "main"]

_log = logging.getLogger("gateway.worker")

TICK_S: Final = 0.25
#: Visitors' TLS connections are read by the reactor (a ``TlsRawPipe``)
#: unless ``GATEWAY_TLS_REACTOR=0``: then each runs in a task of its own
#: over ``trio.SSLStream`` (``TlsPipe``), as before.
TLS_REACTOR: Final = os.environ.get("GATEWAY_TLS_REACTOR", "1") != "0"
HANDOFF_BACKLOG: Final = 64
#: How long a connection waits for room in the owner's hand-off queue
#: (unix datagram queues are short: net.unix.max_dgram_qlen, 10 by default).
HANDOFF_WAIT_S: Final = 2.0
#: The largest message between workers: a hand-off carries a hello frame
#: (at most max_frame bytes), a moving session its state (trimmed to fit).
PEER_MAX_BYTES: Final = 196608
WHEEL_SLOTS: Final = 1024
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATIC_DIR: Final = Path(__file__).parent / "static"
STATIC_FILES: Final = {
    "/widget.js": ("widget.js", "application/javascript; charset=utf-8"),
    "/example.html": ("example.html", "text/html; charset=utf-8"),
    "/": ("example.html", "text/html; charset=utf-8"),
}


class _Handshake:
    """Wheel entry for a connection still in its handshake."""

    __slots__ = ("pipe", "w")

    def __init__(self, w: Worker, pipe: RawPipe | TlsPipe) -> None:
        self.w = w
        self.pipe = pipe

    def on_timer(self, now: float) -> None:
        self.w.hub.stats["handshake_timeouts"] += 1
        self.pipe.close()


class _PlainHandshake:
    """A connection before its protocol is known (plain TCP, or TLS through
    a :class:`TlsRawPipe`, whose reads run the TLS handshake first), read by
    the worker's reactor: no task per new connection. Also its own timer-wheel
    entry (the handshake timeout; after an HTTP answer, the 2 s the peer
    gets to read it)."""

    __slots__ = ("answered", "buf", "pipe", "w")

    def __init__(self, w: Worker, pipe: RawPipe) -> None:
        self.w = w
        self.pipe = pipe
        self.buf = b""
        self.answered = False

    def start(self) -> None:
        w = self.w
        self.pipe.on_closed = self._closed
        w.wheel.schedule(trio.current_time() + w.cfg.handshake_timeout_s, self)
        w.reactor.add(self.pipe.sock.fileno(), self)

    def on_readable(self) -> None:
        pipe = self.pipe
        data = pipe.recv_ready()
        if not data:
            return
        self.buf += data
        w = self.w
        got = w.sniff(pipe, self.buf, None)
        if got is None:
            return
        self.buf = b""
        if got is False:  # answered: closes after the flush, or in 2 s
            w.reactor.remove(pipe.sock.fileno())
            self.answered = True
            if not pipe.closed:
                w.wheel.schedule(trio.current_time() + 2.0, self)
            return
        w.wheel.cancel(self)
        conn, rest = got
        # the connection object takes the pipe (and its reactor entry) over
        pipe.on_closed = None
        conn.held = True
        conn.attach(w.reactor, rest)

    def on_failure(self) -> None:
        self.w.hub.stats["internal_errors"] += 1
        self.pipe.close()

    def on_timer(self, now: float) -> None:
        if not self.answered:
            self.w.hub.stats["handshake_timeouts"] += 1
        self.pipe.close()

    def _closed(self) -> None:
        w = self.w
        w.wheel.cancel(self)
        w.reactor.remove(self.pipe.sock.fileno())
        w._released(self.pipe.ip)


class Worker:
    def __init__(self, cfg: Config, index: int) -> None:
        self.cfg = cfg
        self.index = index
        # the supervisor's generation of ``cfg`` (gateway.server.control)
        self.config_generation = 0
        n = effective_workers(cfg)
        # Sized by per_worker_connections; accepted up to 5% more, because
        # SO_REUSEPORT spreads connections by hash, not exactly evenly (seen:
        # +1.5% on one of 14 workers at 250k), within the open-file limit.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard_cap = math.ceil(cfg.per_worker_connections * 1.05)
        if soft != resource.RLIM_INFINITY:
            hard_cap = min(hard_cap, max(cfg.per_worker_connections, soft - 500))
        self.max_conns = hard_cap
        self.max_per_ip, hs_rate, hs_burst = _accept_limits(cfg, n)
        self.bot: DemoBot | None = None
        self.forwarder: Any = None
        ds_settings = None
        if cfg.downstream:
            from gateway.downstream.settings import parse_settings

            ds_settings = parse_settings(cfg.downstream)
        if ds_settings is not None:
            from gateway.downstream.forwarder import Forwarder

            self.forwarder = Forwarder(ds_settings, cfg.node_id, index)
            self.forwarder.state_dir = str(cfg.state_dir)
            self.hub = Hub(cfg, self.forwarder, log=self.event, workers=n, index=index)
            self.forwarder.hub = self.hub
        else:
            self.bot = DemoBot(cfg.bot_think_ms, self.max_conns)
            self.hub = Hub(cfg, self.bot, log=self.event, workers=n, index=index)
            self.bot.hub = self.hub
        now = trio.current_time()
        self.wheel = TimerWheel(TICK_S, WHEEL_SLOTS, now)
        self.handshakes = TokenBucket(hs_rate, hs_burst, now)
        self.per_ip: dict[str, int] = {}
        self.open_sockets = 0
        self.conns: set[Any] = set()
        self.reactor = Reactor()
        if self.forwarder is not None:
            self.forwarder.reactor = self.reactor
            self.reactor.after_batch.append(self.forwarder.flush_links)
        self.draining = False
        self.static: dict[str, tuple[bytes, str]] = {}
        for path, (name, ctype) in STATIC_FILES.items():
            f = STATIC_DIR / name
            if f.is_file():
                self.static[path] = (f.read_bytes(), ctype)
        self.ssl_ctx: ssl.SSLContext | None = config_context(cfg, os.environ)
        self.nursery: trio.Nursery | None = None
        self.listener: socket.socket | None = None
        # sockets to the other workers, for handing over resumed connections
        self.peers: dict[int, socket.socket] = {}
        self.migrator: WorkerMigrator | None = None
        self.peer_locks: dict[int, trio.Lock] = {}
        self.handoff_sock: socket.socket | None = None
        # the pipe to the supervisor's metrics (set by main(); None in tests)
        self.stats_fd: int | None = None
        # the read end of the supervisor's control pipe (gateway.server.control)
        self.control_fd: int | None = None
        self.reporter: Any = None
        self._log_budget = TokenBucket(20.0, 100.0, now)

    # -- logging and counting -----------------------------------------------------
    def event(self, level: str, event: str, **fields: Any) -> None:
        """One structured log line (rate limited to 20/s, bursts of 100)."""
        lv = getattr(logging, level.upper(), logging.INFO)
        if not _log.isEnabledFor(lv):
            return
        if self._log_budget.take(trio.current_time()) > 0:
            self.hub.stats["log_lines_suppressed"] += 1
            return
        line = {"ts": round(time.time(), 3), "level": level, "component": f"worker-{self.index}"}
        line["event"] = event
        line.update(fields)
        _log.log(lv, json.dumps(line, default=str, separators=(",", ":")))

    def apply_settings(self, cfg: Config) -> None:
        """The :data:`gateway.reload.LIVE_FIELDS` of a reloaded ``cfg``
        that are not read from ``self.cfg`` where they are used: the log
        level, the per-IP cap and the handshake bucket (which keeps its
        tokens, cut to the new burst), the bound of the sessions that
        moved away, the demo bot's think time (for replies not yet
        scheduled) and the garbage collector's young threshold. The terms
        of new connections and the bounds of new sessions follow the hub's
        configuration (:meth:`Hub.reconfigure`)."""
        logging.getLogger().setLevel(_level(cfg.log_level))
        self.max_per_ip, hs_rate, hs_burst = _accept_limits(cfg, self.hub.workers)
        self.handshakes.retune(hs_rate, hs_burst, trio.current_time())
        if self.migrator is not None:
            self.migrator.tombs.resize(cfg.max_detached_sessions)
        if self.bot is not None:
            self.bot.think_s = cfg.bot_think_ms / 1000.0
        if cfg.gc_young != self.cfg.gc_young:
            retune_gc(cfg.gc_young)

    def count_error(self, code: int) -> None:
        self.hub.stats[f"errors_{int(code)}"] += 1
        self.event("info", "rejected", code=int(code))

    # -- listening ------------------------------------------------------------------
    def bind(self) -> socket.socket:
        cfg = self.cfg
        infos = socket.getaddrinfo(
            cfg.listen_host, cfg.listen_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(addr)
        s.listen(4096)
        s.setblocking(False)
        self.listener = s
        return s

    async def accept_loop(self, lsock: socket.socket) -> None:
        assert self.nursery is not None
        nursery = self.nursery
        while not self.draining:
            try:
                await trio.lowlevel.wait_readable(lsock)
            except (trio.ClosedResourceError, OSError):
                return
            for _ in range(256):
                try:
                    sock, addr = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # EMFILE and friends: back off a little
                    self.hub.stats["accept_errors"] += 1
                    self.event("warning", "accept_failed", error=str(e))
                    await trio.sleep(0.05)
                    break
                self.hub.stats["connections_accepted"] += 1
                sock.setblocking(False)
                # what the per-address limits count under (an IPv6 /64)
                key = client_key(addr[0])
                if self.ssl_ctx is not None and not TLS_REACTOR:
                    nursery.start_soon(self.serve, sock, key)
                    continue
                try:
                    self._accept_plain(sock, key)
                except Exception:  # a bug must not stop the accept loop
                    self.hub.stats["internal_errors"] += 1
                    _log.exception("accepting a connection failed")

    def _refuse(
        self, sock: socket.socket, status: int, why: str, reason: str, retry_s: float
    ) -> None:
        self.hub.stats[f"connections_rejected_{why}"] += 1
        self.event("info", "connection_refused", status=status, why=why, reason=reason)
        if self.ssl_ctx is not None:
            # a TLS client cannot read a plain HTTP answer, and a TLS
            # handshake to send one is the work being refused: just close
            sock.close()
            return
        try:
            sock.send(
                response(
                    status,
                    reason.encode() + b"\n",
                    extra={"Retry-After": str(max(1, int(retry_s)))},
                )
            )
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    # -- one connection -------------------------------------------------------------
    def _held(self, ip: str) -> None:
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.open_sockets += 1

    def _released(self, ip: str) -> None:
        self.open_sockets -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def _admit(self, sock: socket.socket, ip: str) -> bool:
        """The limits on new connections (refused with an HTTP status and
        Retry-After); True when ``sock`` is taken (and holds a slot)."""
        if self.draining:
            self._refuse(sock, 503, "draining", "draining", 1)
            return False
        if self.open_sockets >= self.max_conns:
            self._refuse(
                sock, 503, "worker_limit", "worker at its connection limit", 1 + random.random()
            )
            return False
        n_ip = self.per_ip.get(ip, 0)
        if n_ip >= self.max_per_ip:
            self._refuse(sock, 429, "ip_limit", "too many connections from this address", 5)
            return False
        wait = self.handshakes.take(trio.current_time())
        if wait > 0:
            self._refuse(sock, 429, "handshake_rate", "too many handshakes", wait + random.random())
            return False
        self._held(ip)
        return True

    def _accept_plain(self, sock: socket.socket, ip: str) -> None:
        """A new connection (plain TCP, or TLS unless ``GATEWAY_TLS_REACTOR=0``):
        its handshakes (TLS, then HTTP) are read by the reactor too (no task
        per new connection)."""
        if not self._admit(sock, ip):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = self._raw_pipe(sock, ip, tls=self.ssl_ctx is not None)
        except Exception:
            sock.close()
            self._released(ip)
            raise
        _PlainHandshake(self, pipe).start()

    def _raw_pipe(self, sock: socket.socket, ip: str, tls: bool = False) -> RawPipe:
        assert self.nursery is not None
        terms = self.hub.terms  # the bounds of what waits to be written to it
        pipe: RawPipe
        if tls:
            assert self.ssl_ctx is not None
            pipe = TlsRawPipe(
                sock, self.nursery, terms.out_max_bytes, terms.out_max_frames,
                TlsBio(self.ssl_ctx, None), self.hub.stats,
            )  # fmt: skip
        else:
            pipe = RawPipe(sock, self.nursery, terms.out_max_bytes, terms.out_max_frames)
        pipe.ip = ip
        return pipe

    async def serve(self, sock: socket.socket, ip: str) -> None:
        """A TLS connection, in its own task (``GATEWAY_TLS_REACTOR=0``)."""
        if not self._admit(sock, ip):
            return
        pipe: TlsPipe | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe, alpn = await self._open_tls(sock)
            if pipe is None:
                return
            pipe.ip = ip
            conn, rest = await self._handshake(pipe, alpn)
            if conn is None:
                return
            # the coroutine returned by _handshake ran before this long-lived
            # phase, so an idle connection's task only holds this frame and
            # run()'s
            await conn.run(rest)
        finally:
            if pipe is not None:
                pipe.close()
            else:
                sock.close()
            self._released(ip)

    async def _open_tls(self, sock: socket.socket) -> tuple[TlsPipe | None, str | None]:
        cfg = self.cfg
        assert self.nursery is not None and self.ssl_ctx is not None
        stream = trio.SSLStream(
            trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
            self.ssl_ctx,
            server_side=True,
        )
        with trio.move_on_after(cfg.handshake_timeout_s) as scope:
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.hub.stats["tls_handshake_failures"] += 1
                await trio.aclose_forcefully(stream)
                return None, None
        if scope.cancelled_caught:
            self.hub.stats["handshake_timeouts"] += 1
            await trio.aclose_forcefully(stream)
            return None, None
        self.hub.stats["tls_resumed" if stream.session_reused else "tls_full"] += 1
        terms = self.hub.terms
        pipe = TlsPipe(stream, self.nursery, terms.out_max_bytes, terms.out_max_frames)
        return pipe, stream.selected_alpn_protocol()

    async def _handshake(self, pipe: RawPipe | TlsPipe, alpn: str | None) -> tuple[Any, bytes]:
        """Reads until the protocol is known; answers plain HTTP requests
        itself. Returns the connection object to run (WebSocket or HTTP/2)
        and the bytes already read past the handshake, or (None, b"")."""
        hs = _Handshake(self, pipe)
        self.wheel.schedule(trio.current_time() + self.cfg.handshake_timeout_s, hs)
        try:
            buf = b""
            while True:
                data = await pipe.recv()
                if not data:
                    return None, b""
                buf += data
                got = self.sniff(pipe, buf, alpn)
                if got is None:
                    continue
                if got is False:
                    await self._linger(pipe)
                    return None, b""
                return got  # type: ignore[no-any-return]
        finally:
            self.wheel.cancel(hs)

    def sniff(self, pipe: RawPipe | TlsPipe, buf: bytes, alpn: str | None) -> Any:
        """One step of a handshake over the bytes read so far: None when
        more are needed; False when it was answered here (an HTTP error or a
        static file: the pipe closes after the flush); else the connection
        object to run (WebSocket or HTTP/2) and the bytes read past the
        handshake."""
        if alpn == "h2" or buf.startswith(H2_PREFACE[: len(buf)]):
            if alpn == "h2" or len(buf) >= len(H2_PREFACE):
                from gateway.server.h2conn import H2Conn

                return H2Conn(self, pipe), buf
            return None
        try:
            parsed = parse_head(buf)
        except HttpError as e:
            self._http_error(pipe, e.status, e.reason)
            return False
        if parsed is None:
            return None
        req, used = parsed
        conn = self._http(pipe, req)
        if conn is None:
            return False
        return conn, buf[used:]

    def _http_error(self, pipe: RawPipe | TlsPipe, status: int, reason: str) -> None:
        self.hub.stats[f"http_{status}"] += 1
        self.event("info", "http_error", status=status, reason=reason)
        pipe.write(response(status, reason.encode() + b"\n"))
        pipe.close_after_flush()

    def _http(self, pipe: RawPipe | TlsPipe, req: Any) -> WsConn | None:
        if req.path == "/v1/ws":
            try:
                key = check_upgrade(req)
            except HttpError as e:
                self._http_error(pipe, e.status, e.reason)
                return None
            origin = req.headers.get("origin")
            if origin is not None and not self._origin_known(origin):
                self.hub.stats["origin_refused"] += 1
                self._http_error(pipe, 403, "origin not allowed")
                return None
            pipe.write(upgrade_response(key))
            self.hub.stats["ws_upgrades"] += 1
            return WsConn(self, pipe, origin)
        static = self.static.get(req.path)
        if static is not None and req.method in ("GET", "HEAD"):
            body, ctype = static
            pipe.write(response(200, body, ctype, head_only=req.method == "HEAD"))
            pipe.close_after_flush()
            return None
        if req.path == "/v1/stream":
            self._http_error(pipe, 400, "HTTP/2 required (prior knowledge or ALPN h2)")
            return None
        self._http_error(pipe, 404, "not found")
        return None

    async def _linger(self, pipe: RawPipe | TlsPipe) -> None:
        with trio.move_on_after(2):
            while not pipe.closed and pipe.pending:
                await trio.sleep(0.01)

    def _origin_known(self, origin: str) -> bool:
        v = self.hub.verifier
        return any(v.origin_allowed(t, origin) for t in self.cfg.tenants)

    # -- handing resumed connections to the worker that holds the session ----------
    def _handoff_addr(self, index: int) -> bytes:
        # abstract unix socket namespace: nothing on disk, gone with the process
        return f"\0chat-gateway-{self.cfg.node_id}-{self.cfg.listen_port}-{index}".encode()

    def open_handoff(self) -> socket.socket | None:
        """Binds this worker's socket for its peers (when it has peers):
        plain-TCP connections and sessions move between workers through it
        (docs/architecture.md, "Resumes across workers")."""
        if self.hub.workers < 2 or self.cfg.listen_port == 0:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.bind(self._handoff_addr(self.index))
        except OSError as e:
            s.close()
            self.event("warning", "handoff_unavailable", error=str(e))
            return None
        s.listen(HANDOFF_BACKLOG)
        s.setblocking(False)
        self.handoff_sock = s
        self.migrator = WorkerMigrator(self)
        self.hub.migrator = self.migrator
        return s

    async def send_handoff(
        self, owner: int, sock: socket.socket | None, meta: dict[str, Any]
    ) -> bool:
        """Sends ``meta`` and ``sock`` (by SCM_RIGHTS, when given) to worker
        ``owner``, waiting up to :data:`HANDOFF_WAIT_S` for room in its
        queue; False if it cannot be done (for a socket: the caller serves
        the connection itself)."""
        data = msgpack.packb(meta, use_bin_type=True)
        if len(data) > PEER_MAX_BYTES:
            return False
        fds = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
            if sock is not None
            else []
        )
        lock = self.peer_locks.get(owner)
        if lock is None:
            lock = self.peer_locks[owner] = trio.Lock()
        with trio.move_on_after(HANDOFF_WAIT_S):
            async with lock:  # one sender (and one waiter on the socket) per peer
                for _ in range(2):  # a second try on a fresh socket if the peer restarted
                    peer = self.peers.get(owner)
                    if peer is None:
                        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                        peer.setblocking(False)
                        with contextlib.suppress(OSError):  # room for session states
                            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PEER_MAX_BYTES)
                        try:
                            peer.connect(self._handoff_addr(owner))
                        except OSError:
                            peer.close()
                            break
                        self.peers[owner] = peer
                    try:
                        while True:
                            try:
                                peer.sendmsg([data], fds)
                                return True
                            except BlockingIOError:  # its queue is full: wait
                                await trio.lowlevel.wait_writable(peer)
                    except OSError:
                        peer.close()
                        del self.peers[owner]
        self.hub.stats["handoff_failed"] += 1
        return False

    async def handoff_accept_loop(self, lsock: socket.socket) -> None:
        assert self.nursery is not None
        while True:
            await trio.lowlevel.wait_readable(lsock)
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                await trio.sleep(0.05)
                continue
            conn.setblocking(False)
            self.nursery.start_soon(self.handoff_recv_loop, conn)

    async def handoff_recv_loop(self, conn: socket.socket) -> None:
        assert self.nursery is not None
        cmsg_len = socket.CMSG_SPACE(array.array("i").itemsize)
        try:
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    data, anc, _, _ = conn.recvmsg(PEER_MAX_BYTES, cmsg_len)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                fds = array.array("i")
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return  # the peer worker is gone
                if not fds and self.migrator is not None:
                    self.migrator.on_message(data)  # a session moving
                    continue
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    self.hub.stats["handoff_bad"] += 1
                    continue
                try:
                    meta = msgpack.unpackb(data, raw=False)
                    hello = meta["hello"]
                    if type(hello) is not dict:
                        raise ValueError("hello")
                except Exception:
                    os.close(fds[0])
                    self.hub.stats["handoff_bad"] += 1
                    continue
                sock = socket.socket(fileno=fds[0])
                sock.setblocking(False)
                try:
                    self.adopt(sock, meta)
                except Exception:
                    self.hub.stats["internal_errors"] += 1
                    _log.exception("adopting a handed-over connection failed")
        finally:
            conn.close()

    def adopt(self, sock: socket.socket, meta: dict[str, Any]) -> None:
        """Serves a WebSocket connection another worker handed over, starting
        with the resume ``hello`` it read."""
        ip = str(meta.get("ip", ""))
        if self.draining or self.open_sockets >= self.max_conns:
            sock.close()  # the client reconnects (and resumes) elsewhere
            return
        self.hub.stats["handoffs_in"] += 1
        self._held(ip)
        pipe = self._raw_pipe(sock, ip)
        origin = meta.get("origin")
        conn = WsConn(self, pipe, origin if isinstance(origin, str) else None)
        conn.enc = Encoding.JSON if meta.get("enc") == "JSON" else Encoding.MSGPACK
        conn.proto.adopted = True
        conn.held = True
        conn.attach(self.reactor, b"", meta["hello"])

    # -- timers ---------------------------------------------------------------------
    async def timer_loop(self) -> None:
        wheel = self.wheel
        next_expire = 0.0
        while True:
            await trio.sleep(TICK_S)
            now = trio.current_time()
            for key in wheel.advance(now):
                try:
                    key.on_timer(now)  # type: ignore[attr-defined]
                except Exception:
                    self.hub.stats["internal_errors"] += 1
                    _log.exception("timer callback failed")
            if now >= next_expire:
                next_expire = now + 1.0
                self.hub.expire(now)

    def spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Starts a short-lived task in the worker's nursery."""
        assert self.nursery is not None
        self.nursery.start_soon(fn)

    def schedule(self, deadline: float, key: Hashable) -> None:
        self.wheel.schedule(deadline, key)

    # -- drain ------------------------------------------------------------------------
    async def signal_loop(self, cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                # set before leaving the receiver, which puts outside_trio
                # back: a signal arriving from then on must not exit
                STOP.requested = True
                break
        await self.drain()
        cancel.cancel()

    async def drain(self) -> None:
        cfg = self.cfg
        self.draining = True
        self.event("info", "draining", connections=len(self.conns), drain_s=cfg.drain_s)
        if self.listener is not None:
            trio.lowlevel.notify_closing(self.listener)
            self.listener.close()
        spread_ms = max(0, int(cfg.drain_s * 1000 * 0.5))
        for c in list(self.conns):
            c.goaway(random.randint(0, spread_ms))
        deadline = trio.current_time() + max(0.0, cfg.drain_s - 1.0)
        while self.conns and trio.current_time() < deadline:
            await trio.sleep(0.05)
        for c in list(self.conns):
            c.shutdown()
        with trio.move_on_after(1.0):
            while self.conns:
                await trio.sleep(0.02)
        self.event("info", "drained", left=len(self.conns))
        if self.reporter is not None:
            await self.reporter.push()  # the last counts before exiting

    async def run(
        self, handle_signals: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        lsock = self.bind()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.accept_loop, lsock)
            nursery.start_soon(self.timer_loop)
            nursery.start_soon(self.reactor.run)
            hsock = self.open_handoff()
            if hsock is not None:
                nursery.start_soon(self.handoff_accept_loop, hsock)
            if self.bot is not None:
                nursery.start_soon(self.bot.run, self.hub)
            if self.forwarder is not None:
                nursery.start_soon(self.forwarder.run)
            if handle_signals:
                nursery.start_soon(self.signal_loop, nursery.cancel_scope)
            if self.control_fd is not None:
                from gateway.server.control import control_loop

                nursery.start_soon(control_loop, self, self.control_fd)
            if self.stats_fd is not None:
                from gateway.ops.report import Reporter, worker_snapshot

                self.reporter = Reporter(self.stats_fd, lambda: worker_snapshot(self))
                nursery.start_soon(self.reporter.run)
            port = lsock.getsockname()[1]
            # the supervisor's banner is printed before its workers start:
            # this line says that this one accepts now
            self.event("info", "listening", port=port, pid=os.getpid())
            task_status.started(port)


def _accept_limits(cfg: Config, n: int) -> tuple[int, float, float]:
    """A worker's share (one of ``n``) of the per-IP connection cap
    (rounded up) and of the handshake rate and burst."""
    return (
        max(1, math.ceil(cfg.max_conns_per_ip / n)),
        cfg.handshake_rate / n,
        max(1.0, cfg.handshake_burst / n),
    )


def _level(name: str) -> int:
    level: int = getattr(logging, name.upper(), logging.INFO)
    return level


def _setup_logging(level: str, index: int) -> None:
    logging.basicConfig(
        level=_level(level),
        format="%(message)s",
        stream=sys.stderr,
    )


async def _amain(cfg: Config, index: int) -> None:
    from gateway.ops.report import STATS_FD_ENV
    from gateway.server.control import CONTROL_FD_ENV

    w = Worker(cfg, index)
    gen = os.environ.get(CONFIG_GENERATION_ENV, "")
    if gen.isdigit():
        w.config_generation = int(gen)
    fd = os.environ.get(STATS_FD_ENV)
    if fd and fd.isdigit():
        w.stats_fd = int(fd)
    fd = os.environ.get(CONTROL_FD_ENV)
    if fd and fd.isdigit():
        w.control_fd = int(fd)
    await w.run()


def _export_gc_pauses() -> None:
    """Garbage-collector pauses go to ``gateway_gc_pause_seconds``."""
    from gateway.ops.names import GC_PAUSE

    children = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def observe(generation: int, seconds: float) -> None:
        children[min(generation, 2)].observe(seconds)

    watch_pauses(observe)


def main(argv: list[str] | None = None) -> None:
    # Stop signals outside trio's receiver: see gateway.server.stopsig.
    signal.signal(signal.SIGTERM, outside_trio)
    signal.signal(signal.SIGINT, outside_trio)
    # a reload goes through the supervisor (gateway.server.control); a
    # SIGHUP to the whole process group must not end the workers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ap = argparse.ArgumentParser(prog="gateway.server.worker")
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args(argv)
    cfg = config_from_env()
    _setup_logging(cfg.log_level, args.index)
    watch_parent()
    random.seed(time.time_ns() ^ args.index)
    tune_gc(cfg.gc_young)
    _export_gc_pauses()
    trio.run(_amain, cfg, args.index)
    ignore_from_now()  # drained: nothing left for a late stop signal to do
    sys.exit(0)


if __name__ == "__main__":
    main()
