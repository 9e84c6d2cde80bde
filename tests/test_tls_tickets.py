"""Shared TLS session-ticket keys (gateway.server.tickets): a visitor's
ticket resumes on another worker of the node and, with a key file, on
another node; the key file's bad inputs; the resumption counter."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

import gateway.server.worker as worker_mod
from gateway.config import ConfigError, load_config
from gateway.reload import file_sets, plan_reload
from gateway.server import tickets
from gateway.server.tlsconf import visitor_context
from tests.gwserver import running
from tests.test_server_h2 import _tls
from tests.test_server_process import free_port, stop, wait_listening


@pytest.fixture
def certs(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    """The gateway's certificate and key files, and a client that trusts them."""
    return _tls(tmp_path)


def _bio_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A client handshake with ``server`` over memory buffers, then one
    byte from the server (which carries TLS 1.3's tickets); the client."""
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(ci, co, server_hostname="localhost", session=session)
    s = server.wrap_bio(si, so, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        si.write(co.read())
        ci.write(so.read())
    s.write(b"x")
    ci.write(so.read())
    assert c.read(1) == b"x"
    return c


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_contexts_with_one_key_resume_each_others_tickets(
    certs: tuple[str, str, ssl.SSLContext], version: ssl.TLSVersion
) -> None:
    cert, key_file, client = certs
    client.maximum_version = version
    key = tickets.new_key()
    a = visitor_context(cert, key_file, shared_key=key)
    b = visitor_context(cert, key_file, shared_key=key)
    other = visitor_context(cert, key_file, shared_key=tickets.new_key())
    own = visitor_context(cert, key_file)  # OpenSSL's own keys
    first = _bio_handshake(a, client)
    assert first.version() == {"TLSv1_3": "TLSv1.3", "TLSv1_2": "TLSv1.2"}[version.name]
    assert not first.session_reused
    assert _bio_handshake(b, client, first.session).session_reused
    assert _bio_handshake(a, client, first.session).session_reused
    assert not _bio_handshake(other, client, first.session).session_reused
    assert not _bio_handshake(own, client, first.session).session_reused


def test_install_checks_its_inputs(certs: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key_file, client = certs
    ctx = visitor_context(cert, key_file)
    with pytest.raises(ValueError, match="80 bytes, not 79"):
        tickets.install(ctx, bytes(79))
    # a client context is not a server's: left alone
    assert tickets.install(client, tickets.new_key()) is False
    assert tickets.install(ctx, tickets.new_key()) is True
    assert ctx.num_tickets == 2  # the probe put it back


def test_key_file_errors(tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key_file, client = certs
    with pytest.raises(tickets.TicketKeyError, match="cannot read"):
        tickets.read_key(str(tmp_path / "missing"))
    for size, tail in ((79, "not 79"), (81, "not 81 or more"), (0, "not 0")):
        p = tmp_path / f"k{size}"
        p.write_bytes(os.urandom(size))
        with pytest.raises(tickets.TicketKeyError, match=f"exactly 80 bytes .*{tail}"):
            tickets.read_key(str(p))
        with pytest.raises(ConfigError, match=r"tls_ticket_key: .*exactly 80 bytes"):
            visitor_context(cert, key_file, str(p))
    good = tmp_path / "ticket.key"
    good.write_bytes(os.urandom(80))
    a = visitor_context(cert, key_file, str(good), shared_key=tickets.new_key())
    b = visitor_context(cert, key_file, str(good))  # the file wins over the shared key
    assert _bio_handshake(b, client, _bio_handshake(a, client).session).session_reused


def test_key_from_env() -> None:
    key = tickets.new_key()
    assert tickets.key_from_env({tickets.KEY_ENV: tickets.key_to_env(key)}) == key
    for bad in ("", "zz" * 80, "ab" * 79):
        assert tickets.key_from_env({tickets.KEY_ENV: bad}) is None
    assert tickets.key_from_env({}) is None


def test_config_and_reload_plan(tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key_file, _ = certs
    env = {"GATEWAY_STATE_DIR": str(tmp_path)}
    k1, k2 = tmp_path / "t1.key", tmp_path / "t2.key"
    k1.write_bytes(os.urandom(80))
    k2.write_bytes(os.urandom(80))
    with pytest.raises(ConfigError, match="tls_ticket_key: only with tls_cert"):
        load_config(None, env, {"tls_ticket_key": str(k1)})
    with pytest.raises(ConfigError, match="tls_ticket_key: no such file"):
        load_config(None, env, {"tls_cert": cert, "tls_key": key_file, "tls_ticket_key": "/no"})
    tls = {"tls_cert": cert, "tls_key": key_file}
    plain = load_config(None, env, tls)
    a = load_config(None, env, {**tls, "tls_ticket_key": str(k1)})
    b = load_config(None, env, {**tls, "tls_ticket_key": str(k2)})
    assert file_sets(a)["tls"] == (cert, key_file, str(k1))
    assert file_sets(plain)["tls"] == (cert, key_file)
    for old, new in ((plain, a), (a, b), (a, plain)):
        plan = plan_reload(old, new)
        assert plan.tls and not plan.needs_restart, (old.tls_ticket_key, new.tls_ticket_key)
    assert not plan_reload(a, a).tls
    assert plan_reload(a, a, ["tls"]).tls  # new contents in the same file


def _get(
    port: int,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    source: str = "127.0.0.1",
) -> tuple[ssl.SSLSession, bool]:
    """GET /widget.js over TLS from ``source``; the session (with the
    server's tickets, which come with the response) and whether the
    handshake resumed ``session``."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with client.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(b"GET /widget.js HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        sess = s.session
        assert sess is not None
        return sess, s.session_reused


def _serve(
    tmp_path: Path, port: int, ops: int, workers: int, **env: str
) -> subprocess.Popen[bytes]:
    e = dict(os.environ, GATEWAY_STATE_DIR=str(tmp_path), GATEWAY_OPS_LISTEN=f"127.0.0.1:{ops}")
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--workers", str(workers)],
        env={**e, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _handshakes(ops: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=5).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^gateway_tls_handshakes_total\{resumed="(\w+)"\} (\S+)$', text, re.M)
    }


def _api(ops: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{ops}/api/stats", timeout=5) as r:
        got: dict[str, Any] = json.loads(r.read())
    return got


def _wait_handshakes(ops: int, want: dict[str, float]) -> dict[str, float]:
    end = time.monotonic() + 10
    got: dict[str, float] = {}
    while time.monotonic() < end:
        got = _handshakes(ops)
        if got == want:
            break
        time.sleep(0.2)
    return got


def test_a_ticket_resumes_on_every_worker_of_the_node(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]
) -> None:
    """`gateway serve --workers 2` with no key file: the supervisor's key.
    Twelve reconnects from twelve source addresses (SO_REUSEPORT spreads
    them over both workers; all on the issuing one: 1 in 4,096) all
    resume, and /metrics counts them; so do twelve more after a worker was
    killed and restarted (the supervisor keeps the key)."""
    cert, key_file, client = certs
    port, ops = free_port(), free_port()
    proc = _serve(tmp_path, port, ops, 2, GATEWAY_TLS_CERT=cert, GATEWAY_TLS_KEY=key_file)
    try:
        wait_listening(port)
        time.sleep(0.5)  # both workers bound
        sess, reused = _get(port, client)
        assert not reused
        resumed = [_get(port, client, sess, f"127.0.0.{10 + i}")[1] for i in range(12)]
        assert resumed == [True] * 12
        assert _wait_handshakes(ops, {"false": 1, "true": 12}) == {"false": 1, "true": 12}

        pids = [w["pid"] for w in _api(ops)["workers"]]
        os.kill(pids[0], signal.SIGKILL)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            now = [w["pid"] for w in _api(ops)["workers"] if w.get("up", True)]
            if len(now) == 2 and pids[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and pids[0] not in now, now
        wait_listening(port)
        time.sleep(0.5)  # the new worker bound
        resumed = [_get(port, client, sess, f"127.0.0.{40 + i}")[1] for i in range(12)]
        assert resumed == [True] * 12
    finally:
        out = stop(proc)
    assert "Traceback" not in out, out


def test_a_ticket_key_file_resumes_tickets_on_another_node(
    tmp_path: Path, certs: tuple[str, str, ssl.SSLContext]
) -> None:
    """Two nodes with the same `tls_ticket_key` file resume each other's
    tickets; a third node without it does a full handshake."""
    cert, key_file, client = certs
    shared = tmp_path / "ticket.key"
    shared.write_bytes(os.urandom(80))
    tls = {"GATEWAY_TLS_CERT": cert, "GATEWAY_TLS_KEY": key_file}
    nodes = []
    try:
        for i, extra in enumerate(({"GATEWAY_TLS_TICKET_KEY": str(shared)},) * 2 + ({},)):
            port, ops = free_port(), free_port()
            state = tmp_path / f"node{i}"
            state.mkdir()
            nodes.append((port, _serve(state, port, ops, 1, **tls, **extra)))
        for port, _ in nodes:
            wait_listening(port)
        (a, _), (b, _), (c, _) = nodes
        sess, _ = _get(a, client)
        assert _get(b, client, sess)[1] is True
        assert _get(c, client, sess)[1] is False
    finally:
        outs = [stop(p) for _, p in nodes]
    assert not any("Traceback" in o for o in outs), outs


@pytest.mark.parametrize("reactor", [True, False], ids=["reactor", "task"])
async def test_resumed_handshakes_are_counted(
    tmp_path: Path,
    certs: tuple[str, str, ssl.SSLContext],
    reactor: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_mod, "TLS_REACTOR", reactor)
    cert, key_file, client = certs
    async with running(tmp_path, tls_cert=cert, tls_key=key_file) as gw:
        sess, reused = await trio.to_thread.run_sync(_get, gw.port, client)
        again = await trio.to_thread.run_sync(_get, gw.port, client, sess)
        assert (reused, again[1]) == (False, True)
        stats = gw.w.hub.stats
        assert (stats["tls_full"], stats["tls_resumed"]) == (1, 1)


def test_without_a_reachable_libssl(
    tmp_path: Path,
    certs: tuple[str, str, ssl.SSLContext],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the keys cannot be set (no libssl found, as with an OpenSSL
    built into ``_ssl``): a configured file stops the start; the
    supervisor's key only costs a warning, and tickets stay per context."""
    cert, key_file, client = certs
    monkeypatch.setattr(tickets, "_LIB", [None])
    assert tickets.install(visitor_context(cert, key_file), tickets.new_key()) is False
    good = tmp_path / "ticket.key"
    good.write_bytes(os.urandom(80))
    with pytest.raises(ConfigError, match="tls_ticket_key: this Python's ssl module"):
        visitor_context(cert, key_file, str(good))
    key = tickets.new_key()
    with caplog.at_level("WARNING", logger="gateway.tls"):
        a = visitor_context(cert, key_file, shared_key=key)
    assert "resume only on the worker that issued them" in caplog.text
    b = visitor_context(cert, key_file, shared_key=key)
    first = _bio_handshake(a, client)
    assert _bio_handshake(a, client, first.session).session_reused
    assert not _bio_handshake(b, client, first.session).session_reused


def test_visitor_context_refuses_renegotiation_and_old_versions(
    certs: tuple[str, str, ssl.SSLContext],
) -> None:
    """TLS 1.2 renegotiation would let one connection ask for full
    handshake after full handshake; the context refuses it whatever
    OpenSSL's default, and TLS before 1.2."""
    cert, key_file, _ = certs
    ctx = visitor_context(cert, key_file)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
