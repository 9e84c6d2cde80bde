"""The visitors' TLS server context, built from the configured certificate
and key at start and again on a configuration reload
(:mod:`gateway.reload`)."""

from __future__ import annotations

import hashlib
import ssl

from gateway.config import ConfigError

__all__ = ["files_digest", "visitor_context"]


def visitor_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ server context with ALPN ``h2`` and ``http/1.1``;
    :class:`ConfigError` when the files do not load (missing, not PEM, a key
    that does not match the certificate)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls_cert / tls_key: cannot load {cert_file}, {key_file}: {e}") from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


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
