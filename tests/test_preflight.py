"""`gateway serve --check` and the checks `gateway serve` makes before it
starts a worker (gateway.preflight)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

import gateway.supervisor
from gateway import preflight
from gateway.config import Config, ConfigError, load_config
from tests.test_cli import run, state  # noqa: F401  (the fixture)

NOW = time.time()


def _cert(tmp_path: Path, name: str, days: float, *ids: str) -> tuple[str, str]:
    """A certificate (for ``ids``) that expires in ``days`` days, and its key."""
    ca = trustme.CA()
    c = ca.issue_cert(*ids, not_after=dt.datetime.fromtimestamp(NOW + days * 86400, dt.UTC))
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    c.private_key_and_cert_chain_pem.write_to_path(str(cert))
    c.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def _load(tmp_path: Path, **over: object) -> Config:
    return load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path / "state")}, dict(over))


def test_summary_describes_the_configuration(tmp_path: Path) -> None:
    cert, key = _cert(tmp_path, "a", 90, "chat.example.com", "10.0.0.7")
    cfg = _load(tmp_path, tls_cert=cert, tls_key=key, workers=2, ops_listen="127.0.0.1:9090",
                downstream_specs=["general=127.0.0.1:7001,127.0.0.1:7002",
                                  "billing=127.0.0.1:7003"])  # fmt: skip
    lines = preflight.summary(cfg, "f.toml", NOW)
    assert lines[0] == "configuration: f.toml"
    assert lines[1] == "listen: 127.0.0.1:8080, 2 worker(s), 10,000 connections"
    assert lines[2].startswith("TLS: certificate for chat.example.com, 10.0.0.7, expires ")
    assert "session tickets: the supervisor's key" in lines[2]
    assert "operator endpoint: 127.0.0.1:9090 (no token)" in lines
    assert "tenant demo: 1 secret(s), minting with key 'default'; origins *" in lines
    assert "cluster general: h2c to 127.0.0.1:7001, 127.0.0.1:7002" in lines
    assert "group general (default): cluster general" in lines
    assert "group billing: cluster billing" in lines
    # the demo tenant is the only warning here (loopback ops, a 90-day certificate)
    assert [x for x in lines if x.startswith("warning:")] == [
        "warning: no tenant configured: the demo tenant accepts any origin "
        "(configure [tenants.NAME])"
    ]


@pytest.mark.parametrize(
    ("days", "ops", "token", "want"),
    [
        (5, "127.0.0.1:9090", "", ["the TLS certificate expires in 5.0 days"]),
        (-1, "127.0.0.1:9090", "", ["the TLS certificate expired on"]),
        (90, "0.0.0.0:9090", "", ["the operator endpoint listens on 0.0.0.0 without ops_token"]),
        (90, "[::]:9090", "", ["the operator endpoint listens on :: without ops_token"]),
        (90, "0.0.0.0:9090", "s3cret-token", []),
        (90, "[::1]:9090", "", []),
        (90, "localhost:9090", "", []),
    ],
)
def test_summary_warnings(
    tmp_path: Path, days: float, ops: str, token: str, want: list[str]
) -> None:
    cert, key = _cert(tmp_path, "a", days, "chat.example.com")
    tenants = "[tenants.acme]\nsecret = 'a-secret-of-at-least-16-bytes'\nallowed_origins = ['*']\n"
    (tmp_path / "g.toml").write_text(tenants)
    cfg = load_config(str(tmp_path / "g.toml"), {"GATEWAY_STATE_DIR": str(tmp_path)},
                      {"tls_cert": cert, "tls_key": key, "ops_listen": ops,
                       "ops_token": token})  # fmt: skip
    got = [x for x in preflight.summary(cfg, "g.toml", NOW) if x.startswith("warning: ")]
    assert len(got) == len(want), got
    for line, start in zip(got, want, strict=True):
        assert line.startswith(f"warning: {start}"), got


def test_check_loads_the_tls_files(tmp_path: Path) -> None:
    cert, key = _cert(tmp_path, "a", 90, "localhost")
    _, other_key = _cert(tmp_path, "b", 90, "localhost")
    preflight.check(_load(tmp_path, tls_cert=cert, tls_key=key))
    with pytest.raises(ConfigError, match=r"tls_cert / tls_key: cannot load .*mismatch"):
        preflight.check(_load(tmp_path, tls_cert=cert, tls_key=other_key))
    short = tmp_path / "ticket.key"
    short.write_bytes(b"x" * 10)
    with pytest.raises(ConfigError, match=r"tls_ticket_key: .*exactly 80 bytes"):
        preflight.check(_load(tmp_path, tls_cert=cert, tls_key=key, tls_ticket_key=str(short)))


def test_serve_check_prints_and_exits(
    tmp_path: Path,
    state: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[object] = []
    monkeypatch.setattr(gateway.supervisor, "run_supervisor", lambda *a, **k: started.append(a))
    cert, key = _cert(tmp_path, "a", 90, "localhost")
    monkeypatch.setenv("GATEWAY_TLS_CERT", cert)
    monkeypatch.setenv("GATEWAY_TLS_KEY", key)
    assert run(["serve", "--check", "--workers", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "gateway: configuration: defaults, environment, command line"
    assert "gateway: listen: 127.0.0.1:8080, 3 worker(s), 10,000 connections" in out
    assert out[-1] == "gateway: configuration OK"
    # a key that does not belong to the certificate: exit 2, for --check
    # and for a plain start, which starts no worker
    _, other = _cert(tmp_path, "b", 90, "localhost")
    monkeypatch.setenv("GATEWAY_TLS_KEY", other)
    for argv in (["serve", "--check"], ["serve"]):
        assert run(argv) == 2
        captured = capsys.readouterr()
        assert "config error: tls_cert / tls_key: cannot load" in captured.err
        assert "configuration OK" not in captured.out
    assert started == []


def test_serve_with_a_mismatched_key_exits_at_once(tmp_path: Path) -> None:
    """As users run it: one line, exit 2, no worker started and failing."""
    cert, _ = _cert(tmp_path, "a", 90, "localhost")
    _, other = _cert(tmp_path, "b", 90, "localhost")
    env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path / "s"), GATEWAY_TLS_CERT=cert,
               GATEWAY_TLS_KEY=other, GATEWAY_OPS_LISTEN="")  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0"],
                       env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.startswith("gateway: config error: tls_cert / tls_key: cannot load"), p.stderr
    assert "Traceback" not in p.stderr and "worker" not in p.stderr + p.stdout


def test_summary_of_a_certificate_cryptography_cannot_read(tmp_path: Path) -> None:
    """The description says so; it is not a reason to refuse the start."""
    cert, key = _cert(tmp_path, "a", 90, "localhost")
    cfg = _load(tmp_path, tls_cert=cert, tls_key=key)
    Path(cert).write_text(Path(key).read_text())  # no certificate in it any more
    lines = preflight.summary(cfg, "f.toml", NOW)
    assert any(x.startswith(f"TLS: certificate for ? ({cert}: ") for x in lines), lines
