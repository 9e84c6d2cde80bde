"""Frame encoding and decoding (docs/protocol.md, "Transports" and "Frames").

A frame is a map with a string key ``t``. Binary WebSocket messages and HTTP/2
bodies carry msgpack, text WebSocket messages carry JSON. Decoding enforces,
for both encodings:

* size: more than ``max_size`` bytes (UTF-8 bytes for JSON text) -> 1009
  ``TOO_BIG``;
* shape: the top level is a map, every map key (at any level) is a string,
  ``t`` is a string -> otherwise 4500 ``BAD_FRAME``;
* nesting: at most :data:`MAX_DEPTH` levels of maps/arrays, the top-level
  map being level 1 -> 4500;
* entries: at most :data:`MAX_ENTRIES` map entries plus array items in the
  whole frame, counting every level -> 4500;
* msgpack: no ext types (timestamps included), no trailing bytes, strings
  must be valid UTF-8 -> 4500;
* JSON: ``NaN``/``Infinity`` and undecodable text -> 4500; a ``\\uD800``-style
  escape that leaves a lone surrogate (a string that cannot be UTF-8 encoded)
  -> 1007 ``INVALID_PAYLOAD``.

Per-type field checks (``msg.id``, ``hello.v`` ...) belong to the session.

Encoding bytes values as JSON (the visitor speaks JSON but a body arrived as
msgpack ``bin``): valid UTF-8 is sent as a JSON string, anything else as the
one-key object ``{"$b64": "<RFC 4648 base64 with padding>"}``.

:class:`LengthPrefixedDecoder` decodes its frames' msgpack in the native
core on CPython (``native/src/pylink.rs``, many frames per call), building
the same objects ``msgpack.unpackb`` would; any frame it does not take
(every error among them) is decoded here instead, so errors are raised as
before. ``GATEWAY_MSGPACK_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

from gateway import fastpath
from gateway._native import lib as _lib
from gateway.protocol.codes import Code, ProtocolError

__all__ = [
    "B64_MARKER",
    "LENGTH_PREFIX",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "Encoding",
    "LengthPrefixedDecoder",
    "ack_frame",
    "decode_frame",
    "encode_ack",
    "encode_frame",
    "length_prefix",
]

#: Deepest allowed nesting of maps/arrays; the frame itself is level 1.
MAX_DEPTH: Final = 8
#: Most map entries + array items allowed in one frame, all levels together.
MAX_ENTRIES: Final = 256
#: Key of the object that carries non-UTF-8 bytes in JSON mode.
B64_MARKER: Final = "$b64"
#: Size of the HTTP/2 body frame header (u32 big-endian payload length).
LENGTH_PREFIX: Final = 4
_MAX_PREFIXED: Final = 0xFFFFFFFF

_U32: Final = struct.Struct(">I")

#: Whether length-prefixed decoders use the native scan by default:
#: CPython, a native library that has it, GATEWAY_MSGPACK_FASTPATH not "0".
FASTPATH: Final = fastpath.enabled("GATEWAY_MSGPACK_FASTPATH", "gw_lp_scan")
#: Frames one native scan decodes at most.
SCAN_LIMIT: Final = 1024


class Encoding(enum.Enum):
    MSGPACK = "msgpack"
    JSON = "json"


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(Code.BAD_FRAME, reason)


def _check_nested(containers: list[Any], budget: int) -> None:
    """Depth/entry/key checks below the top level (iterative, bounded)."""
    stack: list[tuple[Any, int]] = [(c, 2) for c in containers]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad("frame nested too deeply")
        budget -= len(obj)
        if budget < 0:
            raise _bad("frame has too many entries")
        if type(obj) is dict:
            for k, v in obj.items():
                if type(k) is not str:
                    raise _bad("map key is not a string")
                tv = type(v)
                if tv is dict or tv is list:
                    stack.append((v, depth + 1))
        else:
            for v in obj:
                tv = type(v)
                if tv is dict or tv is list:
                    stack.append((v, depth + 1))


def _check_frame(obj: Any) -> dict[str, Any]:
    if type(obj) is not dict:
        raise _bad("frame is not a map")
    n = len(obj)
    if n > MAX_ENTRIES:
        raise _bad("frame has too many entries")
    nested: list[Any] | None = None
    for k, v in obj.items():
        if type(k) is not str:
            raise _bad("map key is not a string")
        tv = type(v)
        if tv is dict or tv is list:
            if nested is None:
                nested = [v]
            else:
                nested.append(v)
    if type(obj.get("t")) is not str:
        raise _bad("missing or non-string t")
    if nested is not None:
        _check_nested(nested, MAX_ENTRIES - n)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_json_decoder: Final = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _all_strings_encodable(obj: Any) -> bool:
    """True when every string (keys included) can be UTF-8 encoded.
    Only called for frames whose text contains a surrogate escape; the shape
    check before it already bounded depth and size."""
    stack = [obj]
    while stack:
        o = stack.pop()
        items: Any = o.items() if type(o) is dict else ((None, v) for v in o)
        for k, v in items:
            for s in (k, v):
                if type(s) is str and not s.isascii():
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        return False
            if type(v) is dict or type(v) is list:
                stack.append(v)
    return True


def _decode_json(data: str, max_size: int) -> dict[str, Any]:
    n = len(data)
    if n > max_size:
        raise ProtocolError(Code.TOO_BIG)
    # len() counts code points; the limit is on UTF-8 bytes.
    if (
        not data.isascii()
        and n * 4 > max_size
        and len(data.encode("utf-8", "surrogatepass")) > max_size
    ):
        raise ProtocolError(Code.TOO_BIG)
    try:
        obj = _json_decoder.decode(data)
    except RecursionError:
        raise _bad("frame nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, huge ints
        raise _bad(f"bad JSON: {str(e)[:60]}") from None
    frame = _check_frame(obj)
    if "\\u" in data and _SURROGATE_ESCAPE.search(data) and not _all_strings_encodable(frame):
        raise ProtocolError(Code.INVALID_PAYLOAD, "lone surrogate in string")
    return frame


def _unpack(data: bytes | bytearray) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_ENTRIES,
            max_map_len=MAX_ENTRIES,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        # FormatError, StackError, ExtraData, UnicodeDecodeError, limits ...
        raise _bad(f"bad msgpack: {type(e).__name__}") from None


def _decode_msgpack(data: bytes | bytearray, max_size: int) -> dict[str, Any]:
    if len(data) > max_size:
        raise ProtocolError(Code.TOO_BIG)
    return _check_frame(_unpack(data))


def decode_frame(data: bytes | str, max_size: int) -> dict[str, Any]:
    """Decodes one frame: ``str`` as JSON, anything else (bytes-like) as
    msgpack. Raises :class:`ProtocolError` with ``TOO_BIG``, ``BAD_FRAME``
    or ``INVALID_PAYLOAD`` (see the module docstring)."""
    if isinstance(data, str):
        return _decode_json(data, max_size)
    return _decode_msgpack(data, max_size)


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes | bytearray | memoryview):
        b = bytes(o)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return {B64_MARKER: base64.b64encode(b).decode("ascii")}
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


_json_encoder: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
)
_packer: Final = msgpack.Packer(use_bin_type=True, autoreset=True)
# a server ``ack`` frame, {"t": "ack", "id": ..., "n": ..., "dup": ...}, in
# msgpack: fixmap of 4, "t" -> "ack", then "id" (its value follows)
_ACK_HEAD: Final = b"\x84\xa1t\xa3ack\xa2id"
_ACK_NEW: Final = b"\xa3dup\xc2"
_ACK_DUP: Final = b"\xa3dup\xc3"


def ack_frame(msg_id: Any, n: int, dup: bool) -> dict[str, Any]:
    """The server ``ack`` frame as a map (for the transports that encode
    maps; :func:`encode_ack` gives its msgpack bytes directly)."""
    return {"t": "ack", "id": msg_id, "n": n, "dup": dup}


def encode_ack(msg_id: Any, n: int, dup: bool) -> bytes:
    """The msgpack bytes of the server frame ``{"t": "ack", "id": msg_id,
    "n": n, "dup": dup}`` (one for every visitor message), put together
    from its unchanging parts: the same bytes as packing the map, ~3x
    faster."""
    pack = _packer.pack
    return b"".join((_ACK_HEAD, pack(msg_id), b"\xa1n", pack(n), _ACK_DUP if dup else _ACK_NEW))


def encode_frame(frame: dict[str, Any], enc: Encoding) -> bytes | str:
    """Encodes a frame: msgpack -> ``bytes``, JSON -> compact ``str``.

    Raises ``TypeError``/``ValueError``/``OverflowError`` for values that
    cannot be encoded (a gateway bug, not peer input)."""
    if enc is Encoding.MSGPACK:
        out: bytes = _packer.pack(frame)
        return out
    return _json_encoder.encode(frame)


def length_prefix(payload: bytes) -> bytes:
    """``u32 big-endian len(payload)`` followed by the payload."""
    n = len(payload)
    if n > _MAX_PREFIXED:
        raise ValueError("payload too large for a u32 length prefix")
    return _U32.pack(n) + payload


class LengthPrefixedDecoder:
    """Splits an HTTP/2 body into frames: ``u32 BE length`` + msgpack map.

    A declared length over ``max_frame`` raises ``TOO_BIG`` as soon as its
    4-byte header is seen, before any of the payload is buffered, so the
    buffer never holds more than ``4 + max_frame`` bytes between calls. Each
    :meth:`feed` decodes every complete frame in what it is given (the caller
    bounds chunk sizes; HTTP/2 flow control does). After an error the decoder
    is unusable: every later :meth:`feed` raises the same error.

    ``check`` validates each decoded object and returns it as a frame, or
    raises :class:`ProtocolError`; by default the shape checks of this
    module. A protocol that validates every field it reads itself (the
    downstream link, :mod:`gateway.downstream.proto`) passes its own check
    instead, so a frame is not walked twice.

    ``native``: whether to decode with the native scan (default
    :data:`FASTPATH`).
    """

    __slots__ = ("_buf", "_check", "_error", "_max", "_scan")

    def __init__(
        self,
        max_frame: int,
        check: Callable[[Any], dict[str, Any]] = _check_frame,
        native: bool | None = None,
    ) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self._max = max_frame
        self._check = check
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        use = FASTPATH if native is None else native
        self._scan: Any = _lib.gw_lp_scan if use else None

    def buffered(self) -> int:
        """Bytes held for an incomplete frame (header included)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._error = e
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data
        frames: list[dict[str, Any]] = []
        end = len(src)
        pos = 0
        mx = self._max
        check = self._check
        scan = self._scan
        while end - pos >= LENGTH_PREFIX:
            if scan is not None:
                # the native core decodes what it can; the frame it stopped
                # at (incomplete, too big, or one it leaves to msgpack) is
                # the next one below
                objs: list[Any] = []
                at = scan(id(src), pos, mx, MAX_ENTRIES, SCAN_LIMIT, id(objs))
                if at < 0:
                    raise RuntimeError(f"native frame scan failed: {at}")
                for obj in objs:
                    frames.append(check(obj))
                pos = at
                if end - pos < LENGTH_PREFIX:
                    break
            (n,) = _U32.unpack_from(src, pos)
            if n > mx:
                raise ProtocolError(Code.TOO_BIG, f"frame of {n} bytes over max_frame")
            start = pos + LENGTH_PREFIX
            if end - start < n:
                break
            frames.append(check(_unpack(src[start : start + n])))
            pos = start + n
        if src is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf += memoryview(data)[pos:]
        return frames
