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


def _run(benchmark: Any, fn: Callable[[], object], n: int, size: int, **info: object) -> None:
    """Times `fn`; `info` (op, suite, impl, ...) lets bench/ratios.py lay
    out the tables without parsing test names."""
    benchmark.extra_info["messages"] = n
    benchmark.extra_info["bytes"] = n * size
    benchmark.extra_info["size"] = size
    benchmark.extra_info.update(info)
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


def _count(size: int) -> int:
    """Messages per batch: 1,024 up to 1 KiB, then 1 MiB of payload."""
    return 1024 if size <= 1024 else (1 << 20) // size


AES_SIZES = [64, 256, 1024, 4096, 16384]
SUITE_KEYS = {"aes-128-gcm": KEY16, "aes-256-gcm": KEY32, "sm4-gcm": KEY16}
CASES = [
    # (suite, count, size)
    *[
        (suite, _count(size), size)
        for suite in ("aes-128-gcm", "aes-256-gcm")
        for size in AES_SIZES
    ],
    ("sm4-gcm", 1024, 256),
    ("sm4-gcm", 256, 4096),
]


def _case_id(suite: str, n: int, size: int) -> str:
    s = f"{size // 1024}KiB" if size >= 1024 else f"{size}B"
    return f"{suite.removesuffix('-gcm').replace('-', '')}-{s}-x{n}"


CASE_IDS = [_case_id(*c) for c in CASES]


@pytest.mark.parametrize(("suite", "n", "size"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("impl", ["gateway", "pyca"])
def test_seal(benchmark: Any, impl: str, suite: str, n: int, size: int) -> None:
    benchmark.group = f"seal {_case_id(suite, n, size)}"
    key = SUITE_KEYS[suite]
    pts = _items(n, size)
    info = {"op": "seal", "suite": suite, "impl": impl}
    if impl == "gateway":
        kr = Keyring()
        h = kr.add(suite, key, limit=(1 << 64) - 1)
        items = [(h, p, b"") for p in pts]
        _run(benchmark, lambda: kr.seal_many(items), n, size, **info)
    elif suite.startswith("aes"):
        _run(benchmark, pyca_aes_seal(key, pts), n, size, **info)
    else:
        _run(benchmark, pyca_sm4_seal(key, pts), n, size, **info)


@pytest.mark.parametrize(("suite", "n", "size"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("impl", ["gateway", "pyca"])
def test_open(benchmark: Any, impl: str, suite: str, n: int, size: int) -> None:
    benchmark.group = f"open {_case_id(suite, n, size)}"
    key = SUITE_KEYS[suite]
    kr = Keyring()
    h = kr.add(suite, key, limit=(1 << 64) - 1)
    sealed = kr.seal_many([(h, p, b"") for p in _items(n, size)])
    info = {"op": "open", "suite": suite, "impl": impl}
    if impl == "gateway":
        items = [(h, s, b"") for s in sealed]
        _run(benchmark, lambda: kr.open_many(items), n, size, **info)
    elif suite.startswith("aes"):
        dec = AESGCM(key).decrypt
        _run(benchmark, lambda: [dec(s[:12], s[12:], None) for s in sealed], n, size, **info)
    else:

        def run() -> list[bytes]:
            out = []
            for s in sealed:
                d = Cipher(algorithms.SM4(key), modes.GCM(s[:12], s[-16:])).decryptor()
                out.append(d.update(s[12:-16]) + d.finalize())
            return out

        _run(benchmark, run, n, size, **info)


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

    _run(benchmark, run, 4096, 256, op="batch", suite=suite, impl="gateway", batch=batch)


MIXED_SUITES = [("aes-128-gcm", KEY16), ("aes-256-gcm", KEY32), ("sm4-gcm", KEY16)]


@pytest.mark.parametrize("impl", ["gateway", "pyca"])
def test_mixed_keys(benchmark: Any, impl: str) -> None:
    """1,024 x 256 B over 64 keys of all three suites, interleaved, 3 bytes
    of AAD. pyca: one cipher object per key made up front, one call per
    message."""
    benchmark.group = "mixed-keys 256B-x1024"
    pts = _items(1024, 256)
    info = {"op": "mixed", "suite": "mixed", "impl": impl}
    keys = [
        (suite, bytes([i]) + key[1:]) for i in range(64) for suite, key in [MIXED_SUITES[i % 3]]
    ]
    if impl == "gateway":
        kr = Keyring()
        hs = [kr.add(suite, key, limit=(1 << 64) - 1) for suite, key in keys]
        items = [(hs[i % 64], p, b"aad") for i, p in enumerate(pts)]
        _run(benchmark, lambda: kr.seal_many(items), 1024, 256, **info)
        return
    nonces = _nonces(1024)

    def seal_one(suite: str, key: bytes) -> Callable[[bytes, bytes], bytes]:
        if suite.startswith("aes"):
            enc = AESGCM(key).encrypt
            return lambda n, p: n + enc(n, p, b"aad")

        def sm4(n: bytes, p: bytes) -> bytes:
            e = Cipher(algorithms.SM4(key), modes.GCM(n)).encryptor()
            e.authenticate_additional_data(b"aad")
            return n + e.update(p) + e.finalize() + e.tag

        return sm4

    fns = [seal_one(*k) for k in keys]
    work = [(fns[i % 64], nonces[i], p) for i, p in enumerate(pts)]
    _run(benchmark, lambda: [f(n, p) for f, n, p in work], 1024, 256, **info)


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

    _run(
        benchmark,
        run,
        64 * 1024,
        1024,
        op="threads",
        suite="aes-128-gcm",
        impl="gateway",
        threads=threads,
    )
