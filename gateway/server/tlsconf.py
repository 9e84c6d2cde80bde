"""The visitors' TLS server context, built from the configured certificate
and key (and session-ticket key, :mod:`gateway.server.tickets`) at start
and again on a configuration reload (:mod:`gateway.reload`)."""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Mapping

from gateway.config import Config, ConfigError
from gateway.server import tickets

__all__ = ["config_context", "files_digest", "visitor_context"]

_log = logging.getLogger("gateway.tls")


def visitor_context(
    cert_file: str,
    key_file: str,
    ticket_key_file: str | None = None,
    shared_key: bytes | None = None,
) -> ssl.SSLContext:
    """TLS 1.2+ server context with ALPN ``h2`` and ``http/1.1``;
    :class:`ConfigError` when the files do not load (missing, not PEM, a key
    that does not match the certificate). Its session tickets are sealed
    with the key in ``ticket_key_file`` (:class:`ConfigError` when it cannot
    be read or installed), else with ``shared_key`` (the supervisor's;
    a warning and OpenSSL's own keys when it cannot be installed), else
    with OpenSSL's own keys for this context."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls_cert / tls_key: cannot load {cert_file}, {key_file}: {e}") from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    # TLS 1.2 renegotiation: a client could ask for handshake after
    # handshake on one connection (each a full handshake's CPU for the
    # worker). OpenSSL 3 already refuses client-initiated ones; say so for
    # whatever OpenSSL this Python has.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if ticket_key_file is not None:
        try:
            key = tickets.read_key(ticket_key_file)
        except tickets.TicketKeyError as e:
            raise ConfigError(f"tls_ticket_key: {e}") from None
        if not tickets.install(ctx, key):
            raise ConfigError(
                "tls_ticket_key: this Python's ssl module does not let the gateway set "
                "session-ticket keys (docs/operations.md, TLS session resumption)"
            )
    elif shared_key is not None and not tickets.install(ctx, shared_key):
        _log.warning(
            "session tickets resume only on the worker that issued them: this Python's ssl "
            "module does not let the gateway set their keys"
        )
    return ctx


def config_context(cfg: Config, env: Mapping[str, str]) -> ssl.SSLContext | None:
    """The visitors' context for ``cfg`` (None without TLS), its tickets
    under the key file, else the supervisor's key found in ``env``
    (:func:`gateway.server.tickets.key_from_env`)."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    shared = tickets.key_from_env(env)
    return visitor_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ticket_key, shared)


def files_digest(*paths: str) -> bytes:
    """SHA-256 over the files' contents (an unreadable file counts as
    empty), to tell whether a reload brought new contents at the same
    paths."""
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        h.update(len(data).to_bytes(8, "big") + data)
    return h.digest()
