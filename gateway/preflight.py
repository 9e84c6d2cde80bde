"""What `gateway serve` checks before it starts a worker, and what
`gateway serve --check` prints (docs/operations.md, "Checking a
configuration").

:func:`load_config` checks the settings and that the files they name exist;
:func:`check` also loads what the workers will load from those files (the
visitors' certificate, its key, the session-ticket key), so that a key that
does not match its certificate stops the start with one clear error
instead of workers that fail one after another; the supervisor runs the
same check before it applies a reload. :func:`summary` describes the
configuration in a few lines, with warnings about what is legal but
probably not meant (an expiring certificate, an open operator endpoint,
the demo tenant).
"""

from __future__ import annotations

import ipaddress
import math
import time
from datetime import UTC, datetime

from gateway.config import DEMO_TENANT, Config, effective_workers, parse_hostport
from gateway.server.tlsconf import config_context

__all__ = ["EXPIRY_WARNING_DAYS", "certificate_facts", "check", "summary"]

#: A certificate that expires within this many days gets a warning.
EXPIRY_WARNING_DAYS = 14


def check(cfg: Config) -> None:
    """Loads the files the workers load; :class:`gateway.config.ConfigError`
    naming the setting when one does not."""
    config_context(cfg, {})  # (the supervisor's own key only warns: not checked)


def certificate_facts(cert_file: str) -> tuple[str, float]:
    """The first certificate of a PEM chain file: its names (the DNS and IP
    subject alternative names, else the subject) and when it expires (a
    Unix time)."""
    from cryptography import x509

    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    label = ", ".join(names) if names else cert.subject.rfc4514_string()
    return label, cert.not_valid_after_utc.timestamp()


def summary(cfg: Config, source: str, now: float | None = None) -> list[str]:
    """Lines describing ``cfg`` (read from ``source``), warnings last."""
    t = time.time() if now is None else now
    warnings: list[str] = []
    n = effective_workers(cfg)
    lines = [
        f"configuration: {source}",
        f"listen: {cfg.listen_host}:{cfg.listen_port}, {n} worker(s), "
        f"{cfg.max_connections:,} connections",
    ]
    if cfg.tls_cert is not None:
        try:
            names, expires = certificate_facts(cfg.tls_cert)
        except (OSError, ValueError, IndexError) as e:
            # (ssl loaded it; a chain cryptography reads otherwise is
            # described as unreadable, not a reason to refuse the start)
            names, expires = f"? ({cfg.tls_cert}: {e})", math.inf
        days = (expires - t) / 86400
        when = (
            datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
            if math.isfinite(expires)
            else "?"
        )
        tickets = (
            f"key file {cfg.tls_ticket_key}"
            if cfg.tls_ticket_key
            else "the supervisor's key, shared by its workers"
        )
        lines.append(f"TLS: certificate for {names}, expires {when}; session tickets: {tickets}")
        if days < 0:
            warnings.append(f"the TLS certificate expired on {when}")
        elif days < EXPIRY_WARNING_DAYS:
            warnings.append(f"the TLS certificate expires in {days:.1f} days ({when})")
    else:
        lines.append("TLS: off (plain ws:// and h2c; terminate TLS in front, or set tls_cert)")
    if cfg.ops_listen:
        host = parse_hostport(cfg.ops_listen)[0]
        auth = "bearer token required" if cfg.ops_token else "no token"
        lines.append(f"operator endpoint: {cfg.ops_listen} ({auth})")
        if not cfg.ops_token and not _loopback(host):
            warnings.append(
                f"the operator endpoint listens on {host} without ops_token: metrics, "
                "stats and the dashboard are open to that network"
            )
    else:
        lines.append("operator endpoint: off")
    for name, tenant in sorted(cfg.tenants.items()):
        origins = ", ".join(tenant.allowed_origins) or "none"
        lines.append(
            f"tenant {name}: {len(tenant.secrets)} secret(s), minting with key "
            f"{tenant.primary_kid!r}; origins {origins}"
        )
    if DEMO_TENANT in cfg.tenants and len(cfg.tenants) == 1:
        warnings.append(
            "no tenant configured: the demo tenant accepts any origin (configure [tenants.NAME])"
        )
    lines += _downstream_lines(cfg)
    return lines + [f"warning: {w}" for w in warnings]


def _downstream_lines(cfg: Config) -> list[str]:
    if not cfg.downstream:
        return ["downstream: none (the demo bot answers)" if cfg.demo_bot else "downstream: none"]
    from gateway.downstream.settings import parse_settings

    ds = parse_settings(cfg.downstream)  # (load_config has checked it)
    if ds is None:
        return ["downstream: none"]
    out = []
    for name, spec in sorted(ds.clusters.items()):
        eps = ", ".join(f"{h}:{p}" for h, p in spec.endpoints)
        out.append(f"cluster {name}: {'TLS' if spec.tls else 'h2c'} to {eps}")
    for name, g in sorted(ds.groups.items()):
        extra = "".join(
            f", {k} {v}" for k, v in (("bot first", g.bot), ("fallback", g.fallback)) if v
        )
        default = " (default)" if name == ds.default_group else ""
        out.append(f"group {name}{default}: cluster {g.cluster}{extra}")
    out.append(f"routing rules: {len(ds.rules)}")
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
