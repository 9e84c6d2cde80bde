"""gateway.crypto: round trips against pyca/cryptography both ways, nonce
construction and limits, key lifecycle and every kind of bad input."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import crypto
from gateway.crypto import (
    CryptoError,
    KeyExhaustedError,
    Keyring,
    UnknownHandleError,
    allocate_fixed_field,
)


@pytest.fixture(autouse=True, params=["fastpath", "python"] if crypto.FASTPATH else ["python"])
def marshalling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs every test through both item marshalling paths: the native
    CPython fast path and the portable Python one."""
    monkeypatch.setattr(crypto, "FASTPATH", request.param == "fastpath")
    return str(request.param)


@pytest.fixture
def kr(tmp_path: Path) -> Keyring:
    return Keyring(state_dir=tmp_path)


def pyca_seal(suite: str, key: bytes, nonce: bytes, pt: bytes, aad: bytes) -> bytes:
    if suite.startswith("aes"):
        return nonce + AESGCM(key).encrypt(nonce, pt, aad)
    enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    ct = enc.update(pt) + enc.finalize()
    return nonce + ct + enc.tag


def pyca_open(suite: str, key: bytes, sealed: bytes, aad: bytes) -> bytes:
    nonce, body = sealed[:12], sealed[12:]
    if suite.startswith("aes"):
        return AESGCM(key).decrypt(nonce, body, aad)
    dec = Cipher(algorithms.SM4(key), modes.GCM(nonce, body[-16:])).decryptor()
    dec.authenticate_additional_data(aad)
    return dec.update(body[:-16]) + dec.finalize()


SUITES = list(crypto.SUITES)
KEYLEN = {s: kl for s, (_, kl) in crypto.SUITES.items()}

item_st = st.tuples(
    st.sampled_from(SUITES),
    st.integers(0, 3),  # which of 4 keys per suite
    st.one_of(st.binary(max_size=300), st.integers(0, 65536).map(os.urandom)),
    st.binary(max_size=64),
)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(item_st, min_size=1, max_size=24), seed=st.binary(min_size=32, max_size=32))
def test_seal_matches_pyca_both_ways(
    items: list[tuple[str, int, bytes, bytes]], seed: bytes
) -> None:
    kr = Keyring(fixed=int.from_bytes(seed[:4], "big"))
    keys = {(s, i): (seed * 2)[i : i + KEYLEN[s]] for s in SUITES for i in range(4)}
    handles = {k: kr.add(k[0], v) for k, v in keys.items()}
    batch = [(handles[(s, i)], pt, aad) for s, i, pt, aad in items]
    sealed = kr.seal_many(batch)
    assert len(sealed) == len(items)
    for (s, i, pt, aad), out in zip(items, sealed, strict=True):
        assert len(out) == len(pt) + 28
        assert pyca_open(s, keys[(s, i)], out, aad) == pt  # pyca opens ours
    # ... and we open pyca's, with fresh random nonces.
    theirs = [
        (handles[(s, i)], pyca_seal(s, keys[(s, i)], os.urandom(12), pt, aad), aad)
        for s, i, pt, aad in items
    ]
    assert kr.open_many(theirs) == [pt for _, _, pt, _ in items]


@settings(max_examples=40, deadline=None)
@given(
    suite=st.sampled_from(SUITES),
    pt=st.binary(max_size=200),
    aad=st.binary(max_size=40),
    where=st.sampled_from(["nonce", "ct", "tag", "aad"]),
    bit=st.integers(0, 7),
    pos=st.integers(0, 10_000),
)
def test_tampering_is_rejected_without_failing_the_batch(
    suite: str, pt: bytes, aad: bytes, where: str, bit: int, pos: int
) -> None:
    kr = Keyring(fixed=7)
    h = kr.add(suite, bytes(range(KEYLEN[suite])))
    good, victim = kr.seal_many([(h, pt, aad), (h, pt, aad)])
    v, a = bytearray(victim), bytearray(aad)
    if where == "nonce":
        v[pos % 12] ^= 1 << bit
    elif where == "tag":
        v[-16 + pos % 16] ^= 1 << bit
    elif where == "ct" and pt:
        v[12 + pos % len(pt)] ^= 1 << bit
    elif where == "aad":
        a = a or bytearray(b"x")
        a[pos % len(a)] ^= 1 << bit
    else:
        v[-1] ^= 1  # empty plaintext: tamper the tag instead
    got = kr.open_many([(h, good, aad), (h, bytes(v), bytes(a)), (h, good, aad)])
    assert got == [pt, None, pt]


def test_nonces_unique_and_structured(kr: Keyring) -> None:
    h = kr.add("aes-128-gcm", b"k" * 16)
    sealed = kr.seal_many([(h, b"", b"")] * 1000) + kr.seal_many([(h, b"x", b"")] * 1000)
    nonces = [s[:12] for s in sealed]
    assert len(set(nonces)) == 2000
    assert {n[:4] for n in nonces} == {kr.fixed.to_bytes(4, "big")}
    assert [int.from_bytes(n[4:], "big") for n in nonces] == list(range(2000))
    assert kr.used(h) == 2000


def test_fixed_field_never_repeats_across_keyrings(tmp_path: Path) -> None:
    seen = {Keyring(state_dir=tmp_path).fixed for _ in range(50)}
    assert len(seen) == 50
    assert allocate_fixed_field(tmp_path, node_id=3) >> 24 == 3


@pytest.mark.parametrize("text", ["-5\n", "12 junk", "\u0663\n", "1.5", "0x10"])
def test_corrupt_nonce_epoch_file_is_refused(tmp_path: Path, text: str) -> None:
    # a negative or unreadable counter must not become a fixed field (a
    # negative one would be refused later with a misleading message; a
    # guessed one could repeat an earlier keyring's nonces)
    (tmp_path / "nonce-epoch").write_text(text, encoding="utf-8")
    with pytest.raises(CryptoError, match="corrupt nonce epoch file"):
        allocate_fixed_field(tmp_path)
    assert (tmp_path / "nonce-epoch").read_text(encoding="utf-8") == text  # left as it was
    (tmp_path / "nonce-epoch").write_text("41\n")
    assert allocate_fixed_field(tmp_path) == 42


def test_fixed_field_unique_across_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path;"
        "from gateway.crypto import allocate_fixed_field as a;"
        "print(*[a(Path(sys.argv[1])) for _ in range(200)])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    got = [int(x) for p in procs for x in p.communicate(timeout=60)[0].split()]
    assert len(got) == 800 and len(set(got)) == 800


def test_invocation_limit_forces_rotation(kr: Keyring) -> None:
    h = kr.add("sm4-gcm", b"s" * 16, limit=10)
    kr.seal_many([(h, b"a", b"")] * 8)
    with pytest.raises(KeyExhaustedError):
        kr.seal_many([(h, b"a", b"")] * 3)  # would need counters 8, 9, 10
    assert kr.used(h) == 8  # the refused batch burnt nothing
    sealed = kr.seal_many([(h, b"a", b"")] * 2)
    assert [int.from_bytes(s[4:12], "big") for s in sealed] == [8, 9]
    with pytest.raises(KeyExhaustedError):
        kr.seal_many([(h, b"a", b"")])
    # Opening still works after exhaustion; a new key seals again.
    h2 = kr.add("sm4-gcm", b"t" * 16)
    assert kr.open_many([(h2, kr.seal_many([(h2, b"z", b"")])[0], b"")]) == [b"z"]


def test_removed_and_unknown_handles(kr: Keyring) -> None:
    h = kr.add("aes-256-gcm", b"q" * 32)
    sealed = kr.seal_many([(h, b"hi", b"")])
    kr.remove(h)
    with pytest.raises(UnknownHandleError):
        kr.open_many([(h, sealed[0], b"")])
    with pytest.raises(UnknownHandleError):
        kr.remove(h)
    h2 = kr.add("aes-256-gcm", b"q" * 32)
    assert h2 != h  # handles are never reused
    with pytest.raises(UnknownHandleError) as ei:
        kr.seal_many([(h2, b"a", b""), (h2 + 100, b"b", b"")])
    assert ei.value.index == 1


@pytest.mark.parametrize(
    ("suite", "key", "exc"),
    [
        ("aes-128-gcm", b"x" * 15, ValueError),
        ("aes-128-gcm", b"x" * 32, ValueError),
        ("aes-256-gcm", b"x" * 16, ValueError),
        ("sm4-gcm", b"", ValueError),
        ("chacha", b"x" * 32, ValueError),
        ("aes-128-gcm", "x" * 16, TypeError),
    ],
)
def test_bad_keys(kr: Keyring, suite: str, key: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        kr.add(suite, key)


def test_bad_batches(kr: Keyring) -> None:
    h = kr.add("aes-128-gcm", b"k" * 16)
    with pytest.raises(CryptoError, match="empty batch"):
        kr.seal_many([])
    with pytest.raises(CryptoError, match="empty batch"):
        kr.open_many([])
    with pytest.raises(TypeError):
        kr.seal_many([(h, "text", b"")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        kr.seal_many([(h, b"a")])  # type: ignore[list-item]
    with pytest.raises(CryptoError, match="larger than"):
        kr.seal_many([(h, b"a", b""), (h, bytes(crypto.MAX_ITEM_LEN + 1), b"")])
    with pytest.raises(CryptoError, match="more items"):
        kr.seal_many([(h, b"", b"")] * (crypto.MAX_BATCH_ITEMS + 1))
    out = bytearray(10)
    with pytest.raises(CryptoError, match="too small"):
        kr.seal_into([(h, b"abc", b"")], out)
    assert out == bytearray(10)  # nothing partial written


def test_short_items_fail_alone(kr: Keyring) -> None:
    h = kr.add("aes-128-gcm", b"k" * 16)
    good = kr.seal_many([(h, b"payload", b"")])[0]
    assert kr.open_many([(h, b"", b""), (h, good[:27], b""), (h, good, b"")]) == [
        None,
        None,
        b"payload",
    ]


def test_seal_into_zero_copy(kr: Keyring) -> None:
    h = kr.add("sm4-gcm", b"s" * 16)
    buf = bytearray(4096)
    batch = kr.seal_into([(h, b"one", b"a"), (h, b"three", b"b")], buf)
    assert batch.buffer is buf
    assert len(batch) == 2
    assert bytes(batch.view(1))[12:-16] != b"three"
    assert kr.open_many([(h, bytes(batch.view(0)), b"a"), (h, batch.to_list()[1], b"b")]) == [
        b"one",
        b"three",
    ]


def test_fastpath_available_on_cpython() -> None:
    import sys

    if sys.implementation.name == "cpython":
        assert hasattr(crypto.lib, "gw_seal_list"), "maturin build must enable cpython-fastpath"


def test_bad_item_shapes(kr: Keyring) -> None:
    h = kr.add("aes-128-gcm", b"k" * 16)
    for bad in ([(h, b"a", None)], [(-1, b"a", b"")], [(2**40, b"a", b"")], [b"abc"], [(h,)]):
        with pytest.raises((TypeError, CryptoError)):
            kr.seal_many(bad)  # type: ignore[arg-type]
        with pytest.raises((TypeError, CryptoError)):
            kr.open_many(bad)  # type: ignore[arg-type]
    # A failed batch leaves the keyring usable and burns no nonce.
    assert kr.used(h) == 0
    assert kr.open_many([(h, kr.seal_many([(h, b"ok", b"")])[0], b"")]) == [b"ok"]


def test_backends_reported() -> None:
    b = crypto.backends()
    assert b["aes-gcm"] in {"vaes-avx512", "vaes-avx2", "aesni", "portable"}
    assert b["sm4-gcm"] in {"gfni-avx512", "gfni-avx2", "aesni", "portable"}


def test_batches_run_in_parallel_threads(kr: Keyring) -> None:
    """The GIL is released during a batch: two threads sealing with the same
    keyring both make progress and every nonce stays unique."""
    h = kr.add("aes-128-gcm", b"k" * 16)
    results: list[list[bytes]] = [[], []]

    def work(i: int) -> None:
        for _ in range(20):
            results[i].extend(kr.seal_many([(h, b"m" * 64, b"")] * 256))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    nonces = {s[:12] for r in results for s in r}
    assert len(nonces) == 2 * 20 * 256
    assert kr.used(h) == 2 * 20 * 256
