"""The gateway's metrics, declared once on :data:`REGISTRY`
(docs/operations.md, "Metrics")."""

from __future__ import annotations

from typing import Final

from gateway.ops.registry import REGISTRY

R = REGISTRY

MESSAGE_ACK: Final = R.histogram(
    "gateway_message_ack_seconds",
    "Visitor message received to acknowledged by the downstream",
)
ADMISSION_REJECTIONS: Final = R.counter(
    "gateway_admission_rejections_total", "New sessions told to retry later", ("reason",)
)
DOWNSTREAM_LATENCY: Final = R.histogram(
    "gateway_downstream_latency_seconds",
    "Message sent downstream to its ack/nack/timeout",
    labels=("cluster",),
)
DOWNSTREAM_REQUESTS: Final = R.counter(
    "gateway_downstream_requests_total", "Messages answered downstream", ("cluster", "result")
)
DOWNSTREAM_INFLIGHT: Final = R.gauge(
    "gateway_downstream_inflight", "Messages sent downstream and not answered", ("cluster",)
)
DOWNSTREAM_REDELIVERED: Final = R.counter(
    "gateway_downstream_redelivered_total",
    "Messages queued again after a nack, timeout or lost link",
    ("cluster",),
)
DOWNSTREAM_LINKS_UP: Final = R.gauge(
    "gateway_downstream_links_up",
    "HTTP/2 links to the endpoint that are up (summed over workers)",
    ("cluster", "endpoint"),
)
DOWNSTREAM_ENDPOINT_LATENCY: Final = R.gauge(
    "gateway_downstream_endpoint_latency_seconds",
    "The balancer's moving average of the endpoint's answer time (the highest over workers)",
    ("cluster", "endpoint"),
)
DOWNSTREAM_ENDPOINT_OUTSTANDING: Final = R.gauge(
    "gateway_downstream_endpoint_outstanding",
    "Messages sent to the endpoint and not answered (summed over workers)",
    ("cluster", "endpoint"),
)
DOWNSTREAM_CONNECT_FAILURES: Final = R.counter(
    "gateway_downstream_connect_failures_total",
    "Failed link connection attempts (refused, timed out, TLS handshake or certificate)",
    ("cluster", "endpoint"),
)
BREAKER_STATE: Final = R.gauge(
    "gateway_breaker_state",
    "Circuit breaker state per endpoint (0 closed, 1 half-open, 2 open)",
    ("cluster", "endpoint"),
)
BREAKER_TRANSITIONS: Final = R.counter(
    "gateway_breaker_transitions_total",
    "Circuit breaker state changes",
    ("cluster", "endpoint", "to"),
)

GC_PAUSE: Final = R.histogram(
    "gateway_gc_pause_seconds",
    "Collections of Python's cyclic garbage collector (the worker stands still), by generation",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    labels=("generation",),
)
for _gen in ("0", "1", "2"):
    GC_PAUSE.labels(_gen)

CRYPTO_BATCH_ITEMS: Final = R.histogram(
    "gateway_crypto_batch_items",
    "Items per seal/open batch (suite of the batch's first item)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536),
    labels=("suite", "op"),
)
CRYPTO_BATCH_SECONDS: Final = R.histogram(
    "gateway_crypto_batch_seconds",
    "Time per seal/open batch (suite of the batch's first item)",
    buckets=(0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
    labels=("suite", "op"),
)

# Every suite/op child exists from the start, so the series are exported (as
# zeros) before the first batch.
for _suite in ("aes-128-gcm", "aes-256-gcm", "sm4-gcm"):
    for _op in ("seal", "open"):
        CRYPTO_BATCH_ITEMS.labels(_suite, _op)
        CRYPTO_BATCH_SECONDS.labels(_suite, _op)
