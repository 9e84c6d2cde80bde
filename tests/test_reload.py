"""Configuration reload (SIGHUP, ``POST /-/reload``): what may change
without a restart (sans-IO plan), the balancer taking endpoints in and
out, `gateway serve --config FILE` reloading in place while visitors stay
connected, and in-process workers given a configuration directly where a
stalled or mutual-TLS desk is needed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import gateway.client as gc
from gateway.config import Config, ConfigError, load_config
from gateway.downstream.balancer import Balancer, Endpoint
from gateway.downstream.breaker import Breaker, BreakerConfig, OutlierConfig, OutlierDetector
from gateway.downstream.tls import server_context
from gateway.protocol.tokens import mint
from gateway.reload import LIVE_FIELDS, file_sets, plan_reload
from tests.gwserver import RawWs, running
from tests.test_downstream_process import _recorded, _spawn
from tests.test_server_process import free_port, wait_listening

SECRET_1 = "first secret of the acme tenant"
SECRET_2 = "second secret of the acme tenant"


def _downstream(*endpoints: str, **cluster: Any) -> dict[str, Any]:
    return {
        "clusters": {"desks": {"endpoints": list(endpoints), **cluster}},
        "groups": {"general": {"cluster": "desks"}},
    }


def _cfg(tmp: Path, **kw: Any) -> Config:
    return load_config(None, {"GATEWAY_STATE_DIR": str(tmp)}, kw)


# -- the plan (sans-IO) ------------------------------------------------------------


def test_plan_names_endpoints_added_and_removed(tmp_path: Path) -> None:
    old = _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001", "10.0.0.2:7001"))
    new = _cfg(tmp_path, downstream=_downstream("10.0.0.2:7001", "10.0.0.3:7001"))
    plan = plan_reload(old, new)
    assert plan.needs_restart == []
    assert plan.added == {"desks": ["10.0.0.3:7001"]}
    assert plan.removed == {"desks": ["10.0.0.1:7001"]}
    assert plan.changes and not plan.tenants
    assert plan.summary() == {
        "endpoints_added": {"desks": ["10.0.0.3:7001"]},
        "endpoints_removed": {"desks": ["10.0.0.1:7001"]},
    }


def test_plan_without_a_difference_changes_nothing(tmp_path: Path) -> None:
    a = _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001"))
    b = _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001"))
    plan = plan_reload(a, b)
    assert not plan.changes and plan.needs_restart == [] and plan.summary() == {}


def test_plan_sees_tenant_secrets_rotated(tmp_path: Path) -> None:
    a = _cfg(tmp_path, tenants={"acme": {"secret": SECRET_1}})
    b = _cfg(tmp_path, tenants={"acme": {"secrets": {"k2": SECRET_2, "default": SECRET_1}}})
    plan = plan_reload(a, b)
    assert plan.tenants and plan.changes and plan.needs_restart == []


def test_plan_applies_rate_limits_in_place(tmp_path: Path) -> None:
    a = _cfg(tmp_path)
    plan = plan_reload(a, _cfg(tmp_path, visitor_msg_rate=5.0, ip_conn_burst=3))
    assert plan.limits and plan.changes and plan.needs_restart == []
    assert plan.summary() == {"limits": "changed"}


def test_plan_applies_the_log_level_connection_caps_timeouts_and_limits_in_place(
    tmp_path: Path,
) -> None:
    base = _cfg(tmp_path)
    changed = {
        "log_level": "debug", "max_conns_per_ip": 10, "handshake_rate": 5.0,
        "handshake_burst": 7, "handshake_timeout_s": 3.0, "hello_timeout_s": 4.0,
        "session_ttl_s": 60.0, "drain_s": 2.0, "heartbeat_s": 10.0, "heartbeat_misses": 3,
        "mobile_grace_s": 30.0, "max_frame": 4096, "window": 8, "outbound_max_bytes": 65536,
        "outbound_max_frames": 64, "dedup_ids": 128, "replay_frames": 32, "replay_bytes": 65536,
        "max_detached_sessions": 500, "bot_think_ms": 0, "gc_young": 5000,
    }  # fmt: skip
    assert set(changed) == LIVE_FIELDS
    plan = plan_reload(base, _cfg(tmp_path, **changed))
    assert plan.changes and plan.needs_restart == [] and not plan.downstream_changes
    assert sorted(plan.settings) == sorted(changed)
    assert plan.summary() == {"settings": plan.settings}
    plan = plan_reload(base, _cfg(tmp_path, drain_s=2.0, workers=3))
    assert plan.needs_restart == ["workers"] and not plan.changes


def test_limits_update_keeps_tokens_up_to_the_new_burst(tmp_path: Path) -> None:
    from gateway.session.limits import Limits

    lim = Limits(_cfg(tmp_path, visitor_msg_rate=100.0, visitor_msg_burst=100), workers=2)
    assert lim.ip_conn is None  # off by default
    for _ in range(10):
        assert lim.message("t", "v", "1.2.3.4", 0.0) == (0.0, "")
    kept = lim.visitor_msg
    # lower: the bucket keeps its tokens, cut to the new burst of 3
    lim.update(_cfg(tmp_path, visitor_msg_rate=1.0, visitor_msg_burst=3, ip_conn_rate=2.0), 2)
    assert lim.visitor_msg is kept
    for _ in range(3):
        assert lim.message("t", "v", "1.2.3.4", 0.0) == (0.0, "")
    wait, scope = lim.message("t", "v", "1.2.3.4", 0.0)
    assert scope == "visitor" and wait == pytest.approx(1.0)  # one token at 1/s
    # turned on: split between the 2 workers (1/s, burst 50 each), full
    assert lim.ip_conn is not None
    assert lim.connection("t", "1.2.3.4", 0.0) == (0.0, "")
    # turned off
    lim.update(_cfg(tmp_path, visitor_msg_rate=0.0), 2)
    assert lim.visitor_msg is None and lim.ip_conn is None
    assert lim.message("t", "v", "1.2.3.4", 0.0) == (0.0, "")


def test_plan_applies_routing_in_place_with_groups_added_changed_or_removed(
    tmp_path: Path,
) -> None:
    two = _downstream("10.0.0.1:7001")
    two["clusters"]["bots"] = {"endpoints": ["10.0.0.9:7002"]}
    base = _cfg(tmp_path, downstream=two)
    ruled = {**two, "rules": [{"group": "general", "channel": "web"}]}
    added = {**two, "groups": {**two["groups"], "billing": {"cluster": "bots"}}}
    for new in (ruled, added):
        plan = plan_reload(base, _cfg(tmp_path, downstream=new))
        assert plan.routing and plan.changes and plan.needs_restart == []
        assert plan.summary() == {"routing": "changed"} and plan.groups_changed == []
    moved = {**two, "groups": {"general": {"cluster": "bots"}}}  # sessions are in it
    plan = plan_reload(base, _cfg(tmp_path, downstream=moved))
    assert plan.routing and plan.needs_restart == [] and plan.groups_changed == ["general"]
    assert plan.summary() == {"routing": "changed", "groups_changed": ["general"]}
    plan = plan_reload(_cfg(tmp_path, downstream=added), base)  # billing removed
    assert plan.routing and plan.needs_restart == [] and plan.groups_changed == ["billing"]


def test_plan_adds_clusters_with_their_groups(tmp_path: Path) -> None:
    one = _downstream("10.0.0.1:7001")
    base = _cfg(tmp_path, downstream=one)
    bots = {**one, "clusters": {**one["clusters"], "bots": {"endpoints": ["10.0.0.9:7002"]}}}
    plan = plan_reload(base, _cfg(tmp_path, downstream=bots))
    assert plan.changes and plan.needs_restart == [] and not plan.routing
    assert plan.clusters_added == ["bots"] and plan.summary() == {"clusters_added": ["bots"]}
    grouped = {**bots, "groups": {**one["groups"], "billing": {"cluster": "bots"}}}
    plan = plan_reload(base, _cfg(tmp_path, downstream=grouped))
    assert plan.clusters_added == ["bots"] and plan.routing and plan.needs_restart == []


def test_plan_removes_clusters_with_the_groups_that_used_them(tmp_path: Path) -> None:
    both = _downstream("10.0.0.1:7001")
    both["clusters"]["bots"] = {"endpoints": ["10.0.0.9:7002"]}
    both["groups"]["billing"] = {"cluster": "bots"}
    base = _cfg(tmp_path, downstream=both)
    plan = plan_reload(base, _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001")))
    assert plan.changes and plan.needs_restart == [] and plan.downstream_changes
    assert plan.clusters_removed == ["bots"] and plan.clusters_added == []
    assert plan.routing and plan.groups_changed == ["billing"]
    assert plan.summary() == {
        "routing": "changed", "groups_changed": ["billing"], "clusters_removed": ["bots"],
    }  # fmt: skip
    # one added where another went, its group pointed at the new one; an
    # endpoint change of a cluster that stays comes with it
    swapped = {
        "clusters": {"desks": {"endpoints": ["10.0.0.2:7001"]},
                     "agents": {"endpoints": ["10.0.0.5:7003"]}},
        "groups": {"general": {"cluster": "desks"}, "billing": {"cluster": "agents"}},
    }  # fmt: skip
    plan = plan_reload(base, _cfg(tmp_path, downstream=swapped))
    assert plan.needs_restart == [] and plan.changes
    assert (plan.clusters_added, plan.clusters_removed) == (["agents"], ["bots"])
    assert plan.groups_changed == ["billing"]
    assert plan.added == {"desks": ["10.0.0.2:7001"]}
    assert plan.removed == {"desks": ["10.0.0.1:7001"]}


def test_plan_reloads_a_clusters_tls_files(tmp_path: Path) -> None:
    from tests.test_downstream_tls import Pki

    pki = Pki(tmp_path, "10.0.0.1")
    ca = pki.ca_file
    c1, k1 = pki.client(tmp_path, "one")
    c2, k2 = pki.client(tmp_path, "two")
    key = "downstream.clusters.desks"

    def tls(cert: str, key_file: str, **more: Any) -> Config:
        ds = _downstream("10.0.0.1:7001", tls=True, ca_file=ca, cert_file=cert, key_file=key_file)
        ds["clusters"]["desks"].update(more)
        return _cfg(tmp_path, downstream=ds)

    a = tls(c1, k1)
    assert file_sets(a) == {key: (ca, c1, k1)}
    assert not plan_reload(a, a).changes
    for plan in (plan_reload(a, tls(c2, k2)), plan_reload(a, a, files_changed=[key])):
        assert plan.cluster_tls == ["desks"] and plan.changes and plan.needs_restart == []
        assert plan.summary() == {"cluster_tls": ["desks"]}
    # anything else about the cluster: a restart
    assert plan_reload(a, tls(c1, k1, server_name="x")).needs_restart == [key]
    plain = _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001"))
    assert file_sets(plain) == {}
    assert plan_reload(plain, a).needs_restart == [key]


def test_plan_applies_downstream_timeouts_bounds_and_breaker_settings(tmp_path: Path) -> None:
    base = _downstream("10.0.0.1:7001")
    a = _cfg(tmp_path, downstream=base)
    tuned = {**base, "request_timeout_s": 0.5, "link_high_water": 65536, "sticky_ttl_s": 60.0}
    broken = {**base, "breaker": {"consecutive_failures": 2}}
    ejecting = {**base, "outlier": {"consecutive_errors": 2}}
    for new in (tuned, broken, ejecting):
        plan = plan_reload(a, _cfg(tmp_path, downstream=new))
        assert plan.tuning and plan.changes and plan.needs_restart == []
        assert plan.summary() == {"downstream_settings": "changed"}


def test_plan_reloads_tls_files_changed_in_place_or_moved(tmp_path: Path) -> None:
    for name in ("a.pem", "a.key", "b.pem", "b.key"):
        (tmp_path / name).write_text("x")
    a = _cfg(tmp_path, tls_cert=str(tmp_path / "a.pem"), tls_key=str(tmp_path / "a.key"))
    b = _cfg(tmp_path, tls_cert=str(tmp_path / "b.pem"), tls_key=str(tmp_path / "b.key"))
    assert not plan_reload(a, a).changes
    same = plan_reload(a, a, files_changed=["tls"])  # a renewal: new contents
    assert same.tls and same.changes and same.summary() == {"tls": "reloaded"}
    moved = plan_reload(a, b)
    assert moved.tls and moved.needs_restart == []
    # TLS on or off: a restart (the listener's protocol changes)
    assert plan_reload(a, _cfg(tmp_path)).needs_restart == ["tls_cert", "tls_key"]
    assert plan_reload(_cfg(tmp_path), b).needs_restart == ["tls_cert", "tls_key"]


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ({"listen_port": 8080}, {"listen_port": 8081}, ["listen_port"]),
        ({"node_id": 0}, {"node_id": 3}, ["node_id"]),
        # the demo bot on or off
        ({}, {"downstream": _downstream("10.0.0.1:7001")}, ["downstream"]),
        (
            {"downstream": _downstream("10.0.0.1:7001")},
            {"downstream": _downstream("10.0.0.1:7001", links_per_endpoint=2)},
            ["downstream.clusters.desks"],
        ),
        (  # a cluster's settings, next to a cluster removed
            {
                "downstream": {
                    "clusters": {
                        "desks": {"endpoints": ["10.0.0.1:7001"]},
                        "bots": {"endpoints": ["10.0.0.9:7002"]},
                    },
                    "groups": {"general": {"cluster": "desks"}},
                }
            },
            {"downstream": _downstream("10.0.0.1:7001", headers={"x-a": "b"})},
            ["downstream.clusters.desks"],
        ),
    ],
)
def test_plan_names_what_needs_a_restart(
    tmp_path: Path, old: dict[str, Any], new: dict[str, Any], named: list[str]
) -> None:
    # an endpoint change next to it is not applied either: the plan refuses
    # the whole reload
    plan = plan_reload(_cfg(tmp_path, **old), _cfg(tmp_path, **new))
    assert plan.needs_restart == named
    assert not plan.changes


def test_plan_of_an_unparsable_downstream_is_a_config_error(tmp_path: Path) -> None:
    good = _cfg(tmp_path, downstream=_downstream("10.0.0.1:7001"))
    bad = dataclasses.replace(good)
    object.__setattr__(bad, "downstream", {"clusters": {"desks": {"endpoints": []}}})
    with pytest.raises(ConfigError):
        plan_reload(good, bad)


# -- the balancer --------------------------------------------------------------------


def _ep(key: str) -> Endpoint:
    return Endpoint(key, Breaker(BreakerConfig(), 0.0))


def test_balancer_takes_endpoints_in_and_out() -> None:
    a, b = _ep("a:1"), _ep("b:1")
    outliers = OutlierDetector(OutlierConfig())
    bal = Balancer([a, b], random.Random(1), outliers)
    assert outliers.endpoints == 2
    bal.remove("a:1")
    assert outliers.endpoints == 1
    picks = {bal.pick(0.0).key for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"b:1"}
    # the preferred (sticky) endpoint is not picked once removed
    assert bal.pick(0.0, prefer="a:1") is b
    c = _ep("c:1")
    bal.add(c)
    assert outliers.endpoints == 2
    picks = {bal.pick(0.0).key for _ in range(200)}  # type: ignore[union-attr]
    assert picks == {"b:1", "c:1"}
    with pytest.raises(ValueError):
        bal.add(_ep("c:1"))
    bal.remove("nope:1")  # ignored
    # answers still coming from a removed endpoint do not reach the outlier
    # detector (it would count it among the cluster's endpoints again)
    a.outstanding = 1
    bal.finish(a, 1.0, 0.01, ok=False)
    assert "a:1" not in outliers._errors


# -- gateway serve --config, reloaded -----------------------------------------------


class Reloadable:
    """Two recording desk-sims and `gateway serve --config FILE --workers 2`
    (with its ops endpoint), as separate processes; the file is rewritten
    and the supervisor sent SIGHUP."""

    def __init__(self, tmp: Path, extra: str = "", more: str = "") -> None:
        self.tmp = tmp
        self.pa, self.pb, self.port, self.ops = (free_port() for _ in range(4))
        self.a, self.b = f"127.0.0.1:{self.pa}", f"127.0.0.1:{self.pb}"
        self.rec_a, self.rec_b = tmp / "a.jsonl", tmp / "b.jsonl"
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        self.conf = tmp / "gateway.toml"
        self.log = tmp / "gw.log"
        env = dict(os.environ, GATEWAY_STATE_DIR=str(tmp))
        env.pop("GATEWAY_CONFIG", None)
        self.desks = []
        for i, (addr, rec) in enumerate(((self.a, self.rec_a), (self.b, self.rec_b))):
            args = ["desk-sim", "--listen", addr, "--no-reply", "--record", str(rec)]
            self.desks.append(_spawn(args, env, tmp / f"desk-{i}.log"))
        self.write([self.a], extra, more=more)
        self.gw = _spawn(["serve", "--config", str(self.conf)], env, self.log)

    def write(
        self,
        endpoints: list[str],
        extra: str = "",
        secrets: str = "",
        more: str = "",
        general: str = "desks",
    ) -> None:
        """The configuration file: ``extra`` lines in ``[gateway]``,
        ``secrets`` for tenant acme, cluster desks on ``endpoints`` (none:
        no cluster desks), ``more`` tables at the end (``{A}``, ``{B}``:
        the desks' addresses), group general on cluster ``general``."""
        secrets = secrets or f'secrets = {{ k1 = "{SECRET_1}" }}'
        more = more.replace("{A}", self.a).replace("{B}", self.b)
        desks = f"[downstream.clusters.desks]\nendpoints = {json.dumps(endpoints)}\n"
        self.conf.write_text(
            f"""
[gateway]
listen_port = {self.port}
workers = 2
ops_listen = "127.0.0.1:{self.ops}"
{extra}

[tenants.acme]
{secrets}
allowed_origins = ["*"]

{desks if endpoints else ""}
[downstream.groups.general]
cluster = "{general}"

{more}
"""
        )

    async def ready(self) -> None:
        for p in (self.pa, self.pb, self.port, self.ops):
            await trio.to_thread.run_sync(wait_listening, p)
        # both workers' links up (to every cluster): until then a worker
        # asks new sessions to retry later, and the SDK would reconnect
        clusters = self.conf.read_text().count("[downstream.clusters.")
        with trio.fail_after(15):
            while len(self.events("downstream_link_up")) < 2 * clusters:
                await trio.sleep(0.05)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == name:
                    out.append(rec)
        return out

    async def sighup(self, event: str, count: int) -> list[dict[str, Any]]:
        """SIGHUP, then waits for ``count`` more ``event`` log lines."""
        before = len(self.events(event))
        self.gw.send_signal(signal.SIGHUP)
        with trio.fail_after(15):
            while len(self.events(event)) < before + count:
                await trio.sleep(0.05)
        return self.events(event)[before:]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ops}/metrics", timeout=5) as r:
            text: str = r.read().decode()
        return text

    def token(self, visitor: str, kid: str = "k1", secret: str = SECRET_1) -> str:
        return mint("acme", visitor, secret.encode(), 600, time.time(), kid=kid)

    def stop(self) -> None:
        for p in (self.gw, *self.desks):
            if p.poll() is None:
                p.terminate()
        for p in (self.gw, *self.desks):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@contextlib.asynccontextmanager
async def _reloadable(tmp: Path, extra: str = "", more: str = "") -> AsyncIterator[Reloadable]:
    run = Reloadable(tmp, extra, more)
    try:
        await run.ready()
        yield run
    finally:
        run.stop()


#: ``more`` tables for :class:`Reloadable`: cluster bots on desk B, and
#: group billing on it with a keyword rule to it
_BOTS = '[downstream.clusters.bots]\nendpoints = ["{B}"]\n'
_BILLING = (
    '\n[downstream.groups.billing]\ncluster = "bots"\n\n'
    '[[downstream.rules]]\ngroup = "billing"\nkeywords = ["invoice"]\n'
)


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            head, _, value = line.rpartition(" ")
            got = head[len(name) :].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not labels and not got):
                return float(value)
    return None


async def _send(s: gc.Session, bodies: list[str], acked: list[tuple[str, str]]) -> None:
    for body in bodies:
        with trio.fail_after(20):
            await s.send(body)
        acked.append((s.session_id or "", body))


async def test_sighup_moves_traffic_to_new_endpoints_with_visitors_connected(
    tmp_path: Path,
) -> None:
    async with _reloadable(tmp_path) as run:
        acked: list[tuple[str, str]] = []
        async with gc.connect(run.url, token=run.token("v1")) as s:
            before = [f"before #{k}" for k in range(20)]
            await _send(s, before, acked)
            assert {r[2] for r in _recorded(run.rec_a)} == set(before)

            # desk A out, desk B in; the supervisor and both workers apply it
            run.write([run.b])
            lines = await run.sighup("reloaded", 3)
            sup = [r for r in lines if r["component"] == "supervisor"]
            assert len(sup) == 1
            assert sup[0]["endpoints_added"] == {"desks": [run.b]}
            assert sup[0]["endpoints_removed"] == {"desks": [run.a]}
            assert sorted(sup[0]["workers"]) == [0, 1]

            after = [f"after #{k}" for k in range(20)]
            await _send(s, after, acked)
            # the same connection all along: the reload dropped no visitor
            assert s.connections == 1
        async with gc.connect(run.url, token=run.token("v2")) as s2:
            await _send(s2, ["new visitor"], acked)

        a = {r[2] for r in _recorded(run.rec_a)}
        b = {r[2] for r in _recorded(run.rec_b)}
        assert a == set(before)  # nothing reached the removed desk after the reload
        assert b == {*after, "new visitor"}
        # every acknowledged message reached a desk
        assert {body for _, body in acked} <= a | b

        # the removed endpoint's links are gone (and so are its gauges);
        # the new one has a link per worker
        with trio.fail_after(10):
            while True:
                m = await trio.to_thread.run_sync(run.metrics)
                up_b = _metric(m, "gateway_downstream_links_up", cluster="desks", endpoint=run.b)
                up_a = _metric(m, "gateway_downstream_links_up", cluster="desks", endpoint=run.a)
                if up_b == 2 and up_a is None:
                    break
                await trio.sleep(0.2)
        assert _metric(m, "gateway_config_reloads_total", result="applied") == 1


@pytest.mark.parametrize("what", ["endpoint", "cluster"])
async def test_desk_removed_under_load_loses_no_acked_message(tmp_path: Path, what: str) -> None:
    """Eight visitors keep sending while desk A is swapped for desk B (A
    removed from cluster desks' endpoints and B put there, or cluster desks
    removed and group general pointed at cluster bots on B): the messages
    in flight on A when it is removed are answered there or redelivered to
    B; every message a visitor saw acked is in a desk's record, and no
    visitor was disconnected."""
    async with _reloadable(tmp_path, more=_BOTS if what == "cluster" else "") as run:
        acked: list[tuple[str, str]] = []
        sessions: list[gc.Session] = []
        swapped = trio.Event()

        async def visitor(i: int) -> None:
            async with gc.connect(run.url, token=run.token(f"v{i}")) as s:
                sessions.append(s)
                k = 0
                while not swapped.is_set() or k < 60:
                    await _send(s, [f"v{i} #{k}"], acked)
                    k += 1

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(visitor, i)
            with trio.fail_after(15):
                while len(acked) < 100:
                    await trio.sleep(0.01)
            if what == "cluster":
                run.write([], more=_BOTS, general="bots")
            else:
                run.write([run.b])
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("clusters_removed") == (["desks"] if what == "cluster" else None)
                       for r in lines), lines  # fmt: skip
            swapped.set()

        a, b = _recorded(run.rec_a), _recorded(run.rec_b)
        assert len(a) >= 100 and b  # both desks had traffic
        got = {body for _, _, body in a} | {body for _, _, body in b}
        assert {body for _, body in acked} <= got
        assert len(acked) >= 8 * 60
        assert all(s.connections == 1 for s in sessions)


async def test_sighup_refuses_an_invalid_or_restart_needing_config(tmp_path: Path) -> None:
    async with _reloadable(tmp_path) as run:
        acked: list[tuple[str, str]] = []
        async with gc.connect(run.url, token=run.token("v1")) as s:
            await _send(s, ["one"], acked)

            run.conf.write_text(run.conf.read_text() + "\n[gateway\n")  # not TOML
            (failed,) = await run.sighup("reload_failed", 1)
            assert failed["component"] == "supervisor" and "gateway.toml" in failed["error"]

            # an endpoint change next to a setting that needs a restart:
            # neither is applied
            run.write([run.a, run.b], extra="node_id = 3")
            (refused,) = await run.sighup("reload_refused", 1)
            assert refused["needs_restart"] == ["node_id"]

            run.write([run.a])  # as at start
            await run.sighup("reload_unchanged", 1)

            await _send(s, ["two"], acked)
            assert s.connections == 1
        assert run.gw.poll() is None  # still running
        assert {r[2] for r in _recorded(run.rec_a)} == {"one", "two"}
        assert _recorded(run.rec_b) == []  # B was never added
        assert run.events("reloaded") == []
        m = await trio.to_thread.run_sync(run.metrics)
        for result, n in (("applied", 0), ("failed", 1), ("refused", 1), ("unchanged", 1)):
            assert _metric(m, "gateway_config_reloads_total", result=result) == n, result


async def test_a_reload_applies_the_per_ip_cap_handshake_rate_timeouts_and_log_level(
    tmp_path: Path,
) -> None:
    """In-process worker: a reload lowers the per-IP cap below the
    connections held (they stay; the next one is refused with 429), cuts
    the handshake bucket to its new burst, shortens the hello timeout for
    the next connection, and sets the log level."""
    from gateway.loadtest import rawws
    from gateway.server.control import apply_config
    from tests.test_server_ws import http_status

    root = logging.getLogger()
    level = root.level
    try:
        async with running(tmp_path, max_conns_per_ip=10, log_level="warning") as gw:
            held = [await RawWs.connect(gw.port) for _ in range(3)]
            for i, h in enumerate(held):
                await h.hello(gw.token(f"h{i}"))
            new = dataclasses.replace(
                gw.w.cfg, max_conns_per_ip=3, handshake_rate=0.001, handshake_burst=1,
                hello_timeout_s=0.3, log_level="error",
            )  # fmt: skip
            plan = apply_config(gw.w, new)
            assert sorted(plan.settings) == sorted(
                ["max_conns_per_ip", "handshake_rate", "handshake_burst", "hello_timeout_s",
                 "log_level"]
            )  # fmt: skip
            assert root.level == logging.ERROR
            upgrade = rawws.upgrade_request("x", "/v1/ws")
            status, _ = await http_status(gw.port, upgrade)
            assert status == 429 and gw.stats["connections_rejected_ip_limit"] == 1
            for h in held:  # the connections over the new cap stay
                await h.send({"t": "ping", "ts": 1})
                with trio.fail_after(5):
                    while (await h.recv())["t"] != "pong":  # (the bot's greeting first)
                        pass
            await held.pop().aclose()
            with trio.fail_after(5):
                while gw.w.per_ip.get("127.0.0.1", 0) > 2:
                    await trio.sleep(0.01)
            # one token left (the new burst), then none for ~1000 s
            late = await RawWs.connect(gw.port)
            code, _ = await late.until_close(timeout=3)  # no hello: 0.3 s, not 10
            assert code == 4004
            with trio.fail_after(5):
                while gw.w.per_ip.get("127.0.0.1", 0) > 2:
                    await trio.sleep(0.01)
            status, _ = await http_status(gw.port, upgrade)
            assert status == 429 and gw.stats["connections_rejected_handshake_rate"] == 1
    finally:
        root.setLevel(level)


async def test_a_reloaded_heartbeat_holds_for_connections_opened_after_it(
    tmp_path: Path,
) -> None:
    """In-process worker, heartbeat 25 s x 3: a WebSocket and an HTTP/2
    connection open. A reload sets 0.2 s x 2: a new WebSocket is told 200
    ms in its welcome and, silent, is closed for its missed heartbeats;
    the connections from before keep 25 s (a new stream on the old HTTP/2
    connection is told 25000 ms too) and stay up, silent as well."""
    from gateway.loadtest import rawws
    from gateway.protocol.codes import Code
    from gateway.server.control import apply_config
    from tests.test_server_h2 import H2Client

    async with running(tmp_path, heartbeat_s=25.0, heartbeat_misses=3) as gw:
        old_ws = await RawWs.connect(gw.port)
        assert (await old_ws.hello(gw.token("old-ws")))["hb"] == 25000
        h2c = await H2Client.connect(gw.port)
        s1 = await h2c.open()
        await h2c.send(s1, {"t": "hello", "v": 1, "token": gw.token("old-h2")})
        assert (await h2c.recv(s1))["hb"] == 25000
        new = dataclasses.replace(gw.w.cfg, heartbeat_s=0.2, heartbeat_misses=2)
        plan = apply_config(gw.w, new)
        assert sorted(plan.settings) == ["heartbeat_misses", "heartbeat_s"]
        s2 = await h2c.open()
        await h2c.send(s2, {"t": "hello", "v": 1, "token": gw.token("old-h2-b")})
        assert (await h2c.recv(s2))["hb"] == 25000  # the connection's heartbeat
        new_ws = await RawWs.connect(gw.port)
        assert (await new_ws.hello(gw.token("new-ws")))["hb"] == 200
        with trio.fail_after(5):  # silent (its pings unanswered): ~0.4 s
            while (got := await new_ws.next_raw())[0] != rawws.OP_CLOSE:
                pass
        assert struct.unpack("!H", got[1][:2])[0] == int(Code.HEARTBEAT_TIMEOUT)
        assert gw.stats["heartbeat_timeouts"] == 1
        for ws in (old_ws,):  # silent as long, still up
            await ws.send({"t": "ping", "ts": 7})
            with trio.fail_after(5):
                while (await ws.recv())["t"] != "pong":
                    pass
        await h2c.send(s1, {"t": "ping", "ts": 7})
        with trio.fail_after(5):
            while (await h2c.recv(s1))["t"] != "pong":
                pass
        assert gw.stats["heartbeat_timeouts"] == 1


async def test_reloaded_frame_and_queue_limits_hold_for_what_opens_after_them(
    tmp_path: Path,
) -> None:
    """In-process worker with the default limits, a WebSocket and an
    HTTP/2 connection open. A reload lowers max_frame, window, the replay
    and duplicate bounds and the detached-session bound: a new WebSocket
    is told the new limits and a frame over the new max_frame closes it
    with 1009; the old WebSocket sends such a frame and gets its ack; a
    new stream on the old HTTP/2 connection is told that connection's
    max_frame and window (and its new session's replay bound); the bot's
    think time and the collector's young threshold change at once."""
    import gc as pygc

    from gateway.loadtest import rawws
    from gateway.protocol.codes import Code
    from gateway.server.control import apply_config
    from tests.test_server_h2 import H2Client

    thresholds = pygc.get_threshold()
    async with running(tmp_path) as gw:
        try:
            old_ws = await RawWs.connect(gw.port)
            w0 = await old_ws.hello(gw.token("old-ws"))
            assert w0["limits"] == {"max_frame": 65536, "window": 64, "replay": 256}
            h2c = await H2Client.connect(gw.port)
            s1 = await h2c.open()
            await h2c.send(s1, {"t": "hello", "v": 1, "token": gw.token("old-h2")})
            assert (await h2c.recv(s1))["limits"]["max_frame"] == 65536
            # accepted before the reload, upgraded after it: the new terms
            tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
            with trio.fail_after(5):
                while gw.w.open_sockets < 3:
                    await trio.sleep(0.01)
            new = dataclasses.replace(
                gw.w.cfg, max_frame=1024, window=4, replay_frames=16, replay_bytes=8192,
                dedup_ids=32, outbound_max_bytes=32768, outbound_max_frames=32,
                max_detached_sessions=7, bot_think_ms=5, gc_young=3000,
            )  # fmt: skip
            plan = apply_config(gw.w, new)
            assert plan.outcome == "applied" and len(plan.settings) == 10
            assert gw.w.bot is not None and gw.w.bot.think_s == 0.005
            assert pygc.get_threshold()[0] == 3000
            assert gw.w.hub.sessions.max_detached == 7
            new_ws = await RawWs.connect(gw.port)
            w1 = await new_ws.hello(gw.token("new-ws"))
            assert w1["limits"] == {"max_frame": 1024, "window": 4, "replay": 16}
            s = gw.w.hub.sessions.get(w1["sid"])
            assert s is not None and (s.dedup_max, s.replay_max_bytes) == (32, 8192)
            old_s = gw.w.hub.sessions.get(w0["sid"])
            assert old_s is not None and old_s.conn is not None and s.conn is not None
            late = RawWs(tcp)
            await tcp.send_all(rawws.upgrade_request(f"127.0.0.1:{gw.port}", "/v1/ws", None))
            with trio.fail_after(5):
                while not (n := rawws.parse_upgrade(late.buf)):
                    late.buf += await tcp.receive_some(65536)
            late.frames += late.reader.feed(bytes(late.buf[n:]))
            w3 = await late.hello(gw.token("late-ws"))
            assert w3["limits"]["max_frame"] == 1024
            late_s = gw.w.hub.sessions.get(w3["sid"])
            assert late_s is not None and late_s.conn is not None
            pipes = [c.sink.pipe for c in (old_s.conn, s.conn, late_s.conn)]  # (WebSockets)
            assert [(p.max_bytes, p.max_chunks) for p in pipes] == [
                (1048576, 256),
                (32768, 32),
                (32768, 32),
            ]
            s2 = await h2c.open()
            await h2c.send(s2, {"t": "hello", "v": 1, "token": gw.token("old-h2-b")})
            w2 = await h2c.recv(s2)  # the connection's limits, the new session's replay
            assert w2["limits"] == {"max_frame": 65536, "window": 64, "replay": 16}
            big = "x" * 2000
            await old_ws.send({"t": "msg", "id": "m1", "body": big})
            with trio.fail_after(5):
                while (f := await old_ws.recv())["t"] != "ack":
                    pass
            assert f["id"] == "m1"
            await new_ws.send({"t": "msg", "id": "m1", "body": big})
            code, _ = await new_ws.until_close()
            assert code == int(Code.TOO_BIG)
        finally:
            pygc.set_threshold(*thresholds)


async def test_sighup_changes_the_log_level_of_the_supervisor_and_workers(
    tmp_path: Path,
) -> None:
    """A reload to log_level "warning" silences the info lines from then
    on (the next reload's `reloaded` lines do not appear, though it is
    applied); one back to "info" brings them back, its own included."""
    async with _reloadable(tmp_path) as run:

        async def applied(n: int) -> None:
            with trio.fail_after(15):
                while _metric(await trio.to_thread.run_sync(run.metrics),
                              "gateway_config_reloads_total", result="applied") != n:  # fmt: skip
                    await trio.sleep(0.1)

        before = len(run.events("reloaded"))
        run.write([run.a], extra='log_level = "warning"')
        run.gw.send_signal(signal.SIGHUP)
        await applied(1)
        run.write([run.a], extra='log_level = "warning"\ndrain_s = 5.0')
        run.gw.send_signal(signal.SIGHUP)
        await applied(2)
        await trio.sleep(0.5)  # (the workers' lines, had they logged any)
        assert len(run.events("reloaded")) == before
        run.write([run.a], extra="drain_s = 5.0")
        lines = await run.sighup("reloaded", 3)  # the supervisor's and both workers'
        assert all(r.get("settings") == ["log_level"] for r in lines), lines


async def test_sighup_rotates_tenant_secrets_for_new_connections(tmp_path: Path) -> None:
    async with _reloadable(tmp_path) as run:
        acked: list[tuple[str, str]] = []
        async with gc.connect(run.url, token=run.token("old")) as s:
            await _send(s, ["with k1"], acked)
            run.write([run.a], secrets=f'secrets = {{ k2 = "{SECRET_2}" }}')
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("tenants") == "changed" for r in lines)
            # a session authenticated before goes on
            await _send(s, ["still k1"], acked)
            assert s.connections == 1
        # new connections: the k2 token is accepted, the k1 one is not
        async with gc.connect(run.url, token=run.token("new", "k2", SECRET_2)) as s2:
            await _send(s2, ["with k2"], acked)
        with pytest.raises(gc.GatewayError) as e:
            with trio.fail_after(10):
                async with gc.connect(run.url, token=run.token("late"), reconnect=False):
                    pass
        assert e.value.code == 4501  # unknown key id: k1 is gone
        assert {r[2] for r in _recorded(run.rec_a)} == {"with k1", "still k1", "with k2"}


def _issue(tmp: Path, name: str) -> tuple[Any, ssl.SSLContext]:
    """A new CA and a ``localhost`` certificate from it, written to
    ``tmp/NAME.pem`` and ``NAME.key``; the CA and a client context
    trusting only it."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(tmp / f"{name}.key"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ca, ctx


async def test_sighup_reloads_the_tls_certificate_renewed_in_place(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _, trust_1 = _issue(certs, "live")  # the files the configuration names
    extra = f'tls_cert = "{certs / "live.pem"}"\ntls_key = "{certs / "live.key"}"'
    async with _reloadable(tmp_path, extra) as run:
        old = await RawWs.connect(run.port, ssl_context=trust_1)
        assert (await old.hello(run.token("old")))["t"] == "welcome"
        while (await old.recv())["t"] != "deliver":  # the sticky ticket, then the assignment
            pass

        # a renewal: new certificate and key (another CA) in the same files
        _, trust_2 = _issue(certs, "next")
        (certs / "next.pem").replace(certs / "live.pem")
        (certs / "next.key").replace(certs / "live.key")
        run.write([run.a], extra)
        lines = await run.sighup("reloaded", 3)
        assert all(r.get("tls") == "reloaded" for r in lines)

        new = await RawWs.connect(run.port, ssl_context=trust_2)
        assert (await new.hello(run.token("new")))["t"] == "welcome"
        await new.aclose()
        with pytest.raises(trio.BrokenResourceError) as refused:
            await RawWs.connect(run.port, ssl_context=trust_1)
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        # the connection opened before goes on with its certificate
        await old.send({"t": "msg", "id": 1, "body": "still here"})
        assert (await old.recv(timeout=10))["t"] == "ack"
        await old.aclose()

        # a key that does not match its certificate: refused, the renewed
        # certificate stays in use
        _issue(certs, "other")
        (certs / "other.key").replace(certs / "live.key")
        (failed,) = await run.sighup("reload_failed", 1)
        assert failed["component"] == "supervisor" and "tls_cert" in failed["error"]
        again = await RawWs.connect(run.port, ssl_context=trust_2)
        assert (await again.hello(run.token("again")))["t"] == "welcome"
        await again.aclose()


async def test_sighup_rotates_the_tls_ticket_key(tmp_path: Path) -> None:
    """New contents in the `tls_ticket_key` file: a ticket sealed under the
    old key gets one full handshake; the tickets issued after the reload
    resume on both workers."""
    from tests.test_tls_tickets import _get

    certs = tmp_path / "certs"
    certs.mkdir()
    _, trust = _issue(certs, "live")
    key = certs / "ticket.key"
    key.write_bytes(os.urandom(80))
    extra = (
        f'tls_cert = "{certs / "live.pem"}"\ntls_key = "{certs / "live.key"}"\n'
        f'tls_ticket_key = "{key}"'
    )
    async with _reloadable(tmp_path, extra) as run:
        old, _ = await trio.to_thread.run_sync(_get, run.port, trust)
        assert (await trio.to_thread.run_sync(_get, run.port, trust, old, "127.0.0.20"))[1]
        key.write_bytes(os.urandom(80))
        lines = await run.sighup("reloaded", 3)
        assert all(r.get("tls") == "reloaded" for r in lines)
        new, reused = await trio.to_thread.run_sync(_get, run.port, trust, old, "127.0.0.21")
        assert not reused
        for i in range(8):
            got = await trio.to_thread.run_sync(_get, run.port, trust, new, f"127.0.0.{30 + i}")
            assert got[1], i
        # a file that is not 80 bytes: the reload fails, the key in use stays
        key.write_bytes(b"short")
        (failed,) = await run.sighup("reload_failed", 1)
        assert "tls_ticket_key" in failed["error"] and "exactly 80 bytes" in failed["error"]
        assert (await trio.to_thread.run_sync(_get, run.port, trust, new, "127.0.0.40"))[1]


async def test_sighup_lowers_a_rate_limit_for_connected_visitors(tmp_path: Path) -> None:
    """A visitor sends 30 messages at once under the default limit (all
    acked); the limit is lowered to a burst of 5 by a reload; on the same
    connection the next 10 at once: 5 acked, the rest refused with 4029
    and a retry_after, the connection kept."""
    async with _reloadable(tmp_path) as run:
        ws = await RawWs.connect(run.port)
        assert (await ws.hello(run.token("v")))["t"] == "welcome"

        async def burst(first: int, n: int) -> list[dict[str, Any]]:
            for i in range(first, first + n):
                await ws.send({"t": "msg", "id": i, "body": f"m{i}"})
            got: list[dict[str, Any]] = []
            with trio.fail_after(10):
                while len(got) < n:
                    f = await ws.recv()
                    if f["t"] in ("ack", "error"):
                        got.append(f)
            return got

        assert [f["t"] for f in await burst(1, 30)] == ["ack"] * 30
        run.write([run.a], "visitor_msg_rate = 0.5\nvisitor_msg_burst = 5")
        lines = await run.sighup("reloaded", 3)
        assert all(r.get("limits") == "changed" for r in lines)
        got = await burst(31, 10)
        acked = [f for f in got if f["t"] == "ack"]
        refused = [f for f in got if f["t"] == "error"]
        assert len(acked) == 5 and len(refused) == 5
        assert all(f["code"] == 4029 and f["retry_after"] > 0 for f in refused)
        await ws.send({"t": "ping"})  # still connected
        with trio.fail_after(5):
            while (await ws.recv())["t"] != "pong":
                pass
        await ws.aclose()


async def test_sighup_adds_a_group_and_rules_for_new_messages(tmp_path: Path) -> None:
    """Two clusters (desks: desk A, bots: desk B), everything in group
    general at first. A reload adds group billing on the bots cluster, a
    keyword rule ("invoice") and an entry rule (channel vip) to it: the
    connected visitor's next invoice question goes to B, and so does a new
    vip visitor; other messages stay on A."""
    vip = '\n[[downstream.rules]]\ngroup = "billing"\nchannel = "vip"\n'
    async with _reloadable(tmp_path, more=_BOTS) as run:
        acked: list[tuple[str, str]] = []
        async with gc.connect(run.url, token=run.token("v1")) as s:
            await _send(s, ["about my invoice", "hello"], acked)
            run.write([run.a], more=_BOTS + _BILLING + vip)
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("routing") == "changed" for r in lines)
            await _send(s, ["another invoice question", "thanks"], acked)
            assert s.connections == 1
        v2 = gc.connect(run.url, token=run.token("v2"), tags={"channel": "vip"})
        async with v2 as s2:
            await _send(s2, ["vip hello"], acked)
        a = [r[2] for r in _recorded(run.rec_a)]
        b = [r[2] for r in _recorded(run.rec_b)]
        assert a == ["about my invoice", "hello"]
        # the keyword moved the session to billing (B), where it stays
        assert b == ["another invoice question", "thanks", "vip hello"]


async def test_sighup_adds_a_cluster_with_its_group_while_visitors_stay_connected(
    tmp_path: Path,
) -> None:
    """One cluster (desks: desk A) at start. A reload adds cluster bots
    (desk B) with group billing and a keyword rule to it: both workers
    connect to B without a restart, and the connected visitor's next
    invoice question goes there; other visitors' messages stay on A."""
    async with _reloadable(tmp_path) as run:
        acked: list[tuple[str, str]] = []
        async with gc.connect(run.url, token=run.token("v1")) as s:
            await _send(s, ["about my invoice", "hello"], acked)
            ups = [r for r in run.events("downstream_link_up") if r.get("endpoint") == run.b]
            assert ups == []  # no link to B before the reload
            run.write([run.a], more=_BOTS + _BILLING)
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("clusters_added") == ["bots"] for r in lines), lines
            added = run.events("downstream_cluster_added")
            assert len(added) == 2 and all(r["endpoints"] == [run.b] for r in added), added
            with trio.fail_after(15):  # both workers' links to B come up
                while len([r for r in run.events("downstream_link_up")
                           if r.get("endpoint") == run.b]) < 2:  # fmt: skip
                    await trio.sleep(0.05)
            await _send(s, ["another invoice question", "thanks"], acked)
            assert s.connections == 1
        async with gc.connect(run.url, token=run.token("v2")) as s2:
            await _send(s2, ["plain hello"], acked)
        assert len(acked) == 5
        a = [r[2] for r in _recorded(run.rec_a)]
        b = [r[2] for r in _recorded(run.rec_b)]
        assert a == ["about my invoice", "hello", "plain hello"]
        # the keyword moved the session to billing (B), where it stays
        assert b == ["another invoice question", "thanks"]


async def test_sighup_removes_a_group_and_moves_one_with_visitors_connected(
    tmp_path: Path,
) -> None:
    """Clusters desks (desk A) and bots (desk B); group general on desks,
    group billing on bots with a keyword rule. A first reload removes
    billing: the visitor in it goes on in general (A) with its next
    message. A second one points general at bots: both connected visitors'
    next messages go to B. Nobody reconnects."""
    async with _reloadable(tmp_path, more=_BOTS + _BILLING) as run:
        acked: list[tuple[str, str]] = []
        v1 = gc.connect(run.url, token=run.token("v1"))
        v2 = gc.connect(run.url, token=run.token("v2"))
        async with v1 as s1, v2 as s2:
            await _send(s1, ["hello"], acked)
            await _send(s2, ["my invoice"], acked)  # billing: B
            run.write([run.a], more=_BOTS)
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("groups_changed") == ["billing"] for r in lines), lines
            await _send(s2, ["after billing went"], acked)
            await _send(s1, ["still here"], acked)
            run.write([run.a], more=_BOTS, general="bots")
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("groups_changed") == ["general"] for r in lines), lines
            await _send(s1, ["after the move"], acked)
            await _send(s2, ["me too"], acked)
            assert (s1.connections, s2.connections) == (1, 1)
        assert len(acked) == 6
        a = [r[2] for r in _recorded(run.rec_a)]
        b = [r[2] for r in _recorded(run.rec_b)]
        assert a == ["hello", "after billing went", "still here"]
        assert b == ["my invoice", "after the move", "me too"]


async def test_sighup_removes_a_cluster_with_visitors_connected(tmp_path: Path) -> None:
    """Clusters desks (desk A) and bots (desk B), group billing on bots
    with a keyword rule. A reload removes cluster bots and group billing:
    every worker's links to B end (their metrics go), and the visitor who
    was in billing goes on in general (A) with its next message, without
    reconnecting; a new visitor's invoice question goes to A too."""
    async with _reloadable(tmp_path, more=_BOTS + _BILLING) as run:
        acked: list[tuple[str, str]] = []
        with trio.fail_after(15):  # both workers' links to B, as reported
            while _metric(run.metrics(), "gateway_downstream_links_up", cluster="bots",
                          endpoint=run.b) != 2:  # fmt: skip
                await trio.sleep(0.1)
        async with gc.connect(run.url, token=run.token("v1")) as s:
            await _send(s, ["my invoice"], acked)  # billing: B
            run.write([run.a])
            lines = await run.sighup("reloaded", 3)
            assert all(r.get("clusters_removed") == ["bots"] for r in lines), lines
            assert all(r.get("groups_changed") == ["billing"] for r in lines), lines
            removed = run.events("downstream_cluster_removed")
            assert len(removed) == 2 and all(r["endpoints"] == [run.b] for r in removed)
            await _send(s, ["after bots went", "another invoice"], acked)
            assert s.connections == 1
        async with gc.connect(run.url, token=run.token("v2")) as s2:
            await _send(s2, ["a new invoice question"], acked)
        gauges = ("gateway_downstream_links_up", "gateway_breaker_state",
                  "gateway_downstream_inflight")  # fmt: skip
        with trio.fail_after(15):  # both workers' links to B drained and ended
            while left := [ln for ln in run.metrics().splitlines()
                           if ln.startswith(gauges) and 'cluster="bots"' in ln]:  # fmt: skip
                await trio.sleep(0.1)
        assert left == []
        assert len(acked) == 4
        a = [r[2] for r in _recorded(run.rec_a)]
        b = [r[2] for r in _recorded(run.rec_b)]
        assert b == ["my invoice"]
        assert a == ["after bots went", "another invoice", "a new invoice question"]


async def test_post_reload_on_the_operator_endpoint_answers_with_the_result(
    tmp_path: Path,
) -> None:
    """``POST /-/reload`` with the ops token: the same reload as SIGHUP,
    answered with what happened."""

    def post(run: Reloadable, token: str | None) -> tuple[int, dict[str, Any]]:
        r = urllib.request.Request(f"http://127.0.0.1:{run.ops}/-/reload", method="POST")
        if token is not None:
            r.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(r, timeout=20) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, json.loads(body) if body.startswith(b"{") else {}

    extra = 'ops_token = "ops-secret"'
    async with _reloadable(tmp_path, extra) as run:
        assert (await trio.to_thread.run_sync(post, run, None))[0] == 401
        assert (await trio.to_thread.run_sync(post, run, "wrong"))[0] == 401
        run.write([run.a, run.b], extra)
        code, body = await trio.to_thread.run_sync(post, run, "ops-secret")
        assert code == 200 and body["result"] == "applied", body
        assert body["endpoints_added"] == {"desks": [run.b]} and sorted(body["workers"]) == [0, 1]
        code, body = await trio.to_thread.run_sync(post, run, "ops-secret")
        assert (code, body) == (200, {"result": "unchanged"})
        run.write([run.a, run.b], extra + "\nnode_id = 3")
        code, body = await trio.to_thread.run_sync(post, run, "ops-secret")
        assert code == 409 and body["result"] == "refused"
        assert body["needs_restart"] == ["node_id"]


# -- an in-process worker, its configuration applied directly --------------------


async def test_a_clusters_client_certificate_renewed_in_place_is_used_by_the_next_link(
    tmp_path: Path,
) -> None:
    """An in-process worker whose cluster presents a client certificate the
    desk (mutual TLS) does not trust: its link stays down. The files are
    replaced in place by a certificate from the desk's client CA and the
    configuration applied again: the link's next attempt comes up and a
    message is forwarded."""
    from gateway.server.control import apply_config
    from tests.test_downstream import desk, records, wait_links_up
    from tests.test_downstream_tls import Pki, tls_ds

    pki = Pki(tmp_path, "127.0.0.1")
    clients, stranger = Pki(tmp_path, "unused"), Pki(tmp_path, "unused")
    cert, key = stranger.client(tmp_path, "gw")
    ctx = server_context(pki.cert, pki.key, client_ca=clients.ca_file)
    rec = tmp_path / "rec.jsonl"
    async with desk(record=rec, think_ms=0, ssl_context=ctx) as (port, srv, _):
        spec = tls_ds(port, ca_file=pki.ca_file, cert_file=cert, key_file=key)
        async with running(tmp_path, downstream=spec) as gw:
            fw = gw.w.forwarder
            with trio.fail_after(10):
                while srv.tls_failures < 1:  # refused: unknown CA
                    await trio.sleep(0.02)
            assert not any(ln.up for ln in fw.links)
            old = fw.links[0].ssl_context
            # files that do not load (changed again after the supervisor's
            # check): nothing applied, the worker goes on
            good_key = Path(key).read_bytes()
            Path(key).write_text("not a key")
            apply_config(gw.w, gw.w.cfg, ["downstream.clusters.general"])
            assert fw.links[0].ssl_context is old
            assert gw.w.hub.stats["reloads_failed"] == 1 and gw.w.hub.stats["reloads"] == 0
            Path(key).write_bytes(good_key)
            new_cert, new_key = clients.client(tmp_path, "gw-renewed")
            Path(new_cert).replace(cert)
            Path(new_key).replace(key)
            plan = apply_config(gw.w, gw.w.cfg, ["downstream.clusters.general"])
            assert plan.cluster_tls == ["general"]
            assert fw.links[0].ssl_context is not old
            await wait_links_up(fw)
            async with gc.connect(gw.url, token=gw.token("dave"), reconnect=False) as s:
                assert await s.send("renewed") == 1
    assert [r["body"] for r in records(rec)] == ["renewed"]


async def test_a_tls_cluster_added_by_a_reload_connects_once_its_files_load(
    tmp_path: Path,
) -> None:
    """An in-process worker with one h2c cluster. A reload adds a TLS
    cluster (its own desk, a private CA) with a group and a keyword rule:
    while its CA file does not load (changed again after the supervisor's
    check) the reload fails and nothing is added; once it loads, the
    worker's links to it come up over TLS and the connected visitor's
    keyword message is forwarded there."""
    from gateway.server.control import apply_config
    from tests.test_downstream import desk, ds, records, wait_links_up
    from tests.test_downstream_tls import Pki

    pki = Pki(tmp_path, "127.0.0.1")
    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    tls = server_context(pki.cert, pki.key)
    async with (
        desk(record=rec_a, think_ms=0) as (port_a, _, _),
        desk(record=rec_b, think_ms=0, ssl_context=tls) as (port_b, srv_b, _),
    ):
        table = ds(("general", [port_a]))
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            ca = tmp_path / "ca.pem"
            ca.write_bytes(Path(pki.ca_file).read_bytes())
            secure = {"endpoints": [f"127.0.0.1:{port_b}"], "tls": True, "ca_file": str(ca)}
            grown = {
                **table,
                "clusters": {**table["clusters"], "secure": secure},
                "groups": {**table["groups"], "vault": {"cluster": "secure"}},
                "rules": [{"group": "vault", "keywords": ["card"]}],
            }
            new = dataclasses.replace(gw.w.cfg, downstream=grown)
            ca.write_text("not a certificate")
            async with gc.connect(gw.url, token=gw.token("erin"), reconnect=False) as s:
                assert await s.send("hello") == 1
                plan = apply_config(gw.w, new)
                assert plan.clusters_added == ["secure"]
                assert gw.w.hub.stats["reloads_failed"] == 1 and set(fw.clusters) == {"general"}
                ca.write_bytes(Path(pki.ca_file).read_bytes())
                plan = apply_config(gw.w, new)
                assert plan.clusters_added == ["secure"] and gw.w.hub.stats["reloads"] == 1
                assert set(fw.clusters) == {"general", "secure"}
                await wait_links_up(fw, n=2)
                assert srv_b.tls_failures == 0
                assert await s.send("my card was charged twice") == 2
    assert [r["body"] for r in records(rec_a)] == ["hello"]
    assert [r["body"] for r in records(rec_b)] == ["my card was charged twice"]


async def test_reloaded_breaker_settings_reach_every_endpoint_keeping_its_state(
    tmp_path: Path,
) -> None:
    """An in-process worker with two endpoints, one of them down (its
    breaker open after a failed request). A reload with other breaker and outlier settings gives
    every endpoint's breaker and the cluster's outlier detector the new
    settings; the open breaker stays open and the other endpoint serves."""
    from gateway.downstream.breaker import OPEN
    from gateway.server.control import apply_config
    from tests.test_downstream import desk, ds, wait_links_up

    async with desk(think_ms=0) as (port, _, _):
        dead = free_port()  # nothing listens there
        table = ds(("general", [port, dead]), breaker={"consecutive_failures": 1})
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            eps = fw.clusters["general"].eps
            bad = eps[f"127.0.0.1:{dead}"].endpoint.breaker
            bad.record(trio.current_time(), False, 0.0)  # a failed request: open
            assert bad.state(trio.current_time()) == OPEN
            breaker = {"consecutive_failures": 7, "open_s": 1.0, "max_open_s": 2.0}
            outlier = {"consecutive_errors": 9}
            new_table = {**table, "breaker": breaker, "outlier": outlier}
            plan = apply_config(gw.w, dataclasses.replace(gw.w.cfg, downstream=new_table))
            assert plan.tuning and gw.w.hub.stats["reloads"] == 1
            for ep in eps.values():
                assert ep.endpoint.breaker.cfg.consecutive_failures == 7
                assert ep.endpoint.breaker.cfg.max_open_s == 2.0
            outliers = fw.clusters["general"].balancer.outliers
            assert outliers is not None and outliers.cfg.consecutive_errors == 9
            assert bad.state(trio.current_time()) == OPEN  # its state stays
            async with gc.connect(gw.url, token=gw.token("fay"), reconnect=False) as s:
                assert await s.send("still served") == 1


@pytest.mark.parametrize("remove", [False, True], ids=["group-moved", "cluster-removed"])
async def test_a_reload_moving_a_group_off_a_stalled_desk_redelivers_what_it_left_unanswered(
    tmp_path: Path, remove: bool
) -> None:
    """An in-process worker, group general on cluster a, whose desk stops
    answering after its first message. With a second message in flight
    there, a reload points general at cluster b (and, ``remove``, removes
    cluster a): the session is opened on b at once, the unanswered message
    is redelivered there after the request timeout (acknowledged with its
    number), and the next message goes to b too. A removed cluster's link
    is retired at once and ends once the message on it was given up on.
    Nothing is lost."""
    from gateway.server.control import apply_config
    from tests.test_downstream import desk, ds, records, wait_links_up

    rec_a, rec_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with (
        desk(record=rec_a, think_ms=0, stall_after=1) as (port_a, _, _),
        desk(record=rec_b, think_ms=0) as (port_b, _, _),
    ):
        table = ds(("a", [port_a]), ("b", [port_b]), request_timeout_s=0.5)
        table["groups"] = {"general": {"cluster": "a"}}
        moved = {**table, "groups": {"general": {"cluster": "b"}}}
        if remove:
            moved["clusters"] = {"b": table["clusters"]["b"]}
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw, n=2)
            a_links = list(fw.clusters["a"].eps[f"127.0.0.1:{port_a}"].links)
            async with gc.connect(gw.url, token=gw.token("gil"), reconnect=False) as s:
                assert await s.send("first") == 1
                async with trio.open_nursery() as n:
                    acks: list[int] = []

                    async def second() -> None:
                        acks.append(await s.send("second"))

                    n.start_soon(second)
                    with trio.fail_after(5):  # in flight at the stalled desk
                        while not any(x.ds is not None and x.ds.sent for x in gw.w.hub.sessions):
                            await trio.sleep(0.01)
                    plan = apply_config(gw.w, dataclasses.replace(gw.w.cfg, downstream=moved))
                    assert plan.groups_changed == ["general"] and plan.needs_restart == []
                    assert plan.clusters_removed == (["a"] if remove else [])
                    assert set(fw.clusters) == ({"b"} if remove else {"a", "b"})
                    assert all(ln.retired == remove for ln in a_links)
                with trio.fail_after(10):
                    assert acks == [2]
                    assert await s.send("third") == 3
                if remove:
                    with trio.fail_after(10):  # a's link given up on and ended
                        while any(ln in fw.links for ln in a_links):
                            await trio.sleep(0.05)
    assert [r["body"] for r in records(rec_a)] == ["first"]  # the stalled desk drops it
    assert [r["body"] for r in records(rec_b)] == ["second", "third"]


async def test_a_shorter_request_timeout_applies_to_the_next_message(tmp_path: Path) -> None:
    """An in-process worker with a 30 s request timeout in front of a desk
    that stops answering after its first message. With a second message
    in flight, the timeout is reloaded to 0.3 s with one attempt: that
    message and the next one are refused (4429) within a second or two
    instead of waiting 30 s; the links and the sticky table take the new
    bounds too."""
    import dataclasses as dc

    from gateway.server.control import apply_config
    from tests.test_downstream import desk, ds, wait_links_up

    async with desk(think_ms=0, stall_after=1) as (port, _, _):
        table = ds(("general", [port]), request_timeout_s=30.0)
        async with running(tmp_path, downstream=table) as gw:
            fw = gw.w.forwarder
            await wait_links_up(fw)
            ws = await RawWs.connect(gw.port)
            assert (await ws.hello(gw.token("erin")))["t"] == "welcome"
            await ws.send({"t": "msg", "id": 1, "body": "answered"})
            with trio.fail_after(5):
                while (await ws.recv())["t"] != "ack":
                    pass
            await ws.send({"t": "msg", "id": 2, "body": "in flight"})
            await trio.sleep(0.2)  # sent to the desk, which says nothing
            tuned = {**table, "request_timeout_s": 0.3, "max_attempts": 1,
                     "link_high_water": 65536, "health_interval_s": 0.5,
                     "sticky_entries": 10}  # fmt: skip
            plan = apply_config(gw.w, dc.replace(gw.w.cfg, downstream=tuned))
            assert plan.tuning and gw.w.hub.stats["reloads"] == 1
            ln = fw.links[0]
            assert (ln.drain_timeout_s, ln.high_water, ln.health_interval_s) == (0.3, 65536, 0.5)
            assert fw.sticky.max_entries == 10
            t0 = trio.current_time()
            await ws.send({"t": "msg", "id": 3, "body": "never answered"})
            refused: list[dict[str, Any]] = []
            with trio.fail_after(5):
                while len(refused) < 2:
                    f = await ws.recv()
                    if f["t"] == "error":
                        refused.append(f)
            assert sorted(f["id"] for f in refused) == [2, 3], refused
            assert all(f["code"] == 4429 for f in refused)
            assert trio.current_time() - t0 < 2.0  # not the 30 s it was
            await ws.aclose()


async def test_a_failure_applying_a_reload_does_not_end_the_control_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's control loop over a real pipe: a bad message is logged
    and skipped, a bug while applying is counted and skipped, and the next
    message is still applied."""
    import gateway.server.control as control
    from gateway.ops.wire import encode_snapshot

    async with running(tmp_path) as gw:
        w = gw.w
        rfd, wfd = os.pipe()
        real = control.apply_config
        calls: list[int] = []

        def failing_once(w: Any, new: Any, files: Any = ()) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            return real(w, new, files)

        monkeypatch.setattr(control, "apply_config", failing_once)
        lowered = dataclasses.replace(w.cfg, visitor_msg_rate=1.0)
        frame = encode_snapshot({"t": "reload", "config": lowered.to_json(), "files": []})
        async with trio.open_nursery() as n:
            n.start_soon(control.control_loop, w, rfd)
            os.write(wfd, encode_snapshot({"t": "nonsense"}) + frame + frame)
            with trio.fail_after(5):
                while w.hub.stats["reloads"] < 1:
                    await trio.sleep(0.01)
            os.close(wfd)  # the loop ends with the pipe
        assert calls == [1, 1] and w.hub.stats["internal_errors"] == 1
        assert w.cfg.visitor_msg_rate == 1.0


async def test_a_worker_reports_the_generation_of_the_configuration_it_runs(
    tmp_path: Path,
) -> None:
    """Over the control pipe: a reload the worker applies, or has already,
    gives it the supervisor's generation; one it refuses (or cannot apply)
    leaves it at the generation it had, and its snapshot says which."""
    import gateway.server.control as control
    from gateway.ops.report import worker_snapshot
    from gateway.ops.wire import encode_snapshot

    async with running(tmp_path) as gw:
        w = gw.w
        assert w.config_generation == 0 and worker_snapshot(w)["config_generation"] == 0
        lowered = dataclasses.replace(w.cfg, visitor_msg_rate=1.0)
        moved = dataclasses.replace(lowered, listen_port=w.cfg.listen_port + 1)

        def msg(cfg: Config, gen: Any) -> bytes:
            return encode_snapshot(
                {"t": "reload", "config": cfg.to_json(), "files": [], "gen": gen}
            )

        rfd, wfd = os.pipe()
        stats = w.hub.stats

        async def until(done: Any) -> None:
            with trio.fail_after(5):
                while not done():
                    await trio.sleep(0.01)

        async with trio.open_nursery() as n:
            n.start_soon(control.control_loop, w, rfd)
            os.write(wfd, msg(lowered, 1))  # applied
            await until(lambda: w.config_generation == 1)
            assert stats["reloads"] == 1 and worker_snapshot(w)["config_generation"] == 1
            os.write(wfd, msg(moved, 2))  # needs a restart: refused, stays at 1
            await until(lambda: stats["reloads_refused"] == 1)
            assert w.config_generation == 1
            os.write(wfd, msg(lowered, 3))  # runs it already: takes the generation
            await until(lambda: w.config_generation == 3)
            assert stats["reloads"] == 1
            os.write(wfd, msg(lowered, "4") + msg(moved, 6))  # not an integer; refused
            await until(lambda: stats["reloads_refused"] == 2)
            assert w.config_generation == 3 and worker_snapshot(w)["config_generation"] == 3
            os.close(wfd)
        assert w.cfg.visitor_msg_rate == 1.0 and w.cfg.listen_port != moved.listen_port


async def test_the_metrics_show_a_worker_a_reload_left_behind(tmp_path: Path) -> None:
    """`gateway serve` with two workers: after a reload both report the
    supervisor's generation; a worker stopped (SIGSTOP) while the next one
    is applied keeps the old one and is counted behind, in /metrics and
    /api/stats, until it runs again and catches up."""
    async with _reloadable(tmp_path) as run:

        async def scrape(done: Any) -> str:
            with trio.fail_after(15):
                while True:
                    text = await trio.to_thread.run_sync(run.metrics)
                    if done(text):
                        return text
                    await trio.sleep(0.1)

        def gens(text: str) -> tuple[float | None, ...]:
            return (
                _metric(text, "gateway_config_generation"),
                _metric(text, "gateway_worker_config_generation", worker="0"),
                _metric(text, "gateway_worker_config_generation", worker="1"),
                _metric(text, "gateway_config_workers_behind"),
            )

        await scrape(lambda t: gens(t) == (0, 0, 0, 0))
        run.write([run.a], extra="drain_s = 5.0")
        run.gw.send_signal(signal.SIGHUP)
        await scrape(lambda t: gens(t) == (1, 1, 1, 0))
        pid = next(r["pid"] for r in run.events("worker_started") if r["worker"] == 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            run.write([run.a], extra="drain_s = 6.0")
            run.gw.send_signal(signal.SIGHUP)
            # (within the 5 s its last snapshot counts as up)
            text = await scrape(lambda t: gens(t)[:2] == (2, 2))
            assert gens(text) == (2, 2, 1, 1)
            with urllib.request.urlopen(f"http://127.0.0.1:{run.ops}/api/stats", timeout=5) as r:
                api = json.loads(r.read())
            assert api["config_generation"] == 2 and api["config_behind"] == [1]
            assert [w["config_generation"] for w in api["workers"]] == [2, 1]
        finally:
            os.kill(pid, signal.SIGCONT)
        await scrape(lambda t: gens(t) == (2, 2, 2, 0))
