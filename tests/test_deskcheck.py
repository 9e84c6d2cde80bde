"""``gateway desk-check``: every check passes against desk-sim (h2c and
TLS, batched or single acks), and each kind of broken downstream fails the
check it breaks."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.downstream.desk import DeskConfig
from gateway.downstream.deskcheck import Target, run_checks
from gateway.downstream.tls import server_context
from tests.test_downstream import desk
from tests.test_downstream_tls import Pki


async def _check(port: int, **target: Any) -> tuple[int, str]:
    out = io.StringIO()
    rc = await run_checks(Target("127.0.0.1", port, timeout_s=2.0, **target), out)
    return rc, out.getvalue()


@pytest.mark.parametrize("batch_acks", [True, False], ids=["acks", "single-acks"])
async def test_desk_sim_passes_every_check(batch_acks: bool) -> None:
    async with desk(batch_acks=batch_acks, think_ms=0) as (port, _, _):
        rc, out = await _check(port)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == "ok   link: HTTP 200 on /v1/link, features: moved"
    assert [ln.split(":")[0] for ln in lines[1:-1]] == [
        "ok   ack", "ok   duplicate", "ok   large-frame", "ok   close", "ok   ping", "ok   moved",
    ]  # fmt: skip
    assert lines[-1].startswith("all checks passed")


async def test_over_tls_and_with_a_required_header(tmp_path: Path) -> None:
    pki = Pki(tmp_path, "127.0.0.1")
    import ssl

    ctx = ssl.create_default_context(cafile=pki.ca_file)
    ctx.set_alpn_protocols(["h2"])
    srv_ctx = server_context(pki.cert, pki.key, None)
    async with desk(ssl_context=srv_ctx, require_headers=(("authorization", "Bearer t"),)) as (
        port,
        _,
        _,
    ):
        rc, out = await _check(port, ssl_context=ctx)
        assert rc == 2 and "FAIL link: the link request was answered with HTTP 401" in out
        rc, out = await _check(port, ssl_context=ctx, headers=[("authorization", "Bearer t")])
        assert rc == 0, out


async def test_a_downstream_that_does_not_ack_repeats_fails_that_check() -> None:
    async with desk(think_ms=0, violate=("no-dup-ack",)) as (port, _, _):
        rc, out = await _check(port)
    assert rc == 1
    assert "FAIL duplicate: no ack of the repeated message 1 within 2 s" in out
    assert "ok   ack:" in out and "ok   close:" in out and "1 check(s) failed" in out


@pytest.mark.parametrize("batch_acks", [True, False], ids=["acks", "single-acks"])
async def test_a_malformed_frame_fails_the_check(batch_acks: bool) -> None:
    async with desk(batch_acks=batch_acks, violate=("bad-ack",)) as (port, _, _):
        rc, out = await _check(port)
    assert rc == 1 and "FAIL ack: a malformed frame from the downstream" in out, out


async def test_without_the_moved_feature_that_check_is_skipped() -> None:
    async with desk(think_ms=0, violate=("no-moved",)) as (port, _, _):
        rc, out = await _check(port)
    assert rc == 0, out
    assert "features: none" in out
    assert "ok   moved: skipped: the downstream does not announce the 'moved' feature" in out


def test_an_unknown_violation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown violation 'nope'"):
        DeskConfig(violate=("nope",))


async def test_nothing_listening_exits_2() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refused
        rc, out = await _check(port)
    assert rc == 2 and out.startswith("FAIL link:")


@contextlib.contextmanager
def _desk_sim_process(*extra: str) -> Iterator[int]:
    """A ``gateway desk-sim`` process (with ``extra`` options) on a free
    port; yields the port."""
    from tests.test_server_process import free_port, wait_listening

    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "gateway", "desk-sim", "--listen", f"127.0.0.1:{port}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port)
        yield port
    finally:
        sim.terminate()
        sim.wait(15)


def _desk_check(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "desk-check", f"127.0.0.1:{port}", *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_command_line() -> None:
    """``gateway desk-check`` against a ``gateway desk-sim`` process."""
    with _desk_sim_process() as port:
        r = _desk_check(port)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all checks passed" in r.stdout
        r = _desk_check(port, "--ca-file", "x")
        assert r.returncode == 2 and "go with --tls" in r.stderr


def test_violations_from_the_command_line() -> None:
    """``desk-sim --violate``: desk-check against that process fails the
    checks the violations break; an unknown name is refused."""
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "desk-sim", "--violate", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr, r.stderr
    with _desk_sim_process("--violate", "bad-ack", "--violate", "no-moved") as port:
        r = _desk_check(port)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "features: none" in r.stdout
        assert "FAIL ack: a malformed frame from the downstream" in r.stdout


async def test_a_silent_server_is_reported_after_the_timeout() -> None:
    """Accepts the connection and never answers the link request."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[Any] = []

    async def accept(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            held.append(await listeners[0].accept())

    async with trio.open_nursery() as n:
        await n.start(accept)
        with trio.fail_after(10):
            out = io.StringIO()
            rc = await run_checks(Target("127.0.0.1", port, timeout_s=0.5), out)
        n.cancel_scope.cancel()
    assert rc == 2 and out.getvalue() == "FAIL link: no answer to the link request\n"
    for s in held:
        await s.aclose()
    await listeners[0].aclose()
