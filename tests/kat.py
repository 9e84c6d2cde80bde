"""Known-answer runner: opens every NIST CAVP AES-GCM vector (96-bit IV,
128-bit tag) and the RFC 8998 SM4-GCM vectors through ``gateway.crypto`` on
the code paths selected by GATEWAY_AES_BACKEND / GATEWAY_SM4_BACKEND, and
prints a JSON summary. Run as a subprocess by tests/test_crypto_vectors.py so
each path is exercised in its own process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cryptography_vectors

from gateway import crypto

VEC = Path(os.path.dirname(cryptography_vectors.__file__)) / "ciphers"


def parse(path: Path) -> Iterator[dict[str, str]]:
    """Yields the records of a NIST-style .rsp/.txt file, with the section
    headers ([Keylen = 128], ...) merged into each record, keys lowercased."""
    section: dict[str, str] = {}
    rec: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            if rec:
                yield {**section, **rec}
                rec = {}
            continue
        if line.startswith("["):
            k, _, v = line.strip("[]").partition("=")
            section[k.strip().lower()] = v.strip()
            continue
        if line == "FAIL":
            rec["fail"] = "1"
            continue
        k, _, v = line.partition("=")
        k = k.strip().lower()
        if k == "count" and rec:
            yield {**section, **rec}
            rec = {}
        rec[k] = v.strip()
    if rec:
        yield {**section, **rec}


def aes_cases() -> Iterator[tuple[str, bytes, bytes, bytes, bytes, bytes, bytes | None]]:
    for bits, suite in ((128, "aes-128-gcm"), (256, "aes-256-gcm")):
        for name in (f"gcmEncryptExtIV{bits}.rsp", f"gcmDecrypt{bits}.rsp"):
            for r in parse(VEC / "AES" / "GCM" / name):
                if r.get("ivlen") != "96" or r.get("taglen") != "128":
                    continue
                pt = None if "fail" in r else bytes.fromhex(r.get("pt", ""))
                yield (
                    suite,
                    bytes.fromhex(r["key"]),
                    bytes.fromhex(r["iv"]),
                    bytes.fromhex(r.get("aad", "")),
                    bytes.fromhex(r.get("ct", "")),
                    bytes.fromhex(r["tag"]),
                    pt,
                )


def sm4_cases() -> Iterator[tuple[str, bytes, bytes, bytes, bytes, bytes, bytes | None]]:
    for r in parse(VEC / "SM4" / "rfc8998.txt"):
        if "key" not in r:
            continue
        yield (
            "sm4-gcm",
            bytes.fromhex(r["key"]),
            bytes.fromhex(r["iv"]),
            bytes.fromhex(r["aad"]),
            bytes.fromhex(r["ciphertext"]),
            bytes.fromhex(r["tag"]),
            bytes.fromhex(r["plaintext"]),
        )


def main() -> int:
    kr = crypto.Keyring(fixed=1)
    counts = {"aes-ok": 0, "aes-fail-detected": 0, "sm4-ok": 0, "tampered-rejected": 0}
    wrong: list[str] = []
    cases = list(aes_cases()) + list(sm4_cases())
    handles = {}
    batch = []
    for suite, key, iv, aad, ct, tag, pt in cases:
        h = handles.get((suite, key))
        if h is None:
            h = handles[(suite, key)] = kr.add(suite, key)
        batch.append((h, iv + ct + tag, aad, pt, suite))
    for start in range(0, len(batch), 512):
        chunk = batch[start : start + 512]
        got = kr.open_many([(h, s, a) for h, s, a, _, _ in chunk])
        for (_, sealed, _, pt, suite), g in zip(chunk, got, strict=True):
            if g != pt:
                wrong.append(f"{suite} {sealed.hex()[:40]}")
            elif pt is None:
                counts["aes-fail-detected"] += 1
            elif suite == "sm4-gcm":
                counts["sm4-ok"] += 1
            else:
                counts["aes-ok"] += 1
        # Every valid vector with one bit of its tag flipped must be refused.
        flipped = [
            (h, s[:-1] + bytes([s[-1] ^ 1]), a) for h, s, a, pt, _ in chunk if pt is not None
        ]
        if flipped:
            refused = kr.open_many(flipped)
            counts["tampered-rejected"] += sum(r is None for r in refused)
            if any(r is not None for r in refused):
                wrong.append("tampered tag accepted")
    print(json.dumps({"backends": kr.backends(), "counts": counts, "wrong": wrong[:20]}))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
