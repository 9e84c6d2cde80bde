"""write_some: what the socket did not take comes back."""

from __future__ import annotations

import socket

from gateway.netio import write_some


def test_write_some_returns_what_the_socket_did_not_take() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert write_some(a.fileno(), b"hello") == b""
    assert b.recv(100) == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB: more than the buffers hold
    rest = write_some(a.fileno(), big)
    assert 0 < len(rest) < len(big) and big.endswith(rest)
    assert write_some(a.fileno(), b"more") == b"more"  # full: nothing taken
    b.close()
    assert write_some(a.fileno(), b"x") == b"x"  # failed socket: everything back
    a.close()
