"""Supervisor -> worker control messages: a configuration reload.

The supervisor gives every worker the read end of a pipe
(``$GATEWAY_CONTROL_FD``) and writes to it, in the framing of the stats
pipe (:mod:`gateway.ops.wire`: a 4-byte big-endian length, then a msgpack
map):

- ``{"t": "reload", "config": "<the whole config as JSON>", "files":
  [...], "gen": N}``: apply what may change without a restart
  (:mod:`gateway.reload`); ``files``: the sets of TLS files
  (:func:`gateway.reload.file_sets` keys) that have new contents; ``gen``:
  the supervisor's configuration generation (1 for the first reload it
  applied, and so on). A worker that applied the configuration, or had it
  already, reports that generation in its snapshots
  (``config_generation``); one that refused it or failed keeps its own,
  so ``gateway_config_workers_behind`` shows it (docs/operations.md).
  A worker starts with the generation of the configuration it was given
  (``$GATEWAY_CONFIG_GENERATION``).

:func:`apply_config` is the part that does not read the pipe (tests call
it directly); :func:`control_loop` is the trio shell.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

from gateway.config import Config, ConfigError
from gateway.downstream.tls import client_context
from gateway.ops.wire import WireError, read_frames
from gateway.protocol.tokens import TokenVerifier
from gateway.reload import ReloadPlan, plan_reload
from gateway.server.tlsconf import config_context

if TYPE_CHECKING:
    from gateway.server.worker import Worker

__all__ = ["CONTROL_FD_ENV", "apply_config", "control_loop"]

_log = logging.getLogger("gateway.control")

#: The environment variable naming the worker's end of the control pipe.
CONTROL_FD_ENV: Final = "GATEWAY_CONTROL_FD"


def apply_config(w: Worker, new: Config, files_changed: Collection[str] = ()) -> ReloadPlan:
    """Applies ``new`` to worker ``w`` if it differs from the running
    configuration only in what may change without a restart; otherwise
    changes nothing and logs ``reload_refused`` (or ``reload_failed`` when
    the new TLS files do not load). Returns the plan, its ``outcome`` set
    (``applied``, ``unchanged``, ``refused`` or ``failed``)."""
    plan = plan_reload(w.cfg, new, files_changed)
    if not plan.changes and not plan.needs_restart:
        plan.outcome = "unchanged"  # (a worker started after the reload has it already)
        return plan
    if plan.needs_restart:
        plan.outcome = "refused"
        w.hub.stats["reloads_refused"] += 1
        w.event("warning", "reload_refused", needs_restart=plan.needs_restart)
        return plan
    # the TLS files first (they may have changed again since the supervisor
    # loaded them): nothing is applied unless they all load
    settings = None
    if plan.downstream_changes:
        settings = plan.downstream
        assert settings is not None and w.forwarder is not None
    try:
        ctx = config_context(new, os.environ) if plan.tls else None
        cluster_ctx = {}
        for name in plan.cluster_tls:
            assert settings is not None
            cluster_ctx[name] = client_context(settings.clusters[name])
        new_clusters: dict[str, ssl.SSLContext | None] = {}
        for name in plan.clusters_added:
            assert settings is not None
            spec = settings.clusters[name]
            new_clusters[name] = client_context(spec) if spec.tls else None
    except (ConfigError, OSError, ssl.SSLError) as e:
        plan.outcome = "failed"
        w.hub.stats["reloads_failed"] += 1
        w.event("error", "reload_failed", error=str(e)[:500])
        return plan
    if ctx is not None:
        w.ssl_ctx = ctx  # new connections; open ones keep theirs
    if plan.tenants:
        w.hub.verifier = TokenVerifier(new.tenants)
    if plan.limits:
        w.hub.limits.update(new, w.hub.workers)
    if plan.settings:
        w.apply_settings(new)
    if settings is not None:
        if cluster_ctx:
            w.forwarder.update_cluster_tls(settings, cluster_ctx)
        if new_clusters:  # first: the changed groups may point at them
            w.forwarder.add_clusters(settings, new_clusters)
        if plan.routing:
            w.forwarder.update_routing(settings)
        if plan.tuning:
            w.forwarder.update_tuning(settings)
        if plan.added or plan.removed:
            w.forwarder.update_endpoints(settings)
        if plan.clusters_removed:  # last: the routing moved their sessions off
            w.forwarder.remove_clusters(plan.clusters_removed)
        w.forwarder.s = settings  # (clusters added alone: no update above sets it)
    w.cfg = new
    w.hub.reconfigure(new)
    w.hub.stats["reloads"] += 1
    plan.outcome = "applied"
    w.event("info", "reloaded", **plan.summary())
    return plan


async def control_loop(w: Worker, fd: int) -> None:
    """Reads control messages from the supervisor until the pipe closes."""
    try:
        await read_frames(fd, lambda msg: _on_message(w, msg))
    except WireError as e:
        w.event("error", "control_bad_frame", error=str(e))


def _on_message(w: Worker, msg: dict[str, Any]) -> None:
    if msg.get("t") != "reload" or not isinstance(msg.get("config"), str):
        w.event("warning", "control_unknown", message=str(msg.get("t"))[:40])
        return
    files = msg.get("files")
    changed = [f for f in files if type(f) is str] if type(files) is list else []
    gen = msg.get("gen")
    try:
        plan = apply_config(w, Config.from_json(msg["config"]), changed)
        if plan.outcome in ("applied", "unchanged") and type(gen) is int:
            w.config_generation = gen
    except (ConfigError, ValueError) as e:
        w.event("error", "reload_failed", error=str(e)[:500])
    except Exception:  # a bug here must not take the worker down
        w.hub.stats["internal_errors"] += 1
        _log.exception("applying a reloaded configuration failed")
