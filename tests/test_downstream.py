"""Downstream forwarding end to end on loopback: a gateway worker linked over
HTTP/2 to desk-sim servers (in-process, real sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

import gateway.client as gc
from gateway.downstream.desk import DeskConfig
from gateway.downstream.desksim import DeskServer, serve_desk
from tests.gwserver import running


@asynccontextmanager
async def desk(
    port: int = 0, record: Path | None = None, **cfg: Any
) -> AsyncIterator[tuple[int, DeskServer, trio.CancelScope]]:
    async with trio.open_nursery() as n:
        scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_desk(
                    DeskConfig(**cfg),
                    "127.0.0.1",
                    port,
                    str(record) if record else None,
                    task_status=task_status,
                )

        bound, srv = await n.start(run)
        yield bound, srv, scope
        n.cancel_scope.cancel()


def ds(*groups: tuple[str, list[int]], **extra: Any) -> dict[str, Any]:
    """A [downstream] table: one cluster and group per (name, ports)."""
    table: dict[str, Any] = {
        "clusters": {g: {"endpoints": [f"127.0.0.1:{p}" for p in ports]} for g, ports in groups},
        "groups": {g: {"cluster": g} for g, _ in groups},
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
    }
    table.update(extra)
    return table


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_links_up(fw: Any, n: int = 1, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while sum(1 for ln in fw.links if ln.up) < n:
            await trio.sleep(0.02)


async def test_message_reaches_desk_is_acked_and_answered(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    async with desk(record=rec, think_ms=0) as (dport, srv, _):  # noqa: SIM117
        async with running(tmp_path, downstream=ds(("general", [dport]))) as gw:
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("alice"), reconnect=False) as s:
                await s.send("hello desk")
                assigned = await s.receive()
                reply = await s.receive()
    assert (assigned.sender_kind, assigned.sender_name) == ("system", "assign")
    assert assigned.body == "general-agent-1 joined the conversation"
    assert reply.body == "general-agent-1: noted 'hello desk'"
    assert (reply.sender_kind, reply.sender_name) == ("agent", "general-agent-1")
    got = records(rec)
    assert [(r["n"], r["body"]) for r in got] == [(1, "hello desk")]
    assert srv.desk.stats["opens"] >= 1
