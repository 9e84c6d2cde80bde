"""The ``[downstream]`` configuration: clusters, skill groups, routing rules
and protection settings, parsed from the TOML table (or built from
``gateway serve --downstream GROUP=HOST:PORT[,HOST:PORT...]``) and checked
once at start (docs/operations.md, "Downstream configuration")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.downstream.admission import AdmissionConfig
from gateway.downstream.breaker import BreakerConfig, OutlierConfig
from gateway.downstream.routing import Group, Router, Rule

__all__ = ["ClusterSpec", "DownstreamSettings", "merge_cli_specs", "parse_settings"]

MAX_ENDPOINTS: Final = 64
MAX_LINKS_PER_ENDPOINT: Final = 16


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    endpoints: tuple[tuple[str, int], ...]
    tls: bool = False
    ca_file: str | None = None
    links_per_endpoint: int = 1
    #: client certificate chain and its key (mutual TLS), both or neither
    cert_file: str | None = None
    key_file: str | None = None
    #: the name the endpoints' certificates are verified against (and sent
    #: as SNI); None: each endpoint's host
    server_name: str | None = None
    #: extra request headers of the link stream (a bearer token...)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DownstreamSettings:
    clusters: dict[str, ClusterSpec]
    groups: dict[str, Group]
    rules: tuple[Rule, ...]
    default_group: str
    request_timeout_s: float = 5.0
    max_attempts: int = 3
    max_inflight_per_link: int = 8192
    link_high_water: int = 1 << 20
    health_interval_s: float = 2.0
    health_timeout_s: float = 3.0
    sticky_entries: int = 100_000
    sticky_ttl_s: float = 86_400.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def router(self) -> Router:
        return Router(list(self.rules), self.groups, self.default_group)


_SCALARS: Final[dict[str, type]] = {
    "request_timeout_s": float,
    "max_attempts": int,
    "max_inflight_per_link": int,
    "link_high_water": int,
    "health_interval_s": float,
    "health_timeout_s": float,
    "sticky_entries": int,
    "sticky_ttl_s": float,
}
_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "request_timeout_s": (0.05, 600.0),
    "max_attempts": (1, 100),
    "max_inflight_per_link": (1, 1 << 20),
    "link_high_water": (4096, 1 << 30),
    "health_interval_s": (0.05, 600.0),
    "health_timeout_s": (0.05, 600.0),
    "sticky_entries": (1, 10_000_000),
    "sticky_ttl_s": (1.0, 365 * 86_400.0),
}


def _hostport(text: Any, where: str) -> tuple[str, int]:
    from gateway.config import parse_hostport

    if type(text) is not str:
        raise ValueError(f"{where}: endpoint must be a string HOST:PORT")
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if port == 0:
        raise ValueError(f"{where}: endpoint port must not be 0")
    return host, port


def _table(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"{where}.{key} must be a table")
    return v


def _sub(cls: Any, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


_TLS_FILES: Final = ("ca_file", "cert_file", "key_file")
MAX_SERVER_NAME: Final = 253


MAX_LINK_HEADERS: Final = 16
MAX_LINK_HEADER_BYTES: Final = 4096
#: Headers the link request sets itself, or that HTTP/2 forbids.
_RESERVED_HEADERS: Final = frozenset(
    ("content-type", "host", "te", "connection", "keep-alive", "proxy-connection",
     "transfer-encoding", "upgrade", "content-length")
)  # fmt: skip
_TOKEN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")


def _headers(t: Any, w: str) -> tuple[tuple[str, str], ...]:
    """A cluster's ``headers`` table: lower-case header names (not pseudo,
    not set by the link itself, not ``x-gateway-*``) to printable values;
    at most :data:`MAX_LINK_HEADERS`, :data:`MAX_LINK_HEADER_BYTES` in all."""
    if not isinstance(t, Mapping):
        raise ValueError(f'{w}.headers must be a table of NAME = "value"')
    if len(t) > MAX_LINK_HEADERS:
        raise ValueError(f"{w}.headers: at most {MAX_LINK_HEADERS}")
    out = []
    for k, v in t.items():
        if not isinstance(k, str) or not k or not set(k) <= _TOKEN_CHARS:
            raise ValueError(f"{w}.headers: {k!r} is not a lower-case header name")
        if k in _RESERVED_HEADERS or k.startswith("x-gateway-"):
            raise ValueError(f"{w}.headers: {k!r} is set by the link itself or not allowed")
        if not isinstance(v, str) or any(not (c == "\t" or " " <= c <= "~") for c in v):
            raise ValueError(f"{w}.headers.{k} must be a string of printable ASCII")
        out.append((k, v))
    if sum(len(k) + len(v) for k, v in out) > MAX_LINK_HEADER_BYTES:
        raise ValueError(f"{w}.headers: more than {MAX_LINK_HEADER_BYTES} bytes in all")
    return tuple(out)


def _tls_keys(t: Mapping[str, Any], w: str) -> dict[str, Any]:
    """A cluster's TLS keys, checked: ``tls`` a boolean; the files paths
    (``cert_file`` and ``key_file`` together) and ``server_name`` a host
    name, all only with ``tls = true``."""
    tls = t.get("tls", False)
    if type(tls) is not bool:
        raise ValueError(f"{w}.tls must be true or false")
    out: dict[str, Any] = {"tls": tls}
    for key in (*_TLS_FILES, "server_name"):
        v = t.get(key)
        if v is None:
            continue
        if type(v) is not str or not v:
            raise ValueError(f"{w}.{key} must be a non-empty string")
        if not tls:
            raise ValueError(f"{w}.{key} needs tls = true")
        out[key] = v
    if ("cert_file" in out) != ("key_file" in out):
        raise ValueError(f"{w}: cert_file and key_file go together (mutual TLS)")
    sn = out.get("server_name")
    if sn is not None and (len(sn) > MAX_SERVER_NAME or any(c in sn for c in " /:")):
        raise ValueError(f"{w}.server_name must be a host name (got {sn!r})")
    return out


def parse_settings(doc: Mapping[str, Any]) -> DownstreamSettings | None:
    """The settings of a ``[downstream]`` table; None when it defines no
    cluster (the embedded demo bot answers then). ValueError on mistakes."""
    if not doc:
        return None
    where = "[downstream]"
    known = {"clusters", "groups", "rules", "default_group", "breaker", "outlier", "admission"}
    unknown = set(doc) - known - set(_SCALARS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    clusters: dict[str, ClusterSpec] = {}
    for name, t in _table(doc, "clusters", where).items():
        w = f"{where}.clusters.{name}"
        if not isinstance(t, dict):
            raise ValueError(f"{w} must be a table")
        extra = set(t) - {"endpoints", "links_per_endpoint", "tls", *_TLS_FILES, "server_name",
                          "headers"}  # fmt: skip
        if extra:
            raise ValueError(f"{w}: unknown key(s) {', '.join(sorted(extra))}")
        eps = t.get("endpoints")
        if not isinstance(eps, list) or not 1 <= len(eps) <= MAX_ENDPOINTS:
            raise ValueError(f"{w}.endpoints must list 1 to {MAX_ENDPOINTS} HOST:PORT strings")
        endpoints = tuple(_hostport(e, f"{w}.endpoints") for e in eps)
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"{w}.endpoints has duplicates")
        links = t.get("links_per_endpoint", 1)
        if type(links) is not int or not 1 <= links <= MAX_LINKS_PER_ENDPOINT:
            raise ValueError(f"{w}.links_per_endpoint must be 1..{MAX_LINKS_PER_ENDPOINT}")
        clusters[str(name)] = ClusterSpec(str(name), endpoints, links_per_endpoint=links,
                                          headers=_headers(t.get("headers", {}), w),
                                          **_tls_keys(t, w))  # fmt: skip
    if not clusters:
        raise ValueError(f"{where}: define at least one cluster ([downstream.clusters.NAME])")
    groups: dict[str, Group] = {}
    for name, t in _table(doc, "groups", where).items():
        w = f"{where}.groups.{name}"
        if not isinstance(t, dict):
            raise ValueError(f"{w} must be a table")
        g = _sub(Group, {"name": str(name), **t}, w)
        if g.cluster not in clusters:
            raise ValueError(f"{w}.cluster: no cluster named {g.cluster!r}")
        groups[str(name)] = g
    if not groups:
        # one group per cluster, named after it
        groups = {n: Group(name=n, cluster=n) for n in clusters}
    rules_in = doc.get("rules", [])
    if not isinstance(rules_in, list):
        raise ValueError(f"{where}.rules must be an array of tables ([[downstream.rules]])")
    rules: list[Rule] = []
    for i, t in enumerate(rules_in):
        w = f"{where}.rules[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{w} must be a table")
        t = dict(t)
        if "keywords" in t:
            kw = t["keywords"]
            if not isinstance(kw, list) or not all(type(k) is str and k for k in kw):
                raise ValueError(f"{w}.keywords must be a list of non-empty strings")
            t["keywords"] = tuple(kw)
        rules.append(_sub(Rule, t, w))
    default_group = doc.get("default_group", next(iter(groups)))
    if type(default_group) is not str or default_group not in groups:
        raise ValueError(f"{where}.default_group: no group named {default_group!r}")
    values: dict[str, Any] = {}
    for key, kind in _SCALARS.items():
        if key in doc:
            val: Any = doc[key]
            if kind is float and type(val) is int:
                val = float(val)
            lo, hi = _BOUNDS[key]
            same_type = type(val) is kind
            if not same_type or not lo <= val <= hi:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{where}.{key} must be {what} in [{lo}, {hi}] (got {val!r:.40})")
            values[key] = val
    s = DownstreamSettings(
        clusters=clusters,
        groups=groups,
        rules=tuple(rules),
        default_group=default_group,
        breaker=_sub(BreakerConfig, _table(doc, "breaker", where), f"{where}.breaker"),
        outlier=_sub(OutlierConfig, _table(doc, "outlier", where), f"{where}.outlier"),
        admission=_sub(AdmissionConfig, _table(doc, "admission", where), f"{where}.admission"),
        **values,
    )
    try:
        s.router()  # checks group references and fallback cycles
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return s


def merge_cli_specs(doc: Mapping[str, Any], specs: Sequence[str]) -> dict[str, Any]:
    """Adds ``GROUP=HOST:PORT[,HOST:PORT...]`` specs (``--downstream``) to a
    ``[downstream]`` table: a cluster and a group named GROUP each; the first
    spec given becomes the default group. ValueError on a bad spec."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    clusters = out.setdefault("clusters", {})
    groups = out.setdefault("groups", {})
    for i, spec in enumerate(specs):
        group, sep, eps = spec.partition("=")
        group = group.strip()
        if not sep or not group or not eps:
            raise ValueError(f"--downstream {spec!r}: expected GROUP=HOST:PORT[,HOST:PORT...]")
        endpoints = [e.strip() for e in eps.split(",") if e.strip()]
        for e in endpoints:
            _hostport(e, f"--downstream {group}")
        clusters[group] = {"endpoints": endpoints}
        groups[group] = {"cluster": group}
        if i == 0:
            out["default_group"] = group
    return out
