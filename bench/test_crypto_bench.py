"""Crypto benchmarks: gateway.crypto batches side by side with
pyca/cryptography's one-call-per-message loop, in the same run.

Run: make bench-crypto   (or see docs/benchmarks.md for the exact command and
bench/ratios.py to turn the JSON into the ratio table).

Every benchmark records ``messages`` and ``bytes`` per round in extra_info, so
msg/s and GB/s follow from the timing; ``group`` pairs ours with the peer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto import Keyring

KEY16 = bytes(range(16))
KEY32 = bytes(range(32))


def _items(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def _nonces(n: int) -> list[bytes]:
    return [i.to_bytes(12, "big") for i in range(n)]


def _run(benchmark: Any, fn: Callable[[], object], n: int, size: int) -> None:
    benchmark.extra_info["messages"] = n
    benchmark.extra_info["bytes"] = n * size
    benchmark(fn)


def pyca_aes_seal(key: bytes, pts: list[bytes]) -> Callable[[], list[bytes]]:
    enc = AESGCM(key).encrypt
    nonces = _nonces(len(pts))
    return lambda: [n + enc(n, p, None) for n, p in zip(nonces, pts, strict=True)]


def pyca_sm4_seal(key: bytes, pts: list[bytes]) -> Callable[[], list[bytes]]:
    nonces = _nonces(len(pts))

    def run() -> list[bytes]:
        out = []
        for n, p in zip(nonces, pts, strict=True):
            e = Cipher(algorithms.SM4(key), modes.GCM(n)).encryptor()
            out.append(n + e.update(p) + e.finalize() + e.tag)
        return out

    return run


SEAL_CASES = [
    # (group id, suite, key, count, size)
    ("aes128-256B-x1024", "aes-128-gcm", KEY16, 1024, 256),
    ("aes128-64B-x1024", "aes-128-gcm", KEY16, 1024, 64),
    ("aes128-1KiB-x1024", "aes-128-gcm", KEY16, 1024, 1024),
    ("aes128-16KiB-x64", "aes-128-gcm", KEY16, 64, 16384),
    ("aes256-256B-x1024", "aes-256-gcm", KEY32, 1024, 256),
    ("aes256-16KiB-x64", "aes-256-gcm", KEY32, 64, 16384),
    ("sm4-256B-x1024", "sm4-gcm", KEY16, 1024, 256),
    ("sm4-4KiB-x256", "sm4-gcm", KEY16, 256, 4096),
]


@pytest.mark.parametrize(
    ("group", "suite", "key", "n", "size"), SEAL_CASES, ids=[c[0] for c in SEAL_CASES]
)
@pytest.mark.parametrize("impl", ["gateway", "pyca"])
def test_seal(
    benchmark: Any, impl: str, group: str, suite: str, key: bytes, n: int, size: int
) -> None:
    benchmark.group = f"seal {group}"
    pts = _items(n, size)
    if impl == "gateway":
        kr = Keyring()
        h = kr.add(suite, key, limit=(1 << 64) - 1)
        items = [(h, p, b"") for p in pts]
        _run(benchmark, lambda: kr.seal_many(items), n, size)
    elif suite.startswith("aes"):
        _run(benchmark, pyca_aes_seal(key, pts), n, size)
    else:
        _run(benchmark, pyca_sm4_seal(key, pts), n, size)


OPEN_CASES = [
    ("aes128-256B-x1024", "aes-128-gcm", KEY16, 1024, 256),
    ("aes128-16KiB-x64", "aes-128-gcm", KEY16, 64, 16384),
    ("sm4-256B-x1024", "sm4-gcm", KEY16, 1024, 256),
    ("sm4-4KiB-x256", "sm4-gcm", KEY16, 256, 4096),
]


@pytest.mark.parametrize(
    ("group", "suite", "key", "n", "size"), OPEN_CASES, ids=[c[0] for c in OPEN_CASES]
)
@pytest.mark.parametrize("impl", ["gateway", "pyca"])
def test_open(
    benchmark: Any, impl: str, group: str, suite: str, key: bytes, n: int, size: int
) -> None:
    benchmark.group = f"open {group}"
    kr = Keyring()
    h = kr.add(suite, key, limit=(1 << 64) - 1)
    sealed = kr.seal_many([(h, p, b"") for p in _items(n, size)])
    if impl == "gateway":
        items = [(h, s, b"") for s in sealed]
        _run(benchmark, lambda: kr.open_many(items), n, size)
    elif suite.startswith("aes"):
        dec = AESGCM(key).decrypt
        _run(benchmark, lambda: [dec(s[:12], s[12:], None) for s in sealed], n, size)
    else:

        def run() -> list[bytes]:
            out = []
            for s in sealed:
                d = Cipher(algorithms.SM4(key), modes.GCM(s[:12], s[-16:])).decryptor()
                out.append(d.update(s[12:-16]) + d.finalize())
            return out

        _run(benchmark, run, n, size)


@pytest.mark.parametrize("batch", [1, 16, 256, 4096])
@pytest.mark.parametrize("suite", ["aes-128-gcm", "sm4-gcm"])
def test_batch_size(benchmark: Any, suite: str, batch: int) -> None:
    """256-byte messages, 4,096 per round, in batches of `batch`."""
    benchmark.group = f"batch-size {suite} 256B"
    kr = Keyring()
    h = kr.add(suite, KEY16, limit=(1 << 64) - 1)
    items = [(h, p, b"") for p in _items(batch, 256)]
    rounds = 4096 // batch

    def run() -> None:
        for _ in range(rounds):
            kr.seal_many(items)

    _run(benchmark, run, 4096, 256)


def test_mixed_keys(benchmark: Any) -> None:
    """1,024 x 256 B over 64 keys of all three suites, interleaved."""
    benchmark.group = "mixed-keys 256B-x1024"
    kr = Keyring()
    suites = [("aes-128-gcm", KEY16), ("aes-256-gcm", KEY32), ("sm4-gcm", KEY16)]
    hs = [kr.add(*suites[i % 3], limit=(1 << 64) - 1) for i in range(64)]
    items = [(hs[i % 64], p, b"aad") for i, p in enumerate(_items(1024, 256))]
    _run(benchmark, lambda: kr.seal_many(items), 1024, 256)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(benchmark: Any, threads: int) -> None:
    """The GIL is released during a batch: 2 threads x 32 batches of 1,024 x
    1 KiB AES-128-GCM against 1 thread doing the same 64 batches."""
    benchmark.group = "threads aes128-1KiB 64x1024"
    kr = Keyring()
    h = kr.add("aes-128-gcm", KEY16, limit=(1 << 64) - 1)
    items = [(h, p, b"") for p in _items(1024, 1024)]
    per = 64 // threads

    def work() -> None:
        for _ in range(per):
            kr.seal_many(items)

    def run() -> None:
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    _run(benchmark, run, 64 * 1024, 1024)
