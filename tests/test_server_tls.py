"""Visitors' TLS connections (wss://, HTTP/2 over TLS) read by the worker's
reactor: the TLS runs over memory buffers (``TlsRawPipe``), with no task
per connection. ``GATEWAY_TLS_REACTOR=0`` keeps the task-per-connection
path over ``trio.SSLStream``; the tests that hold for both run both."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

import gateway.server.worker as worker_mod
from gateway.loadtest import rawws
from gateway.server.pipe import TlsRawPipe
from tests.gwserver import Closed, RawWs, exchange, running
from tests.test_server_h2 import H2Client, _tls


@pytest.fixture(params=[True, False], ids=["reactor", "task"])
def tls_reactor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(worker_mod, "TLS_REACTOR", request.param)
    yield request.param


async def test_wss_carries_large_messages_both_ways(tmp_path: Path, tls_reactor: bool) -> None:
    """A 60,000-byte message each way (several TLS records, split over
    reads) and a burst of small ones, in order."""
    cert, key, ctx = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key) as gw:
        ws = await RawWs.connect(gw.port, ssl_context=ctx)
        assert (await ws.hello(gw.token("big")))["t"] == "welcome"
        body = "".join(chr(0x41 + i % 26) for i in range(60000))
        await ws.send({"t": "msg", "id": 1, "body": body})
        for i in range(2, 40):
            await ws.send({"t": "msg", "id": i, "body": f"m{i}"})
        acks, replies = [], []
        while len(acks) < 39 or len(replies) < 39:
            f = await ws.recv()
            if f["t"] == "ack":
                acks.append(f["id"])
            elif f["t"] == "deliver" and f["body"].startswith("You said"):
                replies.append(f["body"])  # (not the bot's greeting)
        assert acks == list(range(1, 40))
        assert replies[0] == f"You said: {body}"
        assert replies[1:] == [f"You said: m{i}" for i in range(2, 40)]
        assert all(type(p) is TlsRawPipe for p in _pipes(gw)) == tls_reactor


def _pipes(gw: object) -> list[object]:
    return [c.pipe for c in gw.w.conns]  # type: ignore[attr-defined]


async def test_tls_connections_have_no_task_of_their_own(tmp_path: Path, tls_reactor: bool) -> None:
    cert, key, ctx = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key) as gw:
        nursery = gw.w.nursery
        assert nursery is not None
        before = len(nursery.child_tasks)
        conns = []
        for i in range(12):
            ws = await RawWs.connect(gw.port, ssl_context=ctx)
            assert (await ws.hello(gw.token(f"t{i}")))["t"] == "welcome"
            conns.append(ws)
        ctx.set_alpn_protocols(["h2"])
        h2 = await H2Client.connect(gw.port, ctx)
        st = await h2.open()
        await h2.send(st, {"t": "hello", "v": 1, "token": gw.token("h2")})
        assert (await h2.recv(st))["t"] == "welcome"
        await trio.sleep(0.1)  # any writer task done
        grew = len(nursery.child_tasks) - before
        if tls_reactor:
            assert grew == 0
        else:
            assert grew >= 13


async def test_a_failed_handshake_is_counted_and_the_worker_goes_on(tmp_path: Path) -> None:
    """A client that does not trust the certificate, and one that speaks
    plain HTTP to the TLS port: both handshakes fail (counted, the
    connections closed), and the next good client is served."""
    cert, key, ctx = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key) as gw:
        stats = gw.w.hub.stats
        distrust = ssl.create_default_context()  # the system CAs only
        tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
        with pytest.raises(trio.BrokenResourceError):
            await trio.SSLStream(tcp, distrust, server_hostname="localhost").do_handshake()
        await tcp.aclose()
        got = await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not got.startswith(b"HTTP")  # no HTTP answer: the TLS handshake failed
        with trio.fail_after(5):
            while stats["tls_handshake_failures"] < 2:
                await trio.sleep(0.01)
        ws = await RawWs.connect(gw.port, ssl_context=ctx)
        assert (await ws.hello(gw.token("ok")))["t"] == "welcome"


async def test_a_silent_tls_client_is_dropped_at_the_handshake_timeout(tmp_path: Path) -> None:
    cert, key, _ = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key, handshake_timeout_s=0.3) as gw:
        with socket.create_connection(("127.0.0.1", gw.port)) as raw:
            raw.settimeout(5)
            raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            assert await trio.to_thread.run_sync(raw.recv, 100) == b""
        assert gw.w.hub.stats["handshake_timeouts"] == 1
        assert len(gw.w.conns) == 0


async def test_the_gateway_ends_its_tls_sessions_cleanly(tmp_path: Path) -> None:
    """The gateway closing a wss connection sends close_notify: the client
    sees the end of the TLS session, not a truncated stream."""
    cert, key, ctx = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key) as gw:
        ws = await RawWs.connect(gw.port, ssl_context=ctx)
        assert (await ws.hello(gw.token("bye")))["t"] == "welcome"
        await ws.send_raw(rawws.frame(b"\x03\xe8", rawws.OP_CLOSE))  # 1000
        with pytest.raises(Closed):
            while True:
                await ws.recv()
        with trio.fail_after(5):
            assert await ws.stream.receive_some(100) == b""  # raises on a truncation


async def test_a_refused_tls_connection_is_closed_before_the_handshake(tmp_path: Path) -> None:
    """Over the handshake rate, a TLS client is not sent a plain HTTP 429
    it could not read: the connection is closed (counted as on plain TCP)."""
    cert, key, ctx = _tls(tmp_path)
    async with running(
        tmp_path, tls_cert=cert, tls_key=key, handshake_rate=0.5, handshake_burst=1
    ) as gw:
        ws = await RawWs.connect(gw.port, ssl_context=ctx)
        assert (await ws.hello(gw.token("first")))["t"] == "welcome"
        with socket.create_connection(("127.0.0.1", gw.port)) as raw:
            raw.settimeout(5)
            assert await trio.to_thread.run_sync(raw.recv, 100) == b""  # no HTTP bytes
        assert gw.w.hub.stats["connections_rejected_handshake_rate"] == 1


async def test_tls_bytes_in_tiny_pieces(tmp_path: Path) -> None:
    """A client whose every TLS byte (handshake and records) arrives in
    pieces of 1-7 bytes: the handshake steps over reads and records split
    anywhere are opened once whole."""
    cert, key, ctx = _tls(tmp_path)
    async with running(tmp_path, tls_cert=cert, tls_key=key) as gw:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        cl = ctx.wrap_bio(inc, out, server_hostname="localhost")
        s = await trio.open_tcp_stream("127.0.0.1", gw.port)
        sizes = iter([1, 2, 3, 5, 7] * 100000)

        async def dribble() -> None:
            data = out.read()
            while data:
                k = next(sizes)
                await s.send_all(data[:k])
                data = data[k:]
                await trio.sleep(0)

        async def pump_in() -> None:
            inc.write(await s.receive_some(65536))

        with trio.fail_after(10):
            while True:
                try:
                    cl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await dribble()
                    await pump_in()
            await dribble()
            reader = rawws.FrameReader(max_size=1 << 20)
            cl.write(rawws.upgrade_request(f"127.0.0.1:{gw.port}", "/v1/ws", None))
            await dribble()
            head = b""
            while b"\r\n\r\n" not in head:
                try:
                    head += cl.read(65536)
                except ssl.SSLWantReadError:
                    await pump_in()
            assert head.startswith(b"HTTP/1.1 101")
            hello = {"t": "hello", "v": 1, "token": gw.token("tiny")}
            cl.write(rawws.frame(msgpack.packb(hello)))
            cl.write(rawws.frame(msgpack.packb({"t": "msg", "id": 1, "body": "x" * 3000})))
            await dribble()
            seen: list[str] = []
            rest = head.split(b"\r\n\r\n", 1)[1]
            frames = reader.feed(rest) if rest else []
            while True:
                for _, payload in frames:
                    seen.append(msgpack.unpackb(payload)["t"])
                if "ack" in seen:
                    break
                try:
                    frames = reader.feed(cl.read(65536))
                except ssl.SSLWantReadError:
                    frames = []
                    await pump_in()
            assert seen[0] == "welcome" and "ack" in seen, seen
        await s.aclose()
