"""The link's DATA frames read without h2 (gateway.downstream.h2data): the
link core against a real h2 server (no sockets) gets every frame, in
order, from any split of the bytes; flow control keeps a long stream
going; everything else still goes through h2."""

from __future__ import annotations

import random

import h2.events
import h2.settings
import pytest
import trio

from gateway.downstream.h2data import DATA_FRAME, RUN, DataSplitter, SendWindow, window_update
from gateway.downstream.link import RECV_WINDOW, LinkCore, LinkError
from gateway.downstream.proto import encode
from tests.test_downstream import _open, _raw_link, desk
from tests.test_link_core import _Desk, _linked


def _feed(core: LinkCore, data: bytes, rng: random.Random) -> list[dict[str, object]]:
    """Hands ``data`` to the core in random pieces, as reads would."""
    got: list[dict[str, object]] = []
    pos = 0
    while pos < len(data):
        k = rng.randint(1, 700)
        got += core.receive(data[pos : pos + k])
        pos += k
    return got


@pytest.mark.parametrize("seed", range(5))
def test_every_frame_arrives_in_order_from_any_split_of_the_bytes(seed: int) -> None:
    rng = random.Random(seed)
    core = LinkCore()
    core.start("desk:1", [])
    srv = _Desk(core, deliver=False)
    sent: list[dict[str, object]] = []
    out = bytearray(srv.h2.data_to_send())  # SETTINGS, response headers
    for i in range(400):
        kind = rng.random()
        if kind < 0.05:
            srv.h2.ping(b"12345678")
        elif kind < 0.08:
            srv.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10 + i})
        frame = {"t": "ack", "sid": f"s{i}", "n": i, "pad": "x" * rng.randint(0, 3000)}
        data = encode(frame)
        # padded DATA frames are h2's to read: some of them
        srv.h2.send_data(srv.stream, data, pad_length=rng.choice([None, None, None, 7]))
        sent.append({k: v for k, v in frame.items() if k != "pad"})
        out += srv.h2.data_to_send()
    to_h2 = [0]
    h2_receive = core.h2.receive_data

    def counted(data: bytes) -> list[h2.events.Event]:
        to_h2[0] += len(data)
        return h2_receive(data)

    core.h2.receive_data = counted  # type: ignore[method-assign]
    got = _feed(core, bytes(out), rng)
    assert [(f["sid"], f["n"]) for f in got] == [(f["sid"], f["n"]) for f in sent]
    # the plain DATA frames (~3/4 of the bytes) never went through h2
    assert 0 < to_h2[0] < len(out) / 2, (to_h2[0], len(out))
    srv.take(core)  # the PING ACKs and SETTINGS ACKs went out through h2


def test_flow_control_gives_the_window_back_so_a_long_stream_never_stalls() -> None:
    core, srv = _linked()
    srv.take(core)
    payload = encode({"t": "ack", "sid": "s", "n": 1, "pad": "y" * 60_000})
    total = 0
    while total < 3 * RECV_WINDOW:  # three windows' worth
        room = srv.h2.local_flow_control_window(srv.stream)
        assert room >= len(payload), f"stalled after {total} bytes"
        srv.h2.send_data(srv.stream, payload[:16384])
        srv.h2.send_data(srv.stream, payload[16384:32768])
        srv.h2.send_data(srv.stream, payload[32768:49152])
        srv.h2.send_data(srv.stream, payload[49152:])
        total += len(payload)
        got = core.receive(srv.h2.data_to_send())
        assert len(got) == 1
        srv.take(core)  # WINDOW_UPDATEs, when due
    # given back in half-window steps, as h2 would: the server's view of our
    # window never fell below half of it
    assert srv.h2.local_flow_control_window(srv.stream) >= RECV_WINDOW // 2 - len(payload)


def test_a_downstream_overrunning_the_window_loses_its_link() -> None:
    sp = DataSplitter(1, 100)
    frame = (60).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"z" * 60
    sp.feed(frame + frame)
    assert sp.next(True) == (DATA_FRAME, b"z" * 60)
    with pytest.raises(Exception, match="beyond a 100-byte window"):
        sp.next(True)


def test_window_updates_wait_for_half_the_window() -> None:
    sp = DataSplitter(3, 100)
    frame = (49).to_bytes(3, "big") + b"\x00\x00" + (3).to_bytes(4, "big") + b"z" * 49
    sp.feed(frame + frame)
    assert sp.next(True) == (DATA_FRAME, b"z" * 49) and sp.window_updates() == b""
    assert sp.next(True) == (DATA_FRAME, b"z" * 49)
    assert sp.window_updates() == window_update(0, 98) + window_update(3, 98)
    assert sp.window_updates() == b""


def test_data_before_the_response_or_inside_a_header_block_goes_to_h2() -> None:
    data = (2).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"ab"
    headers = (1).to_bytes(3, "big") + b"\x01\x00" + (1).to_bytes(4, "big") + b"\x88"
    cont = (1).to_bytes(3, "big") + b"\x09\x04" + (1).to_bytes(4, "big") + b"\x88"
    sp = DataSplitter(1, 1 << 20)
    sp.feed(data + headers + data + cont + data + data[:5])
    # not established yet: all of it is a run for h2
    assert sp.next(False) == (RUN, data + headers + data + cont + data)
    assert sp.next(False) is None
    sp.feed(data[5:])
    assert sp.next(True) == (DATA_FRAME, b"ab")  # the rest of the split frame
    sp2 = DataSplitter(1, 1 << 20)
    sp2.feed(headers + data + cont + data)
    # a DATA frame between HEADERS and its CONTINUATION stays with h2
    assert sp2.next(True) == (RUN, headers + data + cont)
    assert sp2.next(True) == (DATA_FRAME, b"ab")


def test_the_link_still_refuses_what_h2_refuses() -> None:
    core = LinkCore()
    core.start("desk:1", [])
    srv = _Desk(core, status=503, deliver=False)
    with pytest.raises(LinkError, match="status 503"):
        core.receive(srv.h2.data_to_send())
    core, srv = _linked()
    srv.h2.send_data(srv.stream, encode({"t": "ack", "sid": "s", "n": 1}), end_stream=True)
    with pytest.raises(LinkError, match="ended the link stream"):
        core.receive(srv.h2.data_to_send())
    core, srv = _linked()
    srv.h2.send_data(srv.stream, b"\x00\x00\x00\x02\xc1\xc1")  # msgpack 0xc1: never valid
    with pytest.raises(LinkError, match="bad frame from downstream"):
        core.receive(srv.h2.data_to_send())


async def test_desk_sim_gives_the_window_back_past_its_first_16_mib() -> None:
    """A link carrying more than desk-sim's receive window (16 MiB) goes on:
    desk-sim reads the link's DATA frames without h2 and sends the
    WINDOW_UPDATEs itself, or the gateway could send nothing more."""
    body = "b" * 60_000
    total = 300  # 300 x 60 KB: 18 MB
    async with desk(think_ms=0, reply=False) as (port, _, _):
        sock, core = await _raw_link(port)
        core.queue(_open("s1"))
        acked = 0
        sent = 0
        with trio.fail_after(30):
            while acked < total:
                while sent < total and core.backlog < 1 << 20:
                    sent += 1
                    core.queue(
                        encode(
                            {
                                "t": "msg",
                                "sid": "s1",
                                "n": sent,
                                "id": sent,
                                "body": body,
                                "group": "general",
                                "stage": "human",
                            }
                        )
                    )
                await sock.send_all(core.flush())
                for f in core.receive(await sock.receive_some(1 << 16)):
                    if f["t"] == "acks":
                        acked += sum(len(ns) for ns in f["sids"].values())
                    elif f["t"] == "ack":
                        acked += 1
        await sock.aclose()
    assert acked == total


def _pump(core: LinkCore, srv: _Desk) -> bytes:
    """One exchange: what the core writes to the server (which reads and
    acknowledges the DATA), then what the server answers to the core.
    Returns the link stream's bytes the server got."""
    got = b""
    for ev in srv.h2.receive_data(core.flush()):
        if isinstance(ev, h2.events.DataReceived):
            srv.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            got += ev.data
    core.receive(srv.h2.data_to_send())
    return got


def test_sending_stays_within_the_peers_windows_and_goes_on_past_them() -> None:
    """The link builds its DATA frames itself: the server's h2 (default
    64 KiB windows) would refuse one byte too many; its WINDOW_UPDATEs,
    taken out before h2, keep the link sending."""
    core, srv = _linked()
    sent = bytearray()
    got = bytearray()
    rng = random.Random(7)
    for _ in range(300):
        chunk = rng.randbytes(rng.randint(1, 20_000))
        core.queue(chunk)
        sent += chunk
        got += _pump(core, srv)
    for _ in range(50):
        if len(got) == len(sent):
            break
        got += _pump(core, srv)
    assert len(sent) > 2_000_000 and got == sent


def test_the_peer_changing_its_initial_window_moves_the_stream_window() -> None:
    core, srv = _linked()
    core.queue(b"a" * 50_000)
    got = _pump(core, srv)
    assert len(got) == 50_000
    # a smaller initial window: the stream may be over it for a while (RFC 9113,
    # 6.9.2); h2 on the server refuses any DATA beyond it
    srv.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    core.receive(srv.h2.data_to_send())
    core.queue(b"b" * 100_000)
    got = _pump(core, srv)
    assert core.send.stream <= 1000
    srv.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    core.receive(srv.h2.data_to_send())
    for _ in range(20):
        got += _pump(core, srv)
    assert got == b"b" * 100_000


@pytest.mark.parametrize(
    ("stream", "increment", "match"),
    [(0, 0, "WINDOW_UPDATE of 0"), (1, 0, "WINDOW_UPDATE of 0"), (0, (1 << 31) - 1, "past 2")],
)
def test_bad_window_updates_end_the_link(stream: int, increment: int, match: str) -> None:
    core, _ = _linked()
    assert core.stream == 1
    frame = b"\x00\x00\x04\x08\x00" + stream.to_bytes(4, "big") + increment.to_bytes(4, "big")
    with pytest.raises(LinkError, match=match):
        core.receive(frame)


def test_send_window_frames_split_at_the_frame_size_and_spend_both_windows() -> None:
    w = SendWindow(3)
    w.update((0).to_bytes(4, "big") + (100).to_bytes(4, "big"))
    assert (w.conn, w.stream) == (65635, 65535)
    frames, k = w.frames(b"x" * 70_000, 16384)
    assert k == 65535 and (w.conn, w.stream) == (100, 0)
    heads = []
    pos = 0
    while pos < len(frames):
        n = int.from_bytes(frames[pos : pos + 3], "big")
        heads.append((n, frames[pos + 3], frames[pos + 4], frames[pos + 5 : pos + 9]))
        pos += 9 + n
    assert [h[0] for h in heads] == [16384, 16384, 16384, 16383]
    assert all(h[1:] == (0, 0, b"\x00\x00\x00\x03") for h in heads)
    assert w.frames(b"y", 16384) == (b"", 0)  # the stream's window is spent


async def test_desk_sim_sends_within_the_gateways_windows() -> None:
    """desk-sim builds the link's DATA frames itself too: a peer (h2, which
    raises on one byte too many) advertising a 2,000-byte stream window and
    not giving it back gets no more than that; once it does, every ack and
    reply arrives."""
    import h2.config
    import h2.connection

    from gateway.downstream.proto import MAX_LINK_FRAME
    from gateway.protocol.codec import LengthPrefixedDecoder

    n = 40
    async with desk(think_ms=0) as (port, _, _):
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2000}
        )
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                (":authority", "desk"), (":path", "/v1/link"),
                                ("content-type", "application/msgpack")])  # fmt: skip
        out = _open("s1")
        for k in range(1, n + 1):
            out += encode({"t": "msg", "sid": "s1", "n": k, "id": k, "body": f"m{k}",
                           "group": "general", "stage": "human"})  # fmt: skip
        conn.send_data(sid, out)
        await sock.send_all(conn.data_to_send())
        dec = LengthPrefixedDecoder(MAX_LINK_FRAME, lambda f: f)
        frames: list[dict] = []
        got = 0
        give_back = False

        async def read(seconds: float) -> None:
            nonlocal got
            with trio.move_on_after(seconds):
                while True:
                    for ev in conn.receive_data(await sock.receive_some(65536)):
                        if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                            got += len(ev.data)
                            frames.extend(dec.feed(ev.data))
                            if give_back:
                                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    await sock.send_all(conn.data_to_send())
                    if sum(f["t"] == "deliver" for f in frames) >= n:
                        return

        await read(0.5)
        assert 0 < got <= 2000  # held at the window (h2 raises past it)
        give_back = True
        conn.acknowledge_received_data(got, sid)
        await sock.send_all(conn.data_to_send())
        await read(10)
        await sock.aclose()
    acked = sorted(x for f in frames if f["t"] == "acks" for ns in f["sids"].values() for x in ns)
    acked += [f["n"] for f in frames if f["t"] == "ack"]
    assert sorted(acked) == list(range(1, n + 1))
    assert sum(f["t"] == "deliver" for f in frames) == n


def test_h2_output_asks_h2_only_when_it_has_bytes_queued() -> None:
    """A real connection: its preface, then nothing (and no copy made);
    an h2 without the buffer attribute is always asked."""
    import h2.config
    import h2.connection

    from gateway.downstream.h2data import h2_output

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    first = h2_output(conn)
    assert first.startswith(b"PRI * HTTP/2.0") and h2_output(conn) == b""
    conn.ping(b"12345678")
    assert len(h2_output(conn)) == 9 + 8

    class Counting:
        def __init__(self, queued: bytes | None) -> None:
            if queued is not None:
                self._data_to_send = bytearray(queued)
            self.calls = 0

        def data_to_send(self) -> bytes:
            self.calls += 1
            return b"x"

    for queued, calls in ((b"", 0), (b"abc", 1), (None, 1)):
        c = Counting(queued)
        assert h2_output(c) == (b"x" if calls else b"") and c.calls == calls
