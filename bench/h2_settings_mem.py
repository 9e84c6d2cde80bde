"""What one HTTP/2 connection holds after a client sends SETTINGS frames
full of identifiers h2 does not know (every 16-bit identifier from 0x100 up,
2,000 per frame): h2's own `Settings` against the gateway's
(`gateway.server.h2compact.CompactSettings`, which ignores them as RFC 9113
6.5.2 says), side by side, traced with tracemalloc.

    .venv/bin/python bench/h2_settings_mem.py
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import h2.config
import h2.connection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.server.h2compact import compact

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
    return struct.pack(">L", len(body))[1:] + b"\x04\x00" + struct.pack(">L", 0) + body


def held(compacted: bool) -> tuple[int, int, int]:
    """(settings kept, bytes held, bytes received)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    if compacted:
        compact(c)
    c.data_to_send()
    c.receive_data(PREFACE)
    frames = [
        settings_frame([(k, 1) for k in range(b, b + 2000)]) for b in range(0x100, 0xF000, 2000)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for f in frames:
            c.receive_data(f)
            if compacted:
                compact(c)
            c.data_to_send()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return len(c.remote_settings), grown, sum(len(f) for f in frames)


def main() -> None:
    print("| settings | identifiers kept | memory held | SETTINGS bytes received |")
    print("|---|---|---|---|")
    for name, compacted in (("h2's own", False), ("CompactSettings", True)):
        kept, grown, received = held(compacted)
        print(f"| {name} | {kept:,} | {grown / 1024:,.0f} KiB | {received / 1024:.0f} KiB |")


if __name__ == "__main__":
    main()
