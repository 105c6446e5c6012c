"""Prometheus metrics: what the driver did, how long it took, what it refused.

Served on --metrics-address (off by default). The names are stable; see
docs/operations.md.

prometheus_client is imported only by serve(): it brings http.server, email and
ssl (OpenSSL) with it, several MiB the driver would carry for the whole life of
the node with metrics off. Until then each metric below is a stand-in whose
updates do nothing, so the call sites (`metrics.RPC_REQUESTS.labels(...).inc()`)
stay the same either way and cost one or two empty calls when metrics are off.
serve() replaces them, before any volume is restored or served, with the real
metrics of the same names, help, labels and buckets.
"""

from __future__ import annotations

from typing import Protocol


class CounterLike(Protocol):
    def labels(self, *labelvalues: str) -> CounterLike: ...
    def inc(self, amount: float = 1) -> None: ...


class GaugeLike(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...


class HistogramLike(Protocol):
    def labels(self, *labelvalues: str) -> HistogramLike: ...
    def observe(self, amount: float) -> None: ...


class _Off:
    """Every metric while metrics are off: each update is a no-op."""

    __slots__ = ()

    def labels(self, *labelvalues: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_OFF = _Off()

RPC_REQUESTS: CounterLike = _OFF
RPC_DURATION: HistogramLike = _OFF
BROKER_REQUESTS: CounterLike = _OFF
BROKER_DURATION: HistogramLike = _OFF
BROKER_REFUSALS: CounterLike = _OFF
LIVE_MOUNTS: GaugeLike = _OFF
PUBLISHED_VOLUMES: GaugeLike = _OFF
DEAD_MOUNTS_DETACHED: CounterLike = _OFF

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def enabled() -> bool:
    """Whether serve() has put the real metrics in place."""
    return RPC_REQUESTS is not _OFF


def _enable() -> None:
    """Put the real prometheus_client metrics in place of the stand-ins (once)."""
    global RPC_REQUESTS, RPC_DURATION, BROKER_REQUESTS, BROKER_DURATION  # noqa: PLW0603
    global BROKER_REFUSALS, LIVE_MOUNTS, PUBLISHED_VOLUMES, DEAD_MOUNTS_DETACHED  # noqa: PLW0603
    if enabled():
        return
    # Imported here, not at the top: see the module's docstring.
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415

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
    """Start the /metrics HTTP endpoint on host:port (in its own thread).

    Call it before any volume is published or restored: the gauges count from then on.
    """
    _enable()
    from prometheus_client import start_http_server  # noqa: PLC0415

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104
