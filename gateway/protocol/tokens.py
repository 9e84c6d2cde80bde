"""Visitor tokens (docs/protocol.md, "Tokens").

``token = b64url(payload) "." b64url(HMAC-SHA256(secret, b64url(payload)))``
without padding, ``payload`` being compact JSON with ``tn`` (tenant), ``vid``
(visitor id), ``exp`` and ``iat`` (unix seconds) and optionally ``kid``.

Verification order: length cap (:data:`MAX_TOKEN_LEN`), strict base64url,
payload JSON with string ``tn`` (and string ``kid`` if present), tenant and
secret lookup, constant-time signature check, claim types, expiry. A token
with a ``kid`` is checked against that secret only; one without is checked
against each of the tenant's secrets. Every failure is 4501 ``UNAUTHORIZED``
except an ``exp`` in the past (``exp < now``), which is 4502
``TOKEN_EXPIRED`` -- reported only for a token whose signature is valid.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.protocol.codes import Code, ProtocolError

__all__ = [
    "MAX_TOKEN_LEN",
    "Claims",
    "Tenant",
    "TokenVerifier",
    "b64url_decode",
    "b64url_encode",
    "mint",
    "normalize_origin",
]

#: Longest token accepted (characters); longer ones are refused unparsed.
MAX_TOKEN_LEN: Final = 2048

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Claims:
    tenant: str
    visitor: str
    exp: int
    iat: int
    kid: str | None


@dataclass(frozen=True)
class Tenant:
    """A tenant: its signing secrets by key id (the first one is used to mint)
    and the browser origins allowed to connect (``"*"`` allows any)."""

    name: str
    secrets: dict[str, bytes] = field(repr=False)  # never in logs
    allowed_origins: tuple[str, ...] = ()

    @property
    def primary_kid(self) -> str:
        """The key id used to mint new tokens (the first secret)."""
        return next(iter(self.secrets))


def b64url_encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; ValueError otherwise."""
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise ValueError("bad base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signing_input: str) -> str:
    # hmac.digest: one call into OpenSSL (hmac.new builds a Python HMAC object
    # with two hash contexts first, ~8% of a worker's time in connection storms)
    return b64url_encode(hmac.digest(secret, signing_input.encode("ascii"), "sha256"))


def mint(
    tenant: str, visitor: str, secret: bytes, ttl_s: int, now: float, kid: str | None = None
) -> str:
    """A token for ``visitor`` of ``tenant`` valid from ``now`` for ``ttl_s``
    seconds."""
    iat = int(now)
    payload: dict[str, Any] = {"tn": tenant, "vid": visitor, "exp": iat + int(ttl_s), "iat": iat}
    if kid is not None:
        payload["kid"] = kid
    body = b64url_encode(
        json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    )
    return f"{body}.{_sign(secret, body)}"


def _unauthorized(reason: str) -> ProtocolError:
    return ProtocolError(Code.UNAUTHORIZED, reason)


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` with scheme and host lower-cased and a default
    port (80 for http/ws, 443 for https/wss) dropped. ValueError when the text
    is not of that form (a path, query, user info or empty host)."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not scheme or not rest:
        raise ValueError(f"bad origin {origin!r}")
    scheme = scheme.lower()
    if any(c in rest for c in "/?#@ \t"):
        raise ValueError(f"bad origin {origin!r}")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ValueError(f"bad origin {origin!r}")
        host, tail = rest[: close + 1], rest[close + 1 :]
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad origin {origin!r}")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_ = rest.partition(":")
        port_text = port_text_ if colon else None
    if not host:
        raise ValueError(f"bad origin {origin!r}")
    host = host.lower()
    if port_text is None:
        return f"{scheme}://{host}"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad origin {origin!r}")
    port = int(port_text)
    if _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class TokenVerifier:
    """Verifies tokens against a fixed set of tenants and checks origins."""

    def __init__(self, tenants: Mapping[str, Tenant]) -> None:
        self._tenants = {sys.intern(name): t for name, t in tenants.items()}
        self._any_origin: set[str] = set()
        self._origins: dict[str, frozenset[str]] = {}
        for name, t in self._tenants.items():
            allowed: set[str] = set()
            for o in t.allowed_origins:
                if o == "*":
                    self._any_origin.add(name)
                else:
                    allowed.add(normalize_origin(o))
            self._origins[name] = frozenset(allowed)

    def tenant(self, name: str) -> Tenant | None:
        """Tenant ``name`` as configured, or None."""
        return self._tenants.get(name)

    def verify(self, token: str, now: float) -> Claims:
        """The claims of a valid token; ``ProtocolError(UNAUTHORIZED)`` or
        ``ProtocolError(TOKEN_EXPIRED)`` otherwise."""
        if type(token) is not str or not token:
            raise _unauthorized("malformed token")
        if len(token) > MAX_TOKEN_LEN:
            raise _unauthorized("token too long")
        body, dot, sig = token.partition(".")
        if not dot or not body or not sig or not token.isascii():
            raise _unauthorized("malformed token")
        try:
            payload = json.loads(b64url_decode(body))
            b64url_decode(sig)
        except (ValueError, binascii.Error, RecursionError, UnicodeDecodeError):
            raise _unauthorized("malformed token") from None
        if type(payload) is not dict:
            raise _unauthorized("malformed token")
        tn = payload.get("tn")
        kid = payload.get("kid")
        if type(tn) is not str or (kid is not None and type(kid) is not str):
            raise _unauthorized("malformed token")
        tenant = self._tenants.get(tn)
        if tenant is None:
            raise _unauthorized("unknown tenant")
        if kid is not None:
            secret = tenant.secrets.get(kid)
            if secret is None:
                raise _unauthorized("unknown key id")
            candidates: Any = (secret,)
        else:
            candidates = tenant.secrets.values()
        ok = False
        for secret in candidates:
            # evaluate every candidate: no early exit on a match
            ok |= hmac.compare_digest(_sign(secret, body), sig)
        if not ok:
            raise _unauthorized("bad token signature")
        vid = payload.get("vid")
        exp = payload.get("exp")
        iat = payload.get("iat")
        if type(vid) is not str or not vid or type(exp) is not int or type(iat) is not int:
            raise _unauthorized("malformed token claims")
        if exp < now:
            raise ProtocolError(Code.TOKEN_EXPIRED)
        # the configured name (interned), not the token's copy: every
        # session of the tenant then holds one string
        return Claims(tenant=sys.intern(tn), visitor=vid, exp=exp, iat=iat, kid=kid)

    def origin_allowed(self, tenant: str, origin: str | None) -> bool:
        """No ``Origin`` (mobile SDKs, servers) is always allowed; otherwise
        the tenant must list ``"*"`` or the same ``scheme://host[:port]``
        (case-insensitive, default ports ignored). Unknown tenant: False."""
        if origin is None:
            return True
        allowed = self._origins.get(tenant)
        if allowed is None:
            return False
        if tenant in self._any_origin:
            return True
        try:
            return normalize_origin(origin) in allowed
        except ValueError:
            return False
