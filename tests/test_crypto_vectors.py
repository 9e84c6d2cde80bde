"""Known answers (NIST CAVP GCM, RFC 8998 SM4-GCM) on every code path this
CPU supports, each path forced through the environment in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import crypto

AES_PATHS = ["vaes-avx512", "vaes-avx2", "aesni", "portable"]
SM4_PATHS = ["gfni-avx512", "gfni-avx2", "aesni", "portable"]
KAT = Path(__file__).with_name("kat.py")


def _rank(paths: list[str], name: str) -> int:
    return len(paths) - paths.index(name)


@pytest.mark.parametrize(
    "idx", range(4), ids=[f"{a}+{s}" for a, s in zip(AES_PATHS, SM4_PATHS, strict=True)]
)
def test_known_answers_on_path(idx: int, tmp_path: Path) -> None:
    aes, sm4 = AES_PATHS[idx], SM4_PATHS[idx]
    det = crypto.backends()
    env = {
        **os.environ,
        "GATEWAY_AES_BACKEND": aes,
        "GATEWAY_SM4_BACKEND": sm4,
        "GATEWAY_STATE_DIR": str(tmp_path),
        "PYTHONPATH": str(KAT.parent.parent),
    }
    proc = subprocess.run(
        [sys.executable, str(KAT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    # The forced path runs when the CPU has it, else the best lower one.
    want_aes = min(_rank(AES_PATHS, aes), _rank(AES_PATHS, det["aes-gcm-detected"]))
    want_sm4 = min(_rank(SM4_PATHS, sm4), _rank(SM4_PATHS, det["sm4-gcm-detected"]))
    assert _rank(AES_PATHS, out["backends"]["aes-gcm"]) == want_aes
    assert _rank(SM4_PATHS, out["backends"]["sm4-gcm"]) == want_sm4
    c = out["counts"]
    assert c["aes-ok"] > 300, c  # both key sizes, encrypt and decrypt files
    assert c["aes-fail-detected"] > 20, c  # the decrypt files' FAIL records
    assert c["sm4-ok"] >= 1, c
    assert c["tampered-rejected"] == c["aes-ok"] + c["sm4-ok"], c
    assert out["wrong"] == []
