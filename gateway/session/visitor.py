"""The visitor protocol of one connection or HTTP/2 stream, sans-IO
(docs/protocol.md, "Frames").

A transport decodes frames and calls :meth:`VisitorProtocol.on_frame`; the
protocol answers through its :class:`Sink` (send a frame, close with a code,
pause or resume reading). Peer errors that end the connection are raised as
:class:`ProtocolError`; the transport reports them (``error`` frame for 4xxx
codes, then close) with :meth:`VisitorProtocol.fail`.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from gateway.protocol.codes import Code, ProtocolError
from gateway.session.hub import Hub
from gateway.session.state import Session
from gateway.session.terms import Terms

__all__ = ["MOBILE_PLATFORMS", "PLATFORMS", "Sink", "VisitorProtocol"]

PLATFORMS: Final = frozenset({"web", "ios", "android", "mobile-bg", "desktop", "bot"})
MOBILE_PLATFORMS: Final = frozenset({"ios", "android", "mobile-bg"})
MAX_TAGS: Final = 16
#: Longest sticky ticket a hello may carry (characters; the tickets are
#: made to fit: gateway.downstream.stickyticket).
MAX_STICKY_LEN: Final = 1024
MAX_TAG_BYTES: Final = 256
MAX_ID_BYTES: Final = 64
MAX_INT_ID: Final = (1 << 63) - 1


class Sink(Protocol):
    """The transport under a :class:`VisitorProtocol`."""

    def send(self, frame: dict[str, Any]) -> None: ...

    def send_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        """Sends ``{"t": "ack", "id": msg_id, "n": n, "dup": dup}`` (the
        frame of every visitor message, which a transport may encode
        without building the map)."""
        ...

    def close(self, code: int, reason: str) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def handoff(self, owner: int, hello: dict[str, Any]) -> bool:
        """Passes this connection, with its ``hello`` not answered yet, to
        worker ``owner``; False when this transport cannot."""
        ...

    def rehello(self, hello: dict[str, Any]) -> None:
        """Handles ``hello`` again (the session it resumes has moved here
        meanwhile, or will not), then resumes reading."""
        ...


class _Gone:
    """The sink of a protocol whose transport is gone: takes everything and
    does nothing. Putting it in the transport's place breaks the
    protocol <-> transport reference cycle, so a closed connection is
    freed at once by reference counting instead of waiting, promoted to
    the oldest generation, for a full collection of the cyclic garbage
    collector (which came rarely enough that closed connections piled up:
    ~30 per second per worker under churn)."""

    def send(self, frame: dict[str, Any]) -> None:
        pass

    def send_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def handoff(self, owner: int, hello: dict[str, Any]) -> bool:
        return False

    def rehello(self, hello: dict[str, Any]) -> None:
        pass


#: The one :class:`_Gone` sink.
GONE: Final[Sink] = _Gone()


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(Code.BAD_FRAME, reason)


def _check_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if type(tags) is not dict or len(tags) > MAX_TAGS:
        raise _bad("tags must be a map of at most 16 strings")
    for k, v in tags.items():
        if type(v) is not str or len(k) > MAX_TAG_BYTES or len(v.encode()) > MAX_TAG_BYTES:
            raise _bad("tag values must be strings of at most 256 bytes")
    return tags


def _check_id(msg_id: Any) -> Any:
    t = type(msg_id)
    if t is int:
        if 0 <= msg_id <= MAX_INT_ID:
            return msg_id
    elif t is str and len(msg_id) <= MAX_ID_BYTES and len(msg_id.encode()) <= MAX_ID_BYTES:
        return msg_id
    raise _bad("msg.id must be a string of at most 64 bytes or an int in 0..2^63-1")


#: Counter key of visitor messages received, per transport.
_MSG_IN: Final = {"ws": "messages_in_ws", "h2": "messages_in_h2"}


class VisitorProtocol:
    """States: waiting for ``hello``, open (a session attached), closed."""

    __slots__ = (
        "adopted",
        "hub",
        "ip",
        "origin",
        "paused",
        "pending_hello",
        "platform",
        "pulled",
        "session",
        "sink",
        "state",
        "terms",
        "transport",
    )

    HELLO: Final = 0
    OPEN: Final = 1
    CLOSED: Final = 2

    def __init__(
        self, hub: Hub, sink: Sink, origin: str | None, ip: str = "", transport: str = "ws"
    ) -> None:
        self.hub = hub
        self.transport = transport
        self.adopted = False  # handed over by another worker: never hand off again
        self.pulled = False  # asked another worker for its session already
        self.pending_hello: dict[str, Any] | None = None
        self.sink = sink
        self.origin = origin
        self.ip = ip
        self.state = self.HELLO
        self.session: Session | None = None
        self.platform = "web"
        self.paused = False
        # the heartbeat and limits this connection was opened with (its
        # welcome says them; a reload changes them for connections opened
        # after it)
        self.terms: Terms = hub.terms

    # -- timing facts the transport needs ---------------------------------
    @property
    def grace_s(self) -> float:
        """Extra silence allowed on top of ``heartbeat * misses``."""
        return self.hub.cfg.mobile_grace_s if self.platform in MOBILE_PLATFORMS else 0.0

    def token_expired(self, wall: float) -> bool:
        s = self.session
        return s is not None and s.exp < wall

    # -- input ------------------------------------------------------------
    def on_frame(self, frame: dict[str, Any]) -> None:
        t = frame["t"]
        if self.state == self.OPEN:
            if t == "msg":
                self._on_msg(frame)
            elif t == "ack":
                seq = frame.get("seq")
                if type(seq) is not int:
                    raise _bad("ack.seq must be an int")
                assert self.session is not None
                self.session.client_acked(seq)
            elif t == "ping":
                ts = frame.get("ts", 0)
                self.sink.send({"t": "pong", "ts": ts if type(ts) is int else 0})
            elif t == "pong":
                pass
            elif t == "refresh":
                self._on_refresh(frame)
            elif t == "hello":
                raise _bad("hello on an open session")
            else:
                self.hub.stats["unknown_frame_type"] += 1
                raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown frame type {t[:32]!r}")
        elif self.state == self.HELLO:
            if t != "hello":
                raise ProtocolError(Code.NO_HELLO)
            self._on_hello(frame)
        # frames after close are ignored

    def _on_hello(self, f: dict[str, Any]) -> None:
        hub = self.hub
        if f.get("v") != 1 or type(f.get("v")) is not int:
            raise ProtocolError(Code.UNSUPPORTED_VERSION, "hello.v must be 1")
        claims = hub.verifier.verify(f.get("token"), hub.wall())  # type: ignore[arg-type]
        if not hub.verifier.origin_allowed(claims.tenant, self.origin):
            raise ProtocolError(Code.ORIGIN_NOT_ALLOWED)
        tags = _check_tags(f.get("tags"))
        sticky = f.get("sticky")
        if sticky is not None and (type(sticky) is not str or len(sticky) > MAX_STICKY_LEN):
            raise _bad(f"hello.sticky must be a string of at most {MAX_STICKY_LEN} characters")
        platform = f.get("platform", "web")
        if type(platform) is not str or platform not in PLATFORMS:
            platform = "web"
        self.platform = platform
        resume = f.get("resume")
        s: Session | None = None
        last = 0
        if resume is not None:
            if type(resume) is not dict:
                raise _bad("hello.resume must be a map")
            sid = resume.get("sid")
            last = resume.get("last", 0)
            if type(sid) is not str or type(last) is not int or last < 0:
                raise _bad("hello.resume needs sid (str) and last (int >= 0)")
            s = hub.sessions.get(sid)
            if s is not None and (s.tenant != claims.tenant or s.visitor != claims.visitor):
                raise ProtocolError(Code.BAD_RESUME)
            mig = hub.migrator
            if s is None and mig is not None and not self.pulled:
                holder = mig.holder(sid)
                if holder is not None:
                    # another worker of this node holds the session: move
                    # this connection there (plain TCP), or the session here
                    if not self.adopted and mig.handoff_possible() and self.sink.handoff(holder, f):
                        hub.stats["handoffs_out"] += 1
                        self.state = self.CLOSED
                        return
                    self.pulled = True
                    self.pending_hello = f
                    hub.stats["migrations_requested"] += 1
                    self.sink.pause()  # frames after the hello wait
                    mig.request(self, holder, sid, claims.tenant, claims.visitor)
                    return
        wait, scope = hub.limits.connection(claims.tenant, self.ip, hub.mono())
        if wait > 0:
            hub.stats[f"rate_limited_conn_{scope}"] += 1
            err = ProtocolError(Code.RATE_LIMITED, f"too many new sessions per {scope}")
            err.retry_after_ms = hub.retry_after_ms(wait)  # type: ignore[attr-defined]
            raise err
        resumed = s is not None
        if s is None:
            wait = hub.downstream.admit(hub, claims.tenant, tags)
            if wait > 0:
                hub.stats["admission_rejected"] += 1
                err = ProtocolError(Code.OVERLOADED, "overloaded, retry later")
                err.retry_after_ms = hub.retry_after_ms(wait)  # type: ignore[attr-defined]
                raise err
            s = hub.new_session(claims.tenant, claims.visitor, tags, platform)
            s.ticket = sticky
            last = 0
        else:
            old = s.conn
            if old is not None and old is not self:
                hub.stats["sessions_taken_over"] += 1
                s.conn = None
                old.taken_over()
            hub.sessions.attach(s)
            hub.stats["sessions_resumed"] += 1
        s.exp = claims.exp
        s.platform = platform
        self.session = s
        self.state = self.OPEN
        s.conn = self
        missed, resync = s.missed(last) if resumed else ([], False)
        self.sink.send(
            {
                "t": "welcome",
                "sid": s.sid,
                "hb": int(self.terms.hb_s * 1000),
                "resumed": resumed,
                "resync": resync,
                "first": s.first,
                "limits": {
                    "max_frame": self.terms.max_frame,
                    "window": self.terms.window,
                    "replay": s.replay_max_frames,
                },
                "exp": claims.exp,
            }
        )
        if resync:
            hub.stats["resyncs"] += 1
        for fr in missed:
            self.sink.send(fr)
        if not resumed:
            hub.stats["sessions_opened"] += 1
        hub.downstream.opened(hub, s, resumed)
        s.ticket = None  # read by the downstream side, if it wanted it

    def _on_msg(self, f: dict[str, Any]) -> None:
        s = self.session
        assert s is not None
        hub = self.hub
        msg_id = _check_id(f.get("id"))
        body = f.get("body")
        tb = type(body)
        if tb is not str and tb is not bytes:
            raise _bad("msg.body must be a string or bytes")
        hub.stats[_MSG_IN.get(self.transport, "messages_in_other")] += 1
        known = s.classify(msg_id)
        if known is not None:
            hub.stats["duplicates_dropped"] += 1
            if known > 0:
                self.sink.send_ack(msg_id, known, True)
            return
        wait, scope = hub.limits.message(s.tenant, s.visitor, self.ip, hub.mono())
        if wait > 0:
            hub.stats[f"rate_limited_msg_{scope}"] += 1
            self.sink.send(
                {
                    "t": "error",
                    "code": int(Code.RATE_LIMITED),
                    "reason": f"rate limited ({scope})",
                    "id": msg_id,
                    "retry_after": max(1, int(wait * 1000)),
                }
            )
            return
        window = self.terms.window
        if len(s.inflight) >= window:
            hub.stats["window_exceeded"] += 1
            self.sink.send(
                {
                    "t": "error",
                    "code": int(Code.WINDOW_EXCEEDED),
                    "reason": "window exceeded",
                    "id": msg_id,
                    "retry_after": 100,
                }
            )
            return
        n = s.begin(msg_id)
        ok = hub.submit(self, s, msg_id, n, body)
        if (not ok or len(s.inflight) >= window) and not self.paused:
            self.paused = True
            self.sink.pause()

    def _on_refresh(self, f: dict[str, Any]) -> None:
        s = self.session
        assert s is not None
        hub = self.hub
        claims = hub.verifier.verify(f.get("token"), hub.wall())  # type: ignore[arg-type]
        if claims.tenant != s.tenant or claims.visitor != s.visitor:
            raise ProtocolError(Code.UNAUTHORIZED, "refresh token for another visitor")
        s.exp = claims.exp
        hub.stats["token_refreshes"] += 1
        self.sink.send({"t": "refreshed", "exp": claims.exp})

    # -- Attachment (called by the session / hub) -------------------------
    def session_frame(self, frame: dict[str, Any]) -> None:
        self.sink.send(frame)

    def session_ack(self, msg_id: Any, n: int, dup: bool) -> None:
        self.sink.send_ack(msg_id, n, dup)
        self._maybe_resume()

    def session_refused(self, msg_id: Any, code: int, reason: str, retry_after_ms: int) -> None:
        self.sink.send(
            {
                "t": "error",
                "code": code,
                "reason": reason,
                "id": msg_id,
                "retry_after": retry_after_ms,
            }
        )
        self._maybe_resume()

    def downstream_ready(self) -> None:
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        s = self.session
        if self.paused and s is not None and len(s.inflight) < self.terms.window:
            self.paused = False
            self.sink.resume()

    def migrated(self) -> None:
        """The session asked for (:meth:`Hub.migrator`) has moved to this
        worker, or will not (then the hello gets a fresh session)."""
        f = self.pending_hello
        self.pending_hello = None
        if f is not None and self.state == self.HELLO:
            self.sink.rehello(f)

    def taken_over(self) -> None:
        self.session = None
        self.state = self.CLOSED
        self.sink.close(int(Code.TAKEN_OVER), "taken over")

    # -- endings ------------------------------------------------------------
    def fail(self, err: ProtocolError) -> None:
        """Reports ``err`` to the visitor and closes (counted by code)."""
        if self.state == self.CLOSED:
            return
        self.hub.stats[f"closed_{int(err.code)}"] += 1
        if err.code >= 4000:
            frame: dict[str, Any] = {"t": "error", "code": int(err.code), "reason": err.reason}
            ra = getattr(err, "retry_after_ms", None)
            if ra is not None:
                frame["retry_after"] = ra
            self.sink.send(frame)
        self.state = self.CLOSED
        self.sink.close(int(err.code), err.reason)

    def goaway(self, reconnect_after_ms: int) -> None:
        if self.state != self.CLOSED:
            self.sink.send(
                {"t": "goaway", "reason": "draining", "reconnect_after": reconnect_after_ms}
            )

    def connection_lost(self, now: float) -> None:
        """The transport is gone: detach the session (kept for resume) and
        let go of the transport (:data:`GONE` in its place)."""
        self.state = self.CLOSED
        self.sink = GONE
        self.hub.forget(self)
        s = self.session
        self.session = None
        if s is not None and s.conn is self:
            self.hub.detach(s, now)
