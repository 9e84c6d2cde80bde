"""bench/hops.py: a visitor message's hops read back from a packet capture
(a pcap file built here, segment by segment, as tcpdump writes them)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from bench.hops import Flows, hops, link_messages, report, ws_messages

GW, DESK, CLIENT, LINK = 8080, 7001, 40001, 40002


class _Pcap:
    def __init__(self) -> None:
        self.out = bytearray(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
        self.seq: dict[tuple[int, int], int] = {}

    def send(
        self, t: float, sport: int, dport: int, payload: bytes, seq: int | None = None
    ) -> None:
        """One TCP segment from ``sport`` to ``dport`` stamped ``t``; ``seq``
        (an offset into the direction's bytes) re-sends old bytes."""
        base = self.seq.get((sport, dport), 1000)
        s = base if seq is None else 1000 + seq
        if seq is None:
            self.seq[(sport, dport)] = base + len(payload)
        tcp = struct.pack(">HHIIBBHHH", sport, dport, s, 0, 5 << 4, 0x18, 65535, 0, 0)
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6,
                         0, b"\x7f\0\0\1", b"\x7f\0\0\1")  # fmt: skip
        frame = b"\0" * 12 + b"\x08\x00" + ip + tcp + payload
        sec = int(t)
        self.out += struct.pack("<IIII", sec, round((t - sec) * 1e9), len(frame), len(frame))
        self.out += frame


def _ws(msg: dict[str, object], mask: bytes = b"") -> bytes:
    body = msgpack.packb(msg)
    head = bytes([0x82, (0x80 if mask else 0) | len(body)]) + mask
    if mask:
        body = bytes(c ^ mask[i & 3] for i, c in enumerate(body))
    return head + body


def _h2(ftype: int, stream: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([ftype, 0]) + struct.pack(">I", stream) + body


def _lp(msg: dict[str, object]) -> bytes:
    body = msgpack.packb(msg)
    return struct.pack(">I", len(body)) + body


def _capture() -> bytes:
    p = _Pcap()
    head = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n"
    p.send(1.000, CLIENT, GW, head)
    p.send(1.001, GW, CLIENT, b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    p.send(1.002, GW, CLIENT, _ws({"t": "welcome", "sid": "S1"}))
    msg7 = _ws({"t": "msg", "id": 7, "body": "x"}, b"\x01\x02\x03\x04")
    p.send(2.000, CLIENT, GW, msg7)
    p.send(2.0001, CLIENT, GW, msg7, len(head))  # a retransmission
    data = _h2(0, 1, _lp({"t": "msg", "sid": "S1", "n": 1, "id": 7, "body": "x"}))
    p.send(2.001, GW, DESK, _h2(4, 0, b"") + data[:10])  # a SETTINGS frame, then half
    p.send(2.002, GW, DESK, data[10:])  # the frame completes here
    p.send(2.005, DESK, GW, _h2(0, 1, _lp({"t": "acks", "sids": {"S1": [1]}})))
    p.send(2.006, GW, CLIENT, _ws({"t": "ack", "id": 7}))
    p.send(3.000, CLIENT, GW, _ws({"t": "msg", "id": 8, "body": "y"}, b"\x05\x06\x07\x08"))
    p.send(3.001, GW, CLIENT, _ws({"t": "ack", "id": 8}))  # (say, refused: not forwarded)
    p.send(4.000, CLIENT, GW, _ws({"t": "msg", "id": 9, "body": "z"}, b"\x05\x06\x07\x08"))
    return bytes(p.out)


def test_each_hop_is_stamped_by_the_segment_that_completed_it() -> None:
    flows = Flows()
    flows.add_pcap(_capture())
    got = sorted(hops(flows, GW, DESK), key=lambda h: h.t1)
    assert len(got) == 2  # message 9 was never acked
    h = got[0]
    # the re-sent segment of message 7 changes nothing; the link frame's
    # stamp is that of its second half
    assert (h.t1, h.t2, h.t3, h.t4) == pytest.approx((2.000, 2.002, 2.005, 2.006))
    rep = report(got, (1.5, 2.5))
    assert rep["gateway in (t2 - t1)"]["p50"] == pytest.approx(2.0)
    assert rep["desk-sim (t3 - t2)"]["p50"] == pytest.approx(3.0)
    assert rep["gateway out (t4 - t3)"]["p50"] == pytest.approx(1.0)
    assert rep["gateway in + out"]["max"] == pytest.approx(3.0)
    assert rep["round trip (t4 - t1)"]["n"] == 1
    assert (got[1].t1, got[1].t2, got[1].t4) == pytest.approx((3.0, None, 3.001))
    assert list(report(got, (2.5, 3.5))) == ["round trip (t4 - t1)"]  # no hop forwarded
    assert report(got, (4.5, 5.5))["round trip (t4 - t1)"] == {}  # nothing in the window


def test_a_stream_stops_at_bytes_missing_from_the_capture() -> None:
    p = _Pcap()
    p.send(1.0, GW, CLIENT, b"HTTP/1.1 101\r\n\r\n" + _ws({"t": "welcome", "sid": "S"}))
    p.send(1.1, GW, CLIENT, _ws({"t": "ack", "id": 1}), 200)  # bytes 18..199 never seen
    flows = Flows()
    flows.add_pcap(bytes(p.out))
    st = flows.streams[(GW, CLIENT)]
    assert st.gap and [m["t"] for _, m in ws_messages(st.buf)] == ["welcome"]


def test_without_a_downstream_only_the_round_trip_is_known() -> None:
    flows = Flows()
    flows.add_pcap(_capture())
    got = sorted(hops(flows, GW, None), key=lambda h: h.t1)
    assert [(h.t2, h.t3) for h in got] == [(None, None)] * 2
    assert [h.t4 for h in got] == pytest.approx([2.006, 3.001])
    assert list(report(got, (0, 9))) == ["round trip (t4 - t1)"]


def test_frames_are_read_only_once_complete() -> None:
    ws = b"HTTP/1.1 101\r\n\r\n" + _ws({"t": "ack", "id": 1}) + _ws({"t": "ack", "id": 2})
    assert [m["id"] for _, m in ws_messages(ws[:-1])] == [1]
    assert [m["id"] for _, m in ws_messages(ws)] == [1, 2]
    link = _h2(
        0, 3, _lp({"t": "ack", "sid": "a", "n": 1}) + _lp({"t": "ack", "sid": "a", "n": 2})[:5]
    )
    assert [(end, m["n"]) for end, m in link_messages(link)] == [(len(link), 1)]
