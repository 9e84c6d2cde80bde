"""A downstream that breaks the link protocol or HTTP/2 (a scripted h2
server on loopback): the link is dropped with a logged reason, the worker
goes on, and the message it held is redelivered to a good endpoint and
acknowledged once.

Each misbehaving server takes one connection, misbehaves when the first
visitor message arrives (or at once), and stops listening; the good desk
(desk-sim) starts on the cluster's second endpoint only after that, so the
message is known to have gone to the bad one first."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
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
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if b"msg" in ev.data and not self.got_message.is_set():
                        self.got_message.set()
                        self._misbehave(conn, ev.stream_id)
            await stream.send_all(conn.data_to_send())
            if self.mode in ("goaway", "garbage") and self.got_message.is_set():
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
            conn.close_connection()
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
    "goaway": "GOAWAY",
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
