"""What a configuration reload (SIGHUP to the supervisor) may change in
running workers, sans-IO (docs/operations.md, "Reloading the
configuration").

Ten parts of the configuration apply without a restart:

- the tenants (secrets, allowed origins): new connections are checked
  against the new set; sessions already authenticated go on;
- downstream clusters added (with groups that use them, below): their
  links start in every worker at once; until one is up, the cluster is
  treated as down (messages routed there wait in their session's bounded
  buffer, new sessions are asked to retry later). Clusters removed (with
  the groups that used them changed or removed, below): their sessions
  are opened again where their groups now point, and their links drain
  (what is in flight on them is answered there, or redelivered after
  ``request_timeout_s``) and end;
- the endpoint list of each downstream cluster: new endpoints get links and
  traffic, removed ones stop getting new sessions and are drained (the
  messages in flight on them are answered there, or redelivered elsewhere
  after ``request_timeout_s``), and the sessions on them move with their
  next message;
- the visitors' TLS certificate and key (``tls_cert``, ``tls_key``: other
  files, or new contents in the same files, as after a renewal) and the
  session-ticket key file (``tls_ticket_key``): new connections get the
  new certificate and tickets under the new key; connections already open
  keep theirs. TLS turned on or off needs a restart;
- the rate limits (``*_rate``, ``*_burst``): a changed limit keeps each
  key's tokens, cut to its new burst, so a lower limit holds at once; a
  limit turned on starts with full buckets;
- the log level, the per-IP connection cap (``max_conns_per_ip``), the
  handshake rate (``handshake_rate``, ``handshake_burst``: the bucket keeps
  its tokens, cut to the new burst) and the timeouts ``handshake_timeout_s``,
  ``hello_timeout_s``, ``session_ttl_s`` and ``drain_s``: from the next
  connection, handshake, sweep of detached sessions or drain (connections
  already over a lower cap stay); the heartbeat (``heartbeat_s``,
  ``heartbeat_misses``) for connections opened from then on, each keeping
  the one its ``welcome`` told (over HTTP/2, per connection), and
  ``mobile_grace_s`` at once;
- the frame and queue limits: ``max_frame``, ``window`` and
  ``outbound_max_bytes`` / ``outbound_max_frames`` for connections opened
  from then on (connected visitors keep the ones their ``welcome`` told),
  ``dedup_ids``, ``replay_frames`` and ``replay_bytes`` for sessions
  opened from then on, ``max_detached_sessions`` from the next detach;
  and ``bot_think_ms`` (replies not yet scheduled) and ``gc_young``;
- the downstream routing: the rules, the default group, and groups
  added, changed or removed: new sessions, and the keyword rules of every
  message, follow it; the sessions in a group changed or removed are
  opened again where their group now points (those of a removed group in
  the entry group the new rules give them);
- a TLS cluster's CA, client certificate and key (``ca_file``,
  ``cert_file``, ``key_file``: other files, or new contents in the same
  files): a link's next connection uses them; connected links go on;
- the downstream timeouts and bounds (``request_timeout_s``,
  ``max_attempts``, ``max_inflight_per_link``, ``link_high_water``,
  ``health_interval_s``, ``health_timeout_s``, ``sticky_entries``,
  ``sticky_ttl_s``), the admission settings, and the breaker and outlier
  settings: messages sent from then on, and the links' next checks, use
  them; each endpoint's breaker keeps its state and counts (its window
  starts empty if ``window_s`` changed) and an ejection in progress runs
  to its end.

Anything else that differs (the listen address, the worker count or
connection count, TLS turned on or off, a cluster's other settings ...)
needs a
restart: :func:`plan_reload` names it, and the supervisor then
refuses the whole reload rather than apply part of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gateway.config import Config, ConfigError
from gateway.session.limits import FIELDS as LIMIT_FIELDS

if TYPE_CHECKING:
    from gateway.downstream.settings import DownstreamSettings

__all__ = ["LIVE_FIELDS", "TUNING_FIELDS", "ReloadPlan", "file_sets", "plan_reload"]

#: The ``[gateway]`` settings a reload applies in place (besides the rate
#: limits and the TLS files): the log level, the listener's per-IP cap and
#: handshake rate, timeouts read where they are used (so they hold for what
#: comes next: handshakes begun, detached sessions swept, a drain), the
#: heartbeat and frame and queue limits of the connections opened from then
#: on (each keeps the terms its ``welcome`` told: gateway.session.terms),
#: the replay and duplicate bounds of sessions opened from then on, the
#: bound of detached sessions, the demo bot's think time and the garbage
#: collector's young threshold.
LIVE_FIELDS: Final = frozenset(
    {
        "log_level", "max_conns_per_ip", "handshake_rate", "handshake_burst",
        "handshake_timeout_s", "hello_timeout_s", "session_ttl_s", "drain_s",
        "heartbeat_s", "heartbeat_misses", "mobile_grace_s",
        "max_frame", "window", "outbound_max_bytes", "outbound_max_frames",
        "dedup_ids", "replay_frames", "replay_bytes", "max_detached_sessions",
        "bot_think_ms", "gc_young",
    }
)  # fmt: skip

#: The ``[downstream]`` settings a reload applies in place (besides the
#: routing, the endpoint lists and the clusters' TLS files).
TUNING_FIELDS: Final = frozenset(
    {
        "request_timeout_s", "max_attempts", "max_inflight_per_link", "link_high_water",
        "health_interval_s", "health_timeout_s", "sticky_entries", "sticky_ttl_s", "admission",
        "breaker", "outlier",
    }
)  # fmt: skip


@dataclass
class ReloadPlan:
    #: settings that differ and cannot change without a restart (dotted
    #: names, e.g. ``listen_port``, ``downstream.groups``)
    needs_restart: list[str] = field(default_factory=list)
    tenants: bool = False
    #: the visitors' TLS certificate or key changed (paths or contents)
    tls: bool = False
    #: the rate limits changed
    limits: bool = False
    #: the :data:`LIVE_FIELDS` that changed
    settings: list[str] = field(default_factory=list)
    #: the downstream rules, default group or groups changed
    routing: bool = False
    #: the TLS clusters whose CA, client certificate or key changed
    cluster_tls: list[str] = field(default_factory=list)
    #: the downstream timeouts, bounds, admission, breaker or outlier settings changed
    tuning: bool = False
    #: the groups changed or removed (their sessions are opened again)
    groups_changed: list[str] = field(default_factory=list)
    #: the clusters added and removed, by name
    clusters_added: list[str] = field(default_factory=list)
    clusters_removed: list[str] = field(default_factory=list)
    #: per cluster: the endpoints (``host:port``) added and removed
    added: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    #: the new ``[downstream]`` settings, parsed (None: the demo bot)
    downstream: DownstreamSettings | None = None
    #: what a worker did with it (set by ``gateway.server.control.apply_config``):
    #: applied, unchanged, refused or failed
    outcome: str = ""

    @property
    def changes(self) -> bool:
        """Something to apply (and nothing that needs a restart)."""
        return not self.needs_restart and (
            self.tenants
            or self.tls
            or self.limits
            or self.downstream_changes
            or bool(self.settings)
        )

    @property
    def downstream_changes(self) -> bool:
        """Something for the workers' forwarders to apply."""
        return (
            self.routing
            or self.tuning
            or bool(self.clusters_added or self.clusters_removed)
            or bool(self.added or self.removed or self.cluster_tls)
        )

    def summary(self) -> dict[str, Any]:
        """For the log line of a reload."""
        out: dict[str, Any] = {}
        if self.tenants:
            out["tenants"] = "changed"
        if self.tls:
            out["tls"] = "reloaded"
        if self.limits:
            out["limits"] = "changed"
        if self.settings:
            out["settings"] = self.settings
        if self.routing:
            out["routing"] = "changed"
        if self.groups_changed:
            out["groups_changed"] = self.groups_changed
        if self.cluster_tls:
            out["cluster_tls"] = self.cluster_tls
        if self.tuning:
            out["downstream_settings"] = "changed"
        if self.clusters_added:
            out["clusters_added"] = self.clusters_added
        if self.clusters_removed:
            out["clusters_removed"] = self.clusters_removed
        if self.added:
            out["endpoints_added"] = self.added
        if self.removed:
            out["endpoints_removed"] = self.removed
        return out


def _endpoints(spec: Any) -> list[str]:
    return [f"{h}:{p}" for h, p in spec.endpoints]


def _without_endpoints(spec: Any) -> Any:
    return dataclasses.replace(spec, endpoints=())


def _without_files(spec: Any) -> Any:
    return dataclasses.replace(spec, ca_file=None, cert_file=None, key_file=None)


def file_sets(cfg: Config) -> dict[str, tuple[str, ...]]:
    """The TLS files whose contents a reload compares (the caller reads
    them): ``"tls"`` for the visitors' certificate and key, and
    ``"downstream.clusters.NAME"`` for each TLS cluster's CA, client
    certificate and key."""
    out: dict[str, tuple[str, ...]] = {}
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        tk = cfg.tls_ticket_key
        out["tls"] = (cfg.tls_cert, cfg.tls_key) + ((tk,) if tk is not None else ())
    if cfg.downstream:
        from gateway.downstream.settings import parse_settings

        try:
            ds = parse_settings(cfg.downstream)
        except ValueError:
            ds = None
        for name, spec in ds.clusters.items() if ds is not None else ():
            if spec.tls:
                files = (spec.ca_file, spec.cert_file, spec.key_file)
                out[f"downstream.clusters.{name}"] = tuple(f for f in files if f is not None)
    return out


def plan_reload(old: Config, new: Config, files_changed: Collection[str] = ()) -> ReloadPlan:
    """What going from ``old`` to ``new`` changes; ``files_changed``: the
    keys of :func:`file_sets` whose files have other contents than those
    loaded (a renewal in place). Raises :class:`ConfigError` if ``new``'s
    downstream table does not parse (the loader has checked it already)."""
    from gateway.downstream.settings import parse_settings

    plan = ReloadPlan()
    tls_on = old.tls_cert is not None, new.tls_cert is not None
    for f in dataclasses.fields(Config):
        if f.name in ("tenants", "downstream"):
            continue
        if f.name in ("tls_cert", "tls_key", "tls_ticket_key") and tls_on == (True, True):
            continue  # other files: reloaded below
        if getattr(old, f.name) == getattr(new, f.name):
            continue
        if f.name in LIMIT_FIELDS:
            plan.limits = True
        elif f.name in LIVE_FIELDS:
            plan.settings.append(f.name)
        else:
            plan.needs_restart.append(f.name)
    if tls_on == (True, True):
        plan.tls = "tls" in files_changed or (old.tls_cert, old.tls_key, old.tls_ticket_key) != (
            new.tls_cert,
            new.tls_key,
            new.tls_ticket_key,
        )
    plan.tenants = old.tenants != new.tenants
    try:
        a = parse_settings(old.downstream) if old.downstream else None
        b = parse_settings(new.downstream) if new.downstream else None
    except ValueError as e:
        raise ConfigError(f"downstream: {e}") from None
    plan.downstream = b
    if a is None or b is None:
        if (a is None) != (b is None):
            plan.needs_restart.append("downstream")  # the demo bot on or off
        return plan
    # (the groups that used a removed cluster changed or went: the parser
    # refuses a group naming a cluster that is not there)
    plan.clusters_added = sorted(set(b.clusters) - set(a.clusters))
    plan.clusters_removed = sorted(set(a.clusters) - set(b.clusters))
    for f in dataclasses.fields(a):
        if f.name == "clusters" or getattr(a, f.name) == getattr(b, f.name):
            continue
        if f.name in ("rules", "default_group"):
            plan.routing = True
        elif f.name in TUNING_FIELDS:
            plan.tuning = True
        elif f.name == "groups":
            plan.routing = True
            plan.groups_changed = sorted(n for n, g in a.groups.items() if b.groups.get(n) != g)
        else:
            plan.needs_restart.append(f"downstream.{f.name}")
    for name in sorted(set(a.clusters) & set(b.clusters)):
        was_spec, now_spec = (
            _without_endpoints(a.clusters[name]),
            _without_endpoints(b.clusters[name]),
        )
        if was_spec != now_spec:
            if not (was_spec.tls and _without_files(was_spec) == _without_files(now_spec)):
                plan.needs_restart.append(f"downstream.clusters.{name}")
                continue
            plan.cluster_tls.append(name)  # other TLS files
        elif was_spec.tls and f"downstream.clusters.{name}" in files_changed:
            plan.cluster_tls.append(name)  # new contents in the same files
        was, now = _endpoints(a.clusters[name]), _endpoints(b.clusters[name])
        added = [e for e in now if e not in was]
        removed = [e for e in was if e not in now]
        if added:
            plan.added[name] = added
        if removed:
            plan.removed[name] = removed
    return plan
