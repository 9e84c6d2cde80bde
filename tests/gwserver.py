"""Test helpers: an in-process gateway worker on a loopback port and a raw
trio WebSocket client that can send anything (including invalid frames)."""

from __future__ import annotations

import json
import ssl
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

from gateway.config import DEMO_TENANT, load_config
from gateway.loadtest import rawws
from gateway.protocol.tokens import mint
from gateway.server.worker import Worker


class Running:
    def __init__(self, worker: Worker, port: int) -> None:
        self.w = worker
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1/ws"

    def token(self, visitor: str = "v1", ttl: int = 3600, tenant: str = DEMO_TENANT) -> str:
        t = self.w.cfg.tenants[tenant]
        kid = t.primary_kid
        return mint(tenant, visitor, t.secrets[kid], ttl, time.time(), kid=kid)

    @property
    def stats(self) -> Any:
        return self.w.hub.stats


@asynccontextmanager
async def running(state_dir: Path, **overrides: Any) -> AsyncIterator[Running]:
    base: dict[str, Any] = {
        "listen_port": 0,
        "workers": 1,
        "bot_think_ms": 0,
        "ops_listen": "",
        "log_level": "warning",
    }
    base.update(overrides)
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state_dir)}, base)
    w = Worker(cfg, 0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(w.run, False))
        yield Running(w, port)
        nursery.cancel_scope.cancel()


async def exchange(
    port: int, data: bytes, *, reset_is_end: bool = False, timeout: float = 5.0
) -> bytes:
    """Sends ``data`` on a new TCP connection to ``port`` and returns what
    came back until the server closed it (with ``reset_is_end``, a reset
    counts as the close; else it raises)."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    try:
        await s.send_all(data)
        with trio.fail_after(timeout):
            while True:
                try:
                    d = await s.receive_some(65536)
                except trio.BrokenResourceError:
                    if not reset_is_end:
                        raise
                    break
                if not d:
                    break
                got += d
    finally:
        await s.aclose()
    return got


class RawWs:
    """A WebSocket client over a trio stream with full control of the bytes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = rawws.FrameReader(max_size=1 << 24)
        self.frames: list[tuple[int, bytes]] = []
        self.buf = bytearray()

    @classmethod
    async def connect(
        cls,
        port: int,
        origin: str | None = None,
        path: str = "/v1/ws",
        ssl_context: ssl.SSLContext | None = None,
    ) -> RawWs:
        """A WebSocket connection (over TLS for ``localhost`` with
        ``ssl_context``)."""
        s: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if ssl_context is not None:
            s = trio.SSLStream(s, ssl_context, server_hostname="localhost")
            await s.do_handshake()
        c = cls(s)
        await s.send_all(rawws.upgrade_request(f"127.0.0.1:{port}", path, origin))
        while True:
            data = await s.receive_some(65536)
            if not data:
                raise ConnectionError("closed during upgrade")
            c.buf += data
            n = rawws.parse_upgrade(c.buf)
            if n:
                rest = bytes(c.buf[n:])
                if rest:
                    c.frames += c.reader.feed(rest)
                return c

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, frame: dict[str, Any], text: bool = False) -> None:
        if text:
            await self.send_raw(rawws.frame(json.dumps(frame).encode(), rawws.OP_TEXT))
        else:
            await self.send_raw(rawws.frame(msgpack.packb(frame)))

    async def next_raw(self, timeout: float = 5.0) -> tuple[int, bytes]:
        with trio.fail_after(timeout):
            while not self.frames:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    raise EOFError("connection closed")
                self.frames += self.reader.feed(data)
        return self.frames.pop(0)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next data frame, decoded (control frames are skipped, pings
        answered); raises ``Closed`` with the code on a close frame."""
        while True:
            op, payload = await self.next_raw(timeout)
            if op == rawws.OP_PING:
                await self.send_raw(rawws.frame(payload, rawws.OP_PONG))
                continue
            if op == rawws.OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise Closed(code, payload[2:].decode("utf-8", "replace"))
            if op == rawws.OP_TEXT:
                return json.loads(payload)  # type: ignore[no-any-return]
            if op == rawws.OP_BINARY:
                return msgpack.unpackb(payload)  # type: ignore[no-any-return]

    async def until_close(self, timeout: float = 5.0) -> tuple[int, list[dict[str, Any]]]:
        """Frames until the close frame; returns (close code, frames seen)."""
        seen: list[dict[str, Any]] = []
        while True:
            try:
                seen.append(await self.recv(timeout))
            except Closed as c:
                return c.code, seen

    async def hello(self, token: str, text: bool = False, **extra: Any) -> dict[str, Any]:
        await self.send({"t": "hello", "v": 1, "token": token, **extra}, text=text)
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
