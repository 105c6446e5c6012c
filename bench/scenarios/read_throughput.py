"""P5: the data path, a sequential read through a mount made by the broker and a native one.

A file of random data on a private tmpfs; libfuse's `passthrough -f -o
allow_other,default_permissions` (the same binary and options for both)
started twice: in an agent whose /usr/bin/fusermount3 is the zipapp and
/dev/fuse a bind of /dev/null (as in a pod), mounting through the broker;
and in an agent with a 0666 /dev/fuse and user_allow_other, mounting with
the real fusermount3. Both daemons run in pod cgroups of the same depth. A
reader (/usr/bin/python3, uid 65534, readinto with a 1 MiB buffer) reads
the file through each mount; the rounds interleave the two reads, after
one discarded round, and the goal is on the median of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.agent_client import Agent
from bench.harness import Measurement, interleaved, paired_ratios, ratio_of_medians
from bench.profiling import profiled
from bench.testbed import MIB, NOBODY, Env, pod_cgroup_procs, simulated_node, socket_dir
from e2e.kubelet import Pod

IDS = ("P5",)
# The reader reports its own timing, so the agent's spawn is not in it.
READER = """
import json, os, sys, time
fd = os.environ.get("BENCH_PATH_FD")
path = f"/proc/self/fd/{fd}/{sys.argv[1]}" if fd else sys.argv[1]
buf = bytearray(1 << 20)
total = 0
with open(path, "rb", buffering=0) as f:
    started = time.perf_counter()
    while n := f.readinto(buf):
        total += n
    elapsed = time.perf_counter() - started
print(json.dumps({"bytes": total, "seconds": elapsed}))
"""


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=755", "bench-src", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run(env: Env, ids: set[str]) -> list[Measurement]:
    size = env.sizes.p5_mib * MIB
    options = "allow_other,default_permissions"
    with tmpfs(env.workdir / "p5-src", env.sizes.p5_mib + 64) as src:
        big = src / "big.bin"
        block = os.urandom(MIB)
        with big.open("wb") as f:
            for _ in range(env.sizes.p5_mib):
                f.write(block)
        big.chmod(0o644)
        mnt_ours = env.dir("p5/ours-mnt", NOBODY)
        mnt_native = env.dir("p5/native-mnt", NOBODY)
        rel = str(big).lstrip("/")
        with (
            simulated_node(env, "p5") as node,
            Agent(env, "p5-ours", zipapp=str(env.zipapp), dev_fuse="null") as ours,
            Agent(env, "p5-native", dev_fuse="open", user_allow_other=True) as native,
        ):
            volume = node.publish_fuse_volume(Pod("p5"), "data")
            ours.call(
                "spawn",
                key="passthrough",
                socket_dir=str(socket_dir(node, volume)),
                cgroup_procs=pod_cgroup_procs(node, volume.pod),
                argv=[str(env.passthrough), "-f", "-o", options, str(mnt_ours)],
            )
            # The native daemon gets a pod cgroup of its own, so that both
            # daemons sit equally deep in the cgroup tree (per-cgroup
            # accounting on every context switch is part of the data path).
            native.call(
                "spawn",
                key="passthrough",
                argv=[str(env.passthrough), "-f", "-o", options, str(mnt_native)],
                cgroup_procs=pod_cgroup_procs(node, Pod("p5-native")),
            )
            line_ours = ours.call("wait_mount", path=str(volume.target))["line"]
            line_native = native.call("wait_mount", path=str(mnt_native))["line"]
            mb_s: dict[str, list[float]] = {"ours": [], "native": []}

            def read(agent: Agent, key: str, path_fd: str | None, path: str) -> float:
                agent.call(
                    "spawn",
                    key=key,
                    capture=True,
                    path_fd=path_fd,
                    argv=["/usr/bin/python3", "-I", "-S", "-c", READER, path],
                )
                done = agent.call("wait", key=key, timeout=600)
                if done["returncode"] != 0:
                    raise RuntimeError(f"reader failed: {agent.log_tail()}")
                result = json.loads(done["stdout"])
                if result["bytes"] != size:
                    raise RuntimeError(f"read {result['bytes']} bytes, expected {size}")
                return float(result["bytes"]) / float(result["seconds"]) / 1e6

            with profiled(env, node, "P5"):
                for rep in range(env.sizes.p5_reps + 1):  # the first round warms up
                    for which in interleaved(("native", "ours"), rep):
                        if which == "ours":
                            value = read(ours, f"read-{rep}", str(volume.target), rel)
                        else:
                            value = read(native, f"read-{rep}", None, f"{mnt_native}/{rel}")
                        if rep:
                            mb_s[which].append(value)
            # libfuse unmounts through the helper on SIGTERM: ours via the
            # zipapp and the broker, native via the real fusermount3.
            ours.call("signal_all", signal=int(signal.SIGTERM))
            native.call("signal_all", signal=int(signal.SIGTERM))
            ours.call("wait_mount", path=str(volume.target), present=False)
            native.call("wait_mount", path=str(mnt_native), present=False)
    ours_row = Measurement(
        "P5",
        "P5.broker",
        f"passthrough via broker: sequential read of {env.sizes.p5_mib} MiB from tmpfs",
        "MB/s",
        mb_s["ours"],
        extra={"mountinfo": line_ours},
    )
    native_row = Measurement(
        "P5",
        "P5.native",
        "passthrough via native fusermount3: same read",
        "MB/s",
        mb_s["native"],
        extra={"mountinfo": line_native},
    )
    # Paired: the two reads of a round run back to back, under the same
    # background load, so their ratio is steadier than either throughput.
    ratios = paired_ratios(mb_s["ours"], mb_s["native"])
    of_medians = ratio_of_medians(mb_s["ours"], mb_s["native"])
    ratio_row = Measurement(
        "P5",
        "P5.ratio",
        "ratio broker/native, per round (paired reads)",
        "x",
        ratios,
        "p50 ≥ 0.97",
        note=f"ratio of the medians {of_medians:.3f}",
        extra={"ratio_of_medians": of_medians},
    )
    ratio_row.passed = ratio_row.median >= 0.97
    return [ours_row, native_row, ratio_row]
