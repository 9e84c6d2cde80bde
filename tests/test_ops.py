"""The operator endpoint's sans-IO parts: counter-key mapping, merging worker
snapshots (monotonic across restarts), the Prometheus text rendering (parsed
back with prometheus_client), the snapshot wire format and the routes."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.aggregate import Aggregator, families_of, quantile
from gateway.ops.app import OpsApp
from gateway.ops.exposition import render
from gateway.ops.names import GC_PAUSE
from gateway.ops.registry import Registry
from gateway.ops.statsmap import counter_labels, map_key
from gateway.ops.wire import MAX_SNAPSHOT_BYTES, SnapshotDecoder, WireError, encode_snapshot
from gateway.server.http1 import parse_head


def parsed(text: str) -> dict[str, Any]:
    """{family name: {(sample name, sorted labels): value}}"""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        d = out.setdefault(fam.name, {"type": fam.type, "samples": {}})
        for s in fam.samples:
            d["samples"][(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def snap(pid: int, stats: dict[str, int], conns: int = 0, reg: Registry | None = None) -> dict:
    return {
        "pid": pid,
        "ready": True,
        "stats": stats,
        "gauges": {"gateway_connections_open": conns, "gateway_sessions": conns},
        "reg": (reg or Registry()).snapshot(),
    }


@pytest.mark.parametrize(
    ("key", "name", "labels"),
    [
        ("connections_accepted", "gateway_connections_accepted_total", ()),
        ("errors_4003", "gateway_errors_sent_total", (("code", "4003"),)),
        ("closed_1009", "gateway_closes_total", (("code", "1009"),)),
        ("bytes_in_h2", "gateway_bytes_in_total", (("transport", "h2"),)),
        ("messages_in_ws", "gateway_messages_in_total", (("transport", "ws"),)),
        ("connections_rejected_ip_limit", "gateway_connections_rejected_total",
         (("reason", "ip_limit"),)),
        ("rate_limited_msg_tenant", "gateway_rate_limited_total",
         (("kind", "message"), ("scope", "tenant"))),
        ("ws_upgrades", "gateway_handshakes_total", (("transport", "ws"),)),
        ("something_new", "gateway_events_total", (("event", "something_new"),)),
        ("errors_", "gateway_events_total", (("event", "errors_"),)),
    ],
)  # fmt: skip
def test_map_key(key: str, name: str, labels: tuple[tuple[str, str], ...]) -> None:
    assert map_key(key) == (name, labels)
    # counter_labels() knows every metric and label a key can land in
    assert {k for k, _ in labels} <= counter_labels()[name]


def test_quantile_interpolates_within_buckets() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.5)
    assert quantile(bounds, [0, 10, 10, 0], 0.5) == pytest.approx(2.0)
    assert quantile(bounds, [0, 10, 10, 0], 0.75) == pytest.approx(3.0)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 4.0  # +Inf bucket: the last bound


def test_merge_sums_workers_and_survives_restart() -> None:
    agg = Aggregator(workers=2)
    r1, r2 = Registry(), Registry()
    for r, vals in ((r1, (0.0004, 0.003)), (r2, (0.02,))):
        h = r.histogram("gateway_message_ack_seconds", "ack")
        for v in vals:
            h.observe(v)
        r.gauge("gateway_breaker_state", "b", ("cluster", "endpoint")).labels("c", "e").set(
            2 if r is r2 else 0
        )
    agg.update(0, snap(100, {"messages_in_ws": 5, "errors_4003": 1}, 3, r1), 10.0)
    agg.update(1, snap(200, {"messages_in_ws": 7}, 4, r2), 10.0)
    text = render(agg.merged(10.0))
    m = parsed(text)
    assert (
        m["gateway_messages_in"]["samples"][("gateway_messages_in_total", (("transport", "ws"),))]
        == 12
    )
    assert (
        m["gateway_messages_in"]["samples"][("gateway_messages_in_total", (("transport", "h2"),))]
        == 0
    )  # seeded
    assert m["gateway_connections_open"]["samples"][("gateway_connections_open", ())] == 7
    ack = m["gateway_message_ack_seconds"]["samples"]
    assert ack[("gateway_message_ack_seconds_count", ())] == 3
    assert ack[("gateway_message_ack_seconds_bucket", (("le", "0.0005"),))] == 1
    assert ack[("gateway_message_ack_seconds_bucket", (("le", "0.005"),))] == 2
    assert ack[("gateway_message_ack_seconds_bucket", (("le", "+Inf"),))] == 3
    assert ack[("gateway_message_ack_seconds_sum", ())] == pytest.approx(0.0234)
    # the worst breaker state over the workers
    key = ("gateway_breaker_state", (("cluster", "c"), ("endpoint", "e")))
    assert m["gateway_breaker_state"]["samples"][key] == 2
    # worker 1 restarts (new pid, counters from zero): totals never go down
    agg.update(1, snap(201, {"messages_in_ws": 1}, 1), 11.0)
    agg.restarts = 1
    m = parsed(render(agg.merged(11.0)))
    ws = ("gateway_messages_in_total", (("transport", "ws"),))
    assert m["gateway_messages_in"]["samples"][ws] == 5 + 7 + 1
    assert m["gateway_connections_open"]["samples"][("gateway_connections_open", ())] == 4
    assert m["gateway_worker_restarts"]["samples"][("gateway_worker_restarts_total", ())] == 1
    assert (
        m["gateway_message_ack_seconds"]["samples"][("gateway_message_ack_seconds_count", ())] == 3
    )  # the retired histogram is kept
    # worker 0 exits for good: its gauges go, its counters stay
    agg.worker_gone(0)
    m = parsed(render(agg.merged(12.0)))
    assert m["gateway_messages_in"]["samples"][ws] == 13
    assert m["gateway_connections_open"]["samples"][("gateway_connections_open", ())] == 1
    assert m["gateway_workers_up"]["samples"][("gateway_workers_up", ())] == 1


def test_stale_worker_is_not_up_and_readiness() -> None:
    agg = Aggregator(workers=1)
    assert not agg.ready(0.0)  # no worker yet
    agg.update(0, snap(1, {}, 2), 0.0)
    assert agg.ready(1.0)
    assert not agg.ready(100.0)  # silent for too long
    m = parsed(render(agg.merged(100.0)))
    assert "gateway_connections_open" not in m  # a silent worker's gauges are not shown
    agg.update(0, snap(1, {}, 2), 100.0)
    agg.draining = True
    assert not agg.ready(100.5)


def test_rates_and_latency_for_the_dashboard() -> None:
    agg = Aggregator(workers=1)
    r = Registry()
    h = r.histogram("gateway_message_ack_seconds", "ack")
    for t in range(12):
        for _ in range(100):
            h.observe(0.002)
        agg.update(0, snap(1, {"messages_in_ws": 100 * (t + 1)}, 10, r), float(t))
        agg.tick(float(t))
    api = agg.api(11.0)
    assert api["ready"] and api["workers_up"] == 1
    tot = api["totals"]
    assert tot["msgs_in_per_s"] == pytest.approx(100.0)
    assert tot["connections"] == 10
    assert 1.0 <= tot["p50_ms"] <= 2.5 and 1.0 <= tot["p99_ms"] <= 2.5
    assert api["workers"][0]["msgs_in_per_s"] == pytest.approx(100.0)
    assert len(api["series"]) == 12
    json.dumps(api)  # plain data


def test_garbage_collector_pauses_per_worker_over_the_window() -> None:
    agg = Aggregator(workers=2)
    regs = [Registry(), Registry()]
    pauses = [
        r.histogram("gateway_gc_pause_seconds", "gc", GC_PAUSE.buckets, ("generation",))
        for r in regs
    ]
    pauses[0].labels("2").observe(0.5)  # long before the window
    for t in range(12):
        if t >= 2:
            pauses[0].labels("0").observe(0.003)  # one 3 ms pause a second
        agg.update(0, snap(1, {}, 0, regs[0]), float(t))
        agg.update(1, snap(2, {}, 0, regs[1]), float(t))
        agg.tick(float(t))
    api = agg.api(11.0)
    w0, w1 = api["workers"]
    # the last 5 s: five pauses of 3 ms; worker 1 had none
    assert (w0["gc_pauses"], w0["gc_ms"]) == (5, pytest.approx(15.0))
    assert (w1["gc_pauses"], w1["gc_ms"]) == (0, 0.0)
    assert (api["totals"]["gc_pauses"], api["totals"]["gc_ms"]) == (5, pytest.approx(15.0))


def test_event_loop_and_cpu_shares_per_worker_and_in_total() -> None:
    agg = Aggregator(workers=2)
    for t in range(8):
        # worker 0: loop busy a quarter of each second, half a core of CPU,
        # 1,000 ready connections a second; worker 1 idle
        busy = {"loop_busy_s": 0.25 * t, "cpu_s": 0.5 * t, "loop_events": 1000 * t,
                "loop_batches": 400 * t}  # fmt: skip
        idle = {"loop_busy_s": 0.0, "cpu_s": 0.01, "loop_events": 0, "loop_batches": 0}
        agg.update(0, snap(1, busy), float(t))
        agg.update(1, snap(2, idle), float(t))
        agg.tick(float(t))
    api = agg.api(7.0)
    w0, w1 = api["workers"]
    assert w0["loop_busy_pct"] == pytest.approx(25.0)
    assert w0["cpu_pct"] == pytest.approx(50.0)
    assert w0["loop_us_per_event"] == pytest.approx(250.0)
    assert (w1["loop_busy_pct"], w1["cpu_pct"], w1["loop_us_per_event"]) == (0.0, 0.0, None)
    assert api["totals"]["cpu_pct"] == pytest.approx(50.0)
    m = parsed(render(agg.merged(7.0)))
    assert m["gateway_loop_busy_seconds"]["samples"][
        ("gateway_loop_busy_seconds_total", ())
    ] == pytest.approx(1.75)
    assert m["gateway_loop_events"]["samples"][("gateway_loop_events_total", ())] == 7000
    assert m["gateway_loop_batches"]["samples"][("gateway_loop_batches_total", ())] == 2800
    per = m["gateway_worker_cpu_seconds"]["samples"]
    assert per[("gateway_worker_cpu_seconds_total", (("worker", "0"),))] == pytest.approx(3.5)
    assert per[("gateway_worker_cpu_seconds_total", (("worker", "1"),))] == pytest.approx(0.01)
    busy_per = m["gateway_worker_loop_busy_seconds"]["samples"]
    assert busy_per[
        ("gateway_worker_loop_busy_seconds_total", (("worker", "0"),))
    ] == pytest.approx(1.75)


def test_exposition_escapes_and_parses() -> None:
    r = Registry()
    c = r.counter("gateway_x_total", "help with \\ and\nnewline", ("name",))
    c.labels('a "quoted"\nvalue \\ here').inc(3)
    r.gauge("gateway_g", "g").set(1.5)
    fams = families_of({"reg": r.snapshot()})
    m = parsed(render(fams))
    assert m["gateway_x"]["type"] == "counter"
    assert (
        m["gateway_x"]["samples"][("gateway_x_total", (("name", 'a "quoted"\nvalue \\ here'),))]
        == 3
    )
    assert m["gateway_g"]["samples"][("gateway_g", ())] == 1.5


def test_every_exported_name_follows_conventions() -> None:
    agg = Aggregator(workers=1)
    stats = {k: 1 for k in ("connections_accepted", "errors_4001", "bytes_out_ws", "odd")}
    from gateway.ops import names  # noqa: F401  (declares the registry's metrics)
    from gateway.ops.registry import REGISTRY

    agg.update(0, {"pid": 1, "stats": stats, "reg": REGISTRY.snapshot()}, 0.0)
    for fam in text_string_to_metric_families(render(agg.merged(0.0))):
        assert fam.name.startswith("gateway_")
        assert fam.type in ("counter", "gauge", "histogram")
        if fam.type == "histogram":
            assert fam.name.endswith(("_seconds", "_items"))
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith(("_total", "_created"))
            assert not math.isnan(s.value)


def test_wire_roundtrip_in_pieces_and_bounds() -> None:
    a, b = {"pid": 1, "stats": {"x": 1}}, {"pid": 1, "stats": {"x": 2}}
    data = encode_snapshot(a) + encode_snapshot(b)
    dec = SnapshotDecoder()
    got: list[dict] = []
    for i in range(0, len(data), 3):
        got += dec.feed(data[i : i + 3])
    assert got == [a, b]
    with pytest.raises(WireError):
        SnapshotDecoder().feed(struct.pack("!I", MAX_SNAPSHOT_BYTES + 1))
    body = msgpack.packb([1, 2])
    with pytest.raises(WireError):
        SnapshotDecoder().feed(struct.pack("!I", len(body)) + body)
    with pytest.raises(WireError):
        SnapshotDecoder().feed(struct.pack("!I", 1) + b"\xc1")  # never-used msgpack byte


def req(raw: str) -> Any:
    p = parse_head(raw.encode())
    assert p is not None
    return p[0]


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def test_routes_and_bearer_token() -> None:
    agg = Aggregator(workers=1)
    app = OpsApp(agg, "s3cret-token", lambda: 0.0)
    assert status(app.handle(req("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))) == 200
    assert status(app.handle(req("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"))) == 503
    agg.update(0, snap(1, {}), 0.0)
    assert status(app.handle(req("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"))) == 200
    for path in ("/metrics", "/api/stats", "/"):
        r = app.handle(req(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status(r) == 401 and b"WWW-Authenticate: Bearer" in r
        r = app.handle(req(f"GET {path} HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n"))
        assert status(r) == 401
        r = app.handle(req(f"GET {path} HTTP/1.1\r\nAuthorization: Bearer s3cret-token\r\n\r\n"))
        assert status(r) == 200
    r = app.handle(req("GET /?token=s3cret-token HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status(r) == 200 and b"<title>gateway dashboard</title>" in r
    r = app.handle(req("GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token\r\n\r\n"))
    assert b"text/plain; version=0.0.4" in r and b"gateway_workers_up 1" in r
    assert status(app.handle(req("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))) == 405
    assert status(app.handle(req("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"))) == 404
    agg.draining = True
    r = app.handle(req("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status(r) == 503 and r.endswith(b"draining\n")
    assert app.denied == 6  # two refusals for each of the three routes


def test_reload_route_needs_a_configured_token_and_the_bearer_header() -> None:
    async def reload() -> dict[str, Any]:
        return {"result": "applied"}

    post = "POST /-/reload HTTP/1.1\r\nHost: x\r\n"
    agg = Aggregator(workers=1)
    assert status(OpsApp(agg, "tok", lambda: 0.0).reload_check(req(post + "\r\n")) or b"") == 404
    open_app = OpsApp(agg, "", lambda: 0.0, reload)  # no token: metrics open, reloads not
    r = open_app.reload_check(req(post + "\r\n"))
    assert r is not None and status(r) == 403 and b"ops_token" in r
    app = OpsApp(agg, "tok", lambda: 0.0, reload)
    for headers in ("", "Authorization: Bearer wrong\r\n"):
        r = app.reload_check(req(post + headers + "\r\n"))
        assert r is not None and status(r) == 401
    # the query-string token the dashboard uses does not do for a reload
    r = app.reload_check(req("POST /-/reload?token=tok HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert r is not None and status(r) == 401
    assert app.reload_check(req(post + "Authorization: Bearer tok\r\n\r\n")) is None
    for result, code in (("applied", 200), ("unchanged", 200), ("refused", 409), ("failed", 409)):
        r = OpsApp.reload_response({"result": result})
        assert status(r) == code and json.loads(r.split(b"\r\n\r\n", 1)[1])["result"] == result


def test_crypto_batches_are_measured_per_suite_and_op() -> None:
    from gateway.crypto import Keyring
    from gateway.ops.names import CRYPTO_BATCH_ITEMS, CRYPTO_BATCH_SECONDS

    items = CRYPTO_BATCH_ITEMS.labels("sm4-gcm", "seal")
    secs = CRYPTO_BATCH_SECONDS.labels("sm4-gcm", "open")
    n0, s0, o0 = items.count, items.sum, secs.count
    kr = Keyring(fixed=7)
    h = kr.add("sm4-gcm", bytes(16))
    sealed = kr.seal_many([(h, b"x" * 100, b"aad")] * 37)
    opened = kr.open_many([(h, s, b"aad") for s in sealed] + [(h, b"\0" * 40, b"aad")])
    assert opened[:37] == [b"x" * 100] * 37 and opened[37] is None
    assert (items.count, items.sum) == (n0 + 1, s0 + 37)
    assert secs.count == o0 + 1
    # the per-suite families are exported from the start, zeros included
    text = render(families_of({"reg": registry_snapshot()}))
    m = parsed(text)
    assert m["gateway_crypto_batch_items"]["type"] == "histogram"
    key = ("gateway_crypto_batch_items_count", (("op", "open"), ("suite", "aes-128-gcm")))
    assert key in m["gateway_crypto_batch_items"]["samples"]


def registry_snapshot() -> dict[str, Any]:
    from gateway.ops.registry import REGISTRY

    return REGISTRY.snapshot()


def test_downstream_endpoints_for_the_dashboard() -> None:
    """Per worker and endpoint: the breaker state, the links up, the failed
    connection attempts, the balancer's moving average of the answer time
    and the messages outstanding, from each worker's own metrics."""
    agg = Aggregator(workers=2)
    regs = [Registry(), Registry()]
    lab = ("cluster", "endpoint")
    for i, r in enumerate(regs):
        r.gauge("gateway_breaker_state", "b", lab).labels("desks", "a:1").set(2 * i)
        r.gauge("gateway_downstream_links_up", "u", lab).labels("desks", "a:1").set(1 - i)
        failed = r.counter("gateway_downstream_connect_failures_total", "f", lab)
        failed.labels("desks", "a:1").inc(3 * i)
        ewma = r.gauge("gateway_downstream_endpoint_latency_seconds", "l", lab)
        ewma.labels("desks", "a:1").set((0.0123, 0.05)[i])
        out = r.gauge("gateway_downstream_endpoint_outstanding", "o", lab)
        out.labels("desks", "a:1").set(3 + i)
        agg.update(i, snap(10 + i, {}, 0, r), 1.0)
    rows = agg.api(1.5)["breakers"]
    assert rows == [
        {"worker": 0, "cluster": "desks", "endpoint": "a:1", "state": "closed",
         "links_up": 1, "connect_failures": 0, "latency_ms": 12.3, "outstanding": 3},
        {"worker": 1, "cluster": "desks", "endpoint": "a:1", "state": "open",
         "links_up": 0, "connect_failures": 3, "latency_ms": 50.0, "outstanding": 4},
    ]  # fmt: skip
    m = parsed(render(agg.merged(1.5)))
    labels = (("cluster", "desks"), ("endpoint", "a:1"))

    def merged(name: str) -> float:
        return float(m[name]["samples"][(name, labels)])

    assert merged("gateway_downstream_links_up") == 1  # summed over workers
    assert merged("gateway_downstream_endpoint_latency_seconds") == 0.05  # the highest
    assert merged("gateway_downstream_endpoint_outstanding") == 7  # summed


def test_workers_behind_the_supervisors_configuration_are_counted() -> None:
    """Each worker up reports the configuration generation it runs; those
    not at the supervisor's are behind. A snapshot without one (or with
    garbage) counts as generation 0; a worker no longer reporting is not
    counted."""
    agg = Aggregator(3)
    agg.config_generation = 2
    agg.update(0, {**snap(10, {}), "config_generation": 2}, 10.0)
    agg.update(1, {**snap(11, {}), "config_generation": "2"}, 10.0)
    agg.update(2, {**snap(12, {}), "config_generation": 1}, 8.0)  # up until 13.0
    m = parsed(render(agg.merged(10.0)))
    per = m["gateway_worker_config_generation"]["samples"]
    assert per[("gateway_worker_config_generation", (("worker", "0"),))] == 2
    assert per[("gateway_worker_config_generation", (("worker", "1"),))] == 0
    assert per[("gateway_worker_config_generation", (("worker", "2"),))] == 1
    behind = m["gateway_config_workers_behind"]["samples"]
    assert behind[("gateway_config_workers_behind", ())] == 2
    assert m["gateway_config_generation"]["samples"][("gateway_config_generation", ())] == 2
    assert agg.behind(10.0) == [1, 2] and agg.api(10.0)["config_behind"] == [1, 2]
    assert agg.behind(13.5) == [1]  # worker 2 stopped reporting
    agg.update(1, {**snap(11, {}), "config_generation": 2}, 13.5)
    assert agg.behind(13.5) == [] and agg.api(13.5)["config_generation"] == 2
