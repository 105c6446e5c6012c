"""The machine a run measured: hardware, versions, load, and the fd limit it needs."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from bench.testbed import MIB, REPO

# Every process of the run (this one, the driver, the agents and their
# programs) inherits this; 1000 volumes with live mounts need ~5 fds each in
# the driver.
NOFILE_WANTED = 65536


def loadavg() -> float:
    """The 1-minute load average: other work on the machine skews every timing."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = NOFILE_WANTED
    wanted = min(max(NOFILE_WANTED, soft), nr_open)
    if soft < wanted or hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        except (ValueError, OSError):
            # No CAP_SYS_RESOURCE (e.g. in a container): the hard limit it is.
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_info() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    def run(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return ""
        return (done.stdout or done.stderr).strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem_kib = next(
        (
            int(line.split()[1])
            for line in read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(
        run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--",
                "csi_async",
                "fusermount3_proxy",
                "e2e",
            ]
        )
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / MIB, 1),
        "kernel": platform.release(),
        "os": run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "driver_python": sys.version.split()[0],
        "helper_python": run(["/usr/bin/python3", "-V"]).removeprefix("Python "),
        "fusermount3": run(["/usr/bin/fusermount3", "-V"]),
        "grpcio": grpc.__version__,
        "loadavg_at_start": read("/proc/loadavg").split()[:3],
        "commit": commit + ("+dirty" if dirty else ""),
    }
