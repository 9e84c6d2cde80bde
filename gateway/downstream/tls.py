"""TLS for downstream links: the gateway's client context per cluster and
desk-sim's server context.

A cluster with ``tls = true`` links to its endpoints over TLS 1.2 or later
with ALPN ``h2``. The endpoint's certificate is verified against
``ca_file`` (default: the system's trust store) for the name
``server_name`` (default: the endpoint's host, so an IP address endpoint
needs a certificate naming that address, or ``server_name``). With
``cert_file`` and ``key_file`` the gateway presents a client certificate
(mutual TLS), for downstreams that only accept known gateways.

desk-sim serves TLS with ``--tls-cert``/``--tls-key`` and, with
``--tls-client-ca``, requires a client certificate signed by that CA.

:class:`~gateway.tlsbio.TlsBio` (one connection's TLS over memory
buffers) drives a link's TLS (gateway/downstream/link.py) and desk-sim's;
:func:`handshake` is its trio shell for them.

The clusters' contexts are built when the configuration is loaded, so a
missing or unreadable file, a key that does not match its certificate or a
CA file with no certificate in it is a configuration error at startup
(:func:`check_cluster`), not a link that silently never comes up;
desk-sim's when it starts (it exits with 2).
"""

from __future__ import annotations

import ssl
from typing import Final

import trio

from gateway.downstream.settings import ClusterSpec
from gateway.tlsbio import TLS_READ, TlsBio

__all__ = [
    "ALPN",
    "TLS_READ",
    "TlsBio",
    "check_cluster",
    "client_context",
    "handshake",
    "server_context",
]

#: The only application protocol a link speaks.
ALPN: Final = "h2"


def client_context(spec: ClusterSpec) -> ssl.SSLContext:
    """The context of a TLS cluster's links (see the module docstring).
    OSError or ssl.SSLError when a file cannot be used."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    if spec.cert_file is not None:
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
    return ctx


def server_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    """desk-sim's context: its certificate chain and key, ALPN ``h2``;
    with ``client_ca`` a client certificate signed by it is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_cluster(spec: ClusterSpec) -> None:
    """Builds the cluster's context once to find unusable files; ValueError
    naming the cluster and the problem."""
    if not spec.tls:
        return
    try:
        client_context(spec)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(
            f"[downstream.clusters.{spec.name}]: cannot set up TLS from "
            f"ca_file/cert_file/key_file: {e}"
        ) from None


async def handshake(tls: TlsBio, tcp: trio.SocketStream) -> bool:
    """Runs ``tls``'s handshake over ``tcp`` (the thin trio shell of
    :class:`TlsBio`): True once done, False if the peer closed the
    connection first; ssl.SSLError when the handshake failed (whatever
    alert it produced is left to :meth:`TlsBio.seal`)."""
    while True:
        done = tls.handshake()
        out = tls.seal(b"")
        if out:
            await tcp.send_all(out)
        if done:
            return True
        data = await tcp.receive_some(TLS_READ)
        if not data:
            return False
        tls.feed(data)
