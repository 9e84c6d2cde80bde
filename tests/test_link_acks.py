"""Batched acks on the downstream link (docs/protocol.md, ``acks``):
desk-sim packs the acks of one read into ``acks`` frames the gateway's
decoder takes, in order with its other frames; the forwarder acks every
visitor message such a frame names and counts what it cannot match."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import trio

from gateway.downstream.forwarder import Forwarder
from gateway.downstream.link import UP, Link, LinkCore
from gateway.downstream.proto import (
    MAX_LINK_FRAME,
    check_from_downstream,
    encode,
    encode_acks,
)
from gateway.downstream.settings import merge_cli_specs, parse_settings
from gateway.protocol.codec import LengthPrefixedDecoder
from gateway.session.hub import Hub
from gateway.session.state import Session
from tests.hubkit import Visitor, attach, hub_for
from tests.test_downstream import _open, _raw_link, desk


def _msg(sid: str, n: int) -> bytes:
    return encode({"t": "msg", "sid": sid, "n": n, "id": f"{sid}-{n}", "body": "hi",
                   "group": "general", "stage": "human"})  # fmt: skip


async def _exchange(port: int, sessions: int, per: int) -> list[dict[str, Any]]:
    """Opens ``sessions`` sessions on a hand-driven link, sends ``per``
    messages each in one write, and returns what came back (decoded and
    checked as the gateway does) once every message is acked."""
    sock, core = await _raw_link(port)
    sids = [f"s{i:04d}" for i in range(sessions)]
    for sid in sids:
        core.queue(_open(sid))
    for n in range(1, per + 1):
        for sid in sids:
            core.queue(_msg(sid, n))
    await sock.send_all(core.flush())
    got: list[dict[str, Any]] = []
    acked = 0
    with trio.fail_after(10):
        while acked < sessions * per:
            frames = core.receive(await sock.receive_some(1 << 16))
            await sock.send_all(core.flush())
            got += frames
            for f in frames:
                if f["t"] == "acks":
                    acked += sum(len(ns) for ns in f["sids"].values())
                elif f["t"] == "ack":
                    acked += 1
    await sock.aclose()
    return got


def _acks(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for f in frames:
        if f["t"] == "acks":
            out += [(sid, n) for sid, ns in f["sids"].items() for n in ns]
        elif f["t"] == "ack":
            out.append((f["sid"], f["n"]))
    return out


async def test_desk_sim_packs_a_reads_acks_into_few_frames_the_gateway_accepts() -> None:
    # 300 sessions x 3 messages in one write: more acks than one frame may
    # carry (its map and lists hold at most 256 items for the gateway)
    async with desk(think_ms=0, reply=False) as (port, _, _):
        got = await _exchange(port, 300, 3)
    acks = _acks(got)
    assert sorted(acks) == sorted((f"s{i:04d}", n) for i in range(300) for n in (1, 2, 3))
    assert len(set(acks)) == len(acks)  # each once
    frames = [f for f in got if f["t"] in ("ack", "acks")]
    assert all(f["t"] == "acks" for f in frames)
    assert 4 <= len(frames) <= 60  # 900 acks, at most ~120 sessions per frame
    for sid in {s for s, _ in acks}:  # per session in order
        assert [n for s, n in acks if s == sid] == [1, 2, 3]


async def test_single_acks_option_sends_one_ack_frame_per_message() -> None:
    async with desk(think_ms=0, reply=False, batch_acks=False) as (port, _, _):
        got = await _exchange(port, 20, 2)
    frames = [f for f in got if f["t"] in ("ack", "acks")]
    assert len(frames) == 40 and all(f["t"] == "ack" for f in frames)


async def test_batched_acks_keep_their_place_before_the_replies() -> None:
    """A reply written after an ack never overtakes it: the acks of a read
    go out as one frame ahead of the replies, which keep their order, so
    replies do not break the batching up."""
    async with desk(think_ms=0, agents=4, capacity=8) as (port, _, _):
        got = await _exchange(port, 20, 4)
    # 80 acks interleaved with 80 replies: a few acks frames, not 80
    assert sum(1 for f in got if f["t"] == "acks") <= 8
    assert not any(f["t"] == "ack" for f in got)
    for i in range(20):
        sid = f"s{i:04d}"
        acked = 0
        for f in got:
            if f["t"] == "acks":
                acked += len(f["sids"].get(sid, ()))
            elif f["t"] == "deliver" and f["sid"] == sid and f["from"]["kind"] != "system":
                replies = sum(
                    1 for g in got[: got.index(f) + 1] if g["t"] == "deliver" and g["sid"] == sid
                )
                assert acked >= min(replies, 4), (sid, acked, replies)
        assert acked == 4


def _forwarder(
    n: int, state_dir: Path
) -> tuple[Forwarder, Hub, Link, LinkCore, list[Session], list[Visitor]]:
    """A forwarder with one link that is up (its output kept in a
    :class:`LinkCore`, no socket) and ``n`` sessions opened on it, each
    with a recording visitor."""
    settings = parse_settings(merge_cli_specs({}, ["general=127.0.0.1:9001"]))
    assert settings is not None
    fwd = Forwarder(settings)
    hub = hub_for(fwd, state_dir)
    fwd.hub = hub
    link = fwd.links[0]
    link.core = core = LinkCore()
    link.state = UP
    link.endpoint.endpoint.up = True
    sessions, visitors = [], []
    for i in range(n):
        s = Session(f"sid-{i}", "t", f"v{i}", {}, "web", 16, 8, 1 << 20)
        visitors.append(attach(hub, s))
        fwd.opened(hub, s, False)
        sessions.append(s)
    return fwd, hub, link, core, sessions, visitors


async def test_forwarder_acks_every_message_an_acks_frame_names(tmp_path: Path) -> None:
    fwd, hub, link, core, sessions, visitors = _forwarder(50, tmp_path)
    paused = Visitor()
    hub._paused.add(paused)  # a reader that waits for the downstream
    for k in (1, 2):
        for s in sessions:
            msg_id = f"{s.sid}/m{k}"
            assert fwd.submit(hub, s, msg_id, s.begin(msg_id), "x")
    assert link.inflight == 100
    sent = LengthPrefixedDecoder(MAX_LINK_FRAME).feed(bytes(core.out))
    ns = {(f["sid"], f["id"]): f["n"] for f in sent if f["t"] == "msg"}
    assert len(ns) == 100

    acks: dict[str, list[int]] = {}
    for (sid, _), n in ns.items():
        acks.setdefault(sid, []).append(n)
    acks["sid-0"].append(999)  # never sent: counted, ignored
    acks["no-such-session"] = [1]  # counted, ignored
    data = encode_acks(dict(list(acks.items())[:30])) + encode_acks(dict(list(acks.items())[30:]))
    frames = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(data)
    fwd.link_frames(link, frames)

    acked = [(s.sid, a) for s, v in zip(sessions, visitors, strict=True) for a in v.acks]
    assert sorted(acked) == sorted((s.sid, f"{s.sid}/m{k}") for s in sessions for k in (1, 2))
    assert hub.stats["downstream_ack_unknown"] == 1
    assert hub.stats["downstream_unknown_session"] == 1
    assert link.inflight == 0 and fwd.clusters["general"].inflight == 0
    assert paused.ready == 1  # visitors paused on the downstream may read again
    # the same acks again (a downstream repeating itself): nothing acked twice
    fwd.link_frames(link, LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(data))
    assert sum(len(v.acks) for v in visitors) == 100
    assert hub.stats["downstream_ack_unknown"] == 102


async def test_acknowledged_messages_leave_no_objects_for_the_garbage_collector(
    tmp_path: Path,
) -> None:
    """Once acked, a forwarded message leaves nothing behind that the cyclic
    garbage collector tracks (its deadline entry stays until the deadline,
    as plain numbers): young-generation collections then have nothing to
    scan that grows with the message rate (pauses of several ms when each
    message left a tuple for its 5 s deadline)."""
    fwd, hub, link, core, sessions, _ = _forwarder(50, tmp_path)

    def round_trip(first: int, per: int) -> None:
        for k in range(first, first + per):
            for s in sessions:
                assert fwd.submit(hub, s, k, s.begin(k), "x")
        sent = LengthPrefixedDecoder(MAX_LINK_FRAME).feed(bytes(core.out))
        core.out.clear()
        acks: dict[str, list[int]] = {}
        for f in sent:
            if f["t"] == "msg":
                acks.setdefault(f["sid"], []).append(f["n"])
        frames = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(
            encode_acks(acks)
        )
        fwd.link_frames(link, frames)
        assert link.inflight == 0

    round_trip(1, 2)  # warm: sessions opened on the link, caches filled
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(0))
        round_trip(3, 8)  # 400 messages forwarded and acked
        left = len(gc.get_objects(0)) - before
    finally:
        gc.enable()
    assert len(fwd._deadlines) == 500  # each kept until its deadline
    # at most each session's dict of sent messages, which the collection
    # above untracked while empty and which its next message tracks again
    # (one per session, not per message: a tuple each was 400 more)
    assert left <= len(sessions), left
