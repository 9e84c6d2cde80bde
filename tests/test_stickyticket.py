"""Sticky tickets (gateway.downstream.stickyticket), sans-IO: what opens,
what does not, and that nothing a client sends makes them raise."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.crypto import Keyring
from gateway.downstream.stickyticket import (
    MAX_FIELD_LEN,
    MAX_TICKET_LEN,
    StickyTickets,
    hkdf_sha256,
)
from gateway.protocol.tokens import Tenant

NOW = 1_800_000_000.0
TTL = 86_400.0


def tickets(tenants: dict[str, Tenant]) -> StickyTickets:
    return StickyTickets(tenants.get, lambda: Keyring(fixed=int.from_bytes(os.urandom(4), "big")))


def test_hkdf_sha256_matches_rfc5869_and_pyca() -> None:
    # RFC 5869, test case 3 (no salt, no info)
    okm = hkdf_sha256(bytes([0x0B] * 22), b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    for n in (1, 32, 33, 100):
        secret, info = os.urandom(n), os.urandom(n % 40)
        want = HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(secret)
        assert hkdf_sha256(secret, info, n) == want


def test_a_ticket_made_on_one_node_opens_on_another() -> None:
    """Two keyrings (two workers or nodes: other nonce fields), the same
    tenant configuration."""
    one, two = tickets(acme("k1")), tickets(acme("k1"))
    t = one.seal("acme", "alice", "ep", "agent", NOW)
    assert t is not None
    assert two.open("acme", "alice", t, NOW, TTL) == ("ep", "agent", NOW)
    # and no two tickets share a nonce (nor the same text for the same contents)
    assert len({one.seal("acme", "alice", "ep", "agent", NOW) for _ in range(100)}) == 100


def acme(*kids: str) -> dict[str, Tenant]:
    return {"acme": Tenant("acme", {k: f"secret-{k}".encode() * 2 for k in kids})}


def test_a_ticket_opens_for_its_visitor_only() -> None:
    tk = tickets({**acme("k1"), "other": Tenant("other", {"k1": b"secret-k1" * 2})})
    t = tk.seal("acme", "alice", "10.0.0.5:7001", "desk-agent-7", NOW)
    assert t is not None and t.startswith("s1.") and len(t) <= MAX_TICKET_LEN
    assert tk.open("acme", "alice", t, NOW + 60, TTL) == ("10.0.0.5:7001", "desk-agent-7", NOW)
    assert tk.open("acme", "bob", t, NOW, TTL) is None  # another visitor
    assert tk.open("other", "alice", t, NOW, TTL) is None  # another tenant, same kid
    assert tk.open("nobody", "alice", t, NOW, TTL) is None  # unknown tenant
    # no agent yet: the endpoint alone
    t2 = tk.seal("acme", "alice", "10.0.0.5:7001", None, NOW)
    assert t2 is not None and tk.open("acme", "alice", t2, NOW, TTL) == ("10.0.0.5:7001", None, NOW)


def test_age_and_clock_skew_bound_a_ticket() -> None:
    tk = tickets(acme("k1"))
    t = tk.seal("acme", "alice", "ep", "a", NOW)
    assert t is not None
    assert tk.open("acme", "alice", t, NOW + TTL, TTL) is not None
    assert tk.open("acme", "alice", t, NOW + TTL + 1, TTL) is None  # older than the TTL
    assert tk.open("acme", "alice", t, NOW - 300, TTL) is not None  # another node's clock
    assert tk.open("acme", "alice", t, NOW - 301, TTL) is None  # from too far in the future


def test_secret_rotation_retires_tickets_with_their_key() -> None:
    tenants = acme("k1")
    tk = tickets(tenants)
    old = tk.seal("acme", "alice", "ep", "a", NOW)
    assert old is not None
    # a new primary key, the old one kept: old tickets open, new ones use k2
    tenants["acme"] = Tenant("acme", {"k2": b"secret-k2" * 2, "k1": b"secret-k1" * 2})
    new = tk.seal("acme", "alice", "ep", "b", NOW)
    assert new is not None and new.split(".")[1] != old.split(".")[1]
    assert tk.open("acme", "alice", old, NOW, TTL) is not None
    assert tk.open("acme", "alice", new, NOW, TTL) is not None
    # the old key removed: its tickets no longer open
    tenants["acme"] = Tenant("acme", {"k2": b"secret-k2" * 2})
    assert tk.open("acme", "alice", old, NOW, TTL) is None
    assert tk.open("acme", "alice", new, NOW, TTL) is not None
    # the same key id with another secret (a reload): not opened with the old key
    tenants["acme"] = Tenant("acme", {"k2": b"another-secret-entirely"})
    assert tk.open("acme", "alice", new, NOW, TTL) is None


def test_fields_too_long_get_no_ticket() -> None:
    tk = tickets(acme("k1"))
    assert tk.seal("acme", "v", "e" * (MAX_FIELD_LEN + 1), None, NOW) is None
    assert tk.seal("acme", "v", "ep", "a" * (MAX_FIELD_LEN + 1), NOW) is None
    longest = tk.seal("acme", "v", "e" * MAX_FIELD_LEN, "a" * MAX_FIELD_LEN, NOW)
    assert longest is not None and len(longest) <= MAX_TICKET_LEN
    assert tk.open("acme", "v", longest, NOW, TTL) == (
        "e" * MAX_FIELD_LEN,
        "a" * MAX_FIELD_LEN,
        NOW,
    )
    assert tickets({}).seal("acme", "v", "ep", None, NOW) is None  # no such tenant


def test_every_altered_character_is_refused() -> None:
    tk = tickets(acme("k1"))
    t = tk.seal("acme", "alice", "ep:1", "agent", NOW)
    assert t is not None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i in range(len(t)):  # every position, every other character
        for c in alphabet:
            if c != t[i]:
                assert tk.open("acme", "alice", t[:i] + c + t[i + 1 :], NOW, TTL) is None, (i, c)
    assert tk.open("acme", "alice", t[:-1], NOW, TTL) is None
    assert tk.open("acme", "alice", t + "A", NOW, TTL) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_TICKET_LEN + 8))
def test_nothing_a_client_sends_makes_it_raise(text: str) -> None:
    tk = tickets(acme("k1"))
    assert tk.open("acme", "alice", text, NOW, TTL) is None
    # and shaped like a ticket, with random contents
    assert tk.open("acme", "alice", "s1.azE." + text, NOW, TTL) is None


def test_no_keyring_means_no_tickets_and_one_attempt() -> None:
    """A state directory the keyring cannot use: no ticket is made or
    opened (sessions are routed as new ones), the reason is kept, and the
    keyring is not tried again on every assignment."""
    calls = []

    def broken() -> Keyring:
        calls.append(1)
        raise PermissionError(13, "Permission denied", "/state/nonce-epoch")

    tk = StickyTickets(acme("k1").get, broken)
    good = tickets(acme("k1")).seal("acme", "alice", "ep", None, NOW)
    assert good is not None
    for _ in range(3):
        assert tk.seal("acme", "alice", "ep", None, NOW) is None
        assert tk.open("acme", "alice", good, NOW, TTL) is None
    assert len(calls) == 1
    assert tk.error is not None and "Permission denied" in tk.error
