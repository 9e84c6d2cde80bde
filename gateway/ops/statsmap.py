"""Maps a worker's flat event counters (``Hub.stats`` keys such as
``errors_4003`` or ``bytes_in_ws``) to Prometheus counter families.

Every key is exported: keys without a rule below land in
``gateway_events_total{event="<key>"}``, so a new counter in the code shows
up in ``/metrics`` without touching this table (docs/operations.md,
"Metrics").
"""

from __future__ import annotations

from typing import Final

__all__ = ["COUNTER_HELP", "SEEDED", "counter_labels", "map_key"]

#: exact key -> (metric, labels)
_EXACT: Final[dict[str, tuple[str, tuple[tuple[str, str], ...]]]] = {
    "connections_accepted": ("gateway_connections_accepted_total", ()),
    "ws_upgrades": ("gateway_handshakes_total", (("transport", "ws"),)),
    "h2_connections": ("gateway_handshakes_total", (("transport", "h2"),)),
    "h2_streams": ("gateway_h2_streams_total", ()),
    "handshake_timeouts": ("gateway_handshake_failures_total", (("reason", "timeout"),)),
    "tls_handshake_failures": ("gateway_handshake_failures_total", (("reason", "tls"),)),
    "tls_full": ("gateway_tls_handshakes_total", (("resumed", "false"),)),
    "tls_resumed": ("gateway_tls_handshakes_total", (("resumed", "true"),)),
    "origin_refused": ("gateway_connections_rejected_total", (("reason", "origin"),)),
    "messages_acked": ("gateway_messages_acked_total", ()),
    "messages_delivered": ("gateway_messages_delivered_total", ()),
    "duplicates_dropped": ("gateway_duplicates_dropped_total", ()),
    "sessions_opened": ("gateway_sessions_opened_total", ()),
    "sessions_resumed": ("gateway_sessions_resumed_total", ()),
    "sessions_taken_over": ("gateway_sessions_taken_over_total", ()),
    "resyncs": ("gateway_resyncs_total", ()),
    "sessions_expired": ("gateway_sessions_ended_total", (("reason", "expired"),)),
    "sessions_evicted": ("gateway_sessions_ended_total", (("reason", "evicted"),)),
    "heartbeat_timeouts": ("gateway_heartbeat_timeouts_total", ()),
    "hello_timeouts": ("gateway_hello_timeouts_total", ()),
    "slow_consumer_disconnects": ("gateway_slow_consumer_disconnects_total", ()),
    "heartbeats_sent": ("gateway_heartbeats_sent_total", ()),
    "reads_paused": ("gateway_reads_paused_total", ()),
    "internal_errors": ("gateway_internal_errors_total", ()),
    "loop_busy_s": ("gateway_loop_busy_seconds_total", ()),
    "loop_batches": ("gateway_loop_batches_total", ()),
    "loop_events": ("gateway_loop_events_total", ()),
    "loop_direct": ("gateway_loop_direct_wakeups_total", ()),
    "cpu_s": ("gateway_cpu_seconds_total", ()),
}

#: key prefix -> (metric, label name, fixed labels); the rest of the key is the label value
_PREFIX: Final[tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...]] = (
    ("connections_rejected_", "gateway_connections_rejected_total", "reason", ()),
    ("messages_in_", "gateway_messages_in_total", "transport", ()),
    ("messages_out_", "gateway_messages_out_total", "transport", ()),
    ("bytes_in_", "gateway_bytes_in_total", "transport", ()),
    ("bytes_out_", "gateway_bytes_out_total", "transport", ()),
    ("rate_limited_msg_", "gateway_rate_limited_total", "scope", (("kind", "message"),)),
    ("rate_limited_conn_", "gateway_rate_limited_total", "scope", (("kind", "session"),)),
    ("errors_", "gateway_errors_sent_total", "code", ()),
    ("closed_", "gateway_closes_total", "code", ()),
    ("http_", "gateway_http_errors_total", "status", ()),
    ("sticky_tickets_", "gateway_sticky_tickets_total", "result", ()),
    ("sticky_routes_", "gateway_sticky_routes_total", "result", ()),
)

COUNTER_HELP: Final = {
    "gateway_connections_accepted_total": "TCP connections accepted",
    "gateway_connections_rejected_total": "Connections refused, by reason",
    "gateway_handshakes_total": "Completed protocol handshakes, by transport",
    "gateway_handshake_failures_total": "Handshakes that failed, by reason",
    "gateway_h2_streams_total": "HTTP/2 visitor streams opened",
    "gateway_tls_handshakes_total": "Visitor TLS handshakes, by whether a session resumed",
    "gateway_messages_in_total": "Visitor messages received, by transport",
    "gateway_messages_out_total": "Messages delivered to connected visitors, by transport",
    "gateway_bytes_in_total": "Bytes read from visitor connections, by transport",
    "gateway_bytes_out_total": "Bytes written to visitor connections, by transport",
    "gateway_messages_acked_total": "Visitor messages acknowledged",
    "gateway_messages_delivered_total": "Messages queued for visitors (numbered frames)",
    "gateway_duplicates_dropped_total": "Visitor messages dropped as duplicates",
    "gateway_sessions_opened_total": "New sessions",
    "gateway_sessions_resumed_total": "Sessions resumed after a reconnect",
    "gateway_sessions_taken_over_total": "Sessions resumed while still attached elsewhere",
    "gateway_resyncs_total": "Resumes beyond the replay buffer (told to resync)",
    "gateway_sessions_ended_total": "Sessions ended for good, by reason",
    "gateway_heartbeat_timeouts_total": "Connections closed after missed heartbeats",
    "gateway_hello_timeouts_total": "Connections closed without a hello in time",
    "gateway_slow_consumer_disconnects_total": "Connections closed over their outbound bound",
    "gateway_heartbeats_sent_total": "Heartbeat pings sent",
    "gateway_reads_paused_total": "Times a connection stopped reading (backpressure)",
    "gateway_internal_errors_total": "Unexpected errors caught (a bug; see the logs)",
    "gateway_rate_limited_total": "Frames answered with 4029, by kind and scope",
    "gateway_errors_sent_total": "Error frames and close codes sent, by code",
    "gateway_closes_total": "Connections closed with a code, by code",
    "gateway_http_errors_total": "Plain HTTP error responses, by status",
    "gateway_sticky_tickets_total": "Sticky tickets issued, and those presented: used or refused",
    "gateway_sticky_routes_total": "Returning visitors opened on their endpoint (kept) or not",
    "gateway_events_total": "Other worker events, by name",
    "gateway_loop_busy_seconds_total": "Seconds the event loops spent handling ready connections",
    "gateway_loop_batches_total": "Event loop wakeups that handled ready connections",
    "gateway_loop_events_total": "Ready connections handled by the event loops",
    "gateway_loop_direct_wakeups_total": "Event loop wakeups from the loop's own wait, not trio's",
    "gateway_cpu_seconds_total": "CPU time (user + system) of the worker processes",
}


#: Counters exported (as 0) before anything happened, so that ``rate()``
#: and dashboards see them from the first scrape.
SEEDED: Final = tuple(
    sorted(
        {
            *_EXACT.values(),
            *(
                (f"gateway_{what}_total", (("transport", t),))
                for what in ("messages_in", "messages_out", "bytes_in", "bytes_out")
                for t in ("ws", "h2")
            ),
        }
    )
)


def counter_labels() -> dict[str, set[str]]:
    """Every metric an event counter can land in, with its label names
    (``gateway_events_total`` included)."""
    out: dict[str, set[str]] = {"gateway_events_total": {"event"}}
    for name, fixed in _EXACT.values():
        out.setdefault(name, set()).update(k for k, _ in fixed)
    for _, name, label, fixed in _PREFIX:
        out.setdefault(name, set()).update({label, *(k for k, _ in fixed)})
    return out


def map_key(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(metric name, ((label, value), ...))`` for a ``Hub.stats`` key."""
    hit = _EXACT.get(key)
    if hit is not None:
        return hit
    for prefix, name, label, fixed in _PREFIX:
        if key.startswith(prefix) and len(key) > len(prefix):
            return name, (*fixed, (label, key[len(prefix) :]))
    return "gateway_events_total", (("event", key),)
