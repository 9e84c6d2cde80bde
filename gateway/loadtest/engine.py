"""One load-client process: an epoll loop driving many connections.

Speaks either the gateway protocol (`mode="gateway"`: hello with a token,
msg -> ack round trips, deliver acks, heartbeat pongs, resume) over WebSocket
or HTTP/2 (`transport`), or plain WebSocket echo (`mode="echo"`: a text
message and its echo, for peer servers such as the `websockets` library).
Optionally the message bodies are sealed end to end (`encrypt`: the native
core, one batch per loop turn) and the echoed deliveries opened and checked.
Everything is bounded: connections, in-flight messages, run time. Results
are plain dicts (histograms HDR-encoded) so the runner can merge processes.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hdrh.histogram import HdrHistogram

from gateway.loadtest import rawws
from gateway.loadtest.h2client import H2Error, H2Stream

# Connection states.
CONNECTING, UPGRADING, HELLO, OPEN, CLOSED, TLS_HANDSHAKE = range(6)

HIST_MAX_US = 120_000_000


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def send_wait(credit: float, rate: float) -> float:
    """Seconds until the next open-loop send is due (``credit`` messages
    owed, ``rate`` per second), between 1 ms and 50 ms. The loop sleeps at
    most this long, so sends are paced in ~1 ms steps, not in bursts of
    up to 50 ms worth of messages (which queued behind each other and
    showed up as latency)."""
    if credit >= 1.0:
        return 0.001
    return min(0.05, max(0.001, (1.0 - credit) / rate))


@dataclass
class Plan:
    """What one client process does. Times in seconds, rates per second."""

    host: str
    port: int
    path: str = "/v1/ws"
    mode: str = "gateway"  # "gateway" | "echo"
    connections: int = 100
    ramp: float = 0.0  # new connections per second; 0 = as fast as allowed
    max_pending: int = 2000  # connects in progress at once
    src_ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    tokens: list[str] = field(default_factory=list)  # cycled over connections
    active: int = 0  # connections that send messages (first `active` opened)
    rate: float = 0.0  # messages/s over the process; 0 = closed loop (`window` in flight each)
    window: int = 1  # messages in flight per connection (closed loop), or at most (rate)
    size: int = 230
    duration: float = 10.0  # after all connections are open (or ramp ended)
    hold_after: float = 0.0  # keep connections open this long after sending stops
    storm: int = 0  # connections dropped and resumed at once, mid-run
    storm_at: float = 0.5  # fraction of duration
    connect_timeout: float = 30.0
    max_runtime: float = 600.0  # hard stop
    origin: str | None = None
    platform: str = "web"
    ready_file: str | None = None  # touched once every connection is open
    tls: bool = False  # wss:// or https://
    tls_verify: bool = True  # check the certificate (and the host name)
    ca_file: str | None = None  # extra CA bundle (default: the system's)
    server_name: str = ""  # SNI and the name checked (default: host)
    transport: str = "ws"  # "ws" | "h2" (h2c, prior knowledge)
    size_mix: list[list[int]] = field(default_factory=list)  # [[bytes, weight], ...]
    encrypt: str = ""  # "" | "aes-256-gcm" | "aes-128-gcm" | "sm4-gcm"
    token_secret: str = ""  # mint tokens here (else `tokens`)
    tenant: str = "demo"
    kid: str | None = None
    visitor_prefix: str = "lt"
    visitor_base: int = 0  # this process's first visitor number
    engine: str = "python"  # "python" | "native" (gw-loadgen: ws:// only, see native.py)


class Conn:
    __slots__ = (
        "acked_seq",
        "fd",
        "h2",
        "idx",
        "inflight",
        "last_seq",
        "next_id",
        "out",
        "rbuf",
        "reader",
        "resume",
        "sid",
        "sock",
        "state",
        "t_open",
        "tin",
        "tls",
        "token",
        "tout",
    )

    def __init__(self, idx: int, token: str) -> None:
        self.idx = idx
        self.token = token
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = CLOSED
        self.rbuf = bytearray()
        self.reader = rawws.FrameReader()
        self.out = b""
        self.t_open = 0.0
        self.inflight: dict[int, float] = {}  # unacknowledged message id -> sent at
        self.next_id = 1
        self.sid = ""
        self.last_seq = 0
        self.acked_seq = 0
        self.resume = False
        self.h2: H2Stream | None = None
        self.tls: ssl.SSLObject | None = None
        self.tin: ssl.MemoryBIO | None = None
        self.tout: ssl.MemoryBIO | None = None


def body_sequence(size: int, mix: list[list[int]], n: int = 1024) -> list[bytes]:
    """``n`` message bodies whose sizes follow ``mix`` ([[bytes, weight],
    ...]; empty = all ``size``), in a shuffled order that repeats."""
    import random

    rnd = random.Random(size ^ len(mix))
    if not mix:
        sizes = [size]
    else:
        sizes = rnd.choices([m[0] for m in mix], weights=[m[1] for m in mix], k=n)
    return [os.urandom(max(1, s) // 2 + 1).hex()[: max(1, s)].encode() for s in sizes]


class Engine:
    def __init__(self, plan: Plan) -> None:
        self.p = plan
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.conns = [
            Conn(i, plan.tokens[i % len(plan.tokens)] if plan.tokens else "")
            for i in range(plan.connections)
        ]
        self.connect_h = new_hist()
        self.rtt_h = new_hist()
        self.resume_h = new_hist()
        self.deliver_h = new_hist()
        self.sec_h = new_hist()  # round trips of the current second
        self.sec_hists: list[list[Any]] = []  # [second, encoded histogram]
        self.counts: dict[str, int] = {
            "connected": 0,
            "connect_errors": 0,
            "handshake_rejected": 0,
            "disconnects": 0,
            "sent": 0,
            "acked": 0,
            "dup_acks": 0,
            "delivered": 0,
            "pings_answered": 0,
            "resumes": 0,
            "resume_fresh": 0,
            "resyncs": 0,
            "storm_dropped": 0,
            "sealed": 0,
            "opened": 0,
            "open_failed": 0,
        }
        self.errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.timeline: list[list[float]] = []
        self.retry: list[tuple[float, int]] = []  # (when, connection) after a refusal
        self.open_now = 0
        self.pending = 0
        self.src_i = 0
        hello_base: dict[str, Any] = {"t": "hello", "v": 1, "platform": plan.platform}
        self.hello_base = hello_base
        self.bodies = body_sequence(plan.size, plan.size_mix)
        self.body_i = 0
        self.body = self.bodies[0]
        self.text_msg = rawws.frame(self.body, rawws.OP_TEXT)
        self.authority = f"{plan.server_name or plan.host}:{plan.port}"
        self.ssl_ctx: ssl.SSLContext | None = None
        if plan.tls:
            ctx = ssl.create_default_context(cafile=plan.ca_file)
            if not plan.tls_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"] if plan.transport == "h2" else ["http/1.1"])
            self.ssl_ctx = ctx
        self.secret = plan.token_secret.encode()
        # end-to-end sealing: sends and opens gathered per loop turn
        self.keyring: Any = None
        self.key = 0
        self.outbox: list[tuple[Conn, int]] = []  # (connection, message id) to seal
        self.inbox: list[bytes] = []
        if plan.encrypt:
            from gateway.crypto import Keyring

            suite = plan.encrypt
            self.keyring = Keyring(fixed=int.from_bytes(os.urandom(4), "big"))
            self.key = self.keyring.add(suite, os.urandom(16 if suite != "aes-256-gcm" else 32))
        self.packer = msgpack.Packer(use_bin_type=True)
        self.t0 = time.monotonic()

    # -- connections -----------------------------------------------------

    def _start_connect(self, c: Conn, resume: bool = False) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        src = self.p.src_ips[self.src_i % len(self.p.src_ips)]
        self.src_i += 1
        try:
            s.bind((src, 0))
            rc = s.connect_ex((self.p.host, self.p.port))
        except OSError as e:
            s.close()
            self._err(f"connect:{errno.errorcode.get(e.errno or 0, e.errno)}")
            return
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self._err(f"connect:{errno.errorcode.get(rc, rc)}")
            return
        c.sock = s
        c.fd = s.fileno()
        c.state = CONNECTING
        c.rbuf = bytearray()
        c.reader = rawws.FrameReader()
        c.out = b""
        c.h2 = None
        c.tls = c.tin = c.tout = None
        c.t_open = time.monotonic()
        c.resume = resume
        if not resume:
            c.inflight = {}  # a resumed connection resends these with their ids
        self.by_fd[c.fd] = c
        self.pending += 1
        self.ep.register(c.fd, select.EPOLLOUT | select.EPOLLIN)

    def _err(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    def _close(self, c: Conn, reason: str | None) -> None:
        if c.sock is None:
            return
        if c.state in (CONNECTING, UPGRADING, HELLO, TLS_HANDSHAKE):
            self.pending -= 1
        elif c.state == OPEN:
            self.open_now -= 1
        if reason:  # closed by the server or the network, not by us
            self.closes[reason] = self.closes.get(reason, 0) + 1
            self.counts["disconnects"] += 1
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(c.fd)
        self.by_fd.pop(c.fd, None)
        c.sock.close()
        c.sock = None
        c.state = CLOSED

    def _send(self, c: Conn, data: bytes) -> None:
        if c.sock is None:
            return
        if c.tls is not None:
            assert c.tout is not None
            try:
                c.tls.write(data)
            except ssl.SSLError:
                self._close(c, "tls_error")
                return
            data = c.tout.read()
            if not data:
                return
        self._send_raw(c, data)

    def _send_raw(self, c: Conn, data: bytes) -> None:
        if c.sock is None:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(c, "send_error")
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def _send_frame(self, c: Conn, obj: dict[str, Any]) -> None:
        h2s = c.h2
        if h2s is None:
            self._send(c, rawws.frame(self.packer.pack(obj)))
            return
        try:
            h2s.send(self.packer.pack(obj))
        except H2Error as e:
            self._close(c, e.reason)
            return
        self._send(c, h2s.out())

    def _next_body(self) -> bytes:
        bodies = self.bodies
        b = bodies[self.body_i % len(bodies)]
        self.body_i += 1
        return b

    def _send_msg(self, c: Conn, now: float) -> None:
        mid = c.next_id
        c.next_id += 1
        c.inflight[mid] = now
        if self.p.mode == "echo":
            self._send(c, self.text_msg)
        else:
            if self.keyring is not None:
                self.outbox.append((c, mid))  # sealed with the others at the end of this turn
                return
            self._send_frame(c, {"t": "msg", "id": mid, "body": self._next_body()})
        self.counts["sent"] += 1

    def _fill(self, c: Conn, now: float) -> None:
        """Closed loop: sends until ``window`` messages are in flight."""
        while len(c.inflight) < self.p.window and c.state == OPEN:
            self._send_msg(c, now)

    def _flush_crypto(self) -> None:
        """Seals this turn's messages in one batch and opens this turn's
        sealed deliveries in another."""
        kr = self.keyring
        if self.outbox:
            sends, self.outbox = self.outbox, []
            aad = self.p.tenant.encode()
            sealed = kr.seal_many([(self.key, self._next_body(), aad) for _ in sends])
            self.counts["sealed"] += len(sealed)
            for (c, mid), body in zip(sends, sealed, strict=True):
                if c.sock is not None and c.state == OPEN and mid in c.inflight:
                    self._send_frame(c, {"t": "msg", "id": mid, "body": body})
                    self.counts["sent"] += 1
        if self.inbox:
            items, self.inbox = self.inbox, []
            aad = self.p.tenant.encode()
            opened = kr.open_many([(self.key, b, aad) for b in items])
            bad = sum(1 for o in opened if o is None)
            self.counts["opened"] += len(opened) - bad
            self.counts["open_failed"] += bad

    def _token(self, c: Conn) -> str:
        if c.token or not self.secret:
            return c.token
        from gateway.protocol.tokens import mint

        p = self.p
        visitor = f"{p.visitor_prefix}-{p.visitor_base + c.idx}"
        c.token = mint(p.tenant, visitor, self.secret, 24 * 3600, time.time(), kid=p.kid)
        return c.token

    def _hello(self, c: Conn) -> None:
        hello = dict(self.hello_base, token=self._token(c))
        if c.resume and c.sid:
            hello["resume"] = {"sid": c.sid, "last": c.last_seq}
        self._send_frame(c, hello)

    # -- events ----------------------------------------------------------

    def _on_writable(self, c: Conn) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if c.sock else 1
            if err:
                self._err(f"connect:{errno.errorcode.get(err, err)}")
                self._close(c, None)
                self.pending += 0
                return
            self.ep.modify(c.fd, select.EPOLLIN)
            if self.ssl_ctx is not None:
                c.tin, c.tout = ssl.MemoryBIO(), ssl.MemoryBIO()
                name = self.p.server_name or self.p.host
                c.tls = self.ssl_ctx.wrap_bio(c.tin, c.tout, server_hostname=name)
                c.state = TLS_HANDSHAKE
                self._tls_step(c)
                return
            self._start_protocol(c)
            return
        if c.out and c.sock is not None:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                return
            except OSError:
                self._close(c, "send_error")
                return
            c.out = c.out[n:]
            if not c.out:
                self.ep.modify(c.fd, select.EPOLLIN)

    def _start_protocol(self, c: Conn) -> None:
        """The connection (and its TLS, if any) is up: upgrade or h2."""
        if self.p.transport == "h2":
            c.state = HELLO
            c.h2 = H2Stream(self.authority, self.p.path)
            self._hello(c)
            return
        c.state = UPGRADING
        self._send(c, rawws.upgrade_request(self.authority, self.p.path, self.p.origin))

    def _flush_tls(self, c: Conn) -> None:
        assert c.tout is not None
        out = c.tout.read()
        if out:
            self._send_raw(c, out)

    def _tls_step(self, c: Conn) -> None:
        assert c.tls is not None
        try:
            c.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls(c)
            return
        except (ssl.SSLError, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            self._err(f"tls:{reason}")
            self._close(c, None)
            return
        self._flush_tls(c)
        if self.p.transport == "h2" and c.tls.selected_alpn_protocol() != "h2":
            self._err("tls:no_alpn_h2")
            self._close(c, None)
            return
        self._start_protocol(c)

    def _tls_in(self, c: Conn, data: bytes) -> bytes | None:
        """TLS records in, plaintext out (b"" while the handshake runs);
        None when the connection was closed."""
        assert c.tls is not None and c.tin is not None
        c.tin.write(data)
        if c.state == TLS_HANDSHAKE:
            self._tls_step(c)
            if c.sock is None or c.state == TLS_HANDSHAKE:
                return None if c.sock is None else b""
        chunks = []
        while True:
            try:
                chunks.append(c.tls.read(262144))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._close(c, "eof")
                return None
            except ssl.SSLError:
                self._close(c, "tls_error")
                return None
        self._flush_tls(c)
        return b"".join(chunks)

    def _opened(self, c: Conn, now: float) -> None:
        self.pending -= 1
        self.open_now += 1
        c.state = OPEN
        dt = int((now - c.t_open) * 1e6) or 1
        if c.resume:
            self.resume_h.record_value(min(dt, HIST_MAX_US))
        else:
            self.connect_h.record_value(min(dt, HIST_MAX_US))
            self.counts["connected"] += 1
        if self.p.mode != "gateway":
            c.inflight.clear()  # an echo server does not resume
        elif c.inflight:
            # Resend the unacknowledged messages with their ids (deduplicated).
            aad = self.p.tenant.encode()
            for mid in c.inflight:
                body = self.body
                if self.keyring is not None:
                    body = self.keyring.seal_many([(self.key, body, aad)])[0]
                self._send_frame(c, {"t": "msg", "id": mid, "body": body})
        if c.idx < self.p.active and self.p.rate == 0 and now < self.send_until:
            self._fill(c, now)

    def _on_readable(self, c: Conn, now: float) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            self._close(c, "recv_error")
            return
        if not data:
            self._close(c, "eof")
            return
        if c.tls is not None:
            plain = self._tls_in(c, data)
            if not plain:
                return
            data = plain
        h2s = c.h2
        if h2s is not None:
            try:
                payloads = h2s.feed(data)
            except H2Error as e:
                if e.reason.startswith("http:"):
                    self.counts["handshake_rejected"] += 1
                    self._err(e.reason)
                self._close(c, e.reason)
                return
            out = h2s.out()
            if out:
                self._send(c, out)
            for payload in payloads:
                self._on_frame(c, payload, now)
                if c.sock is None:
                    return
            return
        if c.state == UPGRADING:
            c.rbuf += data
            try:
                n = rawws.parse_upgrade(c.rbuf)
            except rawws.HandshakeError as e:
                self.counts["handshake_rejected"] += 1
                self._err(f"http:{e.status}")
                self._close(c, None)
                return
            if not n:
                return
            data = bytes(c.rbuf[n:])
            c.rbuf = bytearray()
            if self.p.mode == "echo":
                self._opened(c, now)
            else:
                c.state = HELLO
                self._hello(c)
            if not data:
                return
        try:
            frames = c.reader.feed(data)
        except ValueError:
            self._err("bad_server_frame")
            self._close(c, "bad_server_frame")
            return
        for op, payload in frames:
            if op == rawws.OP_PING:
                self._send(c, rawws.frame(payload, rawws.OP_PONG))
                self.counts["pings_answered"] += 1
            elif op == rawws.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._close(c, f"close:{code}")
                return
            elif op in (rawws.OP_TEXT, rawws.OP_BINARY):
                if self.p.mode == "echo":
                    self._on_echo(c, now)
                else:
                    self._on_frame(c, payload, now)
                if c.sock is None:
                    return

    def _record_rtt(self, c: Conn, mid: int, now: float) -> None:
        sent = c.inflight.pop(mid)
        us = min(int((now - sent) * 1e6) or 1, HIST_MAX_US)
        self.sec_h.record_value(us)  # added to rtt_h once a second (_close_second)
        self.counts["acked"] += 1
        if self.p.rate == 0 and c.idx < self.p.active and now < self.send_until:
            self._send_msg(c, now)

    def _on_echo(self, c: Conn, now: float) -> None:
        if c.inflight:  # echoes come back in the order sent
            self._record_rtt(c, next(iter(c.inflight)), now)

    def _on_frame(self, c: Conn, payload: bytes, now: float) -> None:
        try:
            f = msgpack.unpackb(payload, raw=False)
            t = f["t"]
        except Exception:
            self._err("bad_server_payload")
            return
        if t == "ack":
            if f.get("dup"):
                self.counts["dup_acks"] += 1
            mid = f.get("id")
            if type(mid) is int and mid in c.inflight:
                self._record_rtt(c, mid, now)
        elif t == "deliver":
            seq = f.get("seq", 0)
            if seq > c.last_seq:
                c.last_seq = seq
                self.counts["delivered"] += 1
                ts = f.get("ts")
                if type(ts) is int:
                    lag = int(time.time() * 1e6) - ts * 1000
                    self.deliver_h.record_value(min(max(lag, 1), HIST_MAX_US))
                body = f.get("body")
                if self.keyring is not None and type(body) is bytes:
                    self.inbox.append(body)
            if c.last_seq - c.acked_seq >= 16:
                c.acked_seq = c.last_seq
                self._send_frame(c, {"t": "ack", "seq": c.last_seq})
        elif t == "welcome":
            c.sid = f.get("sid", "")
            if c.resume:
                if f.get("resumed"):
                    self.counts["resumes"] += 1
                else:
                    self.counts["resume_fresh"] += 1
                if f.get("resync"):
                    self.counts["resyncs"] += 1
            self._opened(c, now)
        elif t == "ping":
            self._send_frame(c, {"t": "pong", "ts": f.get("ts", 0)})
        elif t == "error":
            self._err(f"code:{f.get('code')}")
            mid = f.get("id")
            refused = type(mid) is int and c.inflight.pop(mid, None) is not None
            # refused (4029, 4429, ...): a closed loop sends again after retry_after
            if refused and self.p.rate == 0 and c.idx < self.p.active:
                wait = f.get("retry_after")
                wait_s = wait / 1000 if type(wait) is int and 0 < wait < 600_000 else 1.0
                heapq.heappush(self.retry, (now + wait_s, c.idx))
        elif t == "goaway":
            self._err("goaway")

    # -- main loop ---------------------------------------------------------

    def _close_second(self, second: int) -> None:
        """Moves the current second's round trips into the run's histogram
        and the timeline (one histogram update per round trip, not two)."""
        sec = self.sec_h
        if sec.get_total_count():
            self.rtt_h.add(sec)
            self.sec_hists.append([second, sec.encode().decode()])
            sec.reset()

    def _progress_row(self, now: float, start: float) -> dict[str, Any]:
        return {
            "t": round(now - start, 3),
            "open": self.open_now,
            "pending": self.pending,
            "connected": self.counts["connected"],
            "sent": self.counts["sent"],
            "acked": self.counts["acked"],
            "delivered": self.counts["delivered"],
            "errors": sum(self.errors.values()),
        }

    def run(self, progress: Any = None) -> dict[str, Any]:
        """Runs the plan; ``progress`` (if given) is called about once a
        second with a small dict of running totals."""
        p = self.p
        start = time.monotonic()
        hard_stop = start + p.max_runtime
        next_idx = 0
        opened_all_at: float | None = None
        self.send_until = float("inf")
        storm_done = p.storm == 0
        last_sample = start
        rate_credit = 0.0
        rr = 0
        last_tick = start
        end_at = float("inf")
        # CPU time of the sending window only (not the ramp or the hold)
        cpu_open = 0.0
        send_cpu: float | None = None
        while True:
            now = time.monotonic()
            if send_cpu is None and opened_all_at is not None and now >= self.send_until:
                send_cpu = time.process_time() - cpu_open
            if now >= hard_stop or now >= end_at:
                break
            # Open new connections within the ramp rate and pending bound.
            if next_idx < p.connections:
                allowed = p.connections if p.ramp <= 0 else int((now - start) * p.ramp) + 1
                while next_idx < min(allowed, p.connections) and self.pending < p.max_pending:
                    self._start_connect(self.conns[next_idx])
                    next_idx += 1
            elif opened_all_at is None and self.pending == 0:
                opened_all_at = now
                cpu_open = time.process_time()
                self.send_until = now + p.duration
                end_at = self.send_until + p.hold_after
                if p.ready_file:
                    open(p.ready_file, "w").close()
                if p.rate == 0:
                    for c in self.conns[: p.active]:
                        self._fill(c, now)
            # Time out stuck connects.
            if self.pending and now - last_tick > 1.0:
                for c in list(self.by_fd.values()):
                    if c.state != OPEN and now - c.t_open > p.connect_timeout:
                        self._err("connect_timeout")
                        self._close(c, None)
            # Open-loop sending at a fixed rate over active connections.
            if p.rate > 0 and opened_all_at is not None and now < self.send_until:
                rate_credit += (now - last_tick) * p.rate
                budget = min(int(rate_credit), max(p.active, 1))
                tried = 0
                while budget > 0 and tried < p.active:
                    c = self.conns[rr % p.active]
                    rr += 1
                    tried += 1
                    if c.state == OPEN and len(c.inflight) < p.window:
                        self._send_msg(c, now)
                        budget -= 1
                        rate_credit -= 1
                if rate_credit > p.rate:  # cannot keep up: drop the backlog
                    self._err("send_backlog")
                    rate_credit = 0
            last_tick = now
            retry = self.retry
            while retry and retry[0][0] <= now:
                c = self.conns[heapq.heappop(retry)[1]]
                if c.state == OPEN and len(c.inflight) < p.window and now < self.send_until:
                    self._send_msg(c, now)
            # Reconnect storm: drop N open connections at once, resume them.
            if (
                not storm_done
                and opened_all_at is not None
                and now >= opened_all_at + p.duration * p.storm_at
            ):
                storm_done = True
                victims = [c for c in self.conns if c.state == OPEN][: p.storm]
                for c in victims:
                    self._close(c, None)
                    self.counts["storm_dropped"] += 1
                t_storm = time.monotonic()
                for c in victims:
                    self._start_connect(c, resume=True)
                self.counts["storm_started_ms"] = int((t_storm - start) * 1000)
            if now - last_sample >= 1.0:
                last_sample = now
                self.timeline.append(
                    [
                        round(now - start, 3),
                        self.open_now,
                        self.counts["acked"],
                        self.counts["delivered"],
                    ]
                )
                self._close_second(int(now - start))
                if progress is not None:
                    progress(self._progress_row(now, start))
            wait = 0.05
            if p.rate > 0 and opened_all_at is not None and now < self.send_until:
                wait = send_wait(rate_credit, p.rate)
            for fd, ev in self.ep.poll(wait):
                got = self.by_fd.get(fd)
                if got is None:
                    continue
                c = got
                if ev & select.EPOLLOUT:
                    self._on_writable(c)
                    if c.sock is None:
                        continue
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    if c.state == CONNECTING:
                        self._on_writable(c)
                        continue
                    self._on_readable(c, time.monotonic())
            if self.keyring is not None:
                self._flush_crypto()
        if send_cpu is None and opened_all_at is not None:  # stopped while sending
            send_cpu = time.process_time() - cpu_open
        self._close_second(int(time.monotonic() - start))
        elapsed_send = (
            (min(time.monotonic(), self.send_until) - opened_all_at) if opened_all_at else 0
        )
        result = {
            "counts": self.counts,
            "errors": self.errors,
            "closes": self.closes,
            "open_at_end": self.open_now,
            "ramp_seconds": (opened_all_at - start) if opened_all_at else None,
            "send_seconds": elapsed_send,
            "send_cpu_seconds": send_cpu or 0.0,
            "timeline": self.timeline,
            "hist": {
                "connect_us": self.connect_h.encode().decode(),
                "rtt_us": self.rtt_h.encode().decode(),
                "resume_us": self.resume_h.encode().decode(),
                "deliver_us": self.deliver_h.encode().decode(),
            },
            "sec_hists": self.sec_hists,
        }
        for c in self.conns:
            if c.sock is not None:
                self._close(c, None)
        self.ep.close()
        return result
