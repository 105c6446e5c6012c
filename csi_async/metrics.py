"""Prometheus metrics: what the driver did, how long it took, what it refused.

Served on --metrics-address (off by default). The names are stable; see
docs/operations.md.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

RPC_REQUESTS = Counter(
    "csi_async_rpc_requests", "CSI RPCs handled, by method and gRPC code.", ["method", "code"]
)
RPC_DURATION = Histogram(
    "csi_async_rpc_duration_seconds", "CSI RPC latency.", ["method"], buckets=_LATENCY_BUCKETS
)
BROKER_REQUESTS = Counter(
    "csi_async_broker_requests",
    "Broker requests, by operation and decision (allowed, refused, failed).",
    ["op", "decision"],
)
BROKER_DURATION = Histogram(
    "csi_async_broker_duration_seconds",
    "Broker request latency, from accept to answer.",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
BROKER_REFUSALS = Counter(
    "csi_async_broker_refusals", "Broker requests refused, by reason.", ["reason"]
)
LIVE_MOUNTS = Gauge("csi_async_live_mounts", "FUSE mounts the broker currently holds.")
PUBLISHED_VOLUMES = Gauge("csi_async_published_volumes", "Volumes currently published.")
DEAD_MOUNTS_DETACHED = Counter(
    "csi_async_dead_mounts_detached", "Mounts detached because their FUSE daemon was gone."
)


def serve(address: str) -> None:
    """Start the /metrics HTTP endpoint on host:port (in its own thread)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104
