"""TLS session-ticket keys shared by every worker (and, from a key file,
by every node), so that a visitor who reconnects resumes its TLS session
whichever worker the kernel hands the new connection to.

OpenSSL encrypts the session tickets it issues with keys of its server
context, made at random for each context. Each worker builds its own
context, so a ticket only resumed on the worker that issued it: with
``SO_REUSEPORT`` spreading new connections over the workers by their
addresses, a reconnecting visitor landed on another worker, and paid a
full handshake (a certificate signature on the gateway, the chain's
verification on the visitor's device), on most reconnects with more than
one worker. A reconnect storm after a network blip is the worst moment
for that (docs/benchmarks.md, "Reconnects resume their TLS session").

Python's :mod:`ssl` has no call to set the keys. :func:`install` sets them
with OpenSSL's own control call (``SSL_CTX_ctrl`` with
``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``), through cffi, on the ``SSL_CTX`` the
:class:`ssl.SSLContext` wraps: the first field after the object header of
CPython's ``PySSLContext`` (the same in every CPython since 3.4). Before it
writes anything, it checks that the pointer is the context's: it sets the
context's ``num_tickets`` through Python to two values and reads each back
through OpenSSL. Where any of that does not hold (another Python, an
OpenSSL linked statically into ``_ssl``, a mapped libssl of another
version than :mod:`ssl` reports, no ``/proc``), it returns False
and the context keeps OpenSSL's per-context keys, as before.

A key is 80 bytes (OpenSSL's layout: a 16-byte name that tickets carry,
a 32-byte HMAC key, a 32-byte AES key). Without a configured key file
(``tls_ticket_key``), the supervisor draws one at start and hands it to
its workers in :data:`KEY_ENV`: tickets then resume on any worker of the
node until the supervisor restarts. A key file (``openssl rand 80 >
file``) shared by the nodes lets tickets resume on any node, and a reload
that finds new contents in it starts using them (tickets issued under the
old key then get a full handshake).
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["KEY_BYTES", "KEY_ENV", "install", "key_from_env", "key_to_env", "new_key", "read_key"]

#: A ticket key's size: name (16), HMAC key (32), AES key (32).
KEY_BYTES: Final = 80
#: The variable in which the supervisor hands its key to its workers (hex).
KEY_ENV: Final = "GATEWAY_WORKER_TICKET_KEY"

# OpenSSL's ssl.h (the same numbers in 1.0.2 to 3.x)
_SET_KEYS: Final = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_GET_KEYS: Final = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS

_log = logging.getLogger("gateway.tickets")


class TicketKeyError(ValueError):
    """A ticket key file that cannot be used (missing, not 80 bytes)."""


def new_key() -> bytes:
    """A fresh random key."""
    return os.urandom(KEY_BYTES)


def key_to_env(key: bytes) -> str:
    return key.hex()


def key_from_env(env: Mapping[str, str]) -> bytes | None:
    """The supervisor's key from ``env`` (None when absent or malformed:
    a worker started by something else keeps per-worker keys)."""
    text = env.get(KEY_ENV)
    if not text:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        return None
    return key if len(key) == KEY_BYTES else None


def read_key(path: str) -> bytes:
    """The 80 bytes of a key file; :class:`TicketKeyError` otherwise."""
    try:
        with open(path, "rb") as f:
            key = f.read(KEY_BYTES + 1)
    except OSError as e:
        raise TicketKeyError(f"cannot read {path}: {e.strerror or e}") from None
    if len(key) != KEY_BYTES:
        raise TicketKeyError(
            f"{path} must hold exactly {KEY_BYTES} bytes (`openssl rand {KEY_BYTES} > {path}`), "
            f"not {len(key)}{' or more' if len(key) > KEY_BYTES else ''}"
        )
    return key


def install(ctx: ssl.SSLContext, key: bytes) -> bool:
    """Makes ``ctx`` (a server context) issue and accept tickets under
    ``key``; False when this Python's ssl module cannot be reached safely
    (see the module docstring), with ``ctx`` left as it was."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a ticket key has {KEY_BYTES} bytes, not {len(key)}")
    lib = _libssl()
    if lib is None:
        return False
    ffi, c = lib
    ptr = _ctx_pointer(ctx, ffi, c)
    if ptr is None:
        return False
    buf = ffi.new("unsigned char[]", key)
    if c.SSL_CTX_ctrl(ptr, _SET_KEYS, KEY_BYTES, buf) != 1:
        return False
    back = ffi.new("unsigned char[]", KEY_BYTES)
    if c.SSL_CTX_ctrl(ptr, _GET_KEYS, KEY_BYTES, back) != 1:
        return False
    return bytes(ffi.buffer(back)) == key


def _ctx_pointer(ctx: ssl.SSLContext, ffi: Any, c: Any) -> Any:
    """The ``SSL_CTX *`` of ``ctx``, checked (None when the check fails)."""
    if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] < (3, 15):
        return None
    if not isinstance(ctx, ssl.SSLContext) or ctx.protocol != ssl.PROTOCOL_TLS_SERVER:
        return None
    ptr = ffi.cast("void **", id(ctx) + object.__basicsize__)[0]
    if ptr == ffi.NULL:
        return None
    old = ctx.num_tickets
    try:
        for n in (old + 3, old + 1):
            ctx.num_tickets = n
            if c.SSL_CTX_get_num_tickets(ptr) != n:
                return None
    except (ValueError, AttributeError):
        return None
    finally:
        ctx.num_tickets = old
    return ptr


_LIB: list[tuple[Any, Any] | None] = []


def _libssl() -> tuple[Any, Any] | None:
    """cffi's handle on the libssl that this process's ``_ssl`` uses
    (found in ``/proc/self/maps``), made once; None without one."""
    if not _LIB:
        _LIB.append(_open_libssl())
    return _LIB[0]


def _open_libssl() -> tuple[Any, Any] | None:
    import _ssl  # noqa: F401  (maps the libssl it links, if it links one)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libssl.so" in line}
    except OSError:
        return None
    if len(paths) != 1:
        _log.debug("ticket keys: libssl mapped %d times", len(paths))
        return None
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(
        "long SSL_CTX_ctrl(void *ctx, int cmd, long larg, void *parg);\n"
        "size_t SSL_CTX_get_num_tickets(const void *ctx);\n"
        "unsigned long OpenSSL_version_num(void);"
    )
    try:
        lib = ffi.dlopen(paths.pop())
        # the same OpenSSL as ssl's (not another one that some other
        # extension mapped while _ssl has its own built in)
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return None
    except (OSError, AttributeError):
        return None
    return ffi, lib
