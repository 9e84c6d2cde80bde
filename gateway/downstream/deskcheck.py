"""``gateway desk-check``: checks that a downstream speaks the link protocol
(docs/protocol.md, "Downstream link protocol") before a gateway is pointed
at it, the way a gateway worker would use it.

It opens links like a gateway worker (``POST /v1/link`` over h2c or TLS,
with the cluster's headers), then runs the checks of :data:`CHECKS` in
order, each with its own session: every frame the downstream sends must be
well-formed (the gateway's own check), messages must be acked, a repeated
message acked again (downstreams deduplicate on ``sid``/``n``), a large
frame taken, ``close`` accepted, and, when the downstream announces the
``moved`` feature, a session opened on a second link must bring ``moved``
on the first; an HTTP/2 PING must be answered (the gateway's health
check). Prints one line per check and returns 0 when all passed, 1
otherwise (2: the downstream could not be reached at all).

Anything the downstream sends for the check sessions other than what a
check waits for (replies, assignments) is allowed and counted.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import trio

from gateway.downstream.link import BadFrame, LinkCore, LinkError
from gateway.downstream.proto import LINK_PATH, MOVED_MARK, encode

__all__ = ["CHECKS", "LinkClient", "Target", "run_checks"]

#: Body of the large-frame check: a 64 KiB visitor message.
BIG_BODY: Final = 64 * 1024


@dataclass
class Target:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    timeout_s: float = 5.0


class CheckFailed(Exception):
    pass


class LinkClient:
    """One link to the downstream, opened and read by the gateway's own link
    core (:class:`gateway.downstream.link.LinkCore`: the request headers,
    flow control both ways, the frame checks) over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, timeout_s: float = 5.0) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.core = LinkCore()
        self.frames: list[dict[str, Any]] = []
        self.others = 0  # frames no check waited for

    @property
    def features(self) -> frozenset[str]:
        return self.core.features

    @classmethod
    async def open(cls, t: Target, index: int) -> LinkClient:
        """Connects and sends the link request; trio.TooSlowError when the
        connection, the TLS handshake or the response takes longer than
        the target's timeout."""
        with trio.fail_after(t.timeout_s):
            return await cls._open(t, index)

    @classmethod
    async def _open(cls, t: Target, index: int) -> LinkClient:
        tcp: trio.abc.Stream = await trio.open_tcp_stream(t.host, t.port)
        if t.ssl_context is not None:
            tcp = trio.SSLStream(tcp, t.ssl_context, server_hostname=t.server_name or t.host)
            await tcp.do_handshake()
        c = cls(tcp, t.timeout_s)
        headers = [("x-gateway-node", "desk-check"), ("x-gateway-worker", str(index)),
                   ("x-gateway-link", "0"), *t.headers]  # fmt: skip
        c.core.start(f"{t.host}:{t.port}", headers)
        await c.flush()
        while c.core.status is None:
            await c.read()
        return c

    async def flush(self) -> None:
        data = self.core.flush()
        if data:
            await self.stream.send_all(data)

    async def send(self, frame: dict[str, Any]) -> None:
        core = self.core
        core.queue(encode(frame))
        await self.flush()
        while core.backlog:  # beyond the downstream's window: wait for more
            with trio.move_on_after(self.timeout_s):
                await self.read()
                continue
            raise CheckFailed(f"no flow-control window for {self.timeout_s:g} s")

    async def read(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise CheckFailed("the downstream closed the connection")
        core = self.core
        try:
            self.frames += core.receive(data)
        except BadFrame as e:
            raise CheckFailed(f"a malformed frame from the downstream: {e.__cause__}") from None
        except LinkError as e:
            if core.status not in (None, 200):
                raise CheckFailed(
                    f"the link request was answered with HTTP {core.status}"
                ) from None
            raise CheckFailed(str(e)) from None
        await self.flush()

    async def ping(self) -> bool:
        """Sends an HTTP/2 PING; True once its ACK came (False: timeout)."""
        core = self.core
        core.ping(trio.current_time())
        await self.flush()
        with trio.move_on_after(self.timeout_s):
            while core.ping_sent:
                await self.read()
            return True
        return False

    async def wait_for(
        self, what: str, match: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The first frame ``match`` takes (others are set aside)."""
        with trio.move_on_after(timeout_s):
            while True:
                for i, f in enumerate(self.frames):
                    if match(f):
                        del self.frames[i]
                        return f
                self.others += len(self.frames)
                self.frames.clear()
                await self.read()
        raise CheckFailed(f"no {what} within {timeout_s:g} s")

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)


def _acks(sid: str, n: int) -> Callable[[dict[str, Any]], bool]:
    def match(f: dict[str, Any]) -> bool:
        if f["t"] == "ack":
            return bool(f["sid"] == sid and f["n"] == n)
        if f["t"] == "acks":
            return n in f["sids"].get(sid, ())
        if f["t"] == "nack" and f["sid"] == sid and f["n"] == n:
            raise CheckFailed(f"message {n} was refused (nack code {f.get('code')})")
        return False

    return match


def _open(sid: str) -> dict[str, Any]:
    return {"t": "open", "sid": sid, "tenant": "desk-check", "visitor": f"v-{sid[:8]}",
            "tags": {"channel": "desk-check"}, "group": "general", "stage": "human",
            "agent": None}  # fmt: skip


def _msg(sid: str, n: int, body: Any) -> dict[str, Any]:
    return {"t": "msg", "sid": sid, "n": n, "id": n, "body": body, "group": "general",
            "stage": "human"}  # fmt: skip


async def _acked(ln: LinkClient, t: Target, sid: str, n: int, body: Any, what: str) -> None:
    """Sends message ``n`` of ``sid`` on ``ln`` and waits for its ack."""
    await ln.send(_msg(sid, n, body))
    await ln.wait_for(what, _acks(sid, n), t.timeout_s)


async def _new_session(ln: LinkClient, t: Target, body: Any, what: str) -> str:
    """Opens a session on ``ln``; its message 1 (``body``) acked."""
    sid = uuid.uuid4().hex
    await ln.send(_open(sid))
    await _acked(ln, t, sid, 1, body, what)
    return sid


async def _check_ack(t: Target, links: list[LinkClient]) -> str:
    sid = await _new_session(links[0], t, "hello from desk-check", "ack of message 1")
    await _acked(links[0], t, sid, 2, "second", "ack of message 2")
    return "messages 1 and 2 acked"


async def _check_duplicate(t: Target, links: list[LinkClient]) -> str:
    sid = await _new_session(links[0], t, "once", "ack of message 1")
    # a redelivery: the same sid and n
    await _acked(links[0], t, sid, 1, "once", "ack of the repeated message 1")
    return "a repeated message is acked again"


async def _check_large(t: Target, links: list[LinkClient]) -> str:
    await _new_session(links[0], t, "x" * BIG_BODY, "ack of a 64 KiB message")
    return "a 64 KiB message is acked"


async def _check_close(t: Target, links: list[LinkClient]) -> str:
    ln = links[0]
    sid = await _new_session(ln, t, "bye", "ack of message 1")
    await ln.send({"t": "close", "sid": sid, "reason": "ended"})
    # the link goes on: a new session on it is still served
    await _new_session(ln, t, "after a close", "ack after a close")
    return "close accepted, the link goes on"


async def _check_ping(t: Target, links: list[LinkClient]) -> str:
    if await links[0].ping():
        return "PING answered (the gateway's health check)"
    raise CheckFailed(f"no PING ACK within {t.timeout_s:g} s (the gateway drops such links)")


async def _check_moved(t: Target, links: list[LinkClient]) -> str:
    first, second = links
    if MOVED_MARK not in first.features:
        return "skipped: the downstream does not announce the 'moved' feature"
    sid = await _new_session(first, t, "before the move", "ack of message 1")
    await first.send({"t": "close", "sid": sid, "reason": "moved"})
    await second.send(_open(sid))
    await first.wait_for(
        "'moved' on the first link", lambda f: f["t"] == "moved" and f["sid"] == sid, t.timeout_s
    )
    await _acked(second, t, sid, 2, "after the move", "ack on the second link")
    return "a session opened on another link brings 'moved' on the first"


CHECKS: Final[list[tuple[str, Callable[[Target, list[LinkClient]], Any]]]] = [
    ("ack", _check_ack),
    ("duplicate", _check_duplicate),
    ("large-frame", _check_large),
    ("close", _check_close),
    ("ping", _check_ping),
    ("moved", _check_moved),
]


async def run_checks(t: Target, out: TextIO) -> int:
    """Runs :data:`CHECKS` against ``t``; one line each on ``out``."""
    links: list[LinkClient] = []
    try:
        try:
            for i in range(2):
                links.append(await LinkClient.open(t, i))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, CheckFailed) as e:
            why = "no answer to the link request" if isinstance(e, trio.TooSlowError) else e
            out.write(f"FAIL link: {why}\n")
            return 2
        feats = ", ".join(sorted(links[0].features)) or "none"
        out.write(f"ok   link: HTTP 200 on {LINK_PATH}, features: {feats}\n")
        failed = 0
        for name, check in CHECKS:
            try:
                detail = await check(t, links)
            except (CheckFailed, trio.BrokenResourceError, OSError) as e:
                failed += 1
                out.write(f"FAIL {name}: {e}\n")
                if isinstance(e, (trio.BrokenResourceError, OSError)) or "closed" in str(e):
                    break  # the link is gone: the other checks cannot run
                continue
            out.write(f"ok   {name}: {detail}\n")
        others = sum(ln.others for ln in links)
        out.write(f"{'all checks passed' if not failed else f'{failed} check(s) failed'}; "
                  f"{others} other frames (replies, assignments) seen\n")  # fmt: skip
        return 1 if failed else 0
    finally:
        for ln in links:
            await ln.aclose()
