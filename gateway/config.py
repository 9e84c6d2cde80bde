"""Gateway configuration: defaults < TOML file < ``GATEWAY_*`` env < CLI flags.

Everything ends up in one frozen :class:`Config`; every field, its default
and its environment variable are listed in docs/operations.md ("Configuration
reference"). :func:`load_config` is the only entry point that touches the
file system: it reads the TOML file, checks that TLS files exist and, when no
tenant is configured, creates (once) and reuses the demo tenant's secret in
``state_dir/demo-secret``. Worker processes get the finished config as JSON
(:meth:`Config.to_json`) in the ``GATEWAY_WORKER_CONFIG`` variable and read it
back with :func:`config_from_env`.

TOML layout::

    [gateway]
    listen_port = 8443
    tls_cert = "/etc/gateway/cert.pem"

    [tenants.acme]
    secret = "at least 16 bytes of secret"        # key id "default"
    # or: secrets = { k2 = "new secret ...", k1 = "old secret ..." }  (first mints)
    allowed_origins = ["https://acme.example"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets as _secrets
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, get_type_hints

from gateway.gctune import GEN0_THRESHOLD
from gateway.protocol.tokens import Tenant, normalize_origin

__all__ = [
    "CONFIG_GENERATION_ENV",
    "DEFAULT_KID",
    "DEMO_TENANT",
    "ENV_PREFIX",
    "WORKER_CONFIG_ENV",
    "Config",
    "ConfigError",
    "config_from_env",
    "demo_secret_path",
    "effective_workers",
    "load_config",
    "parse_hostport",
]

ENV_PREFIX: Final = "GATEWAY_"
#: Environment variable naming the TOML file when no path is given.
CONFIG_FILE_ENV: Final = "GATEWAY_CONFIG"
#: Environment variable carrying the JSON config to worker processes.
WORKER_CONFIG_ENV: Final = "GATEWAY_WORKER_CONFIG"
#: ... and its generation (the supervisor's count of applied reloads;
#: gateway.server.control).
CONFIG_GENERATION_ENV: Final = "GATEWAY_CONFIG_GENERATION"
DEMO_TENANT: Final = "demo"
#: Key id of a tenant configured with a single ``secret``.
DEFAULT_KID: Final = "default"
MIN_SECRET_BYTES: Final = 16
MAX_FRAME_LIMIT: Final = 16 * 1024 * 1024
MAX_WORKERS: Final = 256
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and source."""


def _default_state_dir() -> str:
    return _state_dir_from(os.environ)


def _state_dir_from(env: Mapping[str, str]) -> str:
    d = env.get("GATEWAY_STATE_DIR")
    if d:
        return d
    return str(Path.home() / ".local" / "state" / "gateway")


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    workers: int = 1
    max_connections: int = 10000
    per_worker_connections: int = 18000
    tls_cert: str | None = None
    tls_key: str | None = None
    # 80-byte file of session-ticket keys shared by the nodes (None: the
    # supervisor draws one its workers share; gateway.server.tickets)
    tls_ticket_key: str | None = None
    max_frame: int = 65536
    handshake_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    heartbeat_s: float = 25.0
    heartbeat_misses: int = 2
    mobile_grace_s: float = 60.0
    window: int = 64
    dedup_ids: int = 1024
    replay_frames: int = 256
    replay_bytes: int = 262144
    session_ttl_s: float = 300.0
    max_detached_sessions: int = 100000
    outbound_max_frames: int = 256
    outbound_max_bytes: int = 1048576
    max_conns_per_ip: int = 5000
    handshake_rate: float = 20000.0
    handshake_burst: int = 5000
    drain_s: float = 10.0
    state_dir: str = field(default_factory=_default_state_dir)
    demo_bot: bool = True
    bot_think_ms: int = 200
    log_level: str = "info"
    ops_listen: str = "127.0.0.1:9090"
    # bearer token for /metrics, /api/stats and the dashboard ("" = none)
    ops_token: str = ""
    node_id: int = 0
    # net allocations between young-generation collections of the cyclic
    # garbage collector in each worker (gateway.gctune)
    gc_young: int = GEN0_THRESHOLD
    # rate limits (token buckets; rates per second over the whole gateway,
    # split evenly between workers; 0 = no limit)
    visitor_msg_rate: float = 50.0
    visitor_msg_burst: int = 100
    tenant_msg_rate: float = 0.0
    tenant_msg_burst: int = 1000
    ip_msg_rate: float = 0.0
    ip_msg_burst: int = 1000
    ip_conn_rate: float = 0.0
    ip_conn_burst: int = 100
    tenant_conn_rate: float = 0.0
    tenant_conn_burst: int = 1000
    tenants: dict[str, Tenant] = field(default_factory=dict)
    # the [downstream] table as given (checked by
    # gateway.downstream.settings.parse_settings); empty = the demo bot
    downstream: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, kind in _SCALARS.items():
            value = getattr(self, name)
            checked = _check_type(name, kind, value, "")
            if checked is not value:
                object.__setattr__(self, name, checked)
        _validate(self)

    def to_json(self) -> str:
        """The whole config (secrets hex-encoded) as compact JSON."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
        out["tenants"] = {
            name: {
                "secrets": {kid: s.hex() for kid, s in t.secrets.items()},
                "allowed_origins": list(t.allowed_origins),
            }
            for name, t in self.tenants.items()
        }
        out["downstream"] = self.downstream
        return json.dumps(out, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Config:
        """The inverse of :meth:`to_json`; ConfigError on anything else."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON: not an object")
        values: dict[str, Any] = {}
        tenants_in = data.pop("tenants", {})
        downstream = data.pop("downstream", {})
        if not isinstance(downstream, dict):
            raise ConfigError("config JSON: downstream must be an object")
        for key, value in data.items():
            if key not in _SCALARS:
                raise ConfigError(f"config JSON: unknown key {key!r}")
            values[key] = _check_type(key, _SCALARS[key], value, "config JSON: ")
        tenants: dict[str, Tenant] = {}
        if not isinstance(tenants_in, dict):
            raise ConfigError("config JSON: tenants must be an object")
        for name, t in tenants_in.items():
            try:
                sec = {str(k): bytes.fromhex(v) for k, v in t["secrets"].items()}
                tenants[name] = Tenant(name, sec, tuple(t["allowed_origins"]))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ConfigError(f"config JSON: tenant {name!r}: {e}") from None
        return cls(**values, tenants=tenants, downstream=downstream)


def _kinds() -> dict[str, str]:
    hints = get_type_hints(Config)
    kinds: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        t = hints[f.name]
        if f.name in ("tenants", "downstream"):
            continue
        if t is bool:
            kinds[f.name] = "bool"
        elif t is int:
            kinds[f.name] = "int"
        elif t is float:
            kinds[f.name] = "float"
        elif t is str:
            kinds[f.name] = "str"
        elif t == (str | None):
            kinds[f.name] = "str?"
        else:  # pragma: no cover - a new field with an unsupported type
            raise TypeError(f"unsupported config field type {t!r}")
    return kinds


#: Scalar field name -> kind ("int", "float", "bool", "str", "str?").
_SCALARS: Final = _kinds()

_KIND_TEXT: Final = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "str?": "a string",
}


def _check_type(name: str, kind: str, value: Any, where: str) -> Any:
    """``value`` with ints widened to floats for float fields; ConfigError
    when the type is wrong."""
    ok: bool
    if kind == "int":
        ok = type(value) is int
    elif kind == "float":
        if type(value) is int:
            return float(value)
        ok = type(value) is float
    elif kind == "bool":
        ok = type(value) is bool
    elif kind == "str":
        ok = type(value) is str
    else:
        ok = value is None or type(value) is str
    if not ok:
        raise ConfigError(f"{where}{name}: must be {_KIND_TEXT[kind]} (got {value!r:.60})")
    return value


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _parse_text(name: str, kind: str, text: str, where: str) -> Any:
    """A typed value from an environment variable or CLI string."""
    s = text.strip()
    try:
        if kind == "int":
            return int(s, 10)
        if kind == "float":
            v = float(s)
            if not math.isfinite(v):
                raise ValueError
            return v
    except ValueError:
        raise ConfigError(f"{where}{name}: must be {_KIND_TEXT[kind]} (got {text!r})") from None
    if kind == "bool":
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(
            f"{where}{name}: must be one of 1/0/true/false/yes/no/on/off (got {text!r})"
        )
    if kind == "str?" and s == "":
        return None
    return text


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); ValueError if bad."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"expected [addr]:port, got {text!r}")
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected host:port, got {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


_INT_RANGES: Final[dict[str, tuple[int, int | None]]] = {
    "listen_port": (0, 65535),
    "workers": (0, MAX_WORKERS),
    "max_connections": (1, None),
    "per_worker_connections": (1, None),
    "max_frame": (1, MAX_FRAME_LIMIT),
    "heartbeat_misses": (1, None),
    "window": (1, None),
    "dedup_ids": (1, None),
    "replay_frames": (1, None),
    "replay_bytes": (1, None),
    "max_detached_sessions": (0, None),
    "outbound_max_frames": (1, None),
    "outbound_max_bytes": (1, None),
    "max_conns_per_ip": (1, None),
    "handshake_burst": (1, None),
    "bot_think_ms": (0, None),
    "node_id": (0, 255),
    "gc_young": (100, 1_000_000),
    "visitor_msg_burst": (1, None),
    "tenant_msg_burst": (1, None),
    "ip_msg_burst": (1, None),
    "ip_conn_burst": (1, None),
    "tenant_conn_burst": (1, None),
}
#: float fields: (minimum, minimum allowed?)
_FLOAT_MIN: Final[dict[str, tuple[float, bool]]] = {
    "handshake_timeout_s": (0.0, False),
    "hello_timeout_s": (0.0, False),
    "heartbeat_s": (0.0, False),
    "mobile_grace_s": (0.0, True),
    "session_ttl_s": (0.0, True),
    "handshake_rate": (0.0, False),
    "drain_s": (0.0, True),
    "visitor_msg_rate": (0.0, True),
    "tenant_msg_rate": (0.0, True),
    "ip_msg_rate": (0.0, True),
    "ip_conn_rate": (0.0, True),
    "tenant_conn_rate": (0.0, True),
}


def _validate(cfg: Config) -> None:
    for name, (lo, hi) in _INT_RANGES.items():
        v = getattr(cfg, name)
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{name}: must be {rng} (got {v})")
    for name, (fmin, inclusive) in _FLOAT_MIN.items():
        f = getattr(cfg, name)
        if not math.isfinite(f) or f < fmin or (f == fmin and not inclusive):
            rel = ">=" if inclusive else ">"
            raise ConfigError(f"{name}: must be a finite number {rel} {fmin} (got {f})")
    if not cfg.listen_host:
        raise ConfigError("listen_host: must not be empty")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("tls_cert and tls_key: give both or neither")
    if cfg.tls_ticket_key is not None and cfg.tls_cert is None:
        raise ConfigError("tls_ticket_key: only with tls_cert and tls_key")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"log_level: must be one of {', '.join(LOG_LEVELS)} (got {cfg.log_level!r})"
        )
    if cfg.ops_listen:
        try:
            parse_hostport(cfg.ops_listen)
        except ValueError as e:
            raise ConfigError(f'ops_listen: {e} (use "" to disable)') from None
    if not cfg.state_dir:
        raise ConfigError("state_dir: must not be empty")
    if cfg.listen_port == 0 and effective_workers(cfg) > 1:
        raise ConfigError("listen_port: 0 (any port) needs exactly one worker")
    if not isinstance(cfg.tenants, dict):
        raise ConfigError("tenants: must be a mapping of name -> Tenant")
    for name, t in cfg.tenants.items():
        _validate_tenant(name, t)
    if cfg.downstream:
        from gateway.downstream.settings import parse_settings
        from gateway.downstream.tls import check_cluster

        try:
            ds = parse_settings(cfg.downstream)
            for spec in ds.clusters.values() if ds is not None else ():
                check_cluster(spec)  # TLS files usable: an error now, not a dead link
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _validate_tenant(name: str, t: Tenant) -> None:
    where = f"tenants.{name}"
    if not isinstance(t, Tenant):
        raise ConfigError(f"{where}: not a Tenant")
    if t.name != name:
        raise ConfigError(f"{where}: name mismatch ({t.name!r})")
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: names are 1-64 of A-Z a-z 0-9 _ . - (not starting with _.-)")
    if not t.secrets:
        raise ConfigError(f"{where}: needs a secret")
    for kid, s in t.secrets.items():
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"{where}: key ids must be non-empty strings")
        if not isinstance(s, bytes) or len(s) < MIN_SECRET_BYTES:
            raise ConfigError(f"{where}.secrets.{kid}: must be at least {MIN_SECRET_BYTES} bytes")
    if not isinstance(t.allowed_origins, tuple):
        raise ConfigError(f"{where}.allowed_origins: must be a tuple")
    for o in t.allowed_origins:
        if o == "*":
            continue
        try:
            normalize_origin(o)
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(
                f'{where}.allowed_origins: {o!r} is not "*" or scheme://host[:port]'
            ) from None


def effective_workers(cfg: Config) -> int:
    """``max(workers or 1, ceil(max_connections / per_worker_connections))``."""
    return max(cfg.workers or 1, math.ceil(cfg.max_connections / cfg.per_worker_connections))


def _tenant_from_table(name: str, table: Any, where: str) -> Tenant:
    if isinstance(table, Tenant):
        if table.name != name:
            raise ConfigError(f"{where}: name mismatch ({table.name!r})")
        return table
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - {"secret", "secrets", "allowed_origins"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    if ("secret" in table) == ("secrets" in table):
        raise ConfigError(f"{where}: give exactly one of secret / secrets")
    raw: Any = {DEFAULT_KID: table["secret"]} if "secret" in table else table["secrets"]
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f'{where}.secrets: must be a non-empty table of kid = "secret"')
    secrets: dict[str, bytes] = {}
    for kid, s in raw.items():
        if isinstance(s, str):
            secrets[str(kid)] = s.encode("utf-8")
        elif isinstance(s, bytes):
            secrets[str(kid)] = s
        else:
            raise ConfigError(f"{where}: secrets must be strings")
    origins = table.get("allowed_origins", ())
    if isinstance(origins, str) or not isinstance(origins, list | tuple):
        raise ConfigError(f"{where}.allowed_origins: must be a list of strings")
    if not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{where}.allowed_origins: must be a list of strings")
    return Tenant(name, secrets, tuple(origins))


def _tenants_from(tables: Any, where: str) -> dict[str, Tenant]:
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{where}: must be a table of tenants")
    out: dict[str, Tenant] = {}
    for name, table in tables.items():
        t = _tenant_from_table(str(name), table, f"{where}.{name}")
        _validate_tenant(t.name, t)
        out[t.name] = t
    return out


def _read_toml(path: str) -> tuple[dict[str, Any], dict[str, Tenant], dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: bad TOML: {e}") from None
    unknown = set(doc) - {"gateway", "tenants", "downstream"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    section = doc.get("gateway", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [gateway] must be a table")
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _SCALARS:
            raise ConfigError(f"{path}: [gateway] unknown key {key!r}")
        values[key] = _check_type(key, _SCALARS[key], value, f"{path}: [gateway] ")
    tenants = _tenants_from(doc.get("tenants", {}), f"{path}: tenants")
    downstream = doc.get("downstream", {})
    if not isinstance(downstream, dict):
        raise ConfigError(f"{path}: [downstream] must be a table")
    return values, tenants, downstream


def demo_secret_path(state_dir: str) -> Path:
    return Path(state_dir).expanduser() / "demo-secret"


def _demo_secret(state_dir: str) -> bytes:
    """The demo tenant's secret: created once (0600, atomically) and reused."""
    path = demo_secret_path(state_dir)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".demo-secret.")
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(_secrets.token_hex(32) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                # atomic create-if-absent; if another process won the race,
                # its secret is the one used
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"state_dir: cannot create or read {path}: {e.strerror or e}") from None
    if len(text.encode()) < MIN_SECRET_BYTES or any(c.isspace() for c in text):
        raise ConfigError(f"{path}: not a usable secret (delete it to generate a new one)")
    return text.encode("utf-8")


def load_config(path: str | None, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Config:
    """Defaults, then the TOML file (``path``, else ``$GATEWAY_CONFIG`` if
    set), then ``GATEWAY_<FIELD>`` variables of ``env``, then ``overrides``
    (field name -> typed value or string; ``None`` values are ignored;
    ``tenants`` may map names to :class:`Tenant` or to TOML-style tables).
    Raises :class:`ConfigError`."""
    values: dict[str, Any] = {"state_dir": _state_dir_from(env)}
    tenants: dict[str, Tenant] = {}
    downstream: dict[str, Any] = {}
    path = path or env.get(CONFIG_FILE_ENV) or None
    if path is not None:
        file_values, tenants, downstream = _read_toml(path)
        values.update(file_values)
    for name, kind in _SCALARS.items():
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _parse_text(name, kind, env[var], f"{var}: ")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "tenants":
            tenants = _tenants_from(value, "tenants")
            continue
        if key == "downstream_specs":  # gateway serve --downstream GROUP=HOST:PORT,...
            from gateway.downstream.settings import merge_cli_specs

            if value:
                try:
                    downstream = merge_cli_specs(downstream, value)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            continue
        if key == "downstream":
            downstream = dict(value)
            continue
        if key not in _SCALARS:
            raise ConfigError(f"unknown setting {key!r}")
        kind = _SCALARS[key]
        if isinstance(value, str) and kind not in ("str", "str?"):
            value = _parse_text(key, kind, value, "")
        values[key] = _check_type(key, kind, value, "")
    values["state_dir"] = str(Path(values["state_dir"]).expanduser())
    cfg = Config(**values, tenants=tenants, downstream=downstream)
    for name in ("tls_cert", "tls_key", "tls_ticket_key"):
        p = getattr(cfg, name)
        if p is not None and not os.path.isfile(p):
            raise ConfigError(f"{name}: no such file {p!r}")
    if not cfg.tenants:
        secret = _demo_secret(cfg.state_dir)
        demo = Tenant(DEMO_TENANT, {DEFAULT_KID: secret}, ("*",))
        cfg = dataclasses.replace(cfg, tenants={DEMO_TENANT: demo})
    return cfg


def config_from_env(env: Mapping[str, str] | None = None) -> Config:
    """The config a supervisor passed to this worker process."""
    e = os.environ if env is None else env
    text = e.get(WORKER_CONFIG_ENV)
    if text is None:
        raise ConfigError(f"{WORKER_CONFIG_ENV} is not set")
    return Config.from_json(text)
