"""One read from a downstream, side by side: the link core's receive path
(the link stream's DATA frames parsed without h2, gateway.downstream.h2data)
against h2's own (``receive_data``, ``acknowledge_received_data`` and the
same frame decoder), on the same bytes from a real h2 server.

    .venv/bin/pytest bench/test_link_bench.py --benchmark-only \\
        --benchmark-columns=min,median,ops -q

A read is one DATA frame carrying ``acks`` frames for ``N`` messages, as
desk-sim answers a gateway's batch; ``[1]`` is the moderate-load case (a
read per message or so), ``[16]`` a busier one.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from gateway.downstream.link import LinkCore
from gateway.downstream.proto import MAX_LINK_FRAME, check_from_downstream, encode_acks
from gateway.protocol.codec import LengthPrefixedDecoder

READS = 200


def _reads(acks_per_read: int) -> tuple[LinkCore, list[bytes]]:
    """A linked core (response in) and ``READS`` reads from its server."""
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
