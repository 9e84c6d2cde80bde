from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import gateway.crypto
import gateway.supervisor
from gateway.cli import COMMANDS, main
from gateway.config import Config, load_config
from gateway.protocol.codes import ProtocolError
from gateway.protocol.tokens import Tenant, TokenVerifier

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(d))
    for var in [v for v in os.environ if v.startswith("GATEWAY_") and v != "GATEWAY_STATE_DIR"]:
        monkeypatch.delenv(var)
    return d


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_commands_registered() -> None:
    assert {"serve", "token", "selfcheck"} <= set(COMMANDS)


def test_token_for_demo_tenant_verifies(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = int(time.time())
    assert run(["token", "--tenant", "demo", "--visitor", "alice", "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state)}, {})
    claims = TokenVerifier(cfg.tenants).verify(token, time.time())
    assert (claims.tenant, claims.visitor, claims.kid) == ("demo", "alice", "default")
    assert before + 120 <= claims.exp <= int(time.time()) + 120
    assert (state / "demo-secret").exists()


def test_token_uses_first_secret_of_configured_tenant(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text(
        "[tenants.acme]\n"
        'secrets = { new = "new-secret-0123456789", old = "old-secret-0123456789" }\n'
    )
    assert run(["token", "--tenant", "acme", "--visitor", "v", "--config", str(conf)]) == 0
    token = capsys.readouterr().out.strip()
    cfg = load_config(str(conf), {}, {})
    claims = TokenVerifier(cfg.tenants).verify(token, time.time())
    assert claims.kid == "new" and claims.exp - claims.iat == 3600
    # signed with the "new" secret, not the "old" one
    swapped = Tenant("acme", {"new": b"old-secret-0123456789"}, ())
    with pytest.raises(ProtocolError):
        TokenVerifier({"acme": swapped}).verify(token, time.time())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["nope"], "invalid choice"),
        (["token", "--tenant", "demo"], "--visitor"),
        (["token", "--visitor", "v"], "--tenant"),
        (["token", "--tenant", "demo", "--visitor", "v", "--ttl", "0"], "must be between 1"),
        (["token", "--tenant", "demo", "--visitor", "v", "--ttl", "abc"], "not an integer"),
        (["token", "--tenant", "demo", "--visitor", ""], "must not be empty"),
        (["token", "--tenant", "zzz", "--visitor", "v"], "unknown tenant 'zzz' (configured: demo)"),
        (["serve", "--listen", "8080"], "expected host:port"),
        (["serve", "--listen", "h:99999"], "bad port"),
        (["serve", "--workers", "-1"], "must be >= 0"),
        (["serve", "--max-connections", "x"], "not an integer"),
        (["serve", "--ops-listen", "nope"], "expected host:port"),
        (["serve", "--config", "/nonexistent/g.toml"], "config error"),
    ],
)
def test_bad_usage_exits_2_with_a_message(
    state: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_config_error_from_env(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_MAX_FRAME", "0")
    assert run(["serve"]) == 2
    assert "config error: max_frame" in capsys.readouterr().err


def test_serve_passes_flags_to_the_supervisor(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []

    def fake(cfg: Config, *a: Any, **k: Any) -> int:
        seen.append(cfg)
        return 7

    monkeypatch.setattr(gateway.supervisor, "run_supervisor", fake)
    argv = ["serve", "--listen", "[::1]:9443", "--workers", "3", "--max-connections", "60000",
            "--ops-listen", ""]  # fmt: skip
    assert run(argv) == 7
    (cfg,) = seen
    assert (cfg.listen_host, cfg.listen_port, cfg.workers) == ("::1", 9443, 3)
    assert (cfg.max_connections, cfg.ops_listen) == (60000, "")
    assert "demo" in cfg.tenants
    assert run(["serve"]) == 7
    assert (seen[1].listen_port, seen[1].workers, seen[1].ops_listen) == (8080, 1, "127.0.0.1:9090")


def test_selfcheck_prints_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gateway.crypto, "selfcheck", lambda: "backends: fine")
    assert run(["selfcheck"]) == 0
    assert capsys.readouterr().out == "backends: fine\n"

    def broken() -> str:
        raise RuntimeError("round trip failed")

    monkeypatch.setattr(gateway.crypto, "selfcheck", broken)
    assert run(["selfcheck"]) == 1
    assert "selfcheck failed: RuntimeError: round trip failed" in capsys.readouterr().err


def test_python_dash_m_gateway(state: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--tenant", "demo", "--visitor", "m"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    cfg = load_config(None, {"GATEWAY_STATE_DIR": str(state)}, {})
    assert TokenVerifier(cfg.tenants).verify(ok.stdout.strip(), time.time()).visitor == "m"
    bad = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "usage: gateway" in bad.stderr
