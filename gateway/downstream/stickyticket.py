"""Sticky tickets, sans-IO: the endpoint and agent that served a visitor,
sealed for the visitor's client to carry into its next session.

A worker remembers who served a visitor in its own sticky table
(:class:`gateway.downstream.routing.StickyTable`), which another worker or
another gateway node does not see; the visitor's next session lands on
whichever worker the kernel or the load balancer picks. So when a session
is assigned an agent the gateway also sends the visitor a ``sticky`` frame
whose ticket seals ``(endpoint, agent, issued)``, and a client that presents
it in its next ``hello`` (``sticky``) is routed as if that worker had served
it, on any worker of any node that shares the tenant's configuration
(docs/protocol.md).

The ticket is AES-256-GCM under a key derived (HKDF-SHA256, RFC 5869) from
one of the tenant's token secrets, named by its key id, with the tenant and
visitor as associated data: only the gateway can make one, a ticket works
only for the visitor it was issued to, and removing a secret from the
configuration retires the tickets made under it. The sealing is the native
keyring's (:class:`gateway.crypto.Keyring`), whose nonces are a counter
under a fixed field unique to the keyring (the node id and a per-node
counter kept in ``state_dir``), so no two tickets of any worker or node
share a nonce; it is made on the first ticket, so a worker that never
issues or reads one never touches the state directory. A ticket that does not open (altered,
another visitor's, an unknown tenant or key id, older than the sticky TTL,
issued in the future) is ignored: the session is routed as any new one.

Text form: ``s1.<kid, base64url>.<nonce || ciphertext || tag, base64url>``;
the sealed part is the msgpack array ``[endpoint, agent or nil, issued]``
(issued: Unix seconds).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Callable
from typing import Final

import msgpack

from gateway.crypto import CryptoError, Keyring
from gateway.protocol.tokens import Tenant, b64url_decode, b64url_encode
from gateway.session.visitor import MAX_STICKY_LEN

__all__ = ["MAX_TICKET_LEN", "StickyTickets", "hkdf_sha256"]

#: Longest ticket a ``hello`` may carry (characters): what the visitor
#: protocol lets through, so every ticket made fits in a hello.
MAX_TICKET_LEN: Final = MAX_STICKY_LEN
#: Longest endpoint key and agent name a ticket is made for; a longer one
#: gets no ticket (the session is still served; only the hint is lost).
MAX_FIELD_LEN: Final = 256
#: A ticket issued up to this far in the future still opens (clocks of
#: different gateway nodes).
CLOCK_SKEW_S: Final = 300.0
#: Derived keys kept (per tenant and key id); the cache is emptied past it.
MAX_KEYS: Final = 4096
_PREFIX: Final = "s1"
_INFO: Final = b"chat-gateway sticky ticket v1"
#: What sealing adds: the 12-byte nonce before, the 16-byte tag after.
_OVERHEAD: Final = 12 + 16


def _b64d(text: str) -> bytes:
    """The tokens' strict base64url, canonical only (unused low bits zero,
    so each byte string has one text form); ValueError otherwise."""
    out = b64url_decode(text)
    if b64url_encode(out) != text:
        raise ValueError("non-canonical base64url")
    return out


def _aad(tenant: str, visitor: str) -> bytes:
    return b"sticky\x00" + tenant.encode() + b"\x00" + visitor.encode()


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt (a zero-filled one)."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 gives 1..8160 bytes")
    prk = hmac.new(bytes(32), secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((i,)), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


class StickyTickets:
    """Seals and opens sticky tickets with keys derived from the tenants'
    token secrets, as ``tenant(name)`` returns them now (so a
    configuration reload that changes a tenant's secrets takes effect at
    the next ticket), in the keyring ``keyring()`` makes when first
    needed."""

    __slots__ = ("_handles", "_keyring", "_make", "_tenant", "error")

    def __init__(
        self, tenant: Callable[[str], Tenant | None], keyring: Callable[[], Keyring]
    ) -> None:
        self._tenant = tenant
        self._make = keyring
        self._keyring: Keyring | None = None
        #: why no keyring could be made (its nonce field needs the state
        #: directory): no tickets are made or opened then
        self.error: str | None = None
        # (tenant, kid) -> (the secret its key was derived from, key handle)
        self._handles: dict[tuple[str, str], tuple[bytes, int]] = {}

    def _key(self, tenant: str, kid: str | None) -> tuple[Keyring, str, int] | None:
        """The keyring, key id and key handle for ``tenant``'s key ``kid``
        (its primary one for None), or None when it has no such secret."""
        t = self._tenant(tenant)
        if t is None or not t.secrets:
            return None
        kid = t.primary_kid if kid is None else kid
        secret = t.secrets.get(kid)
        if secret is None:
            return None
        kr = self._keyring
        if kr is None:
            if self.error is not None:
                return None
            try:
                kr = self._keyring = self._make()
            except (OSError, CryptoError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return None
        hit = self._handles.get((tenant, kid))
        if hit is not None:
            if hit[0] == secret:
                return kr, kid, hit[1]
            kr.remove(hit[1])  # the secret changed under the same key id
            del self._handles[(tenant, kid)]
        if len(self._handles) >= MAX_KEYS:
            for _, h in self._handles.values():
                kr.remove(h)
            self._handles.clear()
        info = _INFO + b"\x00" + tenant.encode() + b"\x00" + kid.encode()
        handle = kr.add("aes-256-gcm", hkdf_sha256(secret, info))
        self._handles[(tenant, kid)] = (secret, handle)
        return kr, kid, handle

    def seal(
        self, tenant: str, visitor: str, endpoint: str, agent: str | None, now: float
    ) -> str | None:
        """A ticket for ``visitor`` of ``tenant``, issued at ``now`` (Unix
        seconds); None when the tenant has no secret or a field is too long
        to carry."""
        if len(endpoint) > MAX_FIELD_LEN or (agent is not None and len(agent) > MAX_FIELD_LEN):
            return None
        k = self._key(tenant, None)
        if k is None:
            return None
        kr, kid, handle = k
        plain = msgpack.packb([endpoint, agent, int(now)])
        (sealed,) = kr.seal_many([(handle, plain, _aad(tenant, visitor))])
        text = f"{_PREFIX}.{b64url_encode(kid.encode())}.{b64url_encode(sealed)}"
        return text if len(text) <= MAX_TICKET_LEN else None

    def open(
        self, tenant: str, visitor: str, ticket: str, now: float, ttl_s: float
    ) -> tuple[str, str | None, float] | None:
        """``(endpoint, agent, issued)`` of a ticket issued to ``visitor``
        of ``tenant`` at most ``ttl_s`` before ``now`` (Unix seconds);
        None for anything else."""
        if len(ticket) > MAX_TICKET_LEN or not ticket.isascii():
            return None
        parts = ticket.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX:
            return None
        try:
            kid = _b64d(parts[1]).decode()
            sealed = _b64d(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if len(sealed) < _OVERHEAD:
            return None
        k = self._key(tenant, kid)
        if k is None:
            return None
        kr, _, handle = k
        (plain,) = kr.open_many([(handle, sealed, _aad(tenant, visitor))])
        if plain is None:
            return None
        try:
            fields = msgpack.unpackb(plain)
        except (ValueError, msgpack.UnpackException):
            return None
        if type(fields) is not list or len(fields) != 3:
            return None
        endpoint, agent, issued = fields
        if type(endpoint) is not str or (agent is not None and type(agent) is not str):
            return None
        if type(issued) is not int or not (now - ttl_s <= issued <= now + CLOCK_SKEW_S):
            return None
        return endpoint, agent, float(issued)
