"""With --profile: where the driver spends its time (py-spy) and what the zipapp imports.

`profiled` records the driver with py-spy while a block runs and keeps a
summary of its busy samples; `summarize_importtime` ranks the modules the
zipapp imports beyond the bare interpreter's (python -X importtime).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.testbed import Env
from e2e.node import Node


@contextlib.contextmanager
def profiled(env: Env, node: Node, label: str) -> Iterator[None]:
    """With --profile: py-spy records the driver while the block runs."""
    if env.profile_dir is None:
        yield
        return
    py_spy = Path(sys.executable).parent / "py-spy"
    out = env.profile_dir / f"{label}.collapsed"
    assert node.driver.process is not None
    with (env.workdir / f"py-spy-{label}.log").open("wb") as log:
        spy = subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(node.driver.process.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--threads",
                "--output",
                str(out),
            ],
            stdout=log,
            stderr=log,
        )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        if out.exists():
            env.profiles[label] = summarize_profile(out)


# Frames where a thread waits rather than works (py-spy's idle detection
# misses some of them, e.g. worker threads parked in Condition.wait).
IDLE_FRAMES = (
    "Condition.wait",
    "EpollSelector.select",
    "Event.wait",
    "Thread.join",
    "_wait_for_tstate_lock",
    "SimpleQueue.get",
    "Queue.get",
)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Where the driver's busy samples are, from py-spy's collapsed stacks.

    "self": leaf frames (time spent in that line, including the syscalls it
    makes); "inclusive": csi_async frames by the share of busy samples that
    have them on the stack. Samples whose leaf is a wait are counted apart.
    """
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    busy = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_FRAMES):
            idle += count
            continue
        busy += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in {f for f in frames if "csi_async/" in f}:
            incl_counts[frame] = incl_counts.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[name, n, round(100 * n / busy, 1) if busy else 0.0] for name, n in best]

    return {
        "file": str(path),
        "busy_samples": busy,
        "idle_samples": idle,
        "self": ranked(self_counts),
        "inclusive": ranked(incl_counts),
    }


def parse_importtime(text: str) -> list[tuple[str, float, float]]:
    """python -X importtime lines as (module, self ms, cumulative ms)."""
    entries = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = (p.strip() for p in line[len("import time:") :].split("|"))
        entries.append((name, int(self_us) / 1000, int(cumulative_us) / 1000))
    return entries


def summarize_importtime(text: str, floor_text: str, top: int = 25) -> dict[str, Any]:
    """What the zipapp imports beyond the bare interpreter, by self time (ms).

    The times are taken with -X importtime, which inflates them somewhat;
    their shares are what matters. Modules compiled from source by
    zipimport (the zipapp's own) have the compile time in their self time.
    """
    floor_modules = {name for name, _, _ in parse_importtime(floor_text)}
    extra = [e for e in parse_importtime(text) if e[0] not in floor_modules]
    ranked = sorted(extra, key=lambda e: -e[1])[:top]
    return {
        "modules_beyond_floor": len(extra),
        "self_ms_beyond_floor": round(sum(e[1] for e in extra), 2),
        "zipapp_own_self_ms": round(
            sum(e[1] for e in extra if e[0].startswith("fusermount3_proxy")), 2
        ),
        "self_ms": [[name, round(own, 2), round(cum, 2)] for name, own, cum in ranked],
        "raw": text,
        "raw_floor": floor_text,
    }
