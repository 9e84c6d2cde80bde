"""The load test's view of the gateway (``gateway loadtest --metrics``):
parsing what the operator endpoint renders, the arithmetic between two
reads, and the CLI against a real `gateway serve` with its ops token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.loadtest import gwmetrics
from gateway.loadtest.report import html_report
from gateway.ops.aggregate import Aggregator, families_of
from gateway.ops.exposition import render
from gateway.ops.names import GC_PAUSE
from gateway.ops.registry import Registry
from tests.test_loadtest import _cli
from tests.test_ops_process import OPS_TOKEN, serving


def test_parse_reads_what_the_operator_endpoint_renders() -> None:
    r = Registry()
    c = r.counter("gateway_x_total", "x", ("name",))
    c.labels('a "quoted"\nvalue \\ here, {braces} = too').inc(3)
    c.labels("plain").inc(2)
    h = r.histogram("gateway_h_seconds", "h", buckets=(0.001, 0.01))
    for v in (0.0005, 0.005, 0.5):
        h.observe(v)
    text = render(families_of({"reg": r.snapshot()}))
    got = gwmetrics.parse(text)
    want = {}
    for fam in text_string_to_metric_families(text):  # the reference parser
        for s in fam.samples:
            want[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert got == want
    assert got[("gateway_x_total", (("name", 'a "quoted"\nvalue \\ here, {braces} = too'),))] == 3
    assert got[("gateway_h_seconds_bucket", (("le", "+Inf"),))] == 3


@pytest.mark.parametrize(
    "line",
    ["gateway_x_total", "gateway_x_total{a=1} 3", 'gateway_x_total{a="1} 3', "gateway_x_total x"],
)
def test_parse_refuses_what_is_not_a_sample(line: str) -> None:
    with pytest.raises(gwmetrics.MetricsError):
        gwmetrics.parse("# HELP x\n" + line + "\n")


def _read(
    agg: Aggregator, t: float, stats: dict[str, float], reg: Registry, worker: int = 0
) -> gwmetrics.Samples:
    agg.update(worker, {"pid": 1 + worker, "ready": True, "stats": stats,
                        "reg": reg.snapshot()}, t)  # fmt: skip
    return gwmetrics.parse(render(agg.merged(t)))


def test_the_gateway_side_between_two_reads() -> None:
    agg = Aggregator(workers=1)
    reg = Registry()
    ack = reg.histogram("gateway_message_ack_seconds", "ack")
    gc_pause = reg.histogram("gateway_gc_pause_seconds", "gc", GC_PAUSE.buckets, ("generation",))
    for _ in range(50):
        ack.observe(0.0004)  # before the run: not in the window
    gc_pause.labels("1").observe(0.2)  # before the run too
    before = _read(agg, 0.0, {"messages_acked": 100, "cpu_s": 1.0, "loop_busy_s": 0.2,
                              "loop_events": 1000, "loop_batches": 100, "loop_direct": 40},
                   reg)  # fmt: skip
    for _ in range(990):
        ack.observe(0.002)
    for _ in range(10):
        ack.observe(0.04)
    for gen, secs in (("0", 0.0003), ("0", 0.004), ("1", 0.007)):
        gc_pause.labels(gen).observe(secs)
    after = _read(agg, 2.0, {"messages_acked": 1100, "cpu_s": 1.5, "loop_busy_s": 0.7,
                             "loop_events": 5000, "loop_batches": 2100, "loop_direct": 1540,
                             "errors_4029": 7}, reg)  # fmt: skip
    g = gwmetrics.gateway_side(before, after, 2.0)
    assert g["acked"] == 1000
    assert g["cpu_s"] == pytest.approx(0.5) and g["cpu_cores"] == pytest.approx(0.25)
    assert g["cpu_us_per_msg"] == pytest.approx(500.0)
    assert g["loop_busy_cores"] == pytest.approx(0.25)
    assert g["loop_busiest_worker"] == pytest.approx(0.25)
    assert g["loop_us_per_event"] == pytest.approx(125.0)
    assert g["events_per_wakeup"] == pytest.approx(2.0)
    assert g["direct_wakeups"] == pytest.approx(0.75)  # 1,500 of the 2,000 wakeups
    # the 1,000 acks of the window: p50 in the 2 ms bucket, p99 below 40 ms
    assert g["ack"]["count"] == 1000
    assert 1.0 < g["ack"]["p50_ms"] <= 2.5 and 2.0 < g["ack"]["p99_ms"] <= 50
    assert g["downstream"] is None  # nothing was forwarded
    assert (g["errors_sent"], g["worker_restarts"]) == (7, 0)
    # three collections in the window, the longest in the (5 ms, 10 ms] bucket
    assert g["gc"] == {"count": 3, "total_ms": pytest.approx(11.3), "longest_ms": 10.0}
    text = "\n".join(gwmetrics.summary_lines(g))
    assert "500.0 µs per acked message" in text and "gateway ack" in text
    assert "GC pauses: 3, 11.3 ms in all, the longest <= 10 ms" in text
    assert "7 error frames" in text
    page = html_report({"counts": {}, "plan": {}, "gateway": g})
    assert "Gateway side" in page and "500.0 µs per acked message" in page


def test_a_restarted_worker_gets_no_share_and_no_traffic_no_ratios() -> None:
    agg = Aggregator(workers=2)
    reg = Registry()
    _read(agg, 0.0, {"loop_busy_s": 5.0, "cpu_s": 9.0}, reg, worker=1)
    before = _read(agg, 0.0, {"loop_busy_s": 1.0, "cpu_s": 2.0}, reg, worker=0)
    # worker 1 restarted (new pid, counters from zero); worker 0 idled
    agg.update(1, {"pid": 99, "ready": True, "stats": {"loop_busy_s": 0.5, "cpu_s": 0.6},
                   "reg": reg.snapshot()}, 1.0)  # fmt: skip
    after = _read(agg, 1.0, {"loop_busy_s": 1.0, "cpu_s": 2.0}, reg, worker=0)
    g = gwmetrics.gateway_side(before, after, 1.0)
    assert g["loop_busiest_worker"] == 0.0  # worker 1's counter went down: not a share
    assert g["acked"] == 0 and g["cpu_us_per_msg"] is None
    assert g["loop_us_per_event"] is None and g["events_per_wakeup"] is None
    assert g["direct_wakeups"] is None
    assert g["ack"] is None
    assert g["gc"] == {"count": 0, "total_ms": 0.0, "longest_ms": None}
    assert "GC pauses: none" in "\n".join(gwmetrics.summary_lines(g))


async def test_loadtest_reports_the_gateways_side(tmp_path: Path) -> None:
    async with serving(tmp_path, workers=2) as gw:
        t = gw.tenant
        secret = t.secrets[t.primary_kid].decode()
        js, page = tmp_path / "r.json", tmp_path / "r.html"
        metrics = f"http://127.0.0.1:{gw.ops}/metrics"
        base = ["loadtest", "--url", f"ws://127.0.0.1:{gw.port}/v1/ws", "--token-secret", secret,
                "--connections", "40", "--duration", "2", "--no-progress"]  # fmt: skip
        code, out = await _cli([*base, "--metrics", metrics, "--ops-token", OPS_TOKEN,
                                "--json", str(js), "--html", str(page)])  # fmt: skip
        assert code == 0, out
        r: dict[str, Any] = json.loads(js.read_text())
        g = r["gateway"]
        client_acked = r["counts"]["acked"]
        # the gateway acked at least what this client saw acked, and its ack
        # histogram counted each of those acks once
        assert g["acked"] >= client_acked > 0
        assert g["ack"]["count"] == g["acked"]
        assert g["ack"]["p50_ms"] > 0 and g["downstream"] is None  # the demo bot
        assert g["cpu_s"] > 0 and g["cpu_us_per_msg"] > 0
        assert 0 < g["loop_busy_cores"] <= 2.5 and 0 < g["loop_busiest_worker"] <= 1.5
        assert g["loop_us_per_event"] > 0 and g["events_per_wakeup"] >= 1
        assert g["worker_restarts"] == 0
        assert "gateway (its /metrics" in out and "Gateway side" in page.read_text()

        # a wrong token: the run goes on, with a clear warning and no gateway side
        code, out = await _cli([*base, "--metrics", metrics, "--ops-token", "wrong",
                                "--json", str(js)])  # fmt: skip
        assert code == 0, out
        assert "HTTP 401 (set --ops-token or GATEWAY_OPS_TOKEN)" in out
        assert "gateway" not in json.loads(js.read_text())
