"""The key a client's address counts under for the per-address limits
(open connections, messages and new sessions per source address).

An IPv4 address is its own key. An IPv6 host is usually given a whole /64
and picks addresses in it at will (privacy addresses, RFC 8981), so a limit
per /128 would not hold one client back: IPv6 addresses count per /64.
An IPv4-mapped address (``::ffff:a.b.c.d``, what a dual-stack listener on
``::`` reports for IPv4 clients) is the IPv4 address, not a share of one
/64 for every IPv4 client; a zone index (``%eth0``) is dropped.
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = ["IPV6_PREFIX", "client_key"]

#: The IPv6 prefix length addresses are counted under.
IPV6_PREFIX: Final = 64


def client_key(addr: str) -> str:
    """``addr`` (as the socket reports it) as the per-address limits' key."""
    if ":" not in addr:
        return addr  # IPv4 (or not an address at all: counted as it is)
    try:
        ip = ipaddress.IPv6Address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
