"""HTTP/1.1 request heads and the WebSocket upgrade, sans-IO.

The gateway only ever needs the head of one request per HTTP/1.1
connection: a WebSocket upgrade on ``/v1/ws`` or a ``GET`` of a static file.
This parser is strict and bounded (:data:`MAX_HEAD` bytes, :data:`MAX_HEADERS`
lines) and much cheaper than a general HTTP/1.1 state machine, which matters
in reconnect storms (tens of thousands of upgrades per second). The frames
after the upgrade are handled by :mod:`gateway.protocol.wsframe`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEAD",
    "MAX_HEADERS",
    "HttpError",
    "Request",
    "accept_token",
    "check_upgrade",
    "parse_head",
    "response",
    "upgrade_response",
]

MAX_HEAD: Final = 8192
MAX_HEADERS: Final = 64
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]


def parse_head(buf: bytes) -> tuple[Request, int] | None:
    """The request whose head is complete in ``buf`` and the head's length,
    or None when more bytes are needed. Raises :class:`HttpError` (400/431)
    for anything malformed or too large."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(431, "request head too large")
        # an early sign of garbage: the request line must look like one
        nl = buf.find(b"\r\n")
        if nl >= 0:
            _request_line(buf[:nl])
        elif len(buf) > 2048:
            raise HttpError(400, "request line too long")
        return None
    if end + 4 > MAX_HEAD:
        raise HttpError(431, "request head too large")
    lines = buf[:end].split(b"\r\n")
    method, target = _request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        # (three scans in C: a generator over the characters cost ~10% of a
        # worker's time in connection storms)
        if b"\n" in value or b"\r" in value or b"\x00" in value:
            raise HttpError(400, "bad header value")
        text = value.strip(b" \t").decode("latin-1")
        key = name.decode("ascii").lower()
        if key in headers:
            if key in ("host", "sec-websocket-key", "origin", "content-length", "upgrade"):
                raise HttpError(400, f"duplicate {key} header")
            headers[key] += ", " + text
        else:
            headers[key] = text
    path, _, query = target.partition("?")
    return Request(method, path, query, headers), end + 4


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(400, "malformed request line")
    method, target = parts[0], parts[1]
    if not _TOKEN.fullmatch(method) or not target.startswith(b"/") or len(target) > 2048:
        raise HttpError(400, "malformed request line")
    try:
        return method.decode("ascii"), target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "non-ASCII request target") from None


def check_upgrade(req: Request) -> str:
    """Validates a WebSocket upgrade request (RFC 6455 section 4.2.1);
    returns the ``Sec-WebSocket-Key``. Raises :class:`HttpError`."""
    h = req.headers
    if req.method != "GET":
        raise HttpError(405, "WebSocket upgrade needs GET")
    if "host" not in h:
        raise HttpError(400, "missing Host")
    if h.get("upgrade", "").lower() != "websocket":
        raise HttpError(426, "expected Upgrade: websocket")
    if "upgrade" not in (t.strip().lower() for t in h.get("connection", "").split(",")):
        raise HttpError(400, "expected Connection: Upgrade")
    if h.get("sec-websocket-version") != "13":
        raise HttpError(426, "unsupported Sec-WebSocket-Version (need 13)")
    key = h.get("sec-websocket-key", "")
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise HttpError(400, "bad Sec-WebSocket-Key")
    return key


def accept_token(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode()


def upgrade_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_token(key)}\r\n\r\n"
    ).encode("ascii")


def response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    extra: dict[str, str] | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete ``Connection: close`` response."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-cache",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
