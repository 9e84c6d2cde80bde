"""``gateway desk-sim``: the reference downstream, an HTTP/2 server
speaking the downstream link protocol (the connections:
:mod:`gateway.downstream.deskserver`; the desk's behaviour:
:mod:`gateway.downstream.desk`).

This module is the process around them: the listener, the signals
(SIGTERM drains: the gateways finish with this process and close their
links), ``--processes`` and the containment of one connection's failure.
It stays interpreted (``except*`` does not compile with mypyc).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import ssl
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gateway.downstream.desk import DeskConfig
from gateway.downstream.deskserver import DRAIN_S, DeskServer
from gateway.gctune import tune_gc

__all__ = ["DeskServer", "contain", "run_desk_sim", "serve_desk"]


async def contain(
    handle: Callable[[trio.SocketStream], Awaitable[None]], sock: trio.SocketStream
) -> None:
    """Runs ``handle(sock)``: a broken connection ends only itself, and a
    defect handling one gateway is printed, not passed on to end the
    other gateways' links."""
    try:
        await handle(sock)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # this gateway's connection broke (reset, GOAWAY, dropped): the others go on
    except* Exception as eg:
        print("desk-sim: a gateway connection failed:", file=sys.stderr)
        traceback.print_exception(eg, file=sys.stderr)


async def serve_desk(
    cfg: DeskConfig,
    host: str,
    port: int,
    record: str | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serves until cancelled (over TLS with ``ssl_context``);
    ``task_status.started((port, server))``."""
    rec = open(record, "a", buffering=1 << 16, encoding="utf-8") if record else None  # noqa: SIM115
    try:
        srv = DeskServer(cfg, rec, ssl_context)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = trio.socket.socket(family, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await raw.bind((host, port))
        raw.listen(1024)
        bound = raw.getsockname()[1]
        async with trio.open_nursery() as n:
            n.start_soon(srv.timers)
            handler = functools.partial(contain, srv.handle)
            n.start_soon(trio.serve_listeners, handler, [trio.SocketListener(raw)])
            task_status.started((bound, srv))
    finally:
        if rec is not None:
            rec.close()


async def _main(
    cfg: DeskConfig, host: str, port: int, record: str | None, ctx: ssl.SSLContext | None
) -> None:
    async with trio.open_nursery() as n:
        bound, srv = await n.start(
            functools.partial(serve_desk, cfg, host, port, record, ssl_context=ctx)
        )
        what = "TLS" if ctx is not None else "h2c"
        print(f"desk-sim: listening on {host}:{bound} ({what}, pid {os.getpid()})", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                break
            # drain: the gateways finish with this process and close their
            # links; a second signal, or DRAIN_S, ends it at once
            srv.drain()
            async with trio.open_nursery() as wait:

                async def second_signal() -> None:
                    async for _ in sigs:
                        break
                    wait.cancel_scope.cancel()

                wait.start_soon(second_signal)
                with trio.move_on_after(DRAIN_S):
                    await srv.all_closed.wait()
                wait.cancel_scope.cancel()
            n.cancel_scope.cancel()


def run_desk_sim(
    cfg: DeskConfig,
    host: str,
    port: int,
    record: str | None = None,
    processes: int = 1,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Serves until SIGTERM/SIGINT. With ``processes > 1`` that many
    processes share the port (SO_REUSEPORT; each has its own sessions and
    agents, like separate desk servers behind one address)."""
    if processes > 1 and port == 0:
        print("desk-sim: --processes needs a fixed port", file=sys.stderr)
        return 2
    tune_gc()
    children: list[int] = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            try:
                trio.run(_main, cfg, host, port, record, ssl_context)
            finally:
                os._exit(0)
        children.append(pid)
    try:
        trio.run(_main, cfg, host, port, record, ssl_context)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0
