"""P2: NodePublishVolume and NodeUnpublishVolume latency as a ratio to Probe, both socket modes.

Requests are built exactly as kubelet sends them for an inline volume
(nothing is mounted by a FUSE program). Each round runs, on a new channel
per call (as kubelet does) and on one reused channel, the two in alternating
order, both socket modes (docs/design.md), and a Probe after each mode:

- native: publish the FUSE volume and its socketFor volume (a read-only bind
  of the socket dir), then unpublish the socket volume and the FUSE volume;
- meta-fuse: with the pod's emptyDir made first, publish the FUSE volume
  whose socket goes into that emptyDir, then unpublish it.

Only the RPC is timed. The goal (issue #13) is a ratio measured in the same
run, so that it holds on a loaded machine: each RPC's p50 ≤ 1.3 times the p50 of
Probe (a no-op RPC, the transport's floor) over the same kind of channel.
The handler rows are the driver's own `duration_ms` per RPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import betterproto2
import grpc

from bench.harness import Measurement, elapsed_ms, interleaved
from bench.profiling import profiled
from bench.testbed import Env, driver_log_durations, simulated_node
from csi_async._proto.csi import v1 as csi
from e2e.csi_client import CsiClient
from e2e.kubelet import KubeletEmulator, Pod
from e2e.node import Node

IDS = ("P2",)
# The goal: each RPC's p50 at most this many times Probe's p50 (same channel kind).
RATIO_GOAL = 1.3
CHANNELS = ("reused", "new")
EMPTY_DIR = "fuse-fd-passing"
META_FUSE = {"fdPassingEmptyDirName": EMPTY_DIR, "fdPassingSocketName": "fuse.sock"}


@dataclass(frozen=True)
class Volume:
    """One CSI volume of a mode's pod."""

    label: str  # for row keys and names
    name: str
    attributes: dict[str, str]
    readonly: bool = False


# Per mode: the volumes published in this order (and unpublished in reverse).
MODES: dict[str, tuple[Volume, ...]] = {
    "native": (
        Volume("fuse", "data", {}),
        Volume("socket", "data-broker", {"socketFor": "data"}, readonly=True),
    ),
    "meta-fuse": (Volume("fuse", "data", META_FUSE),),
}
# Row names, and key prefixes: the native FUSE volume's rows keep the keys
# P2 had before it measured both modes (P2.publish_new, ...).
WHAT = {
    ("native", "fuse"): ("native FUSE volume", "P2"),
    ("native", "socket"): ("native socketFor volume", "P2.socket_volume"),
    ("meta-fuse", "fuse"): ("meta-fuse FUSE volume", "P2.meta_fuse"),
}
OPS = {"publish": "NodePublishVolume", "unpublish": "NodeUnpublishVolume"}


@dataclass
class Channels:
    """One way of calling each RPC per channel kind: a fresh channel per call, or one kept."""

    new: CsiClient
    reused: grpc.Channel
    _methods: dict[str, Callable[..., object]] = field(default_factory=dict)

    def call(
        self,
        kind: str,
        path: str,
        request: betterproto2.Message,
        response: type[betterproto2.Message],
    ) -> None:
        if kind == "new":
            self.new.call(path, request, response)
            return
        method = self._methods.get(path)
        if method is None:
            method = self.reused.unary_unary(
                path, request_serializer=bytes, response_deserializer=response.parse
            )
            self._methods[path] = method
        method(request, timeout=30)


def _round(
    node: Node, channels: Channels, caps: frozenset[csi.NodeServiceCapabilityRpcType],
    index: int, kind: str, mode: str,
) -> tuple[dict[tuple[str, str], float], float]:  # fmt: skip
    """One mode's publishes and unpublishes on one channel kind, then a Probe.

    Returns (ms by (volume label, op), Probe ms).
    """
    kubelet: KubeletEmulator = node.kubelet
    pod = Pod(f"p2-{mode}-{kind}-{index}")
    if mode == "meta-fuse":
        node.make_empty_dir(pod, EMPTY_DIR)
    volumes = MODES[mode]
    requests = {}
    for volume in volumes:
        kubelet.volume_dir(pod, volume.name).mkdir(parents=True, mode=0o750)
        requests[volume.label] = kubelet.build_publish_request(
            pod, volume.name, volume.attributes, volume.readonly, node_capabilities=caps
        )
    ms: dict[tuple[str, str], float] = {}
    for volume in volumes:
        request = requests[volume.label]
        t0 = time.perf_counter()
        channels.call(
            kind, "/csi.v1.Node/NodePublishVolume", request, csi.NodePublishVolumeResponse
        )
        ms[volume.label, "publish"] = elapsed_ms(t0)
    for volume in reversed(volumes):
        request = requests[volume.label]
        unpublish = csi.NodeUnpublishVolumeRequest(
            volume_id=request.volume_id, target_path=request.target_path
        )
        t0 = time.perf_counter()
        channels.call(
            kind, "/csi.v1.Node/NodeUnpublishVolume", unpublish, csi.NodeUnpublishVolumeResponse
        )
        ms[volume.label, "unpublish"] = elapsed_ms(t0)
    for volume in volumes:
        kubelet.remove_mount_dir(Path(requests[volume.label].target_path))
    if mode == "meta-fuse":
        node.empty_dir_path(pod, EMPTY_DIR).rmdir()
        node.empty_dir_path(pod, EMPTY_DIR).parent.rmdir()
    kubelet.cleanup_pod_dirs(pod)
    # The transport's floor: Probe does nothing in the driver.
    t0 = time.perf_counter()
    channels.call(kind, "/csi.v1.Identity/Probe", csi.ProbeRequest(), csi.ProbeResponse)
    return ms, elapsed_ms(t0)


def run(env: Env, ids: set[str]) -> list[Measurement]:
    n = env.sizes.p2_n
    warmup = max(3, n // 20)
    samples: dict[tuple[str, str, str, str], list[float]] = {}
    probes: dict[str, list[float]] = {kind: [] for kind in CHANNELS}
    with simulated_node(env, "p2") as node:
        caps = node.kubelet.node_capabilities()
        options = [("grpc.default_authority", "localhost"), ("grpc.enable_http_proxy", 0)]
        channels = Channels(
            CsiClient(node.driver.endpoint),
            grpc.insecure_channel(node.driver.endpoint, options=options),
        )
        with profiled(env, node, "P2"):
            for i in range(warmup + n):
                for kind in interleaved(CHANNELS, i):
                    for mode in interleaved(tuple(MODES), i // 2):
                        ms, probe_ms = _round(node, channels, caps, i, kind, mode)
                        if i < warmup:
                            continue
                        for (label, op), value in ms.items():
                            samples.setdefault((mode, label, op, kind), []).append(value)
                        probes[kind].append(probe_ms)
        channels.reused.close()
        handler = {op: driver_log_durations(node, f"{rpc} OK") for op, rpc in OPS.items()}
    return _rows(samples, probes, handler, n)


def _rows(
    samples: dict[tuple[str, str, str, str], list[float]],
    probes: dict[str, list[float]],
    handler: dict[str, list[float]],
    n: int,
) -> list[Measurement]:
    probe_rows = {
        kind: Measurement(
            "P2",
            f"P2.probe_{kind}",
            f"  Probe (no-op RPC: the gRPC floor), {kind} channel",
            "ms",
            probes[kind],
        )
        for kind in CHANNELS
    }
    rows = []
    for kind in ("new", "reused"):
        floor = probe_rows[kind].median
        limit = RATIO_GOAL * floor
        for (mode, label), (what, prefix) in WHAT.items():
            for op, rpc in OPS.items():
                values = samples[mode, label, op, kind]
                channel = "new channel (kubelet)" if kind == "new" else "reused channel"
                row = Measurement(
                    "P2",
                    f"{prefix}.{op}_{kind}",
                    f"{rpc}, {what}, {channel}",
                    "ms",
                    values,
                    f"≤ {RATIO_GOAL:g}xProbe = {limit:.2f}",
                )
                ratio = row.median / floor
                row.passed = ratio <= RATIO_GOAL
                row.note = f"p50 {ratio:.2f}x Probe's p50 ({floor:.2f} ms, {kind} channel)"
                row.extra = {"ratio_to_probe": round(ratio, 3), "probe_median_ms": floor}
                rows.append(row)
    per_round = sum(len(volumes) for volumes in MODES.values()) * len(CHANNELS)
    rows += [
        Measurement(
            "P2",
            f"P2.{op}_server",
            f"  {rpc} handler, all modes (driver log duration_ms)",
            "ms",
            handler[op][-per_round * n :],
        )
        for op, rpc in OPS.items()
    ]
    rows += [probe_rows["new"], probe_rows["reused"]]
    return rows
