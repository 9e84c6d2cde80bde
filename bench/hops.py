"""Where a forwarded message's time goes, hop by hop, from a packet capture.

Every hop of a visitor message over loopback is a TCP segment that
``tcpdump`` stamps when the sender hands it to the kernel:

    t1  load client -> gateway   the visitor's ``msg`` (WebSocket)
    t2  gateway -> desk-sim      the ``msg`` frame on the link (HTTP/2 DATA)
    t3  desk-sim -> gateway      its ``ack``/``acks`` frame naming the message
    t4  gateway -> load client   the visitor's ``ack``

so ``t2 - t1`` is the gateway's inbound time (waiting in its socket, then
its work until the link write), ``t3 - t2`` desk-sim's, ``t4 - t3`` the
gateway's outbound time, and ``t4 - t1`` the round trip without the load
client's own scheduling. With the in-process bot there is no t2/t3 and the
gateway's time is ``t4 - t1``.

    python bench/hops.py [--rate 0] [--seconds 8] [--capture-s 4] [--connections 200] [--repeat 1]

starts desk-sim and two gateways (one forwarding, one with its bot; on
the first CPU, the rest on the others, as ``core_bench.py forwarding
--isolate``), measures the forwarding one's closed-loop maximum (unless
``--rate`` is given), loads each in turn at half of it (or ``--rate``), captures ``--capture-s``
seconds from the middle of each run on ``lo`` (``tcpdump``, from the
Debian package of that name), and prints p50/p99/p99.9 of every hop.

The parsing is sans-IO (:func:`read_pcap`, :class:`Flows`, :func:`hops`):
plain-text traffic only (``ws://`` and h2c links), as on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.downstream.h2data import DATA, PREFACE  # noqa: E402
from gateway.downstream.proto import MAX_LINK_FRAME  # noqa: E402
from gateway.protocol.codec import LengthPrefixedDecoder  # noqa: E402

_PCAP_NS = 0xA1B23C4D
_PCAP_US = 0xA1B2C3D4
_PADDED = 0x8


def read_pcap(data: bytes) -> Iterator[tuple[float, bytes]]:
    """(timestamp s, link-layer frame) of each packet of a little-endian
    pcap file (micro- or nanosecond stamps)."""
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic not in (_PCAP_NS, _PCAP_US):
        raise ValueError("not a little-endian pcap file")
    scale = 1e-9 if magic == _PCAP_NS else 1e-6
    link = struct.unpack_from("<I", data, 20)[0]
    if link != 1:
        raise ValueError(f"link type {link}: expected Ethernet (capture on lo)")
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from("<IIII", data, pos)
        pos += 16
        yield sec + frac * scale, data[pos : pos + caplen]
        pos += caplen


def tcp_segment(frame: bytes) -> tuple[tuple[int, int], int, bytes] | None:
    """((source port, destination port), sequence number, payload) of an
    IPv4 TCP segment in an Ethernet frame, or None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    if ip[9] != 6:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from(">H", ip, 2)[0]
    tcp = ip[ihl:total]
    sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
    off = (tcp[12] >> 4) * 4
    return (sport, dport), seq, bytes(tcp[off:])


@dataclass
class _Stream:
    """One direction of one TCP connection: its bytes in order, and for
    each byte offset where a segment ended, that segment's stamp."""

    next_seq: int | None = None
    buf: bytearray = field(default_factory=bytearray)
    ends: list[tuple[int, float]] = field(default_factory=list)
    gap: bool = False

    def add(self, t: float, seq: int, payload: bytes) -> None:
        if not payload or self.gap:
            return
        if self.next_seq is not None:
            skip = (self.next_seq - seq) & 0xFFFFFFFF
            if skip >= 1 << 31:  # bytes missing from the capture: stop here
                self.gap = True
                return
            payload = payload[skip:]  # a retransmission's old part
            if not payload:
                return
            seq = self.next_seq
        self.buf += payload
        self.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        self.ends.append((len(self.buf), t))

    def time_at(self, end: int) -> float:
        """The stamp of the segment that carried byte ``end - 1``."""
        lo, hi = 0, len(self.ends) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ends[mid][0] >= end:
                hi = mid
            else:
                lo = mid + 1
        return self.ends[lo][1]


class Flows:
    """The TCP streams of a capture, by (source port, destination port)."""

    def __init__(self) -> None:
        self.streams: dict[tuple[int, int], _Stream] = {}

    def add_pcap(self, data: bytes) -> None:
        for t, frame in read_pcap(data):
            seg = tcp_segment(frame)
            if seg is not None:
                ports, seq, payload = seg
                self.streams.setdefault(ports, _Stream()).add(t, seq, payload)


def _decode(payload: bytes, text: bool) -> Any:
    try:
        return json.loads(payload) if text else msgpack.unpackb(payload, raw=False)
    except Exception:
        return None


def ws_messages(buf: bytes | bytearray) -> Iterator[tuple[int, Any]]:
    """(end offset, decoded message) of each complete data frame of one
    direction of a WebSocket connection, after its HTTP/1.1 head."""
    head = buf.find(b"\r\n\r\n")
    if head < 0:
        return
    pos = head + 4
    while pos + 2 <= len(buf):
        b0, b1 = buf[pos], buf[pos + 1]
        n, p = b1 & 0x7F, pos + 2
        if n == 126:
            if p + 2 > len(buf):
                return
            n, p = struct.unpack_from(">H", buf, p)[0], p + 2
        elif n == 127:
            if p + 8 > len(buf):
                return
            n, p = struct.unpack_from(">Q", buf, p)[0], p + 8
        key = b""
        if b1 & 0x80:
            key, p = bytes(buf[p : p + 4]), p + 4
        if p + n > len(buf):
            return
        payload = bytes(buf[p : p + n])
        if key:
            payload = bytes(c ^ key[i & 3] for i, c in enumerate(payload))
        pos = p + n
        opcode = b0 & 0x0F
        if opcode in (1, 2):
            yield pos, _decode(payload, opcode == 1)


def _as_is(obj: Any) -> Any:
    """The link frames as decoded (the capture is read, not judged)."""
    return obj


def link_messages(buf: bytes | bytearray) -> Iterator[tuple[int, Any]]:
    """(end offset, decoded frame) of each length-prefixed msgpack frame
    carried in the DATA frames of one direction of an HTTP/2 connection
    (the end offset is that of the DATA frame where the frame completed)."""
    pos = len(PREFACE) if buf.startswith(PREFACE) else 0
    data: dict[int, LengthPrefixedDecoder] = {}  # per stream
    while pos + 9 <= len(buf):
        length = int.from_bytes(buf[pos : pos + 3], "big")
        ftype, flags = buf[pos + 3], buf[pos + 4]
        stream = struct.unpack_from(">I", buf, pos + 5)[0] & 0x7FFFFFFF
        body = buf[pos + 9 : pos + 9 + length]
        if len(body) < length:
            return
        pos += 9 + length
        if ftype != DATA:
            continue
        if flags & _PADDED:
            body = body[1 : len(body) - body[0]]
        dec = data.get(stream)
        if dec is None:
            dec = data[stream] = LengthPrefixedDecoder(MAX_LINK_FRAME, _as_is)
        for m in dec.feed(bytes(body)):
            yield pos, m


@dataclass
class Hop:
    """One visitor message's stamps (None: not seen in the capture)."""

    t1: float
    t2: float | None = None
    t3: float | None = None
    t4: float | None = None


def hops(flows: Flows, gateway_port: int, desk_port: int | None) -> list[Hop]:
    """Every visitor message of the capture that was acked, with its
    stamps (t2/t3 only when forwarded to ``desk_port``)."""
    sid_of: dict[int, Any] = {}  # client port -> session id
    sent: dict[tuple[int, Any], Hop] = {}  # (client port, message id) -> stamps
    acks: list[tuple[int, Any, float]] = []
    for (sport, dport), st in flows.streams.items():
        if dport == gateway_port:
            for end, m in ws_messages(st.buf):
                if isinstance(m, dict) and m.get("t") == "msg":
                    sent.setdefault((sport, m.get("id")), Hop(st.time_at(end)))
        elif sport == gateway_port:
            for end, m in ws_messages(st.buf):
                if not isinstance(m, dict):
                    continue
                if m.get("t") == "welcome":
                    sid_of[dport] = m.get("sid")
                elif m.get("t") == "ack":
                    acks.append((dport, m.get("id"), st.time_at(end)))
    by_sid: dict[tuple[Any, Any], Hop] = {}
    for (port, mid), h in sent.items():
        sid = sid_of.get(port)
        if sid is not None:
            by_sid[(sid, mid)] = h
    if desk_port is not None:
        id_of: dict[tuple[Any, Any], Any] = {}  # (sid, n) -> message id
        for (_, dport), st in flows.streams.items():
            if dport != desk_port:
                continue
            for end, m in link_messages(st.buf):
                if isinstance(m, dict) and m.get("t") == "msg":
                    fh = by_sid.get((m.get("sid"), m.get("id")))
                    if fh is not None and fh.t2 is None:
                        fh.t2 = st.time_at(end)
                        id_of[(m["sid"], m["n"])] = m["id"]
        for (sport, _), st in flows.streams.items():
            if sport != desk_port:
                continue
            for end, m in link_messages(st.buf):
                if not isinstance(m, dict):
                    continue
                if m.get("t") == "ack":
                    named = [(m.get("sid"), m.get("n"))]
                elif m.get("t") == "acks" and isinstance(m.get("sids"), dict):
                    named = [(s, n) for s, ns in m["sids"].items() for n in ns]
                else:
                    continue
                t = st.time_at(end)
                for sid, n in named:
                    ah = by_sid.get((sid, id_of.get((sid, n))))
                    if ah is not None and ah.t3 is None:
                        ah.t3 = t
    for port, mid, t in acks:
        vh = sent.get((port, mid))
        if vh is not None and vh.t4 is None:
            vh.t4 = t
    return [h for h in sent.values() if h.t4 is not None]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p99/p99.9/max in ms of values in seconds."""
    v = sorted(values)
    if not v:
        return {}

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] * 1000

    return {"n": len(v), "p50": pick(0.5), "p99": pick(0.99), "p99.9": pick(0.999),
            "max": v[-1] * 1000}  # fmt: skip


def report(hs: list[Hop], window: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Per hop, the percentiles of the messages sent within ``window``."""
    lo, hi = window
    hs = [h for h in hs if lo <= h.t1 <= hi]
    out = {"round trip (t4 - t1)": percentiles([h.t4 - h.t1 for h in hs if h.t4])}
    fwd = [h for h in hs if h.t2 is not None and h.t3 is not None and h.t4 is not None]
    if fwd:
        out["gateway in (t2 - t1)"] = percentiles([h.t2 - h.t1 for h in fwd])  # type: ignore[operator]
        out["desk-sim (t3 - t2)"] = percentiles([h.t3 - h.t2 for h in fwd])  # type: ignore[operator]
        out["gateway out (t4 - t3)"] = percentiles([h.t4 - h.t3 for h in fwd])  # type: ignore[operator]
        out["gateway in + out"] = percentiles(
            [(h.t2 - h.t1) + (h.t4 - h.t3) for h in fwd]  # type: ignore[operator]
        )
    return out


_PAYLOAD_ONLY = "(ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2)) != 0"


def _ms(p: dict[str, float]) -> str:
    return (f"p50 {p['p50']:.3f}  p99 {p['p99']:.3f}  p99.9 {p['p99.9']:.3f}  "
            f"max {p['max']:.3f} ms  (n={p['n']:,})")  # fmt: skip


def _capture(path: Path, ports: list[int]) -> subprocess.Popen[bytes]:
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise SystemExit("needs tcpdump (Debian package tcpdump: apt-get install tcpdump)")
    expr = " or ".join(f"tcp port {p}" for p in ports)
    argv = [tcpdump, "-i", "lo", "-s", "0", "-B", "262144", "-U", "--time-stamp-precision=nano",
            "-w", str(path), f"({expr}) and {_PAYLOAD_ONLY}"]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # listening
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return " ".join(line for line in err.decode().splitlines() if "dropped" in line)


def main() -> None:
    import core_bench as cb

    from gateway.loadtest.engine import Plan
    from gateway.loadtest.runner import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=0.0,
                    help="messages/s (default 0: half the forwarding gateway's closed-loop "
                         "maximum, measured first)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--capture-s", type=float, default=4.0)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.capture_s > args.seconds - 2:
        raise SystemExit("--capture-s must leave a second at each end of --seconds")
    conns = args.connections
    toks = cb.tokens(conns)
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs")
    gw_cpus, rest = set(cpus[:1]), set(cpus[1:])
    desk = cb.start_desk(processes=1)
    fwd = cb.start_gateway(1, downstream=[f"general=127.0.0.1:{desk.port}"], conns=conns)
    bot = cb.start_gateway(1, conns=conns)
    out: dict[str, Any] = {"rate": args.rate, "runs": []}
    pcap = cb.OUT / "hops.pcap"
    try:
        for srv in (fwd, bot):
            cb.pin(srv.proc.pid, gw_cpus)
        cb.pin(desk.proc.pid, rest)
        os.sched_setaffinity(0, rest)  # the load clients and tcpdump
        time.sleep(1.0)
        if not args.rate:
            top = run(Plan(host="127.0.0.1", port=fwd.port, mode="gateway", tokens=toks,
                           connections=conns, active=conns, duration=args.seconds, size=230,
                           max_runtime=300, rate=0.0, engine="native"), 1)  # fmt: skip
            args.rate = out["rate"] = round(top["msgs_per_s"] * 0.5)
            out["max_msgs_per_s"] = top["msgs_per_s"]
            print(f"maximum (desk-sim, closed loop): {top['msgs_per_s']:,.0f} msg/s; "
                  f"offered: {args.rate:,} msg/s")  # fmt: skip
        for _ in range(args.repeat):
            for name, gw, dport in (("desk-sim", fwd, desk.port), ("bot", bot, None)):
                cap = _capture(pcap, [gw.port] + ([dport] if dport else []))
                t0 = time.time()
                r = run(Plan(host="127.0.0.1", port=gw.port, mode="gateway", tokens=toks,
                             connections=conns, active=conns, duration=args.seconds, size=230,
                             max_runtime=300, rate=args.rate, engine="native"), 1)  # fmt: skip
                dropped = _stop(cap)
                flows = Flows()
                flows.add_pcap(pcap.read_bytes())
                lo = t0 + 1.0 + (args.seconds - args.capture_s) / 2
                rep = report(hops(flows, gw.port, dport), (lo, lo + args.capture_s))
                out["runs"].append({"path": name, "client_rtt": r["rtt"], "hops": rep,
                                    "tcpdump": dropped})  # fmt: skip
                print(f"{name}: client round trip p50 {r['rtt']['p50_ms']:.2f} ms, "
                      f"p99 {r['rtt']['p99_ms']:.2f} ms; tcpdump: {dropped}")  # fmt: skip
                for hop, p in rep.items():
                    if p:
                        print(f"  {hop:>22}: {_ms(p)}")
    finally:
        os.sched_setaffinity(0, mine)
        fwd.stop()
        bot.stop()
        desk.stop()
        with contextlib.suppress(FileNotFoundError):
            pcap.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
