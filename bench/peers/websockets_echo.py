"""The peer we compare against: the `websockets` library (asyncio) serving
an echo, with the settings a production deployment would use (no
compression, default heartbeats on). One process.

usage: python bench/peers/websockets_echo.py HOST PORT
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main(host: str, port: int) -> None:
    async with serve(
        echo, host, port, compression=None, max_size=65536, backlog=65535, reuse_port=True
    ) as server:
        print("ready", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
