"""P2: NodePublishVolume and NodeUnpublishVolume latency, new channel per call and reused.

Requests are built exactly as kubelet sends them for an inline volume (FUSE
volume, native mode, nothing mounted). Per round: publish then unpublish
one volume with a new channel per call (as kubelet does) and one on a
reused channel, the two in alternating order; then a Probe on each kind of
channel, the transport's floor. Only the RPC is timed. The handler rows are
the driver's own `duration_ms` per RPC.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from bench.harness import Measurement, elapsed_ms, interleaved
from bench.profiling import profiled
from bench.testbed import Env, driver_log_durations, simulated_node
from csi_async._proto.csi import v1 as csi
from e2e.csi_client import CsiClient
from e2e.kubelet import Pod

IDS = ("P2",)
GOAL_MS = 3.0


def run(env: Env, ids: set[str]) -> list[Measurement]:
    n = env.sizes.p2_n
    warmup = max(3, n // 20)
    with simulated_node(env, "p2") as node:
        kubelet = node.kubelet
        caps = kubelet.node_capabilities()
        new_client = CsiClient(node.driver.endpoint)
        options = [("grpc.default_authority", "localhost"), ("grpc.enable_http_proxy", 0)]
        channel = grpc.insecure_channel(node.driver.endpoint, options=options)
        reused_publish = channel.unary_unary(
            "/csi.v1.Node/NodePublishVolume",
            request_serializer=bytes,
            response_deserializer=csi.NodePublishVolumeResponse.parse,
        )
        reused_unpublish = channel.unary_unary(
            "/csi.v1.Node/NodeUnpublishVolume",
            request_serializer=bytes,
            response_deserializer=csi.NodeUnpublishVolumeResponse.parse,
        )
        reused_probe = channel.unary_unary(
            "/csi.v1.Identity/Probe",
            request_serializer=bytes,
            response_deserializer=csi.ProbeResponse.parse,
        )
        samples: dict[str, list[float]] = {
            k: []
            for k in (
                "pub_new",
                "unpub_new",
                "pub_reused",
                "unpub_reused",
                "probe_new",
                "probe_reused",
            )
        }

        def one(i: int, mode: str) -> None:
            pod = Pod(f"p2-{mode}-{i}")
            request = kubelet.build_publish_request(pod, "data", {}, node_capabilities=caps)
            kubelet.volume_dir(pod, "data").mkdir(parents=True, mode=0o750)
            unpublish = csi.NodeUnpublishVolumeRequest(
                volume_id=request.volume_id, target_path=request.target_path
            )
            if mode == "new":
                t0 = time.perf_counter()
                new_client.node_publish(request)
                t1 = time.perf_counter()
                new_client.node_unpublish(request.volume_id, request.target_path)
                t2 = time.perf_counter()
            else:
                t0 = time.perf_counter()
                reused_publish(request, timeout=30)
                t1 = time.perf_counter()
                reused_unpublish(unpublish, timeout=30)
                t2 = time.perf_counter()
            kubelet.remove_mount_dir(Path(request.target_path))
            kubelet.cleanup_pod_dirs(pod)
            # The transport's floor: Probe does nothing in the driver.
            t3 = time.perf_counter()
            if mode == "new":
                new_client.call("/csi.v1.Identity/Probe", csi.ProbeRequest(), csi.ProbeResponse)
            else:
                reused_probe(csi.ProbeRequest(), timeout=30)
            t4 = time.perf_counter()
            if i >= warmup:
                samples[f"pub_{mode}"].append(elapsed_ms(t0, t1))
                samples[f"unpub_{mode}"].append(elapsed_ms(t1, t2))
                samples[f"probe_{mode}"].append(elapsed_ms(t3, t4))

        with profiled(env, node, "P2"):
            for i in range(warmup + n):
                for mode in interleaved(("reused", "new"), i):
                    one(i, mode)
        channel.close()
        server_pub = driver_log_durations(node, "NodePublishVolume OK")
        server_unpub = driver_log_durations(node, "NodeUnpublishVolume OK")
    goal = f"p50 ≤ {GOAL_MS:g}"
    rows = [
        Measurement(
            "P2",
            "P2.publish_new",
            "NodePublishVolume, new channel per call (kubelet)",
            "ms",
            samples["pub_new"],
            goal,
        ),
        Measurement(
            "P2",
            "P2.unpublish_new",
            "NodeUnpublishVolume, new channel per call (kubelet)",
            "ms",
            samples["unpub_new"],
            goal,
        ),
        Measurement(
            "P2",
            "P2.publish_reused",
            "NodePublishVolume, reused channel",
            "ms",
            samples["pub_reused"],
            goal,
        ),
        Measurement(
            "P2",
            "P2.unpublish_reused",
            "NodeUnpublishVolume, reused channel",
            "ms",
            samples["unpub_reused"],
            goal,
        ),
    ]
    for row in rows:
        row.passed = row.median <= GOAL_MS
    rows += [
        Measurement(
            "P2",
            "P2.publish_server",
            "  NodePublishVolume handler (driver log duration_ms)",
            "ms",
            server_pub[-2 * n :],
        ),
        Measurement(
            "P2",
            "P2.unpublish_server",
            "  NodeUnpublishVolume handler (driver log duration_ms)",
            "ms",
            server_unpub[-2 * n :],
        ),
        Measurement("P2", "P2.probe_new", "  Probe (no-op RPC: the gRPC floor), new channel",
                    "ms", samples["probe_new"]),
        Measurement("P2", "P2.probe_reused",
                    "  Probe (no-op RPC: the gRPC floor), reused channel", "ms",
                    samples["probe_reused"]),
    ]  # fmt: skip
    return rows
