"""The forwarder's own Python work per message, sans-IO: a visitor message
handed to ``Forwarder.submit`` (route, admission, ``msg`` frame queued on
the link), then the downstream's ``ack`` decoded by the link's decoder and
handled by ``Forwarder.link_frames``. No sockets, no h2, no visitor side:
a regression benchmark for the forwarding hot path (docs/benchmarks.md,
"Downstream"), with no peer to compare against.

    .venv/bin/pytest bench/test_forwarder_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q

Each round is 500 messages (one for each of 500 sessions): divide the
times by 500 for the cost per message. The acks come as one ``ack`` frame
per message (``[ack]``), or as ``acks`` frames of 100 sessions each
(``[acks]``).
The downstream's side (decoding the ``msg`` frames, encoding the acks)
runs in the untimed setup.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from gateway.downstream.forwarder import Forwarder
from gateway.downstream.link import UP, LinkCore
from gateway.downstream.proto import MAX_LINK_FRAME, check_from_downstream, encode, encode_acks
from gateway.downstream.settings import merge_cli_specs, parse_settings
from gateway.protocol.codec import LengthPrefixedDecoder
from gateway.session.state import Session
from gateway.session.tally import Tally

SESSIONS = 500


class _Hub:
    """What the forwarder calls on its hub, counting acks."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.stats = Tally()
        self.migrator = None
        self.acked = 0

    def downstream_ack(self, s: Session, msg_id: Any) -> None:
        self.acked += 1

    def downstream_ready(self) -> None:
        pass

    def log(self, *a: Any, **k: Any) -> None:
        pass


def _setup() -> tuple[Forwarder, _Hub, list[Session]]:
    settings = parse_settings(merge_cli_specs({}, ["general=127.0.0.1:9001"]))
    assert settings is not None
    fwd = Forwarder(settings)
    hub = _Hub()
    fwd.hub = hub  # type: ignore[assignment]
    for ln in fwd.links:
        ln.core = LinkCore()
        ln.state = UP
        ln.endpoint.endpoint.up = True
    sessions = []
    for i in range(SESSIONS):
        s = Session(f"sid-{i:06d}-abcdefgh", "t", f"v{i}", {}, "web", 4, 8, 1 << 20)
        hub.sessions[s.sid] = s
        fwd.opened(hub, s, False)  # type: ignore[arg-type]
        sessions.append(s)
    fwd.links[0].core.out.clear()  # type: ignore[union-attr]
    return fwd, hub, sessions


class _Rig:
    def __init__(self) -> None:
        self.fwd, self.hub, self.sessions = _setup()
        self.link = self.fwd.links[0]
        core = self.link.core
        assert core is not None
        self.core = core
        self.k = 0

    def submit_all(self) -> None:
        self.k += 1
        k = self.k
        for s in self.sessions:
            self.fwd.submit(self.hub, s, f"m{k}", k, "x" * 200)  # type: ignore[arg-type]

    def answer(self) -> bytes:
        """The downstream's answer to what the link carried: one ack each."""
        out = bytes(self.core.out)
        self.core.out.clear()
        frames = LengthPrefixedDecoder(MAX_LINK_FRAME).feed(out)
        return b"".join(encode({"t": "ack", "sid": f["sid"], "n": f["n"]}) for f in frames)

    def answer_batched(self) -> bytes:
        """The same acks as ``acks`` frames of 100 sessions each (as
        desk-sim packs them)."""
        out = bytes(self.core.out)
        self.core.out.clear()
        frames = LengthPrefixedDecoder(MAX_LINK_FRAME).feed(out)
        chunks: list[bytes] = []
        for i in range(0, len(frames), 100):
            acks: dict[str, list[int]] = {}
            for f in frames[i : i + 100]:
                acks.setdefault(f["sid"], []).append(f["n"])
            chunks.append(encode_acks(acks))
        return b"".join(chunks)

    def take_acks(self, acks: bytes) -> None:
        frames = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream).feed(acks)
        self.fwd.link_frames(self.link, frames)
        self.fwd._deadlines.clear()  # answered: tick() would pop them


def test_submit_500_messages(benchmark: Any) -> None:
    """Forwarder.submit for one message of each of 500 sessions."""
    rig = _Rig()

    def setup() -> None:
        if rig.k:
            rig.take_acks(rig.answer())  # the previous round's, untimed

    async def main() -> None:
        benchmark.pedantic(rig.submit_all, setup=setup, rounds=300, iterations=1)

    trio.run(main)
    assert rig.hub.acked == (rig.k - 1) * SESSIONS


@pytest.mark.parametrize("acks", ["ack", "acks"])
def test_ack_500_messages(benchmark: Any, acks: str) -> None:
    """The link decoder and Forwarder.link_frames for 500 acks: one ``ack``
    frame per message, or ``acks`` frames of 100 sessions each."""
    rig = _Rig()

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        rig.submit_all()
        return (rig.answer() if acks == "ack" else rig.answer_batched(),), {}

    async def main() -> None:
        benchmark.pedantic(rig.take_acks, setup=setup, rounds=300, iterations=1)

    trio.run(main)
    assert rig.hub.acked == rig.k * SESSIONS
