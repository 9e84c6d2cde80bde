"""The downstream link protocol, sans-IO (docs/protocol.md, "Downstream").

A link is one long-lived HTTP/2 stream ``POST /v1/link`` from a gateway
worker to a downstream endpoint. Both bodies are sequences of
``u32 BE length || msgpack map`` frames (the same framing as the visitor
HTTP/2 transport). This module builds the gateway's frames and checks the
downstream's; the desk simulator uses the reverse direction.

Gateway -> downstream: ``open``, ``msg``, ``close``.
Downstream -> gateway: ``ack`` (or ``acks``, many at once), ``nack``,
``deliver``, ``assign``, ``handover``, ``moved``.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from gateway.protocol.codec import length_prefix
from gateway.protocol.codes import Code, ProtocolError

__all__ = [
    "FEATURES_HEADER",
    "LINK_PATH",
    "MAX_LINK_FRAME",
    "MOVED_MARK",
    "check_from_downstream",
    "check_from_gateway",
    "encode",
    "encode_acks",
    "encode_msg",
    "msg_head",
]

LINK_PATH: Final = "/v1/link"
#: Response header of the link request: the protocol features the
#: downstream has, comma-separated.
FEATURES_HEADER: Final = "x-downstream-features"
#: The feature of a downstream that answers a session's re-binding to
#: another link with ``moved`` on the old one (docs/protocol.md, "Replies
#: across a move").
MOVED_MARK: Final = "moved"
#: Largest downstream frame (a 64 KiB visitor body plus the envelope).
MAX_LINK_FRAME: Final = 96 * 1024
MAX_NAME: Final = 128

_packb = msgpack.Packer(use_bin_type=True).pack
_KEY_ID: Final = _packb("id")
_KEY_BODY: Final = _packb("body")


def encode(frame: dict[str, Any]) -> bytes:
    """One length-prefixed frame."""
    return length_prefix(_packb(frame))


def msg_head(sid: str, group: str, stage: str) -> bytes:
    """The part of a session's ``msg`` frames that stays the same from one
    message to the next (see :func:`encode_msg`)."""
    head = {"t": "msg", "sid": sid, "group": group, "stage": stage}
    # a map of 7 entries (fixmap 0x87): these 4, then n, id and body
    parts: list[bytes] = [b"\x87"]
    for k, v in head.items():
        parts += (_packb(k), _packb(v))
    parts.append(_packb("n"))
    return b"".join(parts)


def encode_msg(head: bytes, n: int, msg_id: Any, body: Any) -> bytes:
    """The length-prefixed ``msg`` frame for message ``n`` of the session
    whose :func:`msg_head` is ``head``: the same bytes as :func:`encode` of
    the whole map, without packing the unchanging part again."""
    return length_prefix(
        b"".join((head, _packb(n), _KEY_ID, _packb(msg_id), _KEY_BODY, _packb(body)))
    )


def encode_acks(acks: dict[str, list[int]]) -> bytes:
    """The length-prefixed ``acks`` frame: for each session id, the numbers
    of its messages accepted (a downstream's alternative to one ``ack``
    frame per message)."""
    return length_prefix(_packb({"t": "acks", "sids": acks}))


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(Code.BAD_FRAME, reason)


def _frame(f: Any) -> str:
    """The frame's type, after checking it is a map with a string ``t``
    and a string ``sid``."""
    if type(f) is not dict:
        raise _bad("frame is not a map")
    t = f.get("t")
    if type(t) is not str:
        raise _bad("missing or non-string t")
    _str(f, "sid")
    return t


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


def _short_strings(m: Any) -> bool:
    """A map of short strings to short strings."""
    if type(m) is not dict:
        return False
    for k, v in m.items():  # (a loop: a generator costs more for 2-3 items)
        if type(k) is not str or type(v) is not str or len(k) > MAX_NAME or len(v) > MAX_NAME:
            return False
    return True


def _acks(f: dict[str, Any]) -> None:
    """``acks``: ``sids`` maps session ids to non-empty lists of ``n``."""
    sids = f.get("sids")
    if type(sids) is not dict:
        raise _bad("acks.sids must be a map")
    for sid, ns in sids.items():
        if type(sid) is not str or len(sid) > MAX_NAME:
            raise _bad(f"acks.sids keys must be strings of at most {MAX_NAME} characters")
        if type(ns) is not list or not ns:
            raise _bad("acks.sids values must be non-empty lists")
        for n in ns:
            if type(n) is not int or n < 0:
                raise _bad("acks.sids lists must hold ints >= 0")


def check_from_downstream(f: Any) -> dict[str, Any]:
    """Validates an object decoded from a downstream's frame (the check of
    the link's :class:`gateway.protocol.codec.LengthPrefixedDecoder`): every
    field the gateway reads has its type and bounds; other keys are
    ignored."""
    if type(f) is dict and f.get("t") == "acks":
        _acks(f)
        return f
    t = _frame(f)
    frame: dict[str, Any] = f
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
        if sender is not None and not _short_strings(sender):
            raise _bad("deliver.from must be a map of short strings")
    elif t == "assign":
        _str(f, "agent")
        _str(f, "group", optional=True)
    elif t == "handover":
        _str(f, "group", optional=True)
    elif t != "moved":
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown downstream frame {t[:32]!r}")
    return frame


def check_from_gateway(f: Any) -> dict[str, Any]:
    """Validates an object decoded from a gateway's frame (used by
    desk-sim, as its link decoder's check)."""
    t = _frame(f)
    frame: dict[str, Any] = f
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
        tags = f.get("tags", {})
        if type(tags) is not dict or not all(type(k) is str for k in tags):
            raise _bad("open.tags must be a map with string keys")
    elif t == "close":
        pass
    else:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown gateway frame {t[:32]!r}")
    return frame
