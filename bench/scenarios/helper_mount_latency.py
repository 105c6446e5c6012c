"""P1: how long libfuse's mount through the helper takes, zipapp+broker against setuid fusermount3.

Interleaved, in one agent (bench/agent.py, its "p1" command): the bare
interpreter's start and exit (the floor any Python helper pays), the zipapp
mounting through the broker, and Debian's setuid fusermount3, each spawned
exactly as libfuse spawns its helper (the zipapp exec'd, through its "#!"
line). Timed: spawn → fd received, and
spawn → helper reaped. The broker's own share is the `duration_ms` of its
audit line per mount. With --profile, one more mount under -X importtime.
"""

from __future__ import annotations

from bench.agent_client import Agent
from bench.harness import Measurement
from bench.profiling import profiled, summarize_importtime
from bench.testbed import (
    NOBODY,
    Env,
    driver_log_durations,
    pod_cgroup_procs,
    simulated_node,
    socket_dir,
)
from e2e.kubelet import Pod

IDS = ("P1",)
# The goals: at most this much over the interpreter floor's median, to the
# fd and to the helper's exit.
OVER_FLOOR_MS = 1.5
OVER_FLOOR_EXIT_MS = 2.0


def run(env: Env, ids: set[str]) -> list[Measurement]:
    sizes = env.sizes
    with simulated_node(env, "p1") as node:
        pod = Pod("p1")
        volume = node.publish_fuse_volume(pod, "data")
        mnt_ours = env.dir("p1/ours-mnt", NOBODY)
        mnt_native = env.dir("p1/native-mnt", NOBODY)
        cgroup = pod_cgroup_procs(node, pod)
        with (
            Agent(env, "p1", dev_fuse="open", cgroup_procs=cgroup) as agent,
            profiled(env, node, "P1"),
        ):
            raw = agent.call(
                "p1",
                zipapp=str(env.zipapp),
                options="rw,nosuid,nodev,subtype=bench",
                socket_dir=str(socket_dir(node, volume)),
                target=str(volume.target),
                mnt_ours=str(mnt_ours),
                mnt_native=str(mnt_native),
                n=sizes.p1_n,
                warmup=sizes.p1_warmup,
                importtime=env.profile_dir is not None,
            )
        if "importtime" in raw:
            env.profiles["P1-zipapp-importtime"] = summarize_importtime(
                raw["importtime"], raw["importtime_floor"]
            )
        broker = driver_log_durations(node, "broker mount allowed")
        broker = broker[-sizes.p1_n :]
    floor = Measurement(
        "P1", "P1.floor", "interpreter floor: python3 -I -S -c pass, spawn→exit", "ms", raw["floor"]
    )
    floor_p50 = floor.median
    limit = floor_p50 + OVER_FLOOR_MS
    goal = f"≤ floor+{OVER_FLOOR_MS} = {limit:.2f}"
    exit_limit = floor_p50 + OVER_FLOOR_EXIT_MS
    ours_exit = Measurement(
        "P1",
        "P1.zipapp_exit",
        "zipapp+broker: spawn→fd received→helper reaped (libfuse's fuse_mount)",
        "ms",
        raw["ours_exit"],
        f"≤ floor+{OVER_FLOOR_EXIT_MS} = {exit_limit:.2f}",
    )
    ours_exit.passed = ours_exit.median <= exit_limit
    ours_fd = Measurement(
        "P1",
        "P1.zipapp_fd",
        "zipapp+broker: spawn→fd received (mount exists)",
        "ms",
        raw["ours_fd"],
        goal,
    )
    ours_fd.passed = ours_fd.median <= limit
    ours_exit.extra["p50_over_floor_ms"] = round(ours_exit.median - floor_p50, 3)
    ours_fd.extra["p50_over_floor_ms"] = round(ours_fd.median - floor_p50, 3)
    return [
        floor,
        ours_fd,
        ours_exit,
        Measurement(
            "P1",
            "P1.broker",
            "  of which broker-side handling (driver log duration_ms)",
            "ms",
            broker,
        ),
        Measurement(
            "P1",
            "P1.native_fd",
            "native setuid fusermount3: spawn→fd received",
            "ms",
            raw["native_fd"],
        ),
        Measurement(
            "P1",
            "P1.native_exit",
            "native setuid fusermount3: spawn→fd→helper reaped",
            "ms",
            raw["native_exit"],
        ),
    ]
