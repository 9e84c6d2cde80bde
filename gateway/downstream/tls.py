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

:class:`TlsBio` is one connection's TLS over memory buffers, driven by the
link (gateway/downstream/link.py) or by desk-sim.

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

__all__ = ["ALPN", "TlsBio", "check_cluster", "client_context", "handshake", "server_context"]

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


class TlsBio:
    """A TLS connection over memory buffers (:class:`ssl.SSLObject`): the
    link (or desk-sim) feeds it what its socket read and writes what
    :meth:`seal` returns, so a TLS link is read by the worker's event loop
    like a plain one, with no task of its own and no trio round per read
    (sans-IO). The client side verifies the peer for ``server_name``;
    ``server_name=None`` makes the server side."""

    __slots__ = ("_in", "_out", "obj")

    def __init__(self, ctx: ssl.SSLContext, server_name: str | None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        server = server_name is None
        self.obj = ctx.wrap_bio(
            self._in, self._out, server_side=server, server_hostname=server_name
        )

    def handshake(self) -> bool:
        """One step of the handshake: True once it is done, False while it
        waits for the peer; ssl.SSLError when it failed (a certificate...)."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket (b"": the peer closed it)."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def open(self) -> bytes:
        """The plaintext of every complete record fed so far (b"" if
        none). EOFError when the peer ended the TLS session; ssl.SSLError
        on a bad record, an alert, or a connection closed mid-session."""
        parts: list[bytes] = []
        while True:
            try:
                chunk = self.obj.read(TLS_READ)
            except ssl.SSLWantReadError:
                break  # no complete record left
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:  # the peer's close_notify
                if parts:
                    break  # this data first; the next call reports the end
                raise EOFError("the peer ended the TLS session")
            parts.append(chunk)
        return b"".join(parts)

    def seal(self, plain: bytes | bytearray) -> bytes:
        """The records to send for ``plain``, after any the connection
        still had to send (handshake, key updates), in order."""
        if plain:
            self.obj.write(plain)
        return self._out.read()


#: Plaintext taken per ``SSLObject.read`` (a TLS record holds at most 16 KiB).
TLS_READ: Final = 1 << 16


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
