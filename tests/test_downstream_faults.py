"""Downstreams that misbehave, scripted with h2 on loopback.

A downstream that breaks the link protocol or HTTP/2: the link is dropped
with a logged reason, the worker goes on, and the message it held is
redelivered to a good endpoint and acknowledged once. Each such server takes
one connection, misbehaves when the first visitor message arrives (or at
once), and stops listening; the good desk (desk-sim) starts on the
cluster's second endpoint only after that, so the message is known to have
gone to the bad one first.

A downstream that stops giving its flow-control window back: the gateway
keeps within the window and its own queue bound, holds the visitors back,
and loses nothing when the window opens again."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import msgpack
import pytest
import trio

import gateway.client as gc
from gateway.downstream.proto import LINK_PATH, MAX_LINK_FRAME
from tests.gwserver import running
from tests.test_downstream import desk, records, wait_links_up


class Scripted:
    """One-connection h2 server that answers the link request, then on the
    first DATA (a visitor's message) does ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.got_message = trio.Event()
        self.done = trio.Event()

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        try:
            stream = await listeners[0].accept()
        finally:
            await listeners[0].aclose()  # one connection only; then refused
        try:
            await self._run(stream)
        finally:
            self.done.set()
            await trio.aclose_forcefully(stream)

    async def _run(self, stream: trio.SocketStream) -> None:
        if self.mode == "http1":
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    assert dict(ev.headers)[":path"] == LINK_PATH
                    if self.mode == "503":
                        conn.send_headers(ev.stream_id, [(":status", "503")], end_stream=True)
                    else:
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                    if self.mode == "early":
                        # a frame right behind the headers, in the same write
                        body = msgpack.packb({"t": "deliver", "sid": "nobody", "body": "hi",
                                              "from": {"kind": "bot", "name": "b"}})  # fmt: skip
                        conn.send_data(ev.stream_id, struct.pack("!I", len(body)) + body)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if b"msg" in ev.data and not self.got_message.is_set():
                        self.got_message.set()
                        self._misbehave(conn, ev.stream_id)
            await stream.send_all(conn.data_to_send())
            if self.mode in ("goaway", "goaway_error", "garbage") and self.got_message.is_set():
                if self.mode == "garbage":
                    # a SETTINGS frame whose length is not a multiple of 6
                    await stream.send_all(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00junk!")
                await trio.sleep(0.2)
                return

    def _misbehave(self, conn: h2.connection.H2Connection, sid: int) -> None:
        if self.mode == "rst":
            conn.reset_stream(sid)
        elif self.mode == "end":
            conn.end_stream(sid)
        elif self.mode == "goaway":
            conn.close_connection()  # graceful: the link drains, then it closes
        elif self.mode == "goaway_error":
            conn.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif self.mode == "too_big":
            conn.send_data(sid, struct.pack("!I", MAX_LINK_FRAME + 1) + b"x" * 16)
        elif self.mode == "not_msgpack":
            conn.send_data(sid, struct.pack("!I", 3) + b"\xc1\xc1\xc1")
        elif self.mode == "bad_ack":
            # a well-formed frame with the wrong types: "n" must be an int
            body = msgpack.packb({"t": "ack", "sid": "x", "n": "x"})
            conn.send_data(sid, struct.pack("!I", len(body)) + body)


# mode -> what the gateway logs as the reason the link went down
MODES = {
    "rst": "ended the link stream",
    "end": "ended the link stream",
    "goaway": "downstream closed the connection (draining after the downstream's GOAWAY)",
    "goaway_error": "downstream sent GOAWAY (<ErrorCodes.INTERNAL_ERROR: 2>)",
    "too_big": "bad frame from downstream",
    "not_msgpack": "bad frame from downstream",
    "bad_ack": "bad frame from downstream",
    "garbage": "HTTP/2 protocol error",
}


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_broken_downstream_drops_its_link_and_the_message_is_redelivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.WARNING)
    with trio.socket.socket() as probe:  # the good desk's port, free for now
        await probe.bind(("127.0.0.1", 0))
        good = probe.getsockname()[1]
    rec = tmp_path / "good.jsonl"
    bad = Scripted(mode)
    async with trio.open_nursery() as n:
        bad_port = await n.start(bad.serve)
        table = {
            "clusters": {"general": {"endpoints": [f"127.0.0.1:{bad_port}", f"127.0.0.1:{good}"]}},
            "health_interval_s": 0.2,
            "health_timeout_s": 0.5,
        }
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw, 1)  # the bad one: the good one is not there yet
            acked: list[int] = []

            async def visitor() -> None:
                async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                    acked.append(await s.send("hello"))

            async with trio.open_nursery() as vn:
                vn.start_soon(visitor)
                with trio.fail_after(5):
                    await bad.got_message.wait()
                    await bad.done.wait()
                async with desk(port=good, record=rec, reply=False):
                    with trio.fail_after(15):
                        while not acked:
                            await trio.sleep(0.02)
            assert acked == [1]
            assert gw.w.hub.stats["internal_errors"] == 0
        n.cancel_scope.cancel()
    assert [r["body"] for r in records(rec)] == ["hello"]
    downs = [r.getMessage() for r in caplog.records if "downstream_link_down" in r.getMessage()]
    assert any(MODES[mode] in line and str(bad_port) in line for line in downs), downs


@pytest.mark.parametrize(("mode", "why"), [("503", "HTTP status 503"), ("http1", "")])
async def test_downstream_refusing_the_link_is_never_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, why: str
) -> None:
    """A downstream answering the link request with 503, or speaking
    HTTP/1.1: the link never comes up (the reason logged) and the good
    endpoint serves."""
    caplog.set_level(logging.WARNING)
    rec = tmp_path / "good.jsonl"
    bad = Scripted(mode)
    async with trio.open_nursery() as n:
        bad_port = await n.start(bad.serve)
        async with desk(record=rec, reply=False) as (good, _, _):
            table = {
                "clusters": {
                    "general": {"endpoints": [f"127.0.0.1:{bad_port}", f"127.0.0.1:{good}"]}
                },
            }
            async with running(tmp_path, downstream=table) as gw:
                with trio.fail_after(5):
                    await bad.done.wait()
                await wait_links_up(gw.w.forwarder, 1)
                async with gc.connect(gw.url, token=gw.token("v"), reconnect=False) as s:
                    for i in range(5):
                        assert await s.send(f"m{i}") == i + 1
                assert not gw.w.forwarder.links[0].up
        n.cancel_scope.cancel()
    assert [r["body"] for r in records(rec)] == [f"m{i}" for i in range(5)]
    fails = [
        r.getMessage() for r in caplog.records if "downstream_connect_failed" in r.getMessage()
    ]
    assert any(str(bad_port) in line and why in line for line in fails), fails


class Holding:
    """An h2 downstream with a 4 KiB stream window that takes messages
    without giving the window back or acking them until ``release`` is
    set; then it acks everything and keeps the window open. h2 raises
    (failing the test) if the gateway sends beyond the window."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.msgs: list[tuple[str, int, str]] = []
        self.max_unacked_bytes = 0

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        stream = await listeners[0].accept()
        await listeners[0].aclose()
        try:
            await self._run(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def _run(self, stream: trio.SocketStream) -> None:
        from gateway.downstream.proto import encode_acks
        from gateway.protocol.codec import LengthPrefixedDecoder

        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4096}
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        dec = LengthPrefixedDecoder(MAX_LINK_FRAME, lambda f: f)
        link = 0
        unacked = 0  # flow-controlled bytes not given back
        pending: dict[str, list[int]] = {}
        while True:
            data = b""
            with trio.move_on_after(0.02):
                data = await stream.receive_some(65536)
                if not data:
                    return
            for ev in conn.receive_data(data) if data else ():
                if isinstance(ev, h2.events.RequestReceived):
                    link = ev.stream_id
                    conn.send_headers(link, [(":status", "200")])
                elif isinstance(ev, h2.events.DataReceived):
                    unacked += ev.flow_controlled_length
                    self.max_unacked_bytes = max(self.max_unacked_bytes, unacked)
                    for f in dec.feed(ev.data):
                        if f.get("t") == "msg":
                            self.msgs.append((f["sid"], f["n"], f["body"]))
                            pending.setdefault(f["sid"], []).append(f["n"])
            if self.release.is_set() and link:
                if unacked:
                    conn.acknowledge_received_data(unacked, link)
                    unacked = 0
                if pending:
                    conn.send_data(link, encode_acks(pending))
                    pending = {}
            await stream.send_all(conn.data_to_send())


async def test_downstream_flow_control_holds_the_visitors_back_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """A downstream that stops giving its window back: the gateway sends no
    more than the window allows, queues at most link_high_water beyond it,
    then stops reading the visitors (their messages stay in their sockets,
    unacknowledged). When the downstream opens up, every message arrives
    once, in order per session, and every visitor gets every ack."""
    from tests.gwserver import RawWs

    srv = Holding()
    sessions, per, size = 8, 12, 1000
    async with trio.open_nursery() as n:
        port = await n.start(srv.serve)
        table = {
            "clusters": {"general": {"endpoints": [f"127.0.0.1:{port}"]}},
            "link_high_water": 8192,
            "health_interval_s": 0.5,
            "health_timeout_s": 5.0,
        }
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            ws = [await RawWs.connect(gw.port) for _ in range(sessions)]
            for i, w in enumerate(ws):
                assert (await w.hello(gw.token(f"v{i}")))["t"] == "welcome"
            for k in range(per):
                for i, w in enumerate(ws):
                    body = f"v{i}#{k:02d}".ljust(size, ".")
                    await w.send({"t": "msg", "id": f"{i}-{k}", "body": body})
            await trio.sleep(1.0)
            held = len(srv.msgs)
            link = fw.links[0]
            assert link.core is not None
            # the window and the link's queue are full; the rest waits
            assert srv.max_unacked_bytes <= 4096
            assert link.core.backlog <= 8192 + 2 * (size + 200)
            assert held < sessions * per
            assert gw.stats["reads_paused"] > 0
            srv.release.set()
            acks: dict[int, list[str]] = {i: [] for i in range(sessions)}
            with trio.fail_after(20):
                for i, w in enumerate(ws):
                    while len(acks[i]) < per:
                        f = await w.recv()
                        if f["t"] == "ack":
                            acks[i].append(f["id"])
        n.cancel_scope.cancel()
    for i in range(sessions):
        assert acks[i] == [f"{i}-{k}" for k in range(per)]
    got = [(sid, n, body[:6]) for sid, n, body in srv.msgs]
    assert len(got) == len(set(got)) == sessions * per  # each once
    by_sid: dict[str, list[int]] = {}
    for sid, n, _ in got:
        by_sid.setdefault(sid, []).append(n)
    assert all(ns == list(range(1, per + 1)) for ns in by_sid.values())


async def test_frames_right_behind_the_response_headers_are_taken(tmp_path: Path) -> None:
    """A downstream that sends a frame in the same write as its response
    headers: the link comes up and the frame is handled (here: counted as
    one for an unknown session), not taken for a protocol error."""
    bad = Scripted("early")
    async with trio.open_nursery() as n:
        port = await n.start(bad.serve)
        table = {"clusters": {"general": {"endpoints": [f"127.0.0.1:{port}"]}}}
        async with running(tmp_path, downstream=table) as gw:
            await wait_links_up(gw.w.forwarder)
            with trio.fail_after(5):
                while not gw.stats["downstream_unknown_session"]:
                    await trio.sleep(0.02)
            await trio.sleep(0.3)
            assert gw.w.forwarder.links[0].up
        n.cancel_scope.cancel()
