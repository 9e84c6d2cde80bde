"""Worker -> supervisor snapshot frames: a 4-byte big-endian length, then a
msgpack map (sans-IO; the pipe I/O is in :mod:`gateway.ops.report` and the
supervisor). The supervisor's control messages to the workers use the same
framing (:mod:`gateway.server.control`); :func:`read_frames` is the one
reading loop both pipe ends use."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack
import trio

__all__ = ["MAX_SNAPSHOT_BYTES", "SnapshotDecoder", "WireError", "encode_snapshot", "read_frames"]

#: A snapshot larger than this is refused (every metric's label children
#: are bounded, so a real one stays far below it).
MAX_SNAPSHOT_BYTES: Final = 8 << 20
_LEN: Final = struct.Struct("!I")


class WireError(ValueError):
    pass


def encode_snapshot(snap: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(snap, use_bin_type=True)
    if len(body) > MAX_SNAPSHOT_BYTES:
        raise WireError(f"snapshot of {len(body)} bytes over {MAX_SNAPSHOT_BYTES}")
    return _LEN.pack(len(body)) + body


class SnapshotDecoder:
    """Feed bytes, get whole snapshots; raises :class:`WireError` on a frame
    over :data:`MAX_SNAPSHOT_BYTES` or one that is not a msgpack map."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        buf = self._buf
        while len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_SNAPSHOT_BYTES:
                raise WireError(f"snapshot frame of {n} bytes over {MAX_SNAPSHOT_BYTES}")
            if len(buf) < 4 + n:
                break
            try:
                snap = msgpack.unpackb(bytes(buf[4 : 4 + n]), raw=False, strict_map_key=False)
            except Exception as e:
                raise WireError(f"bad snapshot: {e}") from None
            del buf[: 4 + n]
            if not isinstance(snap, dict):
                raise WireError("snapshot is not a map")
            out.append(snap)
        return out


async def read_frames(fd: int, handle: Callable[[dict[str, Any]], None]) -> None:
    """Reads the pipe ``fd`` (taken over: closed at the end) and calls
    ``handle`` with each frame, until the writer closes it or the pipe
    breaks; raises :class:`WireError` on a bad frame."""
    dec = SnapshotDecoder()
    stream = trio.lowlevel.FdStream(fd)
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for frame in dec.feed(data):
                handle(frame)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()
