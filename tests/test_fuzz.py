"""Random clients against a gateway worker. HTTP/2: streams opened,
written, reset and ended in any order, hellos and messages good and bad,
lengths that lie, pings, settings, window updates, GOAWAYs and raw frames of
every type. WebSocket: upgrades good and bad, frames of every opcode,
unmasked, fragmented, oversized, reserved bits, close codes, text that is
not UTF-8, hellos and messages good and bad. Sent in random pieces while
the gateway answers, many connections chatting among the mischief.
Whatever they do, the worker handles it as a client's doing (a code, a
close, a reset, a GOAWAY), never as a failure of its own (an ERROR log:
"connection failed"), and serves the next client. Seeded: a failure names
the seed that reproduces it.

Found this way: data on an HTTP/2 stream that the client reset in the
same read was answered on the closed stream (h2 raised inside the
worker). A third test plays a hostile downstream: it answers the
gateway's links with anything (acks, nacks, replies with odd fields,
unknown types, garbage, lengths beyond the limit, resets, GOAWAYs) while
visitors chat through it. And TLS clients, on both TLS paths (the
reactor's memory BIOs, a task per connection): random bytes, handshakes cut
short or corrupted, records followed by garbage, cut short, forged
alerts, lying lengths, writing after close_notify. And visitors that drop
and resume at random: replies exactly once, in order."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgpack
import pytest
import trio
import trustme

import gateway.server.worker as worker_mod
from gateway.loadtest import gwmetrics, rawws
from tests.gwserver import Closed, RawWs, running
from tests.test_downstream import ds
from tests.test_downstream_process import TwoDesks
from tests.test_server_h2 import H2Client

SC = h2.settings.SettingCodes


def _raw(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">L", len(payload))[1:] + struct.pack(">BBL", ftype, flags, sid) + payload


def _length_prefixed(frame: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(frame)
    return struct.pack(">I", len(body)) + body


def _frame_bytes(rng: random.Random, token: str) -> bytes:
    """A length-prefixed frame for a stream's body: mostly well formed,
    sometimes not, sometimes cut short or with a lying length."""
    kind = rng.random()
    body: bytes
    if kind < 0.35:
        body = msgpack.packb({"t": "hello", "v": 1, "token": token})
    elif kind < 0.7:
        body = msgpack.packb(
            {"t": "msg", "id": rng.randint(0, 5), "body": "x" * rng.randint(0, 50)}
        )
    elif kind < 0.8:
        frame: dict[str, Any] = {"t": rng.choice(["ack", "ping", "resume", "bye", "zzz"])}
        frame["n"] = rng.randint(-1, 5)
        body = msgpack.packb(frame)
    else:
        body = rng.randbytes(rng.randint(0, 20))
    length = len(body) if rng.random() < 0.9 else rng.randint(0, 1 << 31)
    data = struct.pack(">I", length) + body
    if rng.random() < 0.3:
        data = data[: rng.randint(0, len(data))]
    return data


def _step(rng: random.Random, c: h2.connection.H2Connection, sids: list[int], token: str) -> bytes:
    """One random client action; returns raw bytes to add to the output (h2's
    own output is taken by the caller)."""
    op = rng.random()
    if op < 0.2:
        sid = c.get_next_available_stream_id()
        path = rng.choice(["/v1/stream", "/v1/stream", "/elsewhere", "/v1/stream?x=1"])
        headers = [(":method", rng.choice(["POST", "POST", "GET"])), (":path", path),
                   (":scheme", "http"), (":authority", "x")]  # fmt: skip
        if rng.random() < 0.2:
            headers.append(
                ("origin", rng.choice(["https://elsewhere.example", "http://127.0.0.1"]))
            )
        c.send_headers(sid, headers, end_stream=rng.random() < 0.1)
        sids.append(sid)
    elif op < 0.45 and sids:
        c.send_data(rng.choice(sids), _frame_bytes(rng, token), end_stream=rng.random() < 0.1)
    elif op < 0.55 and sids:
        c.reset_stream(rng.choice(sids), rng.choice(list(h2.errors.ErrorCodes)))
    elif op < 0.6:
        c.ping(rng.randbytes(8))
    elif op < 0.65:
        key = rng.choice([SC.INITIAL_WINDOW_SIZE, SC.MAX_FRAME_SIZE, SC.HEADER_TABLE_SIZE])
        c.update_settings({key: rng.choice([0, 1, 16384, 65535, 1 << 20])})
    elif op < 0.7:
        c.increment_flow_control_window(
            rng.randint(1, 1 << 20), stream_id=rng.choice([*sids, None])
        )
    elif op < 0.73:
        c.close_connection(rng.choice([0, 1, 2]))
    elif op < 0.85:  # a raw frame of any type, on any stream, with any flags
        ftype = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x77])
        sid = rng.choice([*sids, 0, 1, 3, 999])
        return _raw(ftype, rng.randrange(256), sid, rng.randbytes(rng.choice([0, 1, 4, 5, 8, 13])))
    return b""


async def _client(port: int, rng: random.Random, token: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    cfg = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    c = h2.connection.H2Connection(cfg)
    c.initiate_connection()
    sids: list[int] = []
    chatty = rng.random() < 0.6  # a session that chats among the mischief
    if chatty:
        sids.append(c.get_next_available_stream_id())
        c.send_headers(sids[0], [(":method", "POST"), (":path", "/v1/stream"),
                                 (":scheme", "http"), (":authority", "x")])  # fmt: skip
        c.send_data(sids[0], _length_prefixed({"t": "hello", "v": 1, "token": token}))
    out = bytearray(c.data_to_send())
    try:
        for i in range(rng.randint(1, 40)):
            # the client's own h2 may refuse a step (a stream it closed): go on
            with contextlib.suppress(h2.exceptions.ProtocolError, ValueError, KeyError):
                if chatty and rng.random() < 0.7:
                    msg = (
                        {"t": "msg", "id": i, "body": "hi"}
                        if rng.random() < 0.8
                        else {"t": "ack", "seq": i}
                    )
                    c.send_data(sids[0], _length_prefixed(msg))
                else:
                    out += _step(rng, c, sids, token)
            out += c.data_to_send()
            if out and rng.random() < 0.3:
                await stream.send_all(bytes(out))
                out.clear()
                with trio.move_on_after(0.002):
                    data = await stream.receive_some(65536)
                    if data:
                        with contextlib.suppress(h2.exceptions.ProtocolError):
                            c.receive_data(data)
        if out:
            await stream.send_all(bytes(out))
        with trio.move_on_after(0.01):
            await stream.receive_some(65536)
    except trio.BrokenResourceError:
        pass  # the gateway closed the connection: a fine answer
    finally:
        await stream.aclose()


async def _throw(
    gw: Any, client: Callable[[int, random.Random, str], Awaitable[None]], n: int, seed: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """``n`` random clients one after another, until their connections are
    gone; then: no failure of the worker's own was logged."""
    rng = random.Random(seed)
    caplog.set_level(logging.WARNING)
    for i in range(n):
        await client(gw.port, rng, gw.token(f"fuzz{i % 7}"))
    with trio.fail_after(10):
        while gw.w.conns:
            await trio.sleep(0.02)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, f"seed {seed}: {failures[0].getMessage()}\n{failures[0].exc_text}"
    assert gw.stats.get("internal_errors", 0) == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_http2_clients_never_fail_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    async with running(tmp_path) as gw:
        await _throw(gw, _client, 150, seed, caplog)
        assert gw.stats["h2_connections"] == 150
        # the clients did reach the sessions (not only h2's own checks)
        assert gw.stats["h2_streams"] > 20
        assert gw.stats["messages_acked"] > 100
        # and the next, ordinary client is served
        cl = await H2Client.connect(gw.port)
        sid = await cl.open()
        await cl.send(sid, {"t": "hello", "v": 1, "token": gw.token("after")})
        assert (await cl.recv(sid))["t"] == "welcome"
        await cl.stream.aclose()


def _ws_frame(rng: random.Random, payload: bytes, opcode: int, fin: bool = True) -> bytes:
    """A client frame; now and then with reserved bits set or unmasked."""
    b0 = (0x80 if fin else 0) | opcode
    if rng.random() < 0.05:
        b0 |= rng.choice([0x40, 0x70])
    mask = rng.random() < 0.97
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack(">BB", b0, bit | n)
    elif n < 65536:
        head = struct.pack(">BBH", b0, bit | 126, n)
    else:
        head = struct.pack(">BBQ", b0, bit | 127, n)
    if not mask:
        return head + payload
    key = rng.randbytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _ws_message(rng: random.Random, token: str) -> tuple[bytes, int]:
    """A message payload and its opcode (1 text/JSON, 2 binary/msgpack)."""
    k = rng.random()
    frame: dict[str, Any]
    if k < 0.3:
        frame = {"t": "hello", "v": rng.choice([1, 1, 2, "1"]), "token": token}
    elif k < 0.6:
        body = rng.choice(["x" * rng.randint(0, 40), b"\x00\xff", {"a": 1}, None])
        frame = {"t": "msg", "id": rng.choice([0, 1, 2, -1, "a", 2**70, None]), "body": body}
    elif k < 0.75:
        kind = rng.choice(["ack", "ping", "resume", "bye", "zzz", None])
        frame = {"t": kind, "n": rng.choice([0, 5, -3, "x", 2**64]), "seq": rng.choice([0, 10, -1])}
    else:
        return rng.randbytes(rng.randint(0, 30)), rng.choice([1, 2])
    if rng.random() < 0.4:
        with contextlib.suppress(TypeError):
            return json.dumps(frame).encode(), 1
    try:
        return msgpack.packb(frame), 2
    except (TypeError, ValueError, OverflowError):
        return b"\xc1", 2


async def _ws_client(port: int, rng: random.Random, token: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = bytearray()
    if rng.random() < 0.1:  # not a proper upgrade
        out += rng.choice([
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"GET /v1/ws HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n",
            rng.randbytes(50),
        ])  # fmt: skip
    else:
        origin = rng.choice([None, None, "https://elsewhere.example"])
        out += rawws.upgrade_request(f"127.0.0.1:{port}", "/v1/ws", origin)
    chatty = rng.random() < 0.6
    if chatty:
        out += _ws_frame(rng, msgpack.packb({"t": "hello", "v": 1, "token": token}), 2)
    try:
        for i in range(rng.randint(1, 30)):
            op = rng.random()
            if chatty and rng.random() < 0.7:
                msg = {"t": "msg", "id": i, "body": "hi"} if op < 0.8 else {"t": "ack", "seq": i}
                out += _ws_frame(rng, msgpack.packb(msg), 2)
            elif op < 0.55:
                payload, opcode = _ws_message(rng, token)
                if rng.random() < 0.15:  # in two fragments
                    cut = rng.randint(0, len(payload))
                    out += _ws_frame(rng, payload[:cut], opcode, fin=False)
                    out += _ws_frame(rng, payload[cut:], 0)
                else:
                    out += _ws_frame(rng, payload, opcode)
            elif op < 0.65:  # control frames, some too long
                out += _ws_frame(
                    rng, rng.randbytes(rng.choice([0, 4, 125, 126])), rng.choice([8, 9, 10])
                )
            elif op < 0.7:  # close codes, valid and not
                code = rng.choice([1000, 1001, 1005, 3000, 4000, 999, 5000])
                out += _ws_frame(rng, struct.pack(">H", code) + rng.randbytes(rng.randint(0, 3)), 8)
            elif op < 0.75:  # reserved opcodes, continuations of nothing
                opcode = rng.choice([3, 4, 5, 11, 15, 0])
                out += _ws_frame(
                    rng, rng.randbytes(rng.randint(0, 10)), opcode, fin=rng.random() < 0.5
                )
            elif op < 0.8:
                out += rng.randbytes(rng.randint(1, 10))
            elif op < 0.83:  # a length far beyond any limit
                out += struct.pack(">BBQ", 0x82, 0xFF, rng.choice([2**63, 2**40, 70000]))
            if out and rng.random() < 0.4:
                cut = rng.randint(1, len(out)) if rng.random() < 0.3 else len(out)
                await stream.send_all(bytes(out[:cut]))
                del out[:cut]
                with trio.move_on_after(0.002):
                    if not await stream.receive_some(65536):
                        return
        if out:
            await stream.send_all(bytes(out))
        with trio.move_on_after(0.01):
            await stream.receive_some(65536)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_websocket_clients_never_fail_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    async with running(tmp_path) as gw:
        await _throw(gw, _ws_client, 200, seed, caplog)
        assert gw.stats["ws_upgrades"] > 150
        assert gw.stats["messages_acked"] > 100
        ws = await RawWs.connect(gw.port)
        assert (await ws.hello(gw.token("after")))["t"] == "welcome"
        await ws.aclose()


def _desk_answers(rng: random.Random, got: list[Any]) -> list[bytes]:
    """A hostile downstream's answers (length-prefixed frames) to what a
    link brought: mostly acks, also nacks, replies, assignments, handovers
    and `moved` with odd fields, frames for unknown sessions, unknown
    types, malformed maps, garbage and lengths beyond the link's limit."""
    frames: list[Any] = []
    sids = [f["sid"] for f in got if isinstance(f, dict) and isinstance(f.get("sid"), str)]
    sids = sids or ["nosuch"]
    for f in got:
        if not (isinstance(f, dict) and f.get("t") == "msg"):
            continue
        r = rng.random()
        if r < 0.8:
            frames.append({"t": "ack", "sid": f["sid"], "n": f["n"]})
        elif r < 0.93:
            frames.append({"t": "acks", "sids": {f["sid"]: [f["n"], f["n"], f["n"] + 100]}})
        elif r < 0.96:
            frames.append({"t": "nack", "sid": f["sid"], "n": f["n"], "code": rng.choice([1, "x"])})
    for _ in range(rng.randint(0, 3)):
        sid = rng.choice(sids)
        k = rng.random()
        if k < 0.2:
            body = rng.choice(["hi", b"\x00", "x" * 3000, 5, None, {"a": 1}])
            sender = rng.choice([{"kind": "agent", "name": "a"}, {"kind": 1}, None, "x", {}])
            frames.append({"t": "deliver", "sid": sid, "body": body, "from": sender})
        elif k < 0.3:
            agent = rng.choice(["a1", 5, None, "x" * 500])
            frames.append(
                {
                    "t": "assign",
                    "sid": sid,
                    "agent": agent,
                    "group": rng.choice(["general", "nope", 3]),
                }
            )
        elif k < 0.38:
            frames.append(
                {"t": "handover", "sid": sid, "group": rng.choice(["general", "nope", None, 7])}
            )
        elif k < 0.44:
            frames.append({"t": "moved", "sid": sid})
        elif k < 0.5:
            kind = rng.choice(["ack", "zzz", None, 5])
            frames.append(
                {"t": kind, "sid": rng.choice([sid, 5, None]), "n": rng.choice([1, "x", 2**70])}
            )
        elif k < 0.54:
            odd = rng.choice([{}, {sid: []}, {sid: "x"}, [1], {5: [1]}, {sid: list(range(300))}])
            frames.append({"t": "acks", "sids": odd})
        elif k < 0.58:
            frames.append(rng.randbytes(rng.randint(0, 12)))
        elif k < 0.6:
            frames.append(None)  # a declared length beyond 96 KiB
    out = []
    for f in frames:
        if f is None:
            out.append(struct.pack(">I", rng.choice([200_000, 2**31])))
        elif isinstance(f, bytes):
            out.append(struct.pack(">I", len(f)) + f)
        else:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                out.append(_length_prefixed(f))
    return out


async def _hostile_desk(rng: random.Random, stream: trio.SocketStream) -> None:
    """Serves one link: answers its request (now and then with an error
    status), acks and misbehaves (see :func:`_desk_answers`), and now and
    then resets the link, ends it, sends GOAWAY or a raw frame."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    link = 0
    buf = b""
    try:
        await stream.send_all(c.data_to_send())
        while data := await stream.receive_some(65536):
            try:
                events = c.receive_data(data)
            except h2.exceptions.ProtocolError:
                await stream.send_all(c.data_to_send())
                return
            got: list[Any] = []
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    link = ev.stream_id
                    status = "200" if rng.random() < 0.95 else rng.choice(["500", "404"])
                    headers = [(":status", status), ("x-downstream-features", "moved")]
                    c.send_headers(link, headers, end_stream=status != "200")
                elif isinstance(ev, h2.events.DataReceived):
                    c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    buf += ev.data
                    while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                        n = int.from_bytes(buf[:4], "big")
                        got.append(msgpack.unpackb(buf[4 : 4 + n]))
                        buf = buf[4 + n :]
            if link and got:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    for part in _desk_answers(rng, got):
                        c.send_data(link, part)
                    r = rng.random()
                    if r < 0.01:
                        c.reset_stream(link, h2.errors.ErrorCodes.CANCEL)
                    elif r < 0.02:
                        c.close_connection()
                    elif r < 0.03:
                        c.end_stream(link)
                    elif r < 0.05:
                        c.ping(rng.randbytes(8))
            out = c.data_to_send()
            if rng.random() < 0.01:
                out += _raw(
                    rng.choice([0, 1, 3, 8, 9, 0x55]),
                    rng.randrange(256),
                    rng.choice([0, 1, link, 77]),
                    rng.randbytes(5),
                )
            if out:
                await stream.send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def test_a_hostile_downstream_never_fails_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A desk that answers links with anything (see _desk_answers) while
    visitors chat: links end and come back, messages are redelivered, the
    visitors are served on; none of it is a failure of the worker's own.
    The breaker is made lenient so that the links keep being used."""
    rng = random.Random(7)
    caplog.set_level(logging.WARNING)
    table = ds(
        ("general", []),
        breaker={"consecutive_failures": 100_000, "failure_rate": 1.0, "min_requests": 100_000,
                 "open_s": 0.1, "max_open_s": 0.2},
        outlier={"consecutive_errors": 100_000},
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, partial(_hostile_desk, rng), 0)
        port = listeners[0].socket.getsockname()[1]
        table["clusters"]["general"]["endpoints"] = [f"127.0.0.1:{port}"]
        async with running(tmp_path, session_ttl_s=1, downstream=table) as gw:
            for i in range(60):
                with trio.move_on_after(3):
                    while not any(ln.up for ln in gw.w.forwarder.links):
                        await trio.sleep(0.02)
                with contextlib.suppress(trio.BrokenResourceError, Closed), trio.move_on_after(2):
                    ws = await RawWs.connect(gw.port)
                    await ws.hello(gw.token(f"v{i % 9}"))
                    for k in range(rng.randint(1, 15)):
                        await ws.send({"t": "msg", "id": k, "body": f"m{k}"})
                    with trio.move_on_after(0.05):
                        while True:
                            await ws.recv()
                    await ws.aclose()
            failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not failures, f"{failures[0].getMessage()}\n{failures[0].exc_text}"
            assert gw.stats["sessions_opened"] > 20
            assert gw.stats["messages_acked"] > 10  # through a desk that acks ~80%
            assert gw.stats.get("internal_errors", 0) == 0
        nursery.cancel_scope.cancel()


def _masked(payload: bytes) -> bytes:
    """A well-formed client WebSocket binary frame."""
    key = b"\x01\x02\x03\x04"
    n = len(payload)
    head = struct.pack(">BB", 0x82, 0x80 | n) if n < 126 else struct.pack(">BBH", 0x82, 0xFE, n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _mangle_tls(
    rng: random.Random, records: bytes, client: ssl.SSLObject, out: ssl.MemoryBIO
) -> bytes:
    """A client's TLS records as sent: mostly as they are, sometimes with
    garbage after them, cut short, followed by a forged alert, a
    close_notify (the client goes on writing) or a record with a lying
    length."""
    r = rng.random()
    if r < 0.05:
        return records + rng.randbytes(rng.randint(1, 30))
    if r < 0.08:
        return records[: rng.randint(1, len(records))]
    if r < 0.1:
        return records + bytes([21, 3, 3, 0, 2, rng.choice([1, 2]), rng.randrange(256)])
    if r < 0.12:
        with contextlib.suppress(ssl.SSLError):
            client.unwrap()
        return records + out.read()
    if r < 0.14:
        length = struct.pack(">H", rng.choice([0, 1, 16385, 65535]))
        return records + bytes([23, 3, 3]) + length + rng.randbytes(10)
    return records


async def _tls_client(port: int, rng: random.Random, token: str, *, ctx: ssl.SSLContext) -> None:
    """Random bytes instead of TLS, a handshake cut short or corrupted, or a
    full handshake and a chat whose records are mangled now and then."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        if rng.random() < 0.1:
            await stream.send_all(rng.randbytes(rng.randint(1, 600)))
            return
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = ctx.wrap_bio(inc, out, server_hostname="localhost")
        for _ in range(20):
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
                break
            data = out.read()
            if rng.random() < 0.1:  # the handshake cut short or corrupted
                if rng.random() < 0.5:
                    data = data[: rng.randint(0, len(data))]
                else:
                    data = bytes(b ^ 0xFF if rng.random() < 0.01 else b for b in data)
                await stream.send_all(data)
                return
            await stream.send_all(data)
            with trio.move_on_after(0.5):
                got = await stream.receive_some(65536)
                if not got:
                    return
                inc.write(got)
        else:
            return
        await stream.send_all(out.read())  # the handshake's last flight
        chat = [rawws.upgrade_request(f"127.0.0.1:{port}", "/v1/ws")]
        chat.append(_masked(msgpack.packb({"t": "hello", "v": 1, "token": token})))
        chat += [_masked(msgpack.packb({"t": "msg", "id": k, "body": "x"})) for k in range(10)]
        for part in chat[: rng.randint(1, len(chat))]:
            try:
                client.write(part)
            except ssl.SSLError:
                break  # after its own close_notify
            await stream.send_all(_mangle_tls(rng, out.read(), client, out))
            with trio.move_on_after(0.003):
                if not await stream.receive_some(65536):
                    return
        with trio.move_on_after(0.02):
            await stream.receive_some(65536)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


@pytest.mark.parametrize("tls_reactor", [True, False], ids=["reactor", "task"])
async def test_random_tls_clients_never_fail_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls_reactor: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Both TLS paths: the reactor's memory BIOs and a task per connection."""
    monkeypatch.setattr(worker_mod, "TLS_REACTOR", tls_reactor)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    tls = {"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")}
    async with running(tmp_path, **tls) as gw:
        await _throw(gw, partial(_tls_client, ctx=ctx), 150, 5, caplog)
        assert gw.stats["tls_full"] > 100
        assert gw.stats["tls_handshake_failures"] > 5
        assert gw.stats["messages_acked"] > 100


class _Visitor:
    """What one visitor has seen: its session, the highest `seq`, every
    `seq` delivered, the messages sent and not yet acknowledged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sid: str | None = None
        self.last = 0
        self.seen: list[int] = []
        self.unacked: dict[int, str] = {}
        self.sent = 0
        self.problems: list[tuple[Any, ...]] = []
        self.left_open: list[RawWs] = []

    def took(self, frame: dict[str, Any]) -> None:
        if frame["t"] == "ack":
            self.unacked.pop(frame["id"], None)
        elif frame["t"] == "deliver":
            if frame["seq"] != self.last + 1:
                self.problems.append(("seq after", self.last, frame["seq"]))
            self.last = max(self.last, frame["seq"])
            self.seen.append(frame["seq"])


async def _attach(port: int, v: _Visitor, token: str) -> RawWs | None:
    """Connects, says hello (resuming once there is a session) and resends
    every message not acknowledged yet."""
    ws = await RawWs.connect(port)
    extra: dict[str, Any] = {"resume": {"sid": v.sid, "last": v.last}} if v.sid else {}
    welcome = await ws.hello(token, **extra)
    if welcome["t"] != "welcome" or (v.sid and not welcome["resumed"]) or welcome["resync"]:
        v.problems.append(("hello", welcome))
        await ws.aclose()
        return None
    v.sid = welcome["sid"]
    for mid, body in list(v.unacked.items()):
        await ws.send({"t": "msg", "id": mid, "body": body})
    return ws


async def _drop_and_resume(port: int, v: _Visitor, rng: random.Random, token: str) -> None:
    for _ in range(8):
        ws = await _attach(port, v, token)
        if ws is None:
            return
        for _ in range(rng.randint(0, 12)):
            v.unacked[v.sent] = f"{v.name}-{v.sent}"
            await ws.send({"t": "msg", "id": v.sent, "body": v.unacked[v.sent]})
            v.sent += 1
        try:
            for _ in range(rng.randint(0, 30)):  # then drop, wherever it is
                with trio.move_on_after(0.05) as wait:
                    frame = await ws.recv()
                if wait.cancelled_caught:
                    break
                v.took(frame)
                if frame["t"] == "deliver" and rng.random() < 0.3:
                    await ws.send({"t": "ack", "seq": v.last})
        except Closed as c:
            if c.code != 4005:  # taken over by our own next connection: expected
                v.problems.append(("closed", c.code))
        if rng.random() < 0.5:
            await ws.aclose()  # gone without a close frame
        else:
            v.left_open.append(ws)  # still attached: the next hello takes over
    ws = await _attach(port, v, token)  # the last resume: read everything
    if ws is None:
        return
    while True:
        with trio.move_on_after(0.3) as wait:
            frame = await ws.recv()
        if wait.cancelled_caught:
            break
        v.took(frame)
    await ws.aclose()
    for old in v.left_open:
        await old.aclose()


async def _visitors_drop_and_resume(
    port: int, token: Callable[[str], str], n: int, rng: random.Random
) -> list[_Visitor]:
    """``n`` visitors at once, each dropping and resuming (see
    :func:`_drop_and_resume`); each one must have seen every message
    acknowledged and its deliveries in `seq` order, with no gap."""
    visitors = [_Visitor(f"x{i}") for i in range(n)]
    async with trio.open_nursery() as nursery:
        for v in visitors:
            sub = random.Random(rng.random())
            nursery.start_soon(_drop_and_resume, port, v, sub, token(v.name))
    for v in visitors:
        assert not v.problems, (v.name, v.problems[:5])
        assert not v.unacked, (v.name, sorted(v.unacked))
        assert v.seen == list(range(1, len(v.seen) + 1)), v.name
    return visitors


async def test_random_drops_and_resumes_deliver_exactly_once_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Visitors that drop their connection at random points (without a
    close frame, or leaving it open so that the next hello takes the session
    over), resume and resend what was not acknowledged: every message is
    acknowledged, every reply arrives once, in `seq` order, with no gap and
    no resync; nothing fails in the worker."""
    rng = random.Random(11)
    caplog.set_level(logging.WARNING)
    async with running(tmp_path) as gw:
        visitors = await _visitors_drop_and_resume(gw.port, gw.token, 20, rng)
        for v in visitors:  # the bot's greeting, then one reply per message
            assert v.seen == list(range(1, v.sent + 2)), v.name
        assert gw.stats["sessions_resumed"] == 20 * 8
        assert gw.stats["sessions_taken_over"] > 20
        assert gw.stats["duplicates_dropped"] > 100  # resends acknowledged again
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not failures, failures[0].getMessage()


async def test_random_drops_and_resumes_across_workers_and_desks(tmp_path: Path) -> None:
    """The same visitors against `gateway serve --workers 2` forwarding to
    two `gateway desk-sim` processes: a resume may reach the other worker
    (the connection or the session moves to the holder), and every message
    is acknowledged, every delivery (the desks' assignments) arrives once in
    `seq` order, and neither process logs a failure of its own."""
    run = TwoDesks(tmp_path, [], ops=True)
    try:
        await run.ready()
        with trio.fail_after(15):  # both workers' links up: new sessions admitted
            while True:
                ws = await RawWs.connect(run.port)
                welcome = await ws.hello(run.token("probe"))
                await ws.aclose()
                if welcome["t"] == "welcome":
                    break
                await trio.sleep(0.2)
        visitors = await _visitors_drop_and_resume(run.port, run.token, 16, random.Random(12))
        assert sum(v.sent for v in visitors) > 200
        url = f"http://127.0.0.1:{run.ops_port}/metrics"
        with trio.fail_after(10):  # the workers report to the supervisor once a second
            while True:
                m = await trio.to_thread.run_sync(gwmetrics.fetch, url)
                if m.get(("gateway_sessions_resumed_total", ()), 0) >= 16 * 8:
                    break
                await trio.sleep(0.3)
        moved = {e: m.get(("gateway_events_total", (("event", e),)), 0.0)
                 for e in ("handoffs_in", "migrations_requested")}  # fmt: skip
        assert sum(moved.values()) > 10, moved  # resumes reached the other worker
    finally:
        run.stop()
    for log in ("gw.log", "desk-a.log", "desk-b.log"):
        text = (tmp_path / log).read_text(errors="replace")
        assert "Traceback" not in text and '"level":"error"' not in text, text[-2000:]
