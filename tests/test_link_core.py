"""The downstream link's sans-IO core against a hand-driven HTTP/2 server
(h2 on the other side, no sockets): the health check's verdicts."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from gateway.downstream.link import LinkCore
from gateway.downstream.proto import encode

TIMEOUT = 3.0


class _Desk:
    """The downstream's side of one link: an h2 server that answered the
    link request with ``status`` (200), the answer handed to the core unless
    ``deliver`` is false (then it waits in the server's output, with its
    SETTINGS)."""

    def __init__(self, core: LinkCore, status: int = 200, deliver: bool = True) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.initiate_connection()
        self.stream = 0
        self.pings = 0
        self.take(core)
        self.h2.send_headers(self.stream, [(":status", str(status))])
        if deliver:
            core.receive(self.h2.data_to_send())
            assert core.status == 200

    def take(self, core: LinkCore, answer_pings: bool = True) -> None:
        """Reads what the gateway wrote; h2 queues its PING ACKs, which
        reach the gateway only with the next :meth:`send`."""
        for ev in self.h2.receive_data(core.flush()):
            if isinstance(ev, h2.events.RequestReceived):
                self.stream = ev.stream_id
            elif isinstance(ev, h2.events.PingReceived):
                self.pings += 1
        if not answer_pings:
            self.h2.clear_outbound_data_buffer()

    def send(
        self, core: LinkCore, frame: dict[str, object] | None = None
    ) -> list[dict[str, object]]:
        if frame is not None:
            self.h2.send_data(self.stream, encode(frame))
        return core.receive(self.h2.data_to_send())


def _linked() -> tuple[LinkCore, _Desk]:
    core = LinkCore()
    core.start("desk:1", [])
    return core, _Desk(core)


def test_answered_ping_keeps_the_link_and_the_next_round_pings_again() -> None:
    core, desk = _linked()
    assert core.healthy(100.0, TIMEOUT) and core.ping_sent == 100.0
    desk.take(core)
    assert desk.pings == 1
    desk.send(core)  # the ACK
    assert core.ping_sent == 0.0
    assert core.healthy(200.0, TIMEOUT)  # long after: a new PING, not a verdict
    desk.take(core)
    assert desk.pings == 2 and core.ping_sent == 200.0


def test_silent_downstream_fails_the_check_once_the_timeout_passed() -> None:
    core, desk = _linked()
    core.healthy(100.0, TIMEOUT)
    desk.take(core, answer_pings=False)
    assert core.healthy(100.0 + TIMEOUT, TIMEOUT)  # not yet past it
    assert not core.healthy(100.0 + TIMEOUT + 0.01, TIMEOUT)


def test_downstream_sending_while_its_ack_is_late_keeps_its_link() -> None:
    """Frames received after the PING show the downstream alive: the wait
    for the ACK starts again. When it then falls silent, the next timeout
    ends the link."""
    core, desk = _linked()
    core.healthy(100.0, TIMEOUT)
    desk.take(core, answer_pings=False)
    frames = desk.send(core, {"t": "ack", "sid": "s1", "n": 1})
    assert frames and frames[0]["t"] == "ack"
    assert core.healthy(104.0, TIMEOUT)
    assert core.ping_sent == 104.0  # the wait starts again from here
    assert core.healthy(107.0, TIMEOUT)
    assert not core.healthy(107.5, TIMEOUT)


def test_bytes_received_before_the_ping_do_not_count() -> None:
    core, desk = _linked()
    desk.send(core, {"t": "ack", "sid": "s1", "n": 1})
    core.healthy(100.0, TIMEOUT)
    desk.take(core, answer_pings=False)
    assert not core.healthy(104.0, TIMEOUT)
