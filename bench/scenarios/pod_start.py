"""pod_start_to_first_read: a pod's start to its consumer's first read, FUSE volume vs emptyDir.

The scenario that answers the issue "report the time from a
sandboxed pod's start to its consumer's first read, as a ratio to the same
pod with an emptyDir instead of the FUSE volume (goal <= 1.2x)". Both pods
are run by the kubelet emulator's pod worker (e2e.node.Node.run_pod,
e2e.pods.RunningPod), on one simulated node with the real driver:

* pod A, "fuse": the documented pattern. Volumes "data" (CSI, native mode)
  and "data-broker" (its socketFor volume at /run/csi-async). A native
  sidecar runs libfuse's `hello -f /run/data`, which mounts through the zipapp
  (bound over fusermount3 in every container) and the broker, gated by the
  examples' startupProbe `fusermount3 --wait /run/data --timeout 30`
  (periodSeconds 1, initialDelaySeconds 0, timeoutSeconds 35). Then the app
  container reads /run/data/hello.
* pod B, "empty_dir": the same containers, probe timings and mounts, but
  "data" is an emptyDir that already holds the same file (written before the
  clock starts) and there is no broker volume; the sidecar only idles and
  its startupProbe is `true`, so it succeeds at its first run.

Pod start is the moment kubelet begins the pod's volume setup: run_pod is
called (for A the NodePublishVolume RPCs begin; for B the emptyDir is set
up). kubelet's SyncPod waits for every volume (WaitForAttachAndMount)
before it starts the first container, so the volume setup is on the pod's
critical path and belongs to what the FUSE volume costs the pod; timing
from the first container would leave the CSI calls out. The end is the
app's first successful read: the app itself takes the time (`date
+%s.%N`, the host's clock: containers have no time namespace) right after
`cat /run/data/hello` returned the file's text, so polling its log adds nothing.

Pods A and B alternate (A B, B A, ...), each a fresh pod (new UID) that is
deleted, and its volumes torn down, before the next starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Measurement, interleaved, median
from bench.profiling import profiled
from bench.testbed import EXAMPLES, Env, simulated_node
from e2e.kubelet import Pod
from e2e.node import Node
from e2e.pods import (
    ALWAYS,
    ContainerSpec,
    EmptyDirVolume,
    PodSpec,
    VolumeMount,
    fuse_startup_probe,
    fuse_volume_spec,
)
from e2e.sandbox import HOST_TO_CONTAINER

NAME = "pod_start_to_first_read"
IDS = (NAME,)
FUSE = "fuse"
EMPTY_DIR = "empty_dir"
KINDS = (FUSE, EMPTY_DIR)

# Where the node binds build/fuse-examples into every container (the
# checkout may be somewhere uid 65534 cannot reach).
EXAMPLES_IN_CONTAINERS = "/run/examples"
# The examples use /data; the sandbox binds volumes below /run, /tmp or /dev only.
DATA = "/run/data"
FILE = "hello"
TEXT = "Hello World!"  # libfuse's hello serves "Hello World!\n"
# A container's PID 1 gets SIGTERM only if it handles it.
IDLE = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
MARK = "first-read"
# The consumer: read until the file's text comes back (the sidecar's
# startupProbe should make the first try succeed), take the time, idle.
APP = (
    "trap 'exit 0' TERM; n=0; "
    f'until [ "$(cat {DATA}/{FILE} 2>/dev/null)" = "{TEXT}" ]; do '
    'n=$((n+1)); [ "$n" -lt 100000 ] || exit 1; done; '
    f'echo "{MARK} $(date +%s.%N) failed-tries $n"; ' + IDLE.removeprefix("trap 'exit 0' TERM; ")
)
GRACE = 5.0


def fuse_pod() -> PodSpec:
    """Pod A: hello as a native FUSE sidecar behind fusermount3 --wait, then the app."""
    fuse = fuse_volume_spec("data")
    sidecar = ContainerSpec(
        "fuse",
        [f"{EXAMPLES_IN_CONTAINERS}/hello", "-f", DATA],
        fuse.fuse_container_mounts(DATA),
        restart_policy=ALWAYS,
        startup_probe=fuse_startup_probe(DATA),
    )
    app = ContainerSpec("app", ["sh", "-c", APP], [fuse.consumer_mount(DATA, HOST_TO_CONTAINER)])
    return PodSpec(
        containers=[app],
        init_containers=[sidecar],
        volumes=fuse.volumes,
        termination_grace_period_seconds=GRACE,
    )


def empty_dir_pod() -> PodSpec:
    """Pod B: the same shape on an emptyDir; the sidecar idles, its probe is `true`."""
    probe = dataclasses.replace(fuse_startup_probe(DATA), command=["true"])
    mount = VolumeMount("data", DATA, mount_propagation=HOST_TO_CONTAINER)
    sidecar = ContainerSpec(
        "fuse", ["sh", "-c", IDLE], [mount], restart_policy=ALWAYS, startup_probe=probe
    )
    app = ContainerSpec("app", ["sh", "-c", APP], [mount])
    return PodSpec(
        containers=[app],
        init_containers=[sidecar],
        volumes={"data": EmptyDirVolume()},
        termination_grace_period_seconds=GRACE,
    )


@dataclass
class PodRun:
    """One pod's start, in ms after pod start (run_pod called)."""

    kind: str
    round: int
    warmup: bool
    # the sidecar container was created (volumes set up, first container made)
    sidecar_created_ms: float
    # its startupProbe succeeded
    sidecar_started_ms: float
    # the app container was created
    app_created_ms: float
    # the app's first successful read
    first_read_ms: float
    # reads that failed before it (0 when the probe gated the app as it should)
    failed_reads: int

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def parse_first_read(log: str) -> tuple[float, int] | None:
    """(wall-clock time of the first read, failed tries) from the app's log."""
    for line in log.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] == MARK and fields[2] == "failed-tries":
            return float(fields[1]), int(fields[3])
    return None


def run_pod(node: Node, kind: str, index: int, warmup: bool, timeout: float) -> PodRun:
    """Start one pod of that kind, wait for the app's first read, delete the pod."""
    pod = Pod(f"{kind.replace('_', '-')}-{index}")
    if kind == EMPTY_DIR:
        spec = empty_dir_pod()
        # "Pre-filled": the file is there before the pod starts.
        path = node.make_empty_dir(pod, "data") / FILE
        path.write_text(TEXT + "\n")
        path.chmod(0o644)
    else:
        spec = fuse_pod()
    wall0 = time.time()
    mono0 = time.monotonic()
    running = node.run_pod(pod, spec)
    try:
        found: list[tuple[float, int]] = []

        def first_read() -> bool:
            parsed = parse_first_read(running.logs("app"))
            if parsed is not None:
                found.append(parsed)
            return parsed is not None

        # Polls the app's log; the time itself was taken by the app.
        running.wait_for(f"{kind} pod: the app's first read", first_read, timeout, 0.02)
        read_at, failed = found[0]
        sidecar, app = running.status("fuse"), running.status("app")
        assert sidecar.created_at is not None and sidecar.started_at is not None
        assert app.created_at is not None
        return PodRun(
            kind=kind,
            round=index,
            warmup=warmup,
            sidecar_created_ms=(sidecar.created_at - mono0) * 1000,
            sidecar_started_ms=(sidecar.started_at - mono0) * 1000,
            app_created_ms=(app.created_at - mono0) * 1000,
            first_read_ms=(read_at - wall0) * 1000,
            failed_reads=failed,
        )
    finally:
        node.delete_pod(running)


def measure(node: Node, rounds: int, warmup: int, timeout: float = 60.0) -> list[PodRun]:
    """warmup + rounds rounds of one pod A and one pod B, in alternating order."""
    runs: list[PodRun] = []
    for i in range(warmup + rounds):
        for kind in interleaved(KINDS, i):
            runs.append(run_pod(node, kind, i, i < warmup, timeout))
    return runs


def examples_bind(examples: Path) -> dict[str, Path]:
    """The node's shared_binds: the example binaries inside every container."""
    return {EXAMPLES_IN_CONTAINERS: examples}


def run(env: Env, ids: set[str]) -> list[Measurement]:
    """The rows: both pods' times, their ratio (the goal), per-round differences, stages."""
    name = NAME
    binds = examples_bind(EXAMPLES)
    with (
        simulated_node(env, "pod-start", shared_binds=binds) as node,
        profiled(env, node, name),
    ):
        runs = measure(node, env.sizes.pod_start_rounds, env.sizes.pod_start_warmup)
    timed = [r for r in runs if not r.warmup]
    fuse = [r for r in timed if r.kind == FUSE]
    empty = [r for r in timed if r.kind == EMPTY_DIR]
    a = Measurement(
        name,
        f"{name}.fuse",
        "pod A, FUSE volume (hello sidecar, zipapp+broker, fusermount3 --wait probe): "
        "pod start→app's first read",
        "ms",
        [r.first_read_ms for r in fuse],
    )
    b = Measurement(
        name,
        f"{name}.empty_dir",
        "pod B, same pod on a pre-filled emptyDir (probe `true`): pod start→app's first read",
        "ms",
        [r.first_read_ms for r in empty],
    )
    ratio = a.median / b.median

    # The same ratio with the clock started at the first container's creation
    # (leaves out the volume setup: the publish RPCs, or the emptyDir).
    from_container = median([r.first_read_ms - r.sidecar_created_ms for r in fuse]) / median(
        [r.first_read_ms - r.sidecar_created_ms for r in empty]
    )
    paired = [(x, y) for x in fuse for y in empty if x.round == y.round]
    per_round = [x.first_read_ms / y.first_read_ms for x, y in paired]
    retried = [f"{r.kind} round {r.round}: {r.failed_reads}" for r in timed if r.failed_reads]
    ratio_row = Measurement(
        name,
        f"{name}.ratio",
        "ratio of the medians A/B",
        "x",
        [ratio],
        "≤ 1.2",
        ratio <= 1.2,
        note=f"from the sidecar running instead of pod start: {from_container:.3f}; "
        f"median of the per-round ratios {median(per_round):.3f}"
        + (f"; reads that failed before the first success: {retried}" if retried else ""),
        extra={
            "ratio_of_medians": ratio,
            "ratio_from_first_container": from_container,
            "per_round_ratios": [round(v, 4) for v in per_round],
            "failed_reads": retried,
            "runs": [r.to_json() for r in runs],
        },
    )
    rows = [
        a,
        b,
        ratio_row,
        Measurement(
            name,
            f"{name}.difference",
            "  A - B, per round (paired)",
            "ms",
            [x.first_read_ms - y.first_read_ms for x, y in paired],
        ),
    ]
    # "running": the runtime has created and started the container (its
    # program is about to run); a sidecar is "started" once its probe passed.
    stages: list[tuple[str, str, Callable[[PodRun], float]]] = [
        ("volumes", "pod start→sidecar running (volume setup, then the container)",
         lambda r: r.sidecar_created_ms),
        ("probe", "sidecar running→its startupProbe passed",
         lambda r: r.sidecar_started_ms - r.sidecar_created_ms),
        ("app", "startupProbe passed→app running",
         lambda r: r.app_created_ms - r.sidecar_started_ms),
        ("read", "app running→first read", lambda r: r.first_read_ms - r.app_created_ms),
    ]  # fmt: skip
    for label, kind, pod_runs in (("A", "fuse", fuse), ("B", "empty_dir", empty)):
        for key, what, stage in stages:
            rows.append(
                Measurement(name, f"{name}.{kind}.{key}", f"  {label}: {what}", "ms",
                    [stage(r) for r in pod_runs])
            )  # fmt: skip
    return rows
