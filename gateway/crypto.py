"""Batched AES-GCM and SM4-GCM through the native core.

One call seals or opens a whole batch: the items are packed into one buffer,
the native core runs with the GIL released, and the results come back as a
list. Keys are expanded once, inside the core, and referenced by handle.

Sealed format: ``nonce(12) || ciphertext || tag(16)``. Nonces are made inside
the core: ``fixed(32 bits) || counter(64 bits)``, where the fixed field is
unique per keyring instance (allocated from a file-locked counter in the state
directory, with the node id in its top 8 bits), so a nonce never repeats for a
key across worker processes and restarts. Each key allows ``limit`` seals per
keyring (default 2**32, SP 800-38D section 8.3); past it, sealing raises
:class:`KeyExhaustedError` and the key must be rotated.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from array import array
from collections.abc import Sequence
from itertools import accumulate, chain
from pathlib import Path
from typing import Any, Final

from gateway import fastpath
from gateway._native import ffi, lib
from gateway.ops.names import CRYPTO_BATCH_ITEMS, CRYPTO_BATCH_SECONDS

__all__ = [
    "SUITES",
    "CryptoError",
    "KeyExhaustedError",
    "Keyring",
    "SealedBatch",
    "UnknownHandleError",
    "backends",
    "selfcheck",
]

#: Suite name -> (native id, key length in bytes).
SUITES: Final[dict[str, tuple[int, int]]] = {
    "aes-128-gcm": (1, 16),
    "aes-256-gcm": (2, 32),
    "sm4-gcm": (3, 16),
}
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
OVERHEAD: Final = NONCE_LEN + TAG_LEN
MAX_ITEM_LEN: Final = int(lib.gw_max_item_len())
MAX_BATCH_ITEMS: Final = int(lib.gw_max_batch_items())


def _tune_malloc() -> bool:
    """Keeps batch-sized buffers (hundreds of KiB to MiB) on glibc's heap.

    By default glibc serves allocations over 128 KiB with fresh mmaps and
    trims the heap eagerly, so every batch's input and output buffers would be
    page-faulted in anew: measured here, that doubled the cost of a 1,024 x
    256 B batch and cut 16 KiB throughput by 6x. Raising the mmap and trim
    thresholds (32 MiB / 64 MiB) makes them reuse heap memory instead. Set
    GATEWAY_MALLOC_TUNING=0 to leave malloc alone.
    """
    if os.environ.get("GATEWAY_MALLOC_TUNING", "1") == "0":
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(libc.mallopt(m_mmap_threshold, 32 << 20) == 1)
    return bool(libc.mallopt(m_trim_threshold, 64 << 20) == 1) and ok


MALLOC_TUNED: Final = _tune_malloc()

#: Whether seal_many/open_many read the item list and build results in the
#: native core through the CPython C API (see native/src/pyfast.rs). Off on
#: other interpreters and with GATEWAY_CRYPTO_FASTPATH=0.
FASTPATH: bool = fastpath.enabled("GATEWAY_CRYPTO_FASTPATH", "gw_seal_list")
_ERR_BAD_ITEM: Final = -20
_ERR_NO_MEMORY: Final = -22

_ERR_UNKNOWN_HANDLE: Final = -3
_ERR_KEY_EXHAUSTED: Final = -9
_EPOCH_BITS: Final = 24


class CryptoError(ValueError):
    """Bad input to the crypto core; ``code`` is the native error code and
    ``index`` the offending item (or None when not tied to one item)."""

    def __init__(self, code: int, index: int | None = None, detail: str = "") -> None:
        msg = ffi.string(lib.gw_error_message(code)).decode()
        if detail:
            msg = f"{msg}: {detail}"
        if index is not None:
            msg = f"{msg} (item {index})"
        super().__init__(msg)
        self.code = code
        self.index = index


class UnknownHandleError(CryptoError, KeyError):
    """The key handle is unknown or was removed."""

    def __str__(self) -> str:
        return str(self.args[0])


class KeyExhaustedError(CryptoError):
    """The key reached its invocation limit: rotate it."""


def _raise(code: int, index: int | None = None) -> None:
    if code == _ERR_BAD_ITEM:
        raise TypeError(
            f"items must be (handle: int, data: bytes, aad: bytes) tuples (item {index})"
        )
    if code == _ERR_NO_MEMORY:
        raise MemoryError("out of memory building batch results")
    if code == _ERR_UNKNOWN_HANDLE:
        raise UnknownHandleError(code, index)
    if code == _ERR_KEY_EXHAUSTED:
        raise KeyExhaustedError(code, index)
    raise CryptoError(code, index)


def _state_dir() -> Path:
    env = os.environ.get("GATEWAY_STATE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".local" / "state" / "gateway"


def allocate_fixed_field(state_dir: Path | None = None, node_id: int = 0) -> int:
    """Returns a nonce fixed field never handed out before on this node.

    The low 24 bits come from a counter in ``state_dir/nonce-epoch``,
    incremented under an exclusive ``flock`` and fsynced before use; the top 8
    bits are the node id. 2**24 keyrings per node can be created before the
    counter is exhausted (then keys must be rotated and the file reset).
    """
    if not 0 <= node_id < 256:
        raise ValueError("node_id must be in 0..255")
    d = state_dir if state_dir is not None else _state_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / "nonce-epoch"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        current = int(raw) if raw.isdigit() and raw.isascii() else -1 if raw else 0
        if current < 0:
            raise CryptoError(-4, None, f"corrupt nonce epoch file {path}: {raw[:32]!r}")
        nxt = current + 1
        if nxt >= 1 << _EPOCH_BITS:
            raise KeyExhaustedError(_ERR_KEY_EXHAUSTED, None)
        data = f"{nxt}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the lock
    return (node_id << _EPOCH_BITS) | nxt


_local = threading.local()


def _scratch(size: int) -> bytearray:
    """A per-thread output buffer reused across batches (never shrunk below
    what the last batches needed, dropped when it grows past 64 MiB): saves
    zero-filling a fresh buffer per batch. Results are copied out of it."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < size or len(buf) > max(size, 1 << 26):
        buf = bytearray(max(size, 1 << 16))
        _local.buf = buf
    return buf


class SealedBatch:
    """Zero-copy result of :meth:`Keyring.seal_into`: one buffer plus the end
    offset of each item. ``view(i)`` is a memoryview of item i."""

    __slots__ = ("buffer", "ends")

    def __init__(self, buffer: bytearray, ends: list[int]) -> None:
        self.buffer = buffer
        self.ends = ends

    def __len__(self) -> int:
        return len(self.ends)

    def view(self, i: int) -> memoryview:
        start = self.ends[i - 1] if i else 0
        return memoryview(self.buffer)[start : self.ends[i]]

    def to_list(self) -> list[bytes]:
        b = bytes(self.buffer)
        ends = self.ends
        return list(map(b.__getitem__, map(slice, [0, *ends[:-1]], ends)))


# (suite, op) -> the two histograms' observe methods
_METRICS: dict[tuple[str, str], tuple[Any, Any]] = {}


class Keyring:
    """Expanded keys behind integer handles, with batched seal and open.

    Thread-safe: batches run with the GIL released and may run from several
    threads at once; ``add``/``remove`` wait for running batches.
    """

    def __init__(
        self, *, fixed: int | None = None, state_dir: str | Path | None = None, node_id: int = 0
    ) -> None:
        if fixed is None:
            fixed = allocate_fixed_field(
                Path(state_dir) if state_dir is not None else None, node_id
            )
        if not 0 <= fixed < 1 << 32:
            raise ValueError("fixed field must fit in 32 bits")
        self._fixed = fixed
        ptr = lib.gw_keyring_new(fixed)
        if ptr == ffi.NULL:
            raise MemoryError("gw_keyring_new failed")
        self._kr: Any = ffi.gc(ptr, lib.gw_keyring_free)
        self._suites: dict[int, str] = {}

    @property
    def fixed(self) -> int:
        """The 32-bit nonce fixed field of this keyring."""
        return self._fixed

    def add(self, suite: str, key: bytes, *, limit: int | None = None) -> int:
        """Expands ``key`` for ``suite`` and returns its handle.

        ``limit`` caps the seals allowed with this key in this keyring
        (default 2**32); reaching it raises :class:`KeyExhaustedError`.
        """
        try:
            sid, klen = SUITES[suite]
        except KeyError:
            raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}") from None
        if not isinstance(key, bytes | bytearray | memoryview):
            raise TypeError("key must be bytes")
        if len(key) != klen:
            raise ValueError(f"{suite} needs a {klen}-byte key, got {len(key)} bytes")
        if limit is not None and not 0 < limit < 1 << 64:
            raise ValueError("limit must be in 1..2**64-1")
        ho = ffi.new("uint32_t *")
        rc = lib.gw_keyring_add(self._kr, sid, ffi.from_buffer(key), len(key), limit or 0, ho)
        if rc:
            _raise(rc)
        self._suites[int(ho[0])] = suite
        return int(ho[0])

    def remove(self, handle: int) -> None:
        """Removes a key; its expanded form is zeroized."""
        rc = lib.gw_keyring_remove(self._kr, handle)
        if rc:
            _raise(rc)
        self._suites.pop(handle, None)

    def used(self, handle: int) -> int:
        """Seals made with ``handle`` in this keyring so far."""
        out = ffi.new("uint64_t *")
        rc = lib.gw_keyring_used(self._kr, handle, out)
        if rc:
            _raise(rc)
        return int(out[0])

    def backends(self) -> dict[str, str]:
        """The code paths this keyring's keys run on."""
        return {
            "aes-gcm": ffi.string(lib.gw_keyring_aes_backend(self._kr)).decode(),
            "sm4-gcm": ffi.string(lib.gw_keyring_sm4_backend(self._kr)).decode(),
        }

    # -- batches -------------------------------------------------------------

    @staticmethod
    def _columns(
        items: Sequence[tuple[int, bytes, bytes]],
    ) -> tuple[array[int], bytes, array[int], bytes | None, array[int] | None]:
        n = len(items)
        if n == 0:
            raise CryptoError(-2)
        if n > MAX_BATCH_ITEMS:
            raise CryptoError(-8)
        # One flattening pass, then C-speed slicing into columns: much cheaper
        # than zip(*items) for thousands of small items.
        flat: list[Any] = list(chain.from_iterable(items))
        if len(flat) != 3 * n:
            raise TypeError("items must be (handle, data, aad) tuples")
        datas = flat[1::3]
        aads = flat[2::3]
        try:
            harr = array("I", flat[0::3])
            lens = array("Q", list(map(len, datas)))
            buf = b"".join(datas)
        except (TypeError, OverflowError) as e:
            raise TypeError("items must be (handle: int, data: bytes, aad: bytes) tuples") from e
        if aads.count(b"") != n:  # some AAD present (or not bytes: rejected below)
            try:
                alens: array[int] | None = array("Q", list(map(len, aads)))
                abuf: bytes | None = b"".join(aads)
            except TypeError as e:
                raise TypeError("aad must be bytes") from e
        else:
            alens = abuf = None
        return harr, buf, lens, abuf, alens

    def _split(self, out: bytearray, lens: array[int], delta: int) -> tuple[bytes, ...]:
        """Splits a batch output into bytes objects with one struct call; the
        format (e.g. b"284s284s...") is written by the native core."""
        n = len(lens)
        cap = n * 10  # "16777216s" is the longest code
        fmt = bytearray(cap)
        k = lib.gw_struct_format(
            ffi.from_buffer("uint64_t[]", lens), n, delta, ffi.from_buffer(fmt), cap
        )
        if k < 0:
            _raise(int(k))
        del fmt[k:]
        return struct.unpack_from(bytes(fmt), out)

    def _seal(
        self, items: Sequence[tuple[int, bytes, bytes]], out: bytearray | None, scratch: bool
    ) -> tuple[bytearray, array[int]]:
        harr, buf, lens, abuf, alens = self._columns(items)
        need = sum(lens) + OVERHEAD * len(lens)
        if out is None:
            out = _scratch(need) if scratch else bytearray(need)
        elif len(out) < need:
            raise CryptoError(-6, None, f"need {need} bytes, got {len(out)}")
        err = ffi.new("uintptr_t[2]")
        rc = lib.gw_seal_batch(
            self._kr,
            len(harr),
            ffi.from_buffer("uint32_t[]", harr),
            ffi.from_buffer(buf),
            len(buf),
            ffi.NULL,
            ffi.from_buffer("uint64_t[]", lens),
            ffi.from_buffer(abuf) if abuf else ffi.NULL,
            len(abuf) if abuf else 0,
            ffi.NULL,
            ffi.from_buffer("uint64_t[]", alens) if alens is not None else ffi.NULL,
            ffi.from_buffer(out, require_writable=True),
            len(out),
            err + 1,
            err,
        )
        if rc:
            idx = int(err[0])
            _raise(rc, idx if idx < len(harr) else None)
        return out, lens

    def _fast(self, fn: Any, items: Sequence[tuple[int, bytes, bytes]]) -> list[Any]:
        lst = items if type(items) is list else list(items)
        n = len(lst)
        if n == 0:
            raise CryptoError(-2)
        if n > MAX_BATCH_ITEMS:
            raise CryptoError(-8)
        res: list[Any] = [None] * n
        err = ffi.new("uintptr_t *")
        rc = fn(self._kr, id(lst), id(res), err)
        if rc:
            idx = int(err[0])
            _raise(rc, idx if idx < n else None)
        return res

    def _observe(self, op: str, items: Sequence[tuple[int, bytes, bytes]], t0: float) -> None:
        dt = time.perf_counter() - t0
        try:
            suite = self._suites.get(items[0][0], "unknown")
        except (IndexError, TypeError):
            return
        key = (suite, op)
        m = _METRICS.get(key)
        if m is None:
            m = _METRICS[key] = (
                CRYPTO_BATCH_ITEMS.labels(suite, op).observe,
                CRYPTO_BATCH_SECONDS.labels(suite, op).observe,
            )
        m[0](len(items))
        m[1](dt)

    def seal_many(self, items: Sequence[tuple[int, bytes, bytes]]) -> list[bytes]:
        """Seals ``(handle, plaintext, aad)`` items; returns the sealed items."""
        t0 = time.perf_counter()
        if FASTPATH:
            res: list[bytes] = self._fast(lib.gw_seal_list, items)
        else:
            out, lens = self._seal(items, None, True)
            res = list(self._split(out, lens, OVERHEAD))
        self._observe("seal", items, t0)
        return res

    def seal_into(
        self, items: Sequence[tuple[int, bytes, bytes]], out: bytearray | None = None
    ) -> SealedBatch:
        """Zero-copy seal: results stay in one buffer (``out`` if given and
        large enough, reused across calls), addressed through the returned
        :class:`SealedBatch`."""
        t0 = time.perf_counter()
        buf, lens = self._seal(items, out, False)
        self._observe("seal", items, t0)
        return SealedBatch(buf, list(accumulate(map(OVERHEAD.__add__, lens))))

    def open_many(self, items: Sequence[tuple[int, bytes, bytes]]) -> list[bytes | None]:
        """Opens ``(handle, sealed, aad)`` items; an item that fails
        authentication (or is too short to be sealed) gives ``None``; the
        others are unaffected."""
        t0 = time.perf_counter()
        if FASTPATH:
            opened: list[bytes | None] = self._fast(lib.gw_open_list, items)
            self._observe("open", items, t0)
            return opened
        harr, buf, lens, abuf, alens = self._columns(items)
        n = len(harr)
        out = _scratch(sum(lens))
        status = bytearray(n)
        err = ffi.new("uintptr_t[2]")
        rc = lib.gw_open_batch(
            self._kr,
            n,
            ffi.from_buffer("uint32_t[]", harr),
            ffi.from_buffer(buf),
            len(buf),
            ffi.NULL,
            ffi.from_buffer("uint64_t[]", lens),
            ffi.from_buffer(abuf) if abuf else ffi.NULL,
            len(abuf) if abuf else 0,
            ffi.NULL,
            ffi.from_buffer("uint64_t[]", alens) if alens is not None else ffi.NULL,
            ffi.from_buffer(out, require_writable=True),
            len(out),
            ffi.from_buffer(status, require_writable=True),
            err + 1,
            err,
        )
        if rc:
            idx = int(err[0])
            _raise(rc, idx if idx < n else None)
        res: list[bytes | None] = list(self._split(out, lens, -OVERHEAD))
        if status.count(0) != n:
            for i, st in enumerate(status):
                if st:
                    res[i] = None
        self._observe("open", items, t0)
        return res


def backends() -> dict[str, str]:
    """The code paths selected for this process (after ``GATEWAY_AES_BACKEND``
    / ``GATEWAY_SM4_BACKEND`` overrides) and the best ones the CPU has."""
    return {
        "aes-gcm": ffi.string(lib.gw_keyring_aes_backend(ffi.NULL)).decode(),
        "sm4-gcm": ffi.string(lib.gw_keyring_sm4_backend(ffi.NULL)).decode(),
        "aes-gcm-detected": ffi.string(lib.gw_detected_aes_backend()).decode(),
        "sm4-gcm-detected": ffi.string(lib.gw_detected_sm4_backend()).decode(),
    }


def selfcheck(seconds: float = 0.3) -> str:
    """Round-trips every suite and times a short batch; returns a report."""
    import secrets

    kr = Keyring(fixed=0xFFFFFFFF)  # throwaway keyring: its keys never leave
    lines = [f"backends: {backends()}"]
    for suite, (_, klen) in SUITES.items():
        h = kr.add(suite, secrets.token_bytes(klen))
        items = [(h, secrets.token_bytes(256), b"aad")] * 1024
        sealed = kr.seal_many(items)
        opened = kr.open_many([(h, s, b"aad") for s in sealed])
        if opened != [it[1] for it in items]:
            raise RuntimeError(f"{suite}: round trip failed")
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            kr.seal_many(items)
            n += len(items)
        dt = time.perf_counter() - t0
        lines.append(f"{suite}: seal_many 1024 x 256 B: {n / dt / 1e6:.2f} M msg/s")
    return "\n".join(lines)
