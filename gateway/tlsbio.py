"""One TLS connection over memory buffers (:class:`ssl.SSLObject`),
sans-IO: the caller feeds it what its socket read and writes what
:meth:`TlsBio.seal` returns, so a TLS connection is read by an event loop
like a plain one, with no task of its own and no trio round per read. Used
by the downstream links (client side), desk-sim and the visitors' TLS
connections (server side: gateway/server/pipe.py ``TlsRawPipe``)."""

from __future__ import annotations

import contextlib
import ssl
from typing import Final

__all__ = ["TLS_READ", "TlsBio"]

#: Plaintext taken per ``SSLObject.read`` (a TLS record holds at most 16 KiB).
TLS_READ: Final = 1 << 16


class TlsBio:
    """A TLS connection over memory buffers (see the module docstring).
    The client side verifies the peer for ``server_name``;
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

    def resumed(self) -> bool:
        """Whether the finished handshake resumed a session (a ticket)."""
        return bool(self.obj.session_reused)

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

    def pending(self) -> int:
        """Bytes the connection has to send (without new plaintext)."""
        return self._out.pending

    def close_notify(self) -> bytes:
        """Ends the TLS session from this side: the records to send (the
        close_notify alert) after any still pending."""
        with contextlib.suppress(ssl.SSLWantReadError):  # the peer's is not awaited
            self.obj.unwrap()
        return self._out.read()

    def seal(self, plain: bytes | bytearray) -> bytes:
        """The records to send for ``plain``, after any the connection
        still had to send (handshake, key updates), in order."""
        if plain:
            self.obj.write(plain)
        return self._out.read()
