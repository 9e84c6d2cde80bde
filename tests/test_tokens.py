from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from gateway.protocol.codes import Code, ProtocolError
from gateway.protocol.tokens import (
    MAX_TOKEN_LEN,
    Claims,
    Tenant,
    TokenVerifier,
    mint,
    normalize_origin,
)

NOW = 1_700_000_000.5
S1 = b"s1-secret-0123456789abcdef"
S2 = b"s2-secret-0123456789abcdef"
TENANTS = {
    "acme": Tenant("acme", {"k1": S1, "k2": S2}, ("https://acme.example", "http://localhost:8080")),
    "open": Tenant("open", {"default": b"open-secret-0123456789"}, ("*",)),
    "mobile": Tenant("mobile", {"m": b"mobile-secret-0123456789"}, ()),
}
V = TokenVerifier(TENANTS)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: Any, secret: bytes = S1) -> str:
    """A correctly signed token around an arbitrary payload."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    body = b64(raw)
    sig = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{b64(sig)}"


def code_of(token: str, now: float = NOW) -> Code:
    with pytest.raises(ProtocolError) as ei:
        V.verify(token, now)
    return ei.value.code


def test_mint_format_matches_the_spec() -> None:
    tok = mint("acme", "visitor-1", S1, 600, NOW, kid="k1")
    body, sig = tok.split(".")
    assert "=" not in tok
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert payload == {"tn": "acme", "vid": "visitor-1", "exp": int(NOW) + 600, "iat": int(NOW),
                       "kid": "k1"}  # fmt: skip
    assert sig == b64(hmac.new(S1, body.encode(), hashlib.sha256).digest())
    assert "kid" not in json.loads(
        base64.urlsafe_b64decode(mint("acme", "v", S1, 1, NOW).split(".")[0] + "==")
    )


def test_round_trip_with_and_without_kid() -> None:
    c = V.verify(mint("acme", "vé", S2, 60, NOW, kid="k2"), NOW)
    assert c == Claims(tenant="acme", visitor="vé", exp=int(NOW) + 60, iat=int(NOW), kid="k2")
    # no kid: any of the tenant's secrets (rotation)
    assert V.verify(mint("acme", "v", S1, 60, NOW), NOW).kid is None
    assert V.verify(mint("acme", "v", S2, 60, NOW), NOW).visitor == "v"


def test_wrong_secret_kid_or_tenant_is_unauthorized() -> None:
    assert code_of(mint("acme", "v", S2, 60, NOW, kid="k1")) is Code.UNAUTHORIZED
    assert code_of(mint("acme", "v", b"other", 60, NOW)) is Code.UNAUTHORIZED
    assert code_of(mint("acme", "v", S1, 60, NOW, kid="k9")) is Code.UNAUTHORIZED
    assert code_of(mint("nobody", "v", S1, 60, NOW)) is Code.UNAUTHORIZED
    # another tenant's secret does not sign for this tenant
    forged = forge({"tn": "acme", "vid": "v", "exp": int(NOW) + 60, "iat": 0},
                   b"open-secret-0123456789")  # fmt: skip
    assert code_of(forged) is Code.UNAUTHORIZED
    assert V.verify(forge({"tn": "acme", "vid": "v", "exp": int(NOW) + 60, "iat": 0}), NOW)


def test_tampering_breaks_the_signature() -> None:
    tok = mint("acme", "alice", S1, 60, NOW, kid="k1")
    body, sig = tok.split(".")
    evil = b64(
        json.dumps({"tn": "acme", "vid": "bob", "exp": 2**40, "iat": 0, "kid": "k1"}).encode()
    )
    assert code_of(f"{evil}.{sig}") is Code.UNAUTHORIZED
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert code_of(f"{body}.{flipped}") is Code.UNAUTHORIZED
    assert code_of(f"{body}.{sig}=") is Code.UNAUTHORIZED
    assert code_of(f"{body}.{sig}.x") is Code.UNAUTHORIZED


def test_expiry() -> None:
    tok = mint("acme", "v", S1, 10, NOW, kid="k1")
    exp = int(NOW) + 10
    assert V.verify(tok, exp).exp == exp  # exp == now is still valid
    assert code_of(tok, exp + 0.001) is Code.TOKEN_EXPIRED
    # an expired token with a bad signature is unauthorized, not expired
    body, _ = tok.split(".")
    assert code_of(body + ".AAAA", exp + 100) is Code.UNAUTHORIZED


@pytest.mark.parametrize(
    "payload",
    [
        {"tn": "acme", "exp": 2**40, "iat": 0},  # no vid
        {"tn": "acme", "vid": "", "exp": 2**40, "iat": 0},
        {"tn": "acme", "vid": 5, "exp": 2**40, "iat": 0},
        {"tn": "acme", "vid": "v", "exp": "2000000000", "iat": 0},
        {"tn": "acme", "vid": "v", "exp": 2e9, "iat": 0},
        {"tn": "acme", "vid": "v", "exp": True, "iat": 0},
        {"tn": "acme", "vid": "v", "exp": 2**40},  # no iat
        {"tn": "acme", "vid": "v", "exp": 2**40, "iat": None},
        {"tn": ["acme"], "vid": "v", "exp": 2**40, "iat": 0},
        {"tn": "acme", "vid": "v", "exp": 2**40, "iat": 0, "kid": 1},
        ["acme", "v"],
    ],
)
def test_claim_types_are_checked_even_when_signed(payload: Any) -> None:
    assert code_of(forge(payload)) is Code.UNAUTHORIZED


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "a b.c",
        "abc+/.def",
        "é.é",
        "a.b",  # 1-char base64 groups are impossible
        b64(b"\xff\xfe") + ".AAAA",  # not UTF-8
        b64(b"{not json") + ".AAAA",
        b64(b"[" * 1500) + ".AAAA",
    ],
)
def test_malformed_tokens_are_unauthorized(token: str) -> None:
    assert code_of(token) is Code.UNAUTHORIZED


def test_length_cap() -> None:
    long_vid = "v" * MAX_TOKEN_LEN
    assert code_of(mint("acme", long_vid, S1, 60, NOW, kid="k1")) is Code.UNAUTHORIZED
    ok = mint("acme", "v" * 1000, S1, 60, NOW, kid="k1")
    assert len(ok) <= MAX_TOKEN_LEN
    assert V.verify(ok, NOW).visitor == "v" * 1000


def test_non_str_token_is_unauthorized() -> None:
    with pytest.raises(ProtocolError) as ei:
        V.verify(b"abc.def", NOW)  # type: ignore[arg-type]
    assert ei.value.code is Code.UNAUTHORIZED


def test_origins() -> None:
    assert V.origin_allowed("acme", None)
    assert V.origin_allowed("mobile", None)
    assert V.origin_allowed("acme", "https://acme.example")
    assert V.origin_allowed("acme", "HTTPS://ACME.Example")
    assert V.origin_allowed("acme", "https://acme.example:443")
    assert V.origin_allowed("acme", "http://localhost:8080")
    assert not V.origin_allowed("acme", "http://localhost")
    assert not V.origin_allowed("acme", "http://acme.example")
    assert not V.origin_allowed("acme", "https://acme.example.evil.com")
    assert not V.origin_allowed("acme", "https://evil.com/https://acme.example")
    assert not V.origin_allowed("acme", "null")
    assert not V.origin_allowed("mobile", "https://acme.example")
    assert V.origin_allowed("open", "https://anything.example:9")
    assert V.origin_allowed("open", "null")
    assert not V.origin_allowed("nobody", "https://acme.example")
    assert V.origin_allowed("nobody", None)


@pytest.mark.parametrize(
    ("origin", "norm"),
    [
        ("https://A.example", "https://a.example"),
        ("http://a:80", "http://a"),
        ("http://a:8080", "http://a:8080"),
        ("https://[::1]:443", "https://[::1]"),
        ("https://[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_normalize_origin(origin: str, norm: str) -> None:
    assert normalize_origin(origin) == norm


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a.example",
        "https://",
        "https://a/",
        "https://a:0",
        "https://a:x",
        "https://u@a",
        "https://[::1",
        "https://a:99999",
    ],
)
def test_normalize_origin_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_origin(bad)


def test_verifier_rejects_malformed_configured_origin() -> None:
    with pytest.raises(ValueError):
        TokenVerifier({"x": Tenant("x", {"k": b"s"}, ("acme.example",))})


def test_primary_kid_is_the_first_secret() -> None:
    assert TENANTS["acme"].primary_kid == "k1"


def test_every_session_of_a_tenant_shares_one_tenant_name_string() -> None:
    """The claims carry the configured tenant name, not the copy decoded
    from each token: with many sessions held, one string per tenant."""
    name = "".join(["ac", "me"])  # a string made at run time, like a config's
    v = TokenVerifier({name: Tenant(name, {"k1": S1})})
    a = v.verify(mint("acme", "v1", S1, 60, NOW), NOW)
    b = v.verify(mint("acme", "v2", S1, 60, NOW), NOW)
    assert a.tenant == "acme" and a.tenant is b.tenant
