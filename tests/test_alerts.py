"""docs/prometheus/gateway-alerts.yml, the alerting rules shipped for
operators: valid for promtool, their unit tests pass (gateway-alerts-test.yml:
each alert fires on the series it is written for, and not before its
``for``), and every metric and label they name is one the gateway exports
(a live scrape of `gateway serve` linked to desk-sim, plus the counters that
appear only once something happened), so a renamed metric cannot leave an
alert that never fires."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops import names as _names  # noqa: F401  (declares the registry's metrics)
from gateway.ops.registry import REGISTRY, Histogram
from gateway.ops.statsmap import counter_labels
from tests.test_ops_process import serving, wait_until
from tests.test_server_process import free_port, wait_listening

DIR = Path(__file__).resolve().parent.parent / "docs" / "prometheus"
RULES = DIR / "gateway-alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus, `make sysdeps`)"
)
# labels Prometheus adds or histograms carry
OUTSIDE = {"instance", "job", "le"}


def exprs(text: str) -> list[str]:
    """The ``expr:`` values of a rules file: one line, or a ``|`` block."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m is None:
            continue
        if m.group(2).strip() != "|":
            out.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt.strip())
        out.append(" ".join(block))
    return out


def used(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metrics an expression selects, each with the labels its
    selector matches on, and the labels of its ``by (...)`` clauses."""
    metrics: dict[str, set[str]] = {}
    for m in re.finditer(r"\b(gateway_[a-z0-9_]+)(\{([^}]*)\})?", expr):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(3) or ""))
        metrics.setdefault(m.group(1), set()).update(labels)
    by = {b.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", expr) for b in g.split(",")}
    return metrics, by


def test_exprs_and_used_read_what_they_should() -> None:
    text = (
        "expr: a > 0\n  - alert: X\n    expr: |\n      sum by (instance, cluster) (\n"
        '        rate(gateway_x_total{result="e",cluster=~"a|b"}[5m]))\n    for: 1m\n'
    )
    got = exprs(text)
    assert got == [
        "a > 0",
        'sum by (instance, cluster) ( rate(gateway_x_total{result="e",cluster=~"a|b"}[5m]))',
    ]
    assert used(got[1]) == ({"gateway_x_total": {"result", "cluster"}}, {"instance", "cluster"})


async def exported(tmp_path: Path) -> dict[str, set[str]]:
    """Sample name -> label names: a live scrape, then the registry's and
    the event counters' declarations (counters with labels show up only
    once counted)."""
    known: dict[str, set[str]] = {}
    desk_port = free_port()
    desk = subprocess.Popen(
        [sys.executable, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{desk_port}"],
        env=dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await trio.to_thread.run_sync(wait_listening, desk_port)
        extra = ("--downstream", f"general=127.0.0.1:{desk_port}")
        async with serving(tmp_path, 2, extra) as gw:
            # the workers' first snapshots with their links (once a second)
            await wait_until(lambda: "gateway_downstream_links_up{" in gw.get("/metrics")[1], 15)
            status, text = gw.get("/metrics")
            assert status == 200
    finally:
        desk.kill()
        desk.wait()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            known.setdefault(s.name, set()).update(s.labels)
    assert "gateway_downstream_links_up" in known  # the scrape saw the downstream
    for name, m in REGISTRY.metrics.items():
        if isinstance(m, Histogram):
            for suffix in ("_bucket", "_sum", "_count"):
                known.setdefault(name + suffix, set()).update(m.labelnames)
        else:
            known.setdefault(name, set()).update(m.labelnames)
    for name, labels in counter_labels().items():
        known.setdefault(name, set()).update(labels)
    return known


async def test_rules_name_only_what_the_gateway_exports(tmp_path: Path) -> None:
    known = await exported(tmp_path)
    all_exprs = exprs(RULES.read_text())
    assert len(all_exprs) == RULES.read_text().count("- alert:")
    for expr in all_exprs:
        metrics, by = used(expr)
        assert metrics, expr
        for name, labels in metrics.items():
            assert name in known, f"{name} (in {expr!r}) is not exported"
            assert labels <= known[name] | OUTSIDE, (name, labels - known[name])
        inner = set().union(*(known[n] for n in metrics)) | OUTSIDE
        assert by <= inner, (expr, by - inner)


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "15 rules found" in r.stdout
    r = subprocess.run(
        [PROMTOOL, "test", "rules", "gateway-alerts-test.yml"],
        cwd=DIR, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
