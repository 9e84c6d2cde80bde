"""One read from a downstream and one write to it, side by side: the link
core (the link stream's DATA frames parsed and built without h2,
gateway.downstream.h2data) against h2's own paths (``receive_data``,
``acknowledge_received_data`` and the same frame decoder; ``send_data``
and ``data_to_send``), on the same bytes, with a real h2 server.

    .venv/bin/pytest bench/test_link_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q

A read is one DATA frame carrying ``acks`` frames for ``N`` messages, as
desk-sim answers a gateway's batch; ``[1]`` is the moderate-load case (a
read per message or so), ``[16]`` a busier one. A write is the end of a
reactor batch that queued ``N`` 300-byte ``msg`` frames.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from gateway.downstream.h2data import window_update
from gateway.downstream.link import LinkCore
from gateway.downstream.proto import MAX_LINK_FRAME, check_from_downstream, encode_acks
from gateway.protocol.codec import LengthPrefixedDecoder

READS = 200


def _linked() -> tuple[LinkCore, h2.connection.H2Connection, int]:
    """A link core whose server (returned, with the stream) answered 200."""
    core = LinkCore()
    core.start("desk:1", [])
    srv = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    srv.initiate_connection()
    stream = 0
    for ev in srv.receive_data(core.flush()):
        if isinstance(ev, h2.events.RequestReceived):
            stream = ev.stream_id
    srv.send_headers(stream, [(":status", "200")])
    core.receive(srv.data_to_send())
    return core, srv, stream


def _reads(acks_per_read: int) -> tuple[LinkCore, list[bytes]]:
    """A linked core and ``READS`` reads from its server."""
    core, srv, stream = _linked()
    reads = []
    for r in range(READS):
        srv.send_data(stream, encode_acks({f"s{r}": list(range(1, acks_per_read + 1))}))
        reads.append(srv.data_to_send())
    return core, reads


@pytest.mark.parametrize("acks", [1, 16])
def test_link_core_receive(benchmark: Any, acks: int) -> None:
    def run(core: LinkCore, reads: list[bytes]) -> None:
        for data in reads:
            core.receive(data)
            core.flush()

    benchmark.pedantic(run, setup=lambda: (_reads(acks), {}), rounds=50)


@pytest.mark.parametrize("acks", [1, 16])
def test_h2_receive_peer(benchmark: Any, acks: int) -> None:
    """What the link core did before: every frame through h2."""

    def run(core: LinkCore, reads: list[bytes]) -> None:
        conn = core.h2
        dec = LengthPrefixedDecoder(MAX_LINK_FRAME, check_from_downstream)
        for data in reads:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    dec.feed(ev.data)
            conn.data_to_send()

    benchmark.pedantic(run, setup=lambda: (_reads(acks), {}), rounds=50)


def _room(core: LinkCore) -> bytes:
    """WINDOW_UPDATEs from the server: room for every round's writes."""
    return window_update(0, 1 << 30) + window_update(core.stream, 1 << 30)


def _writes(msgs: int) -> list[bytes]:
    return [b"m" * 300 * msgs for _ in range(READS)]


@pytest.mark.parametrize("msgs", [1, 4])
def test_link_core_flush(benchmark: Any, msgs: int) -> None:
    def run(core: LinkCore, writes: list[bytes]) -> None:
        for data in writes:
            core.queue(data)
            core.flush()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        core, _, _ = _linked()
        core.receive(_room(core))
        return (core, _writes(msgs)), {}

    benchmark.pedantic(run, setup=setup, rounds=50)


@pytest.mark.parametrize("msgs", [1, 4])
def test_h2_send_peer(benchmark: Any, msgs: int) -> None:
    """What the link core did before: h2 builds the DATA frames."""

    def run(core: LinkCore, writes: list[bytes]) -> None:
        conn = core.h2
        for data in writes:
            conn.send_data(core.stream, data)
            conn.data_to_send()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        core, _, _ = _linked()
        core.h2.receive_data(_room(core))  # h2 itself takes them here
        return (core, _writes(msgs)), {}

    benchmark.pedantic(run, setup=setup, rounds=50)
