"""The operator endpoint's listener (a thin trio shell around
:class:`gateway.ops.app.OpsApp`): one request per connection, heads bounded
to 8 KiB and read within :data:`READ_TIMEOUT_S`, at most
:data:`MAX_CONNECTIONS` connections at once (more are closed at accept)."""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from gateway.ops.app import RELOAD_PATH, OpsApp
from gateway.server.http1 import HttpError, parse_head, response

__all__ = ["MAX_CONNECTIONS", "READ_TIMEOUT_S", "open_ops_listeners", "serve_ops"]

MAX_CONNECTIONS: Final = 64
READ_TIMEOUT_S: Final = 5.0
_log = logging.getLogger("gateway.ops")


async def open_ops_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def _handle(app: OpsApp, stream: trio.SocketStream) -> None:
    buf = b""
    parsed = None
    with trio.move_on_after(READ_TIMEOUT_S):
        while parsed is None:
            data = await stream.receive_some(8192)
            if not data:
                return
            buf += data
            try:
                parsed = parse_head(buf)
            except HttpError as e:
                await stream.send_all(response(e.status, e.reason.encode() + b"\n"))
                return
    if parsed is None:
        return
    req = parsed[0]
    if req.method == "POST" and req.path == RELOAD_PATH:
        refused = app.reload_check(req)
        if refused is not None:
            await stream.send_all(refused)
            return
        assert app.reload is not None
        # a reload runs to its end, whatever happens to the request
        with trio.CancelScope(shield=True):
            result = await app.reload()
        await stream.send_all(app.reload_response(result))
        return
    with trio.move_on_after(READ_TIMEOUT_S):
        await stream.send_all(app.handle(req))


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
