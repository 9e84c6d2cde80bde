"""The operator endpoint's listener (a thin trio shell around
:class:`gateway.ops.app.OpsApp`): one request per connection, heads bounded
to 8 KiB and read within :data:`READ_TIMEOUT_S`, at most
:data:`MAX_CONNECTIONS` connections at once (more are closed at accept)."""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from gateway.ops.app import OpsApp
from gateway.server.http1 import HttpError, parse_head, response

__all__ = ["MAX_CONNECTIONS", "READ_TIMEOUT_S", "open_ops_listeners", "serve_ops"]

MAX_CONNECTIONS: Final = 64
READ_TIMEOUT_S: Final = 5.0
_log = logging.getLogger("gateway.ops")


async def open_ops_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def _handle(app: OpsApp, stream: trio.SocketStream) -> None:
    buf = b""
    with trio.move_on_after(READ_TIMEOUT_S):
        while True:
            data = await stream.receive_some(8192)
            if not data:
                return
            buf += data
            try:
                parsed = parse_head(buf)
            except HttpError as e:
                await stream.send_all(response(e.status, e.reason.encode() + b"\n"))
                return
            if parsed is not None:
                break
        await stream.send_all(app.handle(parsed[0]))


async def serve_ops(
    app: OpsApp, listeners: list[trio.SocketListener], task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            if limiter.available_tokens < 1:
                return
            async with limiter:
                await _handle(app, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug in a route must not stop the listener
            _log.exception("ops request failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, listeners, task_status=task_status)
