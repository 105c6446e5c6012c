"""P3: a burst of pods at once, against the same pods one after another, on one node.

Each pod publishes a FUSE volume and its socket volume through the kubelet
emulator (for each volume, in a thread of its own as kubelet's volume
manager does: NodeGetCapabilities twice, then NodePublishVolume; a new
channel per call), then starts libfuse's `hello -f` for it in an agent.
Mounts are detected by polling mountinfo; then each mount's `hello` is read
through the kubelet target.

Two phases of the same size, each timed from its first publish to its last
mount, with everything unpublished in between:

- one after another: the next pod starts when the previous one's mount is
  up. Its per-pod publish times are the uncontended single publish;
- the burst: one thread per pod, all at once.

The goals (issue #13) are ratios within the run, so that they hold on a
loaded machine: 0 failures; the burst's per-volume publish p99 ≤ 20 times
the uncontended single publish's p50; the burst's wall time ≤ 0.5 times the
wall time of the one-after-another phase. Failures are RPC errors, programs
that exit, mounts that do not appear within 120 s, and unreadable mounts.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.agent_client import Agent
from bench.harness import Measurement, elapsed_ms, percentile
from bench.mount_watch import MountWatcher
from bench.profiling import profiled
from bench.testbed import (
    NOBODY,
    Env,
    pod_cgroup_procs,
    read_hello,
    simulated_node,
    socket_dir,
    unpublish_all,
)
from e2e.kubelet import Pod
from e2e.node import Node

IDS = ("P3",)
MOUNT_TIMEOUT = 120
# The goals: burst publish p99 / single publish p50, and burst wall / one-after-another wall.
PUBLISH_RATIO_GOAL = 20.0
WALL_RATIO_GOAL = 0.5


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    failures: list[str] = field(default_factory=list)
    publish_ms: list[float] = field(default_factory=list)
    to_mounted_ms: list[float] = field(default_factory=list)
    spawn_to_mounted_ms: list[float] = field(default_factory=list)
    wall_s: float = math.nan
    mounted: int = 0
    readable: int = 0


def _run_phase(
    env: Env, node: Node, agent: Agent, mnt: Path, name: str, pods: int, burst: bool
) -> Phase:
    phase = Phase(name)
    lock = threading.Lock()
    targets: list[str] = []
    spawned_at: dict[str, float] = {}
    with MountWatcher() as watcher:

        def one(i: int) -> str | None:
            started = time.perf_counter()
            pod = Pod(f"{name}-{i}")
            try:
                volume = node.publish_fuse_volume(pod, "data")
            except Exception as err:
                with lock:
                    phase.failures.append(f"publish {pod.name}: {err}")
                return None
            published = time.perf_counter()
            target = str(volume.target)
            watcher.watch(target)
            with lock:
                targets.append(target)
                phase.publish_ms.append(elapsed_ms(started, published))
            agent.call(
                "spawn",
                key=f"hello-{name}-{i}",
                argv=[str(env.hello), "-f", str(mnt)],
                socket_dir=str(socket_dir(node, volume)),
                cgroup_procs=pod_cgroup_procs(node, pod),
            )
            spawned_at[target] = time.perf_counter()
            return target

        def exited() -> bool:
            return bool(agent.call("exited"))

        t0 = time.perf_counter()
        if burst:
            with ThreadPoolExecutor(max_workers=pods) as pool:
                list(pool.map(one, range(pods)))
        else:
            for i in range(pods):
                target = one(i)
                if target is not None:
                    watcher.wait_for({target}, timeout=MOUNT_TIMEOUT, give_up=exited)
        all_up = watcher.wait_for(set(targets), timeout=MOUNT_TIMEOUT, give_up=exited)
        seen = dict(watcher.seen)
    if all_up and not phase.failures:
        phase.wall_s = max(seen.values(), default=t0) - t0
    for key, code in agent.call("exited").items():
        phase.failures.append(f"{key} exited with {code}")
    mounted = [t for t in targets if t in seen]
    phase.failures += [f"{t}: not mounted" for t in targets if t not in seen]
    phase.mounted = len(mounted)
    phase.readable = sum(read_hello(Path(t)) for t in mounted)
    if phase.readable != phase.mounted:
        phase.failures.append(f"{phase.mounted - phase.readable} mounts not readable")
    phase.to_mounted_ms = [elapsed_ms(t0, seen[t]) for t in mounted]
    phase.spawn_to_mounted_ms = [elapsed_ms(spawned_at[t], seen[t]) for t in mounted]
    agent.call("kill_all")
    unpublish_all(node)
    return phase


def run(env: Env, ids: set[str]) -> list[Measurement]:
    pods = env.sizes.p3_burst
    mnt = env.dir("p3/mnt", NOBODY)
    with (
        simulated_node(env, "p3") as node,
        Agent(env, "p3", zipapp=str(env.zipapp), dev_fuse="null") as agent,
    ):
        serial = _run_phase(env, node, agent, mnt, "serial", pods, burst=False)
        with profiled(env, node, "P3"):
            burst = _run_phase(env, node, agent, mnt, "burst", pods, burst=True)
    return _rows(serial, burst, pods)


def _rows(serial: Phase, burst: Phase, pods: int) -> list[Measurement]:
    failures = serial.failures + burst.failures
    single_p50 = percentile(sorted(serial.publish_ms), 0.5) if serial.publish_ms else math.nan
    burst_p99 = percentile(sorted(burst.publish_ms), 0.99) if burst.publish_ms else math.nan
    publish_ratio = burst_p99 / single_p50
    wall_ratio = burst.wall_s / serial.wall_s
    extra = {
        "pods": pods,
        "mounted": {"serial": serial.mounted, "burst": burst.mounted},
        "readable": {"serial": serial.readable, "burst": burst.readable},
        "failures": failures[:20],
        "failure_count": len(failures),
        "wall_s": {
            "serial": None if math.isnan(serial.wall_s) else round(serial.wall_s, 3),
            "burst": None if math.isnan(burst.wall_s) else round(burst.wall_s, 3),
        },
        "burst_publish_p99_ms": round(burst_p99, 3),
        "single_publish_p50_ms": round(single_p50, 3),
        "publish_ratio": round(publish_ratio, 3),
        "wall_ratio": round(wall_ratio, 4),
    }
    wall_row = Measurement(
        "P3",
        "P3.wall",
        f"burst of {pods}: publish+mount all, wall time",
        "s",
        [] if math.isnan(burst.wall_s) else [burst.wall_s],
        "0 failures",
        not failures,
        note=f"{len(failures)} failures (both phases)"
        + (f", first: {failures[0]}" if failures else ""),
        extra=extra,
    )
    publish_ratio_row = Measurement(
        "P3",
        "P3.publish_ratio",
        "burst publish p99 / one-after-another publish p50",
        "x",
        [] if math.isnan(publish_ratio) else [publish_ratio],
        f"≤ {PUBLISH_RATIO_GOAL:g}",
        publish_ratio <= PUBLISH_RATIO_GOAL,
        note=f"burst publish p99 {burst_p99:.1f} ms, single publish p50 {single_p50:.1f} ms",
    )
    wall_ratio_row = Measurement(
        "P3",
        "P3.wall_ratio",
        "burst wall time / one-after-another wall time",
        "x",
        [] if math.isnan(wall_ratio) else [wall_ratio],
        f"≤ {WALL_RATIO_GOAL:g}",
        wall_ratio <= WALL_RATIO_GOAL,
        note=f"burst {burst.wall_s:.2f} s, one after another {serial.wall_s:.2f} s",
    )
    return [
        wall_row,
        publish_ratio_row,
        wall_ratio_row,
        Measurement(
            "P3",
            "P3.publish",
            "  burst, per pod: publish (FUSE + socket volume, 6 RPCs)",
            "ms",
            burst.publish_ms,
        ),
        Measurement(
            "P3",
            "P3.serial_publish",
            "  one after another, per pod: publish (the uncontended single publish)",
            "ms",
            serial.publish_ms,
        ),
        Measurement(
            "P3",
            "P3.serial_wall",
            f"  {pods} pods one after another: publish+mount each, wall time",
            "s",
            [] if math.isnan(serial.wall_s) else [serial.wall_s],
        ),
        Measurement(
            "P3",
            "P3.to_mounted",
            "  burst, per volume: burst start→mounted",
            "ms",
            burst.to_mounted_ms,
        ),
        Measurement(
            "P3",
            "P3.spawn_to_mounted",
            "  burst, per volume: hello started→mounted",
            "ms",
            burst.spawn_to_mounted_ms,
        ),
    ]
