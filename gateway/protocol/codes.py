"""Close and error codes of the visitor protocol (docs/protocol.md, "Codes").

Codes 4000-4499 (and 1001, 1011) mean "reconnect with resume and backoff";
4500-4999 and the RFC 6455 transport-violation codes mean "do not reconnect
until the cause is fixed".
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["DEFAULT_REASONS", "Code", "ProtocolError", "is_reconnect"]


class Code(enum.IntEnum):
    """Every code of docs/protocol.md; the same numbers are used as WebSocket
    close codes and in ``error`` frames."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    HEARTBEAT_TIMEOUT = 4001
    SLOW_CONSUMER = 4002
    OVERLOADED = 4003
    HELLO_TIMEOUT = 4004
    TAKEN_OVER = 4005
    TOO_MANY_CONNECTIONS = 4006
    RATE_LIMITED = 4029
    WINDOW_EXCEEDED = 4409
    DOWNSTREAM_BUSY = 4429
    BAD_FRAME = 4500
    UNAUTHORIZED = 4501
    TOKEN_EXPIRED = 4502
    NO_HELLO = 4503
    UNKNOWN_TYPE = 4504
    ORIGIN_NOT_ALLOWED = 4505
    BAD_RESUME = 4506
    UNSUPPORTED_VERSION = 4507


#: The short reason text of docs/protocol.md for each code.
DEFAULT_REASONS: Final[dict[Code, str]] = {
    Code.NORMAL: "normal",
    Code.GOING_AWAY: "going away",
    Code.PROTOCOL_ERROR: "protocol error",
    Code.INVALID_PAYLOAD: "invalid payload",
    Code.POLICY: "policy",
    Code.TOO_BIG: "too big",
    Code.INTERNAL: "internal error",
    Code.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    Code.SLOW_CONSUMER: "slow consumer",
    Code.OVERLOADED: "overloaded",
    Code.HELLO_TIMEOUT: "hello timeout",
    Code.TAKEN_OVER: "taken over",
    Code.TOO_MANY_CONNECTIONS: "too many connections",
    Code.RATE_LIMITED: "rate limited",
    Code.WINDOW_EXCEEDED: "window exceeded",
    Code.DOWNSTREAM_BUSY: "downstream busy",
    Code.BAD_FRAME: "bad frame",
    Code.UNAUTHORIZED: "unauthorized",
    Code.TOKEN_EXPIRED: "token expired",
    Code.NO_HELLO: "no hello",
    Code.UNKNOWN_TYPE: "unknown frame type",
    Code.ORIGIN_NOT_ALLOWED: "origin not allowed",
    Code.BAD_RESUME: "bad resume",
    Code.UNSUPPORTED_VERSION: "unsupported version",
}

_RECONNECT_TRANSPORT: Final = frozenset({Code.GOING_AWAY, Code.INTERNAL})


def is_reconnect(code: int) -> bool:
    """True when a client should reconnect (with resume and backoff).

    That is 1001, 1011 and the whole 4000-4499 range (including codes not
    defined yet). 1000 (normal end), the other RFC 6455 codes and 4500-4999
    are False.
    """
    if 4000 <= code <= 4499:
        return True
    return code in _RECONNECT_TRANSPORT


class ProtocolError(Exception):
    """Bad input from a peer, raised by the codec and the session.

    ``code`` is the close/error code to report and ``reason`` a short text
    for the ``error`` frame or close reason (defaults to the table's name).
    """

    code: Code
    reason: str

    def __init__(self, code: Code, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason if reason is not None else DEFAULT_REASONS[code]
        super().__init__(code, self.reason)

    def __str__(self) -> str:
        return f"{int(self.code)} {self.reason}"
