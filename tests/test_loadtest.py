"""`gateway loadtest`: option parsing, the sans-IO HTTP/2 client stream
against h2's server side, the HTML report, and whole runs of the CLI (client
processes) against a real gateway worker on loopback over WebSocket and
HTTP/2, with end-to-end sealing and a reconnect storm."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import msgpack
import pytest
import trio

from gateway import cli
from gateway.loadtest import native, runner
from gateway.loadtest.cli import Progress, parse_size_mix, parse_url, summary
from gateway.loadtest.engine import Engine, Plan, body_sequence
from gateway.loadtest.h2client import H2Error, H2Stream
from gateway.loadtest.report import CLIENT_BUSY_ADVICE, html_report, nice_ticks
from tests.gwserver import running


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("ws://127.0.0.1:8080/v1/ws", ("ws", False, "127.0.0.1", 8080, "/v1/ws")),
        ("http://gw.example:9000/v1/stream", ("h2", False, "gw.example", 9000, "/v1/stream")),
        ("http://127.0.0.1:81", ("h2", False, "127.0.0.1", 81, "/v1/stream")),
        ("ws://h", ("ws", False, "h", 80, "/v1/ws")),
        ("wss://chat.example/v1/ws", ("ws", True, "chat.example", 443, "/v1/ws")),
        ("https://chat.example:8443", ("h2", True, "chat.example", 8443, "/v1/stream")),
    ],
)
def test_parse_url(url: str, want: tuple[str, bool, str, int, str]) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize(
    ("url", "msg"),
    [
        ("ftp://h/", "unsupported URL scheme"),
        ("ws:///v1/ws", "no host"),
        ("ws://h:99999/", "bad port"),
    ],
)
def test_parse_url_refuses(url: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_url(url)


def test_size_mix() -> None:
    assert parse_size_mix("230") == (230, [])
    mean, mix = parse_size_mix("100:3,1000:1")
    assert mix == [[100, 3], [1000, 1]] and mean == 325
    for bad in ("0", "x", "100:0", "100:1,abc:2", str(17 << 20)):
        with pytest.raises(ValueError):
            parse_size_mix(bad)
    bodies = body_sequence(0, [[100, 3], [1000, 1]], n=4000)
    sizes = [len(b) for b in bodies]
    assert set(sizes) == {100, 1000}
    assert 0.70 < sizes.count(100) / len(sizes) < 0.80


def test_nice_ticks() -> None:
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 1.3) == [0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert nice_ticks(5, 5) == [5]


def _pump(a: Any, b: Any) -> list[Any]:
    data = a.data_to_send() if hasattr(a, "data_to_send") else a.out()
    return b.receive_data(data) if hasattr(b, "receive_data") else b.feed(data)


def test_h2_stream_against_h2_server() -> None:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    cl = H2Stream("127.0.0.1:1", "/v1/stream")
    cl.send(msgpack.packb({"t": "hello"}))
    events = server.receive_data(cl.out())
    req = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert dict(req.headers)[b":path"] == b"/v1/stream"
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert msgpack.unpackb(data[4:]) == {"t": "hello"}
    server.send_headers(req.stream_id, [(":status", "200")])
    a, b = msgpack.packb({"t": "welcome"}), msgpack.packb({"t": "ack", "id": 1})
    wire = struct.pack(">I", len(a)) + a + struct.pack(">I", len(b)) + b
    server.send_data(req.stream_id, wire[:7])
    got = cl.feed(server.data_to_send())
    server.send_data(req.stream_id, wire[7:])
    got += cl.feed(server.data_to_send())
    assert [msgpack.unpackb(f) for f in got] == [{"t": "welcome"}, {"t": "ack", "id": 1}]
    server.reset_stream(req.stream_id, 11)
    with pytest.raises(H2Error, match="h2_reset:11"):
        cl.feed(server.data_to_send())


def test_h2_stream_refused_status() -> None:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    cl = H2Stream("x", "/v1/stream")
    events = server.receive_data(cl.out())
    sid = next(e for e in events if isinstance(e, h2.events.RequestReceived)).stream_id
    server.send_headers(sid, [(":status", "503")], end_stream=True)
    with pytest.raises(H2Error, match="http:503"):
        cl.feed(server.data_to_send())


def test_progress_line_and_report() -> None:
    out = io.StringIO()
    p = Progress(10.0, 100, out)
    p({"t": 1.0, "open": 50, "acked": 0, "delivered": 0, "errors": 0})
    p({"t": 2.0, "open": 100, "acked": 500, "delivered": 20, "errors": 1})  # within 5 s: quiet
    p({"t": 6.5, "open": 100, "acked": 2700, "delivered": 80, "errors": 1})  # quiet
    p({"t": 7.0, "open": 100, "acked": 3000, "delivered": 90, "errors": 1})  # < 1 s window
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "open 50/100" in lines[0] and "open 100/100" in lines[1]
    assert "(489/s)" in lines[1]  # (2700 - 500) / 4.5 s, the last window of >= 1 s
    r = {
        "plan": {"connections": 2, "host": "h", "port": 1, "transport": "ws"},
        "counts": {"connected": 2, "acked": 10},
        "errors": {"code:4029": 3},
        "closes": {},
        "fatal": [],
        "rtt": {"count": 10, "p50_ms": 1, "p90_ms": 2, "p99_ms": 3, "p999_ms": 4, "max_ms": 5},
        "timeline": [[1.0, 2, 5, 0], [2.0, 2, 10, 0]],
        "latency_timeline": [[1, 1.0, 3.0, 4.0], [2, 1.2, 2.5, 5.0]],
        "rtt_percentiles": [[0, 0.5], [50, 1.0], [99, 3.0], [100, 5.0]],
        "ramp_seconds": 0.1,
    }
    page = html_report(r)
    assert page.count("<svg") == 4 and page.count("<polyline") == 5
    assert "code:4029" in page and "message round trip" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3", "")
    assert CLIENT_BUSY_ADVICE not in page and not any("client CPU" in x for x in summary(r))
    # the client processes' CPU time, and a warning when one was saturated
    r.update(client_cpu_s=0.25, client_busy_max=0.5)
    lines = summary(r)
    assert "client CPU 0.25 s, 25,000.0 µs per acked message; busiest client process 50%" in (
        "\n".join(lines)
    )
    assert not any(x.startswith("warning") for x in lines)
    assert CLIENT_BUSY_ADVICE not in html_report(r)
    r["client_busy_max"] = 0.93
    assert f"warning: {CLIENT_BUSY_ADVICE}" in summary(r)
    assert CLIENT_BUSY_ADVICE in html_report(r) and "93% of a core" in html_report(r)


def test_client_busy_is_taken_over_the_sending_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client process's busy share is its CPU while sending over the
    sending time, not diluted by a long ramp; without a sending window it
    falls back to the whole run."""
    got: list[dict[str, Any]] = []

    class Q:
        def put(self, m: dict[str, Any]) -> None:
            got.append(m)

    plan = Plan(host="127.0.0.1", port=1, tokens=["t"], connections=1)
    for send_s, send_cpu in ((2.0, 1.9), (0.0, 0.0)):

        class Fake:
            def __init__(self, p: Plan) -> None:
                pass

            def run(
                self, progress: Any = None, s: float = send_s, c: float = send_cpu
            ) -> dict[str, Any]:
                time.sleep(0.2)  # a run that waits, using no CPU
                return {"send_seconds": s, "send_cpu_seconds": c}

        monkeypatch.setattr(runner, "Engine", Fake)
        runner._child(dataclasses.asdict(plan), Q())
    assert got[0]["busy"] == pytest.approx(0.95) and "fatal" not in got[0]
    assert 0 <= got[1]["busy"] < 0.5  # the fake slept: the whole-run share


def test_client_cpu_counts_the_native_engines_process() -> None:
    """The CPU time a client process reports includes the child it waited
    for (``gw-loadgen``, for the native engine)."""
    import subprocess
    import sys

    before = runner.cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)  # fmt: skip
    assert runner.cpu_seconds() - before >= 0.25


async def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()

    def go() -> int:
        import contextlib

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return cli.main(argv)

    code = await trio.to_thread.run_sync(go)
    return code, out.getvalue()


def _secret(gw: Any) -> str:
    t = gw.w.cfg.tenants["demo"]
    return str(t.secrets[t.primary_kid].decode())


async def test_cli_websocket_run_with_reports(tmp_path: Path) -> None:
    async with running(tmp_path, visitor_msg_rate=0) as gw:
        js, page = tmp_path / "r.json", tmp_path / "r.html"
        code, out = await _cli(
            ["loadtest", "--url", f"ws://127.0.0.1:{gw.port}/v1/ws",
             "--token-secret", _secret(gw), "--connections", "60", "--ramp", "500",
             "--duration", "2", "--size", "50:1,500:1", "--json", str(js), "--html", str(page)]
        )  # fmt: skip
        assert code == 0, out
        r = json.loads(js.read_text())
        c = r["counts"]
        assert c["connected"] == 60 and r["open_at_end"] == 60 and c["disconnects"] == 0
        assert c["acked"] > 60 and r["rtt"]["count"] == c["acked"]
        assert r["errors"] == {} and r["fatal"] == []
        assert gw.stats["sessions_opened"] == 60
        assert gw.stats["messages_in_ws"] >= c["acked"]
        # the demo bot answers every message: deliveries = greetings + replies
        assert r["deliver"]["count"] >= c["acked"]
        assert "token_secret" not in r["plan"]
        assert r["latency_timeline"] and r["rtt_percentiles"][-1][0] == 100
        assert re.search(r"\[#*-*\] +\d", out), out  # the progress line
        assert f"messages acked {c['acked']:,}" in out
        assert r["client_cpu_s"] > 0 and 0 < r["client_busy_max"] <= 1.1
        html = page.read_text()
        assert html.count("<svg") == 4 and "60 / 60" in html


async def test_cli_h2_encrypted_with_storm(tmp_path: Path) -> None:
    async with running(tmp_path, visitor_msg_rate=0) as gw:
        js = tmp_path / "r.json"
        code, out = await _cli(
            ["loadtest", "--url", f"http://127.0.0.1:{gw.port}/v1/stream",
             "--token-secret", _secret(gw), "--connections", "40", "--ramp", "0",
             "--duration", "3", "--encrypt", "sm4-gcm", "--storm", "15", "--no-progress",
             "--json", str(js)]
        )  # fmt: skip
        assert code == 0, out
        r = json.loads(js.read_text())
        c = r["counts"]
        assert c["connected"] == 40 and c["acked"] > 40
        assert gw.stats["h2_streams"] >= 40 + 15 and gw.stats["ws_upgrades"] == 0
        assert c["sealed"] >= c["acked"] and c["opened"] > 0 and c["open_failed"] == 0
        assert c["storm_dropped"] == 15 and c["resumes"] == 15 and r["resume"]["count"] == 15
        assert gw.stats["sessions_resumed"] == 15
        assert "[" not in out.split("connected", 1)[0]  # --no-progress


async def test_cli_bad_usage_and_unreachable(tmp_path: Path) -> None:
    code, out = await _cli(["loadtest", "--url", "ftp://127.0.0.1:1/", "--token-secret", "x"])
    assert code == 2 and "unsupported URL scheme" in out
    empty = tmp_path / "tokens"
    empty.write_text("\n")
    code, out = await _cli(["loadtest", "--tokens", str(empty)])
    assert code == 2 and "no tokens" in out
    code, out = await _cli(["loadtest", "--window", "1025", "--token-secret", "x"])
    assert code == 2 and "--window at most 1,024" in out
    # a port bound and held, but not listening: connections to it are
    # refused, and no other test's server can take it meanwhile
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        code, out = await _cli(
            ["loadtest", "--url", f"ws://127.0.0.1:{port}/v1/ws", "--token-secret", "x" * 32,
             "--connections", "5", "--duration", "1", "--no-progress", "--max-runtime", "5"]
        )  # fmt: skip
    assert code == 1 and "connect:ECONNREFUSED 5" in out, out


async def test_cli_over_tls_wss_and_https(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_path, key_path, ca_path = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    async with running(
        tmp_path, visitor_msg_rate=0, tls_cert=str(cert_path), tls_key=str(key_path)
    ) as gw:
        for url in (f"wss://localhost:{gw.port}/v1/ws", f"https://localhost:{gw.port}/v1/stream"):
            js = tmp_path / "r.json"
            code, out = await _cli(
                ["loadtest", "--url", url, "--ca-file", str(ca_path), "--token-secret",
                 _secret(gw), "--connections", "20", "--ramp", "0", "--duration", "1.5",
                 "--no-progress", "--json", str(js)]
            )  # fmt: skip
            assert code == 0, out
            r = json.loads(js.read_text())
            assert r["counts"]["connected"] == 20 and r["counts"]["acked"] > 20, out
            assert r["errors"] == {}
        assert gw.stats["h2_streams"] == 20 and gw.stats["ws_upgrades"] == 20
        # without the CA the certificate is refused (and counted), not ignored
        code, out = await _cli(
            ["loadtest", "--url", f"wss://localhost:{gw.port}/v1/ws", "--token-secret",
             _secret(gw), "--connections", "3", "--duration", "0.5", "--no-progress",
             "--max-runtime", "10"]
        )  # fmt: skip
        assert code == 1 and "tls:CERTIFICATE_VERIFY_FAILED 3" in out, out
        code, out = await _cli(
            ["loadtest", "--url", f"wss://localhost:{gw.port}/v1/ws", "--insecure",
             "--token-secret", _secret(gw), "--connections", "3", "--duration", "0.5",
             "--no-progress"]
        )  # fmt: skip
        assert code == 0 and "connected 3 of 3" in out, out


def test_open_loop_sends_are_paced_in_small_steps() -> None:
    from gateway.loadtest.engine import send_wait

    assert send_wait(0.0, 2000) == 0.001  # 0.5 ms away: the 1 ms floor
    assert send_wait(0.5, 100) == pytest.approx(0.005)
    assert send_wait(0.0, 1) == 0.05  # never sleeps past 50 ms (other work)
    assert send_wait(3.0, 10) == 0.001  # owed already: poll, then send


def _run_against_sync_server(handler: Any, engine: str, **plan: Any) -> dict[str, Any]:
    """Runs an echo-mode plan with ``engine`` against a websockets sync
    server calling ``handler`` per connection; the engine's result."""
    import threading

    from websockets.sync.server import serve

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        p = Plan(host="127.0.0.1", port=port, mode="echo", max_runtime=10, engine=engine, **plan)
        r = native.run(p) if engine == "native" else Engine(p).run()
        server.shutdown()
    return r


@pytest.mark.parametrize("engine", ["python", "native"])
@pytest.mark.parametrize("window", [1, 8])
def test_window_keeps_that_many_messages_in_flight(window: int, engine: str) -> None:
    """An echo server that answers only once a burst has stopped growing
    sees exactly ``window`` messages per burst from each connection (both
    engines, against the websockets library's server)."""
    from websockets.sync.server import ServerConnection

    bursts: list[int] = []

    def handler(ws: ServerConnection) -> None:
        try:
            while True:
                got = [ws.recv()]
                while True:
                    try:
                        got.append(ws.recv(timeout=0.15))
                    except TimeoutError:
                        break
                bursts.append(len(got))
                for m in got:
                    ws.send(m)
        except Exception:  # the client went away
            return

    r = _run_against_sync_server(handler, engine, connections=2, active=2, window=window,
                                 duration=1.2)  # fmt: skip
    c = r["counts"]
    assert len(bursts) >= 6 and max(bursts) == window and bursts[:2] == [window, window]
    assert c["acked"] >= 4 * window and c["sent"] - c["acked"] <= 2 * window


@pytest.mark.parametrize("engine", ["python", "native"])
def test_rate_paces_messages_over_the_active_connections(engine: str) -> None:
    """Open loop: ``rate`` messages a second, round robin over the first
    ``active`` connections only (both engines, against the websockets
    library's echo server, which counts what each connection sent)."""
    import threading

    from websockets.sync.server import ServerConnection

    per_conn: list[int] = []
    lock = threading.Lock()

    def handler(ws: ServerConnection) -> None:
        with lock:
            k = len(per_conn)
            per_conn.append(0)
        try:
            for m in ws:
                with lock:
                    per_conn[k] += 1
                ws.send(m)
        except Exception:  # the client went away
            return

    r = _run_against_sync_server(handler, engine, connections=6, active=3, rate=300.0,
                                 window=4, duration=1.5)  # fmt: skip
    c = r["counts"]
    assert len(per_conn) == 6 and sorted(per_conn)[:3] == [0, 0, 0]
    busy = [n for n in per_conn if n]
    assert len(busy) == 3 and max(busy) - min(busy) <= 0.2 * max(busy) + 2, per_conn
    # 1.5 s at 300/s; loaded CI machines run late, never early
    assert 250 <= c["sent"] <= 470 and c["sent"] == sum(per_conn), (c, per_conn)
    assert c["acked"] >= c["sent"] - 3 * 4


async def _loadtest_ws(gw: Any, tmp_path: Path, *opts: str) -> tuple[str, dict[str, Any]]:
    """``gateway loadtest`` over WebSocket against ``gw`` with ``opts``;
    asserts it exits 0 and returns its output and its JSON result."""
    js = tmp_path / "r.json"
    code, out = await _cli(
        ["loadtest", "--url", f"ws://127.0.0.1:{gw.port}/v1/ws", "--token-secret", _secret(gw),
         "--ramp", "0", "--no-progress", "--json", str(js), *opts]
    )  # fmt: skip
    assert code == 0, out
    return out, json.loads(js.read_text())


async def test_cli_window_against_the_gateway(tmp_path: Path) -> None:
    async with running(tmp_path, visitor_msg_rate=0) as gw:
        _, r = await _loadtest_ws(
            gw, tmp_path, "--connections", "4", "--window", "16", "--duration", "1"
        )
        c = r["counts"]
        assert r["plan"]["window"] == 16 and r["errors"] == {} and c["dup_acks"] == 0
        assert c["acked"] >= 4 * 16 and gw.stats["messages_in_ws"] >= c["acked"]
        # the gateway held no more than the window unacknowledged per session
        assert gw.stats["window_exceeded"] == 0


async def test_native_engine_against_the_gateway(tmp_path: Path) -> None:
    async with running(tmp_path, visitor_msg_rate=0) as gw:
        out, r = await _loadtest_ws(
            gw, tmp_path, "--engine", "native", "--connections", "20", "--window", "4",
            "--duration", "1.5",
        )  # fmt: skip
        c = r["counts"]
        assert c["connected"] == 20 and r["open_at_end"] == 20 and c["disconnects"] == 0
        assert r["errors"] == {} and r["fatal"] == [] and c["dup_acks"] == 0
        assert c["acked"] >= 20 * 4 and r["rtt"]["count"] == c["acked"]
        assert c["sent"] - c["acked"] <= 20 * 4  # never more than the window in flight
        assert gw.stats["sessions_opened"] == 20 and gw.stats["messages_in_ws"] >= c["acked"]
        # the demo bot answers every message; the engine counts the deliveries
        assert c["delivered"] >= c["acked"]
        assert r["connect"]["count"] == 20 and r["latency_timeline"]
        assert f"messages acked {c['acked']:,}" in out
        # the client's own CPU time: gw-loadgen's, at most one core's worth
        assert r["client_cpu_s"] > 0 and 0 < r["client_busy_max"] <= 1.1
        assert "client CPU" in out


async def test_native_engine_counts_refusals_like_the_python_engine(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("not.a-token\n")
    async with running(tmp_path, visitor_msg_rate=0) as gw:
        outs = []
        for engine in ("python", "native"):
            code, out = await _cli(
                ["loadtest", "--url", f"ws://127.0.0.1:{gw.port}/v1/ws", "--tokens", str(bad),
                 "--engine", engine, "--connections", "3", "--ramp", "0", "--duration", "0.2",
                 "--no-progress", "--max-runtime", "5"]
            )  # fmt: skip
            assert code == 1, out
            outs.append(out.splitlines()[-1])
        assert outs[0] == outs[1] and "code:4501 3" in outs[1], outs


async def test_native_engine_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = ["loadtest", "--url", "ws://127.0.0.1:1/v1/ws", "--token-secret", "x" * 32]
    for extra, msg in [
        (["--hold", "1"], "does not support --hold"),
        (["--storm", "2"], "does not support --storm"),
        (["--size", "10:1,20:1"], "does not support a size mix"),
    ]:
        code, out = await _cli([*url, "--engine", "native", *extra])
        assert code == 2 and msg in out, out
    code, out = await _cli(
        ["loadtest", "--url", "http://127.0.0.1:1/v1/stream", "--token-secret", "x" * 32,
         "--engine", "native"]
    )  # fmt: skip
    assert code == 2 and "does not support HTTP/2" in out
    monkeypatch.setenv(native.BINARY_ENV, str(tmp_path / "missing"))
    code, out = await _cli([*url, "--engine", "native"])
    assert code == 2 and "not an executable" in out
