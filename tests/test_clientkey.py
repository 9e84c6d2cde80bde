"""What the per-address limits count a client under (gateway.server.clientkey),
and that a worker counts its connections so."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from gateway.server.clientkey import client_key
from tests.gwserver import running


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # IPv4 on a dual-stack listener
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next one
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        ("", ""),
    ],
)
def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4(addr: str, key: str) -> None:
    assert client_key(addr) == key


def _has_dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_dual_stack(), reason="no IPv6 on this host")
async def test_a_dual_stack_worker_counts_ipv4_clients_by_their_own_address(
    tmp_path: Path,
) -> None:
    """A worker listening on ``::`` sees IPv4 clients as ``::ffff:a.b.c.d``:
    each is counted as its IPv4 address, so the per-address cap holds them
    one by one (and does not lump every IPv4 client into one /64)."""
    async with running(tmp_path, listen_host="::", max_conns_per_ip=2) as gw:
        held = []
        for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
            s = trio.socket.socket()
            await s.bind((src, 0))
            await s.connect(("127.0.0.1", gw.port))
            held.append(s)
        with trio.fail_after(5):
            while sum(gw.w.per_ip.values()) < 3:
                await trio.sleep(0.01)
        assert gw.w.per_ip == {"127.0.0.2": 2, "127.0.0.3": 1}
        # a third from 127.0.0.2 is over its cap of 2: HTTP 429
        over = trio.socket.socket()
        await over.bind(("127.0.0.2", 0))
        await over.connect(("127.0.0.1", gw.port))
        with trio.fail_after(5):
            answer = await over.recv(4096)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        for s in [*held, over]:
            s.close()
