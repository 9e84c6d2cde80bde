"""The downstream link protocol, sans-IO (docs/protocol.md, "Downstream").

A link is one long-lived HTTP/2 stream ``POST /v1/link`` from a gateway
worker to a downstream endpoint. Both bodies are sequences of
``u32 BE length || msgpack map`` frames (the same framing as the visitor
HTTP/2 transport). This module builds the gateway's frames and checks the
downstream's; the desk simulator uses the reverse direction.

Gateway -> downstream: ``open``, ``msg``, ``close``.
Downstream -> gateway: ``ack``, ``nack``, ``deliver``, ``assign``,
``handover``.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from gateway.protocol.codec import length_prefix
from gateway.protocol.codes import Code, ProtocolError

__all__ = [
    "LINK_PATH",
    "MAX_LINK_FRAME",
    "check_from_downstream",
    "check_from_gateway",
    "encode",
]

LINK_PATH: Final = "/v1/link"
#: Largest downstream frame (a 64 KiB visitor body plus the envelope).
MAX_LINK_FRAME: Final = 96 * 1024
MAX_NAME: Final = 128

_packb = msgpack.Packer(use_bin_type=True).pack


def encode(frame: dict[str, Any]) -> bytes:
    """One length-prefixed frame."""
    return length_prefix(_packb(frame))


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(Code.BAD_FRAME, reason)


def _str(f: dict[str, Any], key: str, optional: bool = False) -> None:
    v = f.get(key)
    if v is None and optional:
        return
    if type(v) is not str or len(v) > MAX_NAME:
        raise _bad(f"{f['t']}.{key} must be a string of at most {MAX_NAME} characters")


def _uint(f: dict[str, Any], key: str) -> None:
    v = f.get(key)
    if type(v) is not int or v < 0:
        raise _bad(f"{f['t']}.{key} must be an int >= 0")


def _body(f: dict[str, Any]) -> None:
    tb = type(f.get("body"))
    if tb is not str and tb is not bytes:
        raise _bad(f"{f['t']}.body must be a string or bytes")


def check_from_downstream(f: dict[str, Any]) -> dict[str, Any]:
    """Validates a frame a downstream sent to the gateway (already decoded
    by :class:`gateway.protocol.codec.LengthPrefixedDecoder`)."""
    t = f["t"]
    _str(f, "sid")
    if t == "ack":
        _uint(f, "n")
    elif t == "nack":
        _uint(f, "n")
        c = f.get("code", 0)
        if type(c) is not int:
            raise _bad("nack.code must be an int")
    elif t == "deliver":
        _body(f)
        sender = f.get("from")
        if sender is not None and (
            type(sender) is not dict
            or any(type(v) is not str or len(v) > MAX_NAME for v in sender.values())
        ):
            raise _bad("deliver.from must be a map of short strings")
    elif t == "assign":
        _str(f, "agent")
        _str(f, "group", optional=True)
    elif t == "handover":
        _str(f, "group", optional=True)
    else:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown downstream frame {t[:32]!r}")
    return f


def check_from_gateway(f: dict[str, Any]) -> dict[str, Any]:
    """Validates a frame a gateway sent to a downstream (used by desk-sim)."""
    t = f["t"]
    _str(f, "sid")
    if t == "msg":
        _uint(f, "n")
        _body(f)
        _str(f, "group")
    elif t == "open":
        _str(f, "tenant")
        _str(f, "visitor")
        _str(f, "group")
        _str(f, "stage")
        _str(f, "agent", optional=True)
        if type(f.get("tags", {})) is not dict:
            raise _bad("open.tags must be a map")
    elif t == "close":
        pass
    else:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown gateway frame {t[:32]!r}")
    return f
