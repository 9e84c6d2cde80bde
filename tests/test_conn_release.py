"""A closed connection is freed by reference counting, without the cyclic
garbage collector: its protocol lets go of it (``GONE`` in its place) and
an HTTP/2 connection's h2 state drops its handler table. Before, each
closed connection stayed in a reference cycle and, once it had lived long
enough to reach the collector's oldest generation, waited for a full
collection: under churn closed connections piled up by the thousand
(bench/soak.py). The tests run with the collector off, so whatever a
closed connection still holds in a cycle stays countable."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import pytest
import trio

import gateway.server.worker as worker_mod
from gateway.server.h2compact import compact, release
from gateway.session.visitor import GONE
from tests.gwserver import RawWs, running
from tests.test_server_h2 import H2Client, _tls


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _live(kind: str) -> list[object]:
    return [o for o in gc.get_objects() if type(o).__name__ == kind]


async def _until(pred: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # type: ignore[operator]
            await trio.sleep(0.02)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss-task"])
async def test_closed_websockets_are_freed_at_once(
    tmp_path: Path, no_collector: None, tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert = key = None
    ctx = None
    if tls:  # the task-per-connection TLS path (the reactor's is the ws case's)
        monkeypatch.setattr(worker_mod, "TLS_REACTOR", False)
        cert, key, ctx = _tls(tmp_path)
    extra = {"tls_cert": cert, "tls_key": key} if tls else {}
    async with running(tmp_path, **extra) as gw:
        protos = []
        for i in range(6):
            ws = await RawWs.connect(gw.port, ssl_context=ctx)
            assert (await ws.hello(gw.token(f"v{i}")))["t"] == "welcome"
            protos.append(next(c for c in gw.w.conns if c.proto.sink is c).proto)
            await ws.aclose()
        await _until(lambda: not gw.w.conns)
        assert all(p.sink is GONE for p in protos)
        assert _live("WsConn") == []


async def test_closed_http2_connections_are_freed_at_once(
    tmp_path: Path, no_collector: None
) -> None:
    async with running(tmp_path) as gw:
        for i in range(4):
            cl = await H2Client.connect(gw.port)
            sids = [await cl.open(), await cl.open()]
            for k, sid in enumerate(sids):
                await cl.send(sid, {"t": "hello", "v": 1, "token": gw.token(f"v{i}-{k}")})
                assert (await cl.recv(sid))["t"] == "welcome"
            await cl.stream.aclose()
        await _until(lambda: not gw.w.conns)
        # (the test's own client-side h2 connections stay, in their cycles)
        ours = [o for o in _live("H2Stream") if type(o).__module__ == "gateway.server.h2conn"]
        servers = [o for o in _live("H2Connection") if not o.config.client_side]  # type: ignore[attr-defined]
        assert ours == [] and servers == []


def test_release_breaks_the_h2_connections_cycle(no_collector: None) -> None:
    def made(compacted: bool, released: bool) -> weakref.ref[h2.connection.H2Connection]:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
        if compacted:
            compact(c)
        if released:
            release(c)
        return weakref.ref(c)

    for compacted in (False, True):
        assert made(compacted, released=False)() is not None  # a cycle: still there
        assert made(compacted, released=True)() is None  # freed at once
    gc.collect()
