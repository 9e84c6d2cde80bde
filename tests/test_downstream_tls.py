"""Downstream links over TLS on loopback: a gateway worker and desk-sim
(in-process, real sockets, certificates from a throwaway CA), with the
server's certificate verified, a name other than the endpoint's host
(``server_name``), and client certificates (mutual TLS); what an operator
sees when the TLS setup is wrong; the configuration checks; link request
headers (a bearer token) that a downstream checks."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import gateway.client as gc
from gateway.config import ConfigError, load_config
from gateway.downstream.settings import parse_settings
from gateway.downstream.tls import TlsBio, client_context, server_context
from gateway.ops import names as metrics
from tests.gwserver import RawWs, running
from tests.test_downstream import desk, records, wait_links_up


def _write(tmp: Path, name: str, blob: Any) -> str:
    p = tmp / name
    blob.write_to_path(str(p))
    return str(p)


class Pki:
    """A CA, desk-sim's certificate (for ``names``), and files for both."""

    def __init__(self, tmp: Path, *names: str) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert(*names)
        self.ca_file = _write(tmp, f"ca-{id(self)}.pem", self.ca.cert_pem)
        self.cert = _write(tmp, f"cert-{id(self)}.pem", leaf.private_key_and_cert_chain_pem)
        self.key = _write(tmp, f"key-{id(self)}.pem", leaf.private_key_pem)

    def client(self, tmp: Path, name: str = "gateway-1") -> tuple[str, str]:
        """A client certificate signed by this CA: (chain file, key file)."""
        leaf = self.ca.issue_cert(name)
        return (
            _write(tmp, f"client-{name}.pem", leaf.private_key_and_cert_chain_pem),
            _write(tmp, f"client-{name}.key", leaf.private_key_pem),
        )


def tls_ds(port: int, **cluster: Any) -> dict[str, Any]:
    return {
        "clusters": {"general": {"endpoints": [f"127.0.0.1:{port}"], "tls": True, **cluster}},
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
    }


def _failures(fw: Any) -> float:
    key = fw.links[0].key
    return float(metrics.DOWNSTREAM_CONNECT_FAILURES.labels("general", key).value())


async def _refused_then_logged(gw: Any, caplog: pytest.LogCaptureFixture, text: str) -> None:
    """No link comes up: a new visitor is told to retry later (4003), the
    connect failures are counted, and one log line says why."""
    fw = gw.w.forwarder
    before = _failures(fw)
    with trio.fail_after(10):
        while _failures(fw) < before + 2:
            await trio.sleep(0.05)
    assert not any(ln.up for ln in fw.links)
    ws = await RawWs.connect(gw.port)
    err = await ws.hello(gw.token("v"))
    assert err["t"] == "error" and err["code"] == 4003
    lines = [
        r.getMessage() for r in caplog.records if "downstream_connect_failed" in r.getMessage()
    ]
    assert any(text in line for line in lines), lines
    # a reason is logged when it differs from the link's last one, not on
    # every retry (a desk closing a connection it refused may show as a
    # reset or as an end of file, depending on timing: both are logged)
    whys = [json.loads(line[line.index("{") :])["why"] for line in lines]
    assert all(a != b for a, b in itertools.pairwise(whys)), whys


async def test_tls_link_forwards_and_acks(tmp_path: Path) -> None:
    pki = Pki(tmp_path, "127.0.0.1")
    rec = tmp_path / "rec.jsonl"
    ctx = server_context(pki.cert, pki.key)
    async with desk(record=rec, think_ms=0, ssl_context=ctx) as (port, srv, _):  # noqa: SIM117
        async with running(tmp_path, downstream=tls_ds(port, ca_file=pki.ca_file)) as gw:
            await wait_links_up(gw.w.forwarder)
            # read by the worker's event loop, as a plain link is (TlsBio)
            assert gw.w.forwarder.links[0]._watch is not None
            async with gc.connect(gw.url, token=gw.token("alice"), reconnect=False) as s:
                n = await s.send("over TLS")
                assigned = await s.receive()
                reply = await s.receive()
    assert n == 1
    assert assigned.body == "general-agent-1 joined the conversation"
    assert reply.body == "general-agent-1: noted 'over TLS'"
    assert [r["body"] for r in records(rec)] == ["over TLS"]
    assert srv.tls_failures == 0


async def test_untrusted_desk_certificate_keeps_the_link_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    desk_pki, other = Pki(tmp_path, "127.0.0.1"), Pki(tmp_path, "127.0.0.1")
    ctx = server_context(desk_pki.cert, desk_pki.key)
    caplog.set_level(logging.WARNING)
    async with desk(ssl_context=ctx) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=tls_ds(port, ca_file=other.ca_file)) as gw:
            await _refused_then_logged(gw, caplog, "certificate verify failed")


async def test_server_name_verifies_a_certificate_for_another_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint is an IP address, the certificate names desk.internal:
    refused unless ``server_name`` says which name to expect."""
    pki = Pki(tmp_path, "desk.internal")
    ctx = server_context(pki.cert, pki.key)
    caplog.set_level(logging.WARNING)
    async with desk(think_ms=0, ssl_context=ctx) as (port, _, _):
        async with running(tmp_path, downstream=tls_ds(port, ca_file=pki.ca_file)) as gw:
            await _refused_then_logged(gw, caplog, "match")
        named = tls_ds(port, ca_file=pki.ca_file, server_name="desk.internal")
        async with running(tmp_path, downstream=named) as gw:
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("bob"), reconnect=False) as s:
                assert await s.send("named") == 1


async def test_mutual_tls_needs_a_client_certificate_from_the_desks_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path, "127.0.0.1")
    clients = Pki(tmp_path, "unused")  # the CA desk-sim trusts for clients
    stranger = Pki(tmp_path, "unused")
    ctx = server_context(pki.cert, pki.key, client_ca=clients.ca_file)
    rec = tmp_path / "rec.jsonl"
    caplog.set_level(logging.WARNING)
    async with desk(record=rec, think_ms=0, ssl_context=ctx) as (port, srv, _):
        # no client certificate: the desk ends the handshake with an alert
        # (TLS 1.3: the gateway reads it after its side of the handshake)
        async with running(tmp_path, downstream=tls_ds(port, ca_file=pki.ca_file)) as gw:
            await _refused_then_logged(gw, caplog, "certificate required")
        assert srv.tls_failures >= 2
        # a certificate from a CA the desk does not trust: refused too
        cert, key = stranger.client(tmp_path, "intruder")
        spec = tls_ds(port, ca_file=pki.ca_file, cert_file=cert, key_file=key)
        caplog.clear()
        async with running(tmp_path, downstream=spec) as gw:
            await _refused_then_logged(gw, caplog, "unknown ca")
        # one from the desk's client CA: served
        cert, key = clients.client(tmp_path)
        spec = tls_ds(port, ca_file=pki.ca_file, cert_file=cert, key_file=key)
        async with running(tmp_path, downstream=spec) as gw:
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("carol"), reconnect=False) as s:
                assert await s.send("mutual") == 1
    assert [r["body"] for r in records(rec)] == ["mutual"]


async def test_plain_gateway_against_a_tls_desk_and_the_reverse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster without ``tls`` pointed at a TLS desk, and one with ``tls``
    pointed at an h2c desk: no link, the reason logged, visitors asked to
    retry later; nothing crashes on either side."""
    pki = Pki(tmp_path, "127.0.0.1")
    caplog.set_level(logging.WARNING)
    ctx = server_context(pki.cert, pki.key)
    async with desk(ssl_context=ctx) as (port, srv, _):
        plain = {
            "clusters": {"general": {"endpoints": [f"127.0.0.1:{port}"]}},
            "health_interval_s": 0.2,
        }
        async with running(tmp_path, downstream=plain) as gw:
            await _refused_then_logged(gw, caplog, "closed during link setup")
        assert srv.tls_failures >= 1
    caplog.clear()
    async with desk() as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=tls_ds(port, ca_file=pki.ca_file)) as gw:
            await _refused_then_logged(gw, caplog, "connect failed")


async def test_link_that_never_comes_up_backs_off(tmp_path: Path) -> None:
    """A desk that accepts the connection and then drops it before the link
    is up (here: it wants a client certificate the gateway does not have,
    which TLS 1.3 tells the client only at its first read) is retried with
    growing backoff (up to 5 s), not every 50 ms: a handful of attempts in
    2 s."""
    pki, clients = Pki(tmp_path, "127.0.0.1"), Pki(tmp_path, "unused")
    ctx = server_context(pki.cert, pki.key, client_ca=clients.ca_file)
    async with desk(ssl_context=ctx) as (port, _, _):  # noqa: SIM117
        async with running(tmp_path, downstream=tls_ds(port, ca_file=pki.ca_file)) as gw:
            fw = gw.w.forwarder
            with trio.fail_after(5):
                while _failures(fw) < 1:
                    await trio.sleep(0.01)
            before = _failures(fw)
            await trio.sleep(2.0)
            tries = _failures(fw) - before
    # 50 ms doubling, jittered by [0.5, 1.5): about 6 attempts in 2 s;
    # without backoff it would be ~40
    assert 2 <= tries <= 10


# -- configuration ----------------------------------------------------------------


def _cluster(**keys: Any) -> dict[str, Any]:
    return {"clusters": {"c": {"endpoints": ["10.0.0.1:7001"], **keys}}}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"tls": "yes"}, "tls must be true or false"),
        ({"ca_file": "/x.pem"}, "ca_file needs tls = true"),
        ({"server_name": "desk"}, "server_name needs tls = true"),
        ({"tls": True, "cert_file": "/c.pem"}, "cert_file and key_file go together"),
        ({"tls": True, "key_file": "/k.pem"}, "cert_file and key_file go together"),
        ({"tls": True, "server_name": ""}, "server_name must be a non-empty string"),
        ({"tls": True, "server_name": "a/b"}, "server_name must be a host name"),
        ({"tls": True, "server_name": "x" * 254}, "server_name must be a host name"),
        ({"tls": True, "ca_file": 3}, "ca_file must be a non-empty string"),
        ({"tls": True, "client_cert": "/c.pem"}, "unknown key(s) client_cert"),
    ],
)
def test_tls_keys_are_checked(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"clusters\.c") as e:
        parse_settings(_cluster(**keys))
    assert message in str(e.value)


def test_tls_keys_are_parsed() -> None:
    keys = {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}
    s = parse_settings(_cluster(tls=True, server_name="desk.internal", **keys))
    assert s is not None
    spec = s.clusters["c"]
    assert spec.tls and spec.server_name == "desk.internal"
    assert (spec.ca_file, spec.cert_file, spec.key_file) == tuple(keys.values())


def test_unusable_tls_files_fail_at_load(tmp_path: Path) -> None:
    """A missing CA file, a key that is not the certificate's, a CA file
    without a certificate: the configuration is refused at startup, naming
    the cluster, instead of links that never come up."""
    pki, other = Pki(tmp_path, "127.0.0.1"), Pki(tmp_path, "127.0.0.1")
    cert, _ = pki.client(tmp_path, "a")
    _, wrong_key = other.client(tmp_path, "b")
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    bad = [
        {"ca_file": str(tmp_path / "missing.pem")},
        {"ca_file": pki.ca_file, "cert_file": cert, "key_file": wrong_key},
        {"ca_file": str(empty)},
    ]
    for keys in bad:
        ds = _cluster(tls=True, **keys)
        with pytest.raises(ConfigError, match=r"clusters\.c\]: cannot set up TLS"):
            load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {"downstream": ds})
    good = _cluster(
        tls=True, ca_file=pki.ca_file, cert_file=cert, key_file=pki.client(tmp_path, "a")[1]
    )
    load_config(None, {"GATEWAY_STATE_DIR": str(tmp_path)}, {"downstream": good})


def test_client_context_offers_h2_and_verifies() -> None:
    s = parse_settings(_cluster(tls=True))
    assert s is not None
    ctx = client_context(s.clusters["c"])
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- link request headers (a bearer token) ----------------------------------------


async def test_link_headers_authenticate_the_gateway_to_the_desk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """desk-sim requiring an authorization header answers 401 to links
    without it (the gateway logs the status, the link stays down), and
    serves the cluster that sends it."""
    caplog.set_level(logging.WARNING)
    need = (("authorization", "Bearer s3cret"),)
    rec = tmp_path / "rec.jsonl"
    async with desk(record=rec, reply=False, require_headers=need) as (port, _, _):

        def table(**headers: str) -> dict[str, Any]:
            ep = {"endpoints": [f"127.0.0.1:{port}"], "headers": headers}
            return {"clusters": {"general": ep}}

        async with running(tmp_path, downstream=table()) as gw:
            fw = gw.w.forwarder
            with trio.fail_after(10):
                while _failures(fw) < 1:
                    await trio.sleep(0.02)
            assert not fw.links[0].up
        lines = [r.getMessage() for r in caplog.records if "connect_failed" in r.getMessage()]
        assert any("HTTP status 401" in line for line in lines), lines
        async with running(tmp_path, downstream=table(authorization="Bearer guess")) as gw:
            before = _failures(gw.w.forwarder)
            with trio.fail_after(10):
                while _failures(gw.w.forwarder) < before + 1:
                    await trio.sleep(0.02)
        async with running(tmp_path, downstream=table(authorization="Bearer s3cret")) as gw:
            await wait_links_up(gw.w.forwarder)
            async with gc.connect(gw.url, token=gw.token("erin"), reconnect=False) as s:
                assert await s.send("with a token") == 1
    assert [r["body"] for r in records(rec)] == ["with a token"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ("Bearer x", "headers must be a table"),
        ({"Authorization": "x"}, "not a lower-case header name"),
        ({":path": "/x"}, "not a lower-case header name"),
        ({"content-type": "x"}, "set by the link itself"),
        ({"x-gateway-node": "x"}, "set by the link itself"),
        ({"authorization": "a\r\nb"}, "printable ASCII"),
        ({"authorization": 5}, "printable ASCII"),
        ({f"h{i}": "v" for i in range(17)}, "at most 16"),
        ({"a": "v" * 4096}, "more than 4096 bytes"),
    ],
)
def test_link_headers_are_checked(headers: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"clusters\.c\.headers") as e:
        parse_settings(_cluster(headers=headers))
    assert message in str(e.value)


# -- TlsBio, sans-IO ------------------------------------------------------------


def _bio_pair(tmp_path: Path) -> tuple[TlsBio, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TlsBio and a server SSLObject over memory, handshake done."""
    pki = Pki(tmp_path, "127.0.0.1")
    spec = parse_settings(_cluster(tls=True, ca_file=pki.ca_file))
    assert spec is not None
    client = TlsBio(client_context(spec.clusters["c"]), "127.0.0.1")
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(pki.cert, pki.key).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = client.handshake()
        s_in.write(client.seal(b""))
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        if s_out.pending:
            client.feed(s_out.read())
        if done:
            break
    assert client.handshake()
    assert client.obj.selected_alpn_protocol() == "h2"
    return client, server, s_in, s_out


def test_tls_bio_seals_and_opens_in_any_split(tmp_path: Path) -> None:
    client, server, s_in, s_out = _bio_pair(tmp_path)
    s_in.write(client.seal(b"link bytes " * 3000))  # several records
    got = b""
    while len(got) < 33000:
        got += server.read(65536)
    assert got == b"link bytes " * 3000
    server.write(b"answer " * 5000)
    wire = s_out.read()
    opened = b""
    for i in range(0, len(wire), 777):  # records split anywhere
        client.feed(wire[i : i + 777])
        opened += client.open()
    assert opened == b"answer " * 5000
    assert client.open() == b""  # nothing more


def test_tls_bio_tells_a_clean_end_from_a_cut_connection(tmp_path: Path) -> None:
    client, server, _, s_out = _bio_pair(tmp_path)
    server.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):
        server.unwrap()  # close_notify sent; waits for ours
    client.feed(s_out.read())
    assert client.open() == b"last words"  # the data before the end first
    with pytest.raises(EOFError):
        client.open()
    client2, server2, _, s_out2 = _bio_pair(tmp_path)
    server2.write(b"half")
    wire = s_out2.read()
    client2.feed(wire[:-3])  # a record cut short, then the connection ends
    assert client2.open() == b""
    client2.feed(b"")
    with pytest.raises(ssl.SSLError):
        client2.open()


async def test_desk_sim_answers_a_link_request_sent_with_the_end_of_the_handshake(
    tmp_path: Path,
) -> None:
    """A gateway's client Finished and its link request in one TCP segment
    (as under load, when the two writes coalesce): desk-sim answers the
    request from what the handshake left in its TLS buffer. Before, it
    waited for another read that never came, and the link timed out."""
    from gateway.downstream.link import LinkCore

    pki = Pki(tmp_path, "127.0.0.1")
    ctx = server_context(pki.cert, pki.key)
    async with desk(think_ms=0, ssl_context=ctx) as (port, _, _):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        cctx = client_context(parse_settings(tls_ds(port, ca_file=pki.ca_file)).clusters["general"])  # type: ignore[union-attr]
        tls = TlsBio(cctx, "127.0.0.1")
        core = LinkCore()
        core.start(f"127.0.0.1:{port}", [("x-gateway-worker", "0")])
        with trio.fail_after(5):
            while not tls.handshake():
                out = tls.seal(b"")
                if out:
                    await tcp.send_all(out)
                tls.feed(await tcp.receive_some(65536))
            # the Finished and the sealed request, written at once
            await tcp.send_all(tls.seal(b"") + tls.seal(core.flush()))
        with trio.fail_after(1.5):  # the link's own limit is 2 s
            while core.status is None:
                data = await tcp.receive_some(65536)
                assert data, "desk-sim closed the connection"
                tls.feed(data)
                core.receive(tls.open())
        assert core.status == 200
        await tcp.aclose()
