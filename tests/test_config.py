from __future__ import annotations

import dataclasses
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    DEFAULT_KID,
    DEMO_TENANT,
    WORKER_CONFIG_ENV,
    Config,
    ConfigError,
    config_from_env,
    demo_secret_path,
    effective_workers,
    load_config,
    parse_hostport,
)
from gateway.protocol.tokens import Tenant, TokenVerifier, mint

ACME = {"secret": "acme-secret-0123456789", "allowed_origins": ["https://acme.example"]}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"GATEWAY_STATE_DIR": str(tmp_path / "state")}


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return str(p)


def load(env: dict[str, str], path: str | None = None, **overrides: Any) -> Config:
    return load_config(path, env, overrides)


def test_defaults(env: dict[str, str]) -> None:
    c = load(env, tenants={"acme": ACME})
    assert (c.listen_host, c.listen_port, c.workers) == ("127.0.0.1", 8080, 1)
    assert (c.max_connections, c.per_worker_connections, c.max_frame) == (10000, 18000, 65536)
    assert (c.heartbeat_s, c.heartbeat_misses, c.mobile_grace_s) == (25.0, 2, 60.0)
    assert (c.window, c.dedup_ids, c.replay_frames, c.replay_bytes) == (64, 1024, 256, 262144)
    assert (c.session_ttl_s, c.max_detached_sessions) == (300.0, 100000)
    assert (c.outbound_max_frames, c.outbound_max_bytes) == (256, 1048576)
    assert (c.max_conns_per_ip, c.handshake_rate, c.handshake_burst) == (5000, 20000.0, 5000)
    assert (c.drain_s, c.demo_bot, c.bot_think_ms, c.log_level) == (10.0, True, 200, "info")
    assert (c.ops_listen, c.node_id, c.tls_cert, c.tls_key) == ("127.0.0.1:9090", 0, None, None)
    assert (c.handshake_timeout_s, c.hello_timeout_s, c.gc_young) == (10.0, 10.0, 2000)
    assert c.state_dir == env["GATEWAY_STATE_DIR"]
    assert list(c.tenants) == ["acme"]


def test_state_dir_default_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    c = load({}, tenants={"acme": ACME})
    assert c.state_dir == str(tmp_path / ".local" / "state" / "gateway")
    monkeypatch.setenv("GATEWAY_STATE_DIR", "/x/y")
    assert Config().state_dir == "/x/y"


def test_precedence_file_then_env_then_overrides(env: dict[str, str], tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
listen_port = 9000
max_frame = 1000
heartbeat_s = 5
log_level = "debug"
demo_bot = false

[tenants.acme]
secrets = { k2 = "new-secret-0123456789", k1 = "old-secret-0123456789" }
allowed_origins = ["https://acme.example", "*"]
""",
    )
    c = load(env, path)
    assert (c.listen_port, c.max_frame, c.heartbeat_s, c.log_level) == (9000, 1000, 5.0, "debug")
    assert isinstance(c.heartbeat_s, float)
    assert c.demo_bot is False
    t = c.tenants["acme"]
    assert t.secrets == {"k2": b"new-secret-0123456789", "k1": b"old-secret-0123456789"}
    assert t.primary_kid == "k2"
    assert t.allowed_origins == ("https://acme.example", "*")
    env2 = {**env, "GATEWAY_LISTEN_PORT": "9100", "GATEWAY_DEMO_BOT": "yes"}
    c2 = load(env2, path)
    assert (c2.listen_port, c2.max_frame, c2.demo_bot) == (9100, 1000, True)
    c3 = load(env2, path, listen_port=9200, max_frame="2000", workers=None)
    assert (c3.listen_port, c3.max_frame, c3.workers) == (9200, 2000, 1)


def test_config_file_from_env_variable(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nwindow = 8\n")
    assert load({**env, "GATEWAY_CONFIG": path}).window == 8


@pytest.mark.parametrize(
    ("var", "text", "field", "value"),
    [
        ("GATEWAY_TLS_CERT", "", "tls_cert", None),
        ("GATEWAY_OPS_LISTEN", "", "ops_listen", ""),
        ("GATEWAY_OPS_LISTEN", "[::1]:9", "ops_listen", "[::1]:9"),
        ("GATEWAY_HANDSHAKE_RATE", "1.5e3", "handshake_rate", 1500.0),
        ("GATEWAY_DRAIN_S", "0", "drain_s", 0.0),
        ("GATEWAY_DEMO_BOT", "OFF", "demo_bot", False),
        ("GATEWAY_WINDOW", " 32 ", "window", 32),
        ("GATEWAY_NODE_ID", "255", "node_id", 255),
        ("GATEWAY_GC_YOUNG", "20000", "gc_young", 20000),
    ],
)
def test_env_typed_parsing(
    env: dict[str, str], var: str, text: str, field: str, value: Any
) -> None:
    assert getattr(load({**env, var: text}), field) == value


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("GATEWAY_LISTEN_PORT", "http", "GATEWAY_LISTEN_PORT: listen_port: must be an integer"),
        ("GATEWAY_LISTEN_PORT", "70000", "listen_port: must be between 0 and 65535"),
        ("GATEWAY_MAX_FRAME", "-1", "max_frame"),
        ("GATEWAY_MAX_FRAME", "1.5", "must be an integer"),
        ("GATEWAY_HEARTBEAT_S", "nan", "heartbeat_s: must be a number"),
        ("GATEWAY_HEARTBEAT_S", "0", "heartbeat_s: must be a finite number > 0"),
        ("GATEWAY_DEMO_BOT", "maybe", "demo_bot"),
        ("GATEWAY_LOG_LEVEL", "loud", "log_level"),
        ("GATEWAY_OPS_LISTEN", "9090", "ops_listen"),
        ("GATEWAY_NODE_ID", "256", "node_id"),
        ("GATEWAY_GC_YOUNG", "99", "gc_young: must be between 100 and 1000000"),
        ("GATEWAY_WORKERS", "-1", "workers"),
        ("GATEWAY_WINDOW", "0", "window"),
        ("GATEWAY_TLS_CERT", "/nonexistent/cert.pem", "tls_cert and tls_key"),
    ],
)
def test_env_bad_values_give_clear_errors(
    env: dict[str, str], var: str, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load({**env, var: text})


def test_tls_files_must_exist(env: dict[str, str], tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="tls_key: no such file"):
        load(env, tls_cert=str(cert), tls_key=str(tmp_path / "missing.pem"))
    assert load(env, tls_cert=str(cert), tls_key=str(cert)).tls_key == str(cert)


def test_unknown_env_variables_are_ignored(env: dict[str, str]) -> None:
    load({**env, "GATEWAY_NOT_A_FIELD": "1", WORKER_CONFIG_ENV: "{}"})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[gateway]\nlisten_prot = 1\n", "unknown key 'listen_prot'"),
        ("[server]\nx = 1\n", "unknown table"),
        ("[gateway]\nlisten_port = '80'\n", "listen_port: must be an integer"),
        ("[gateway]\nworkers = true\n", "workers: must be an integer"),
        ("[gateway]\ndemo_bot = 1\n", "demo_bot: must be true or false"),
        ("[gateway]\nmax_frame = 0\n", "max_frame: must be between 1"),
        ("[gateway]\nlisten_port = \n", "bad TOML"),
        ("[gateway]\ntenants = 1\n", "unknown key 'tenants'"),
        ("[tenants.a]\nsecret = 'short'\n", "at least 16 bytes"),
        ("[tenants.a]\nallowed_origins = []\n", "exactly one of secret / secrets"),
        (
            "[tenants.a]\nsecret = 'x0123456789abcdef'\nsecrets = {k = 'x0123456789abcdef'}\n",
            "exactly one of",
        ),
        ("[tenants.a]\nsecret = 'x0123456789abcdef'\norigins = []\n", "unknown key"),
        ("[tenants.a]\nsecret = 'x0123456789abcdef'\nallowed_origins = 'x'\n", "list of strings"),
        (
            "[tenants.a]\nsecret = 'x0123456789abcdef'\nallowed_origins = ['acme.example']\n",
            'not "\\*" or scheme',
        ),
        ("[tenants.'b a d']\nsecret = 'x0123456789abcdef'\n", "names are"),
        ("[tenants.a]\nsecrets = {}\n", "non-empty"),
        # a long value is quoted cut short, not whole
        (f"[gateway]\nlisten_port = '{'9' * 500}'\n", r"must be an integer \(got '9{59}\)$"),
        (
            "[downstream.clusters.c]\nendpoints = ['127.0.0.1:1']\n[downstream.groups.g]\n"
            "cluster = 'c'\n[downstream]\nmax_attempts = 2.5\n",
            r"max_attempts must be an integer in \[1, 100\] \(got 2.5\)",
        ),
        (
            "[downstream.clusters.c]\nendpoints = ['127.0.0.1:1']\n[downstream.groups.g]\n"
            "cluster = 'c'\n[downstream]\nrequest_timeout_s = nan\n",
            r"request_timeout_s must be a number in \[0.05, 600.0\] \(got nan\)",
        ),
    ],
)
def test_bad_toml(env: dict[str, str], tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env, write(tmp_path, toml))


def test_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(env, str(tmp_path / "nope.toml"))


def test_bad_overrides(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        load(env, nope=1)
    with pytest.raises(ConfigError, match="listen_port: must be an integer"):
        load(env, listen_port=80.0)
    with pytest.raises(ConfigError, match=r"tenants\.x: name mismatch"):
        load(env, tenants={"x": Tenant("y", {"k": b"0123456789abcdef"}, ())})


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="outbound_max_bytes"):
        Config(outbound_max_bytes=0)
    with pytest.raises(ConfigError, match="listen_port: 0"):
        Config(listen_port=0, workers=2)
    assert Config(listen_port=0).listen_port == 0
    with pytest.raises(ConfigError):
        dataclasses.replace(Config(), max_frame=-5)
    assert Config(drain_s=3).drain_s == 3.0 and isinstance(Config(drain_s=3).drain_s, float)


def test_effective_workers() -> None:
    assert effective_workers(Config()) == 1
    assert effective_workers(Config(workers=4)) == 4
    assert effective_workers(Config(workers=0, max_connections=250_000)) == 14
    assert effective_workers(Config(workers=20, max_connections=250_000)) == 20
    assert effective_workers(Config(max_connections=18_001)) == 2
    assert effective_workers(Config(max_connections=18_000)) == 1


def test_demo_tenant_secret_is_created_once_0600_and_reused(env: dict[str, str]) -> None:
    c1 = load(env)
    assert list(c1.tenants) == [DEMO_TENANT]
    demo = c1.tenants[DEMO_TENANT]
    assert demo.allowed_origins == ("*",)
    assert list(demo.secrets) == [DEFAULT_KID]
    path = demo_secret_path(c1.state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip().encode() == demo.secrets[DEFAULT_KID]
    assert len(demo.secrets[DEFAULT_KID]) >= 32
    c2 = load(env)
    assert c2.tenants[DEMO_TENANT].secrets == demo.secrets
    assert [p.name for p in path.parent.iterdir()] == ["demo-secret"]  # no temp files left
    # a token minted from the file's secret verifies with the loaded config
    v = TokenVerifier(c2.tenants)
    tok = mint(DEMO_TENANT, "v", path.read_text().strip().encode(), 60, 1000.0, kid=DEFAULT_KID)
    assert v.verify(tok, 1000.0).visitor == "v"


def test_demo_secret_race_gives_one_secret(env: dict[str, str]) -> None:
    results: list[bytes] = []

    def worker() -> None:
        results.append(load(env).tenants[DEMO_TENANT].secrets[DEFAULT_KID])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_no_demo_tenant_when_tenants_configured(env: dict[str, str]) -> None:
    c = load(env, tenants={"acme": ACME})
    assert DEMO_TENANT not in c.tenants
    assert not demo_secret_path(c.state_dir).exists()


def test_corrupt_demo_secret_is_reported(env: dict[str, str]) -> None:
    p = demo_secret_path(env["GATEWAY_STATE_DIR"])
    p.parent.mkdir(parents=True)
    p.write_text("short\n")
    with pytest.raises(ConfigError, match="not a usable secret"):
        load(env)


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="state_dir: cannot create"):
        load({"GATEWAY_STATE_DIR": str(blocker / "sub")})


def test_json_round_trip_and_worker_env(env: dict[str, str]) -> None:
    c = load(env, tenants={"acme": ACME, "b": {"secrets": {"x": b"\x00\xff" * 10}}}, workers=3)
    text = c.to_json()
    assert "acme-secret" not in text  # hex, not plain
    assert Config.from_json(text) == c
    assert config_from_env({WORKER_CONFIG_ENV: text}) == c
    with pytest.raises(ConfigError):
        config_from_env({})
    with pytest.raises(ConfigError, match="unknown key"):
        Config.from_json('{"bogus": 1}')
    with pytest.raises(ConfigError):
        Config.from_json("[1]")
    with pytest.raises(ConfigError, match="max_frame"):
        Config.from_json('{"max_frame": "big"}')


def test_secrets_are_not_in_repr(env: dict[str, str]) -> None:
    c = load(env, tenants={"acme": ACME})
    assert "acme-secret" not in repr(c)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9090", ("::1", 9090)), ("h:0", ("h", 0))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "80", ":80", "h:", "h:x", "h:70000", "::1:80", "[::1]80"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_every_field_is_documented() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    for f in dataclasses.fields(Config):
        assert f"`{f.name}`" in doc, f.name
        if f.name not in ("tenants", "downstream"):
            assert f"GATEWAY_{f.name.upper()}" in doc, f.name


def test_process_env_not_used_by_load_config(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_WINDOW", "7")
    assert load(env).window == 64
    assert load({**env, **os.environ}).window == 7
