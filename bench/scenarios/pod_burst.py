"""P3: a burst of pods at once, each publishing a FUSE volume and mounting it.

One thread per pod publishes a FUSE volume and its socket volume through the
kubelet emulator (for each: NodeGetCapabilities twice, then NodePublishVolume;
a new channel per call), then starts libfuse's `hello -f` for it in an agent.
Mounts are detected by polling mountinfo; then each mount's `hello` is read
through the kubelet target. Wall time is from the first publish to the last
mount; failures are RPC errors, programs that exit, mounts that do not appear
within 120 s, and unreadable mounts.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.agent_client import Agent
from bench.harness import Measurement, elapsed_ms
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
from e2e.node import FuseVolume

IDS = ("P3",)
MOUNT_TIMEOUT = 120


def run(env: Env, ids: set[str]) -> list[Measurement]:
    burst = env.sizes.p3_burst
    mnt = env.dir("p3/mnt", NOBODY)
    failures: list[str] = []
    publish_ms: list[float] = []
    spawned_at: dict[str, float] = {}
    with (
        simulated_node(env, "p3") as node,
        MountWatcher() as watcher,
        Agent(env, "p3", zipapp=str(env.zipapp), dev_fuse="null") as agent,
    ):
        volumes: dict[int, FuseVolume] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            started = time.perf_counter()
            pod = Pod(f"burst-{i}")
            try:
                volume = node.publish_fuse_volume(pod, "data")
            except Exception as err:
                with lock:
                    failures.append(f"publish {i}: {err}")
                return
            published = time.perf_counter()
            watcher.watch(str(volume.target))
            with lock:
                volumes[i] = volume
                publish_ms.append(elapsed_ms(started, published))
            agent.call(
                "spawn",
                key=f"hello-{i}",
                argv=[str(env.hello), "-f", str(mnt)],
                socket_dir=str(socket_dir(node, volume)),
                cgroup_procs=pod_cgroup_procs(node, pod),
            )
            spawned_at[str(volume.target)] = time.perf_counter()

        with profiled(env, node, "P3"):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=burst) as pool:
                list(pool.map(one, range(burst)))
            targets = {str(v.target) for v in volumes.values()}
            all_up = watcher.wait_for(
                targets, timeout=MOUNT_TIMEOUT, give_up=lambda: bool(agent.call("exited"))
            )
            wall = (max(watcher.seen.values(), default=t0) - t0) if all_up else math.nan
        exited = agent.call("exited")
        for key, code in exited.items():
            failures.append(f"{key} exited with {code}")
        mounted = [t for t in targets if t in watcher.seen]
        for target in targets - set(mounted):
            failures.append(f"{target}: not mounted")
        readable = sum(read_hello(Path(t)) for t in mounted)
        if readable != len(mounted):
            failures.append(f"{len(mounted) - readable} mounts not readable")
        to_mounted = [elapsed_ms(t0, watcher.seen[t]) for t in mounted]
        spawn_to_mounted = [elapsed_ms(spawned_at[t], watcher.seen[t]) for t in mounted]
        agent.call("kill_all")
        unpublish_all(node)
    extra = {
        "volumes": burst,
        "mounted": len(mounted),
        "readable": readable,
        "failures": failures[:20],
        "failure_count": len(failures),
        "wall_s": None if math.isnan(wall) else round(wall, 3),
    }
    wall_row = Measurement(
        "P3",
        "P3.wall",
        f"burst of {burst}: publish+mount all, wall time",
        "s",
        [] if math.isnan(wall) else [wall],
        "0 failures",
        not failures,
        note=f"{len(failures)} failures",
        extra=extra,
    )
    return [
        wall_row,
        Measurement("P3", "P3.to_mounted", "  per volume: burst start→mounted", "ms", to_mounted),
        Measurement(
            "P3",
            "P3.publish",
            "  per volume: publish (FUSE + socket volume, 6 RPCs)",
            "ms",
            publish_ms,
        ),
        Measurement(
            "P3",
            "P3.spawn_to_mounted",
            "  per volume: hello started→mounted",
            "ms",
            spawn_to_mounted,
        ),
    ]
