#!/usr/bin/env python3
"""csi-async benchmarks: mount latency, CSI RPC latency, bursts, memory, data plane, pod start.

    .venv/bin/python bench/run.py [--quick | --smoke] [--only P1,P2] [--json FILE] [--profile]

(pod_start_to_first_read, a pod's start to its consumer's first read with a
FUSE volume against an emptyDir, is in bench/pod_start.py.)

Runs as root on a Linux node with FUSE (the same prerequisites as
scripts/test.sh). Every measurement starts its own simulated node
(e2e.node.Node: a shared KubeletRoot, the real driver as a subprocess with
its CSI socket at <root>/plugins/<driver>/csi.sock, a grpcio kubelet
emulator) and tears it down again. Prints a table (median, p90, p99, N and
the goal per measurement) and writes the same as JSON. See
docs/performance.md for the method behind each measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench import pod_start  # noqa: E402
from csi_async._proto.csi import v1 as csi  # noqa: E402
from csi_async.volumes import NATIVE_SOCKET_NAME  # noqa: E402
from e2e.csi_client import CsiClient  # noqa: E402
from e2e.kubelet import Pod  # noqa: E402
from e2e.node import FuseVolume, Node  # noqa: E402

AGENT = REPO / "bench" / "agent.py"
EXAMPLES = REPO / "build" / "fuse-examples"
RESULTS_DIR = REPO / "bench" / "results"
NOBODY = 65534
HELLO_TEXT = b"Hello World!\n"
MIB = 1024 * 1024
# Every process of the run (this one, the driver, the agents and their
# programs) inherits this; 1000 volumes with live mounts need ~5 fds each in
# the driver.
NOFILE_WANTED = 65536
# The driver is started at the production log level (DriverProcess defaults
# to debug); the last --log-level wins.
DRIVER_ARGS = ["--log-level", "info"]
# A FUSE program that fails to mount in P6 is restarted, as kubelet restarts a
# failed container; P6 counts as served only if every volume ends up mounted.
P6_ATTEMPTS = 3
MEASUREMENTS = ("P1", "P2", "P3", "P4", "P5", "P6", pod_start.NAME)

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


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    mode: str
    p1_n: int
    p1_warmup: int
    p2_n: int
    p3_burst: int
    p46_volumes: int
    p46_in_flight: int
    p5_mib: int
    p5_reps: int
    # pod_start_to_first_read: timed rounds (one pod A and one pod B each), warm-up rounds
    pod_start_rounds: int
    pod_start_warmup: int


FULL = Sizes(
    "full",
    p1_n=200,
    p1_warmup=10,
    p2_n=300,
    p3_burst=200,
    p46_volumes=1000,
    p46_in_flight=16,
    p5_mib=512,
    p5_reps=16,
    pod_start_rounds=20,
    pod_start_warmup=1,
)
QUICK = Sizes(
    "quick",
    p1_n=60,
    p1_warmup=5,
    p2_n=100,
    p3_burst=100,
    p46_volumes=200,
    p46_in_flight=16,
    p5_mib=256,
    p5_reps=6,
    pod_start_rounds=6,
    pod_start_warmup=1,
)
SMOKE = Sizes(
    "smoke",
    p1_n=5,
    p1_warmup=1,
    p2_n=5,
    p3_burst=5,
    p46_volumes=5,
    p46_in_flight=4,
    p5_mib=16,
    p5_reps=1,
    pod_start_rounds=2,
    pod_start_warmup=0,
)


# ---------------------------------------------------------------------------- results


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    n = len(sorted_samples)
    if n == 1:
        return sorted_samples[0]
    k = (n - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, n - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (k - lo)


@dataclass
class Row:
    id: str
    key: str
    name: str
    unit: str
    samples: list[float]
    goal: str = ""
    passed: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, float | None]:
        if not self.samples:
            return {"median": None, "p90": None, "p99": None}
        s = sorted(self.samples)
        return {"median": percentile(s, 0.5), "p90": percentile(s, 0.9), "p99": percentile(s, 0.99)}

    @property
    def median(self) -> float:
        value = self.stats()["median"]
        if value is None:
            raise ValueError(f"{self.key} has no samples")
        return value

    @property
    def status(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "MISS")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            **self.stats(),
            "n": len(self.samples),
            "goal": self.goal,
            "status": self.status,
            "note": self.note,
            "extra": self.extra,
            "samples": [round(v, 6) for v in self.samples],
        }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("MB/s",) or abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(rows: list[Row], errors: dict[str, str]) -> str:
    header = ["ID", "measurement", "unit", "median", "p90", "p99", "N", "goal", "result"]
    lines = []
    for row in rows:
        st = row.stats()
        lines.append(
            [
                row.id,
                row.name,
                row.unit,
                fmt(st["median"], row.unit),
                fmt(st["p90"], row.unit),
                fmt(st["p99"], row.unit),
                str(len(row.samples)),
                row.goal,
                row.status,
            ]
        )
    for pid, message in errors.items():
        lines.append([pid, f"ERROR: {message}", "", "", "", "", "", "", "ERROR"])
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    numeric = {3, 4, 5, 6}

    def render(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                for i, c in enumerate(cells)
            )
            + " |"
        )

    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines]
    return "\n".join(out)


# ---------------------------------------------------------------------------- environment


@dataclass
class Env:
    workdir: Path
    zipapp: Path
    sizes: Sizes
    profile_dir: Path | None
    hello: Path = EXAMPLES / "hello"
    passthrough: Path = EXAMPLES / "passthrough"
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    kubelet_roots: list[Path] = field(default_factory=list)

    def dir(self, name: str, owner: int = 0) -> Path:
        """A fresh directory below the work dir (mode 0755, owned by `owner`)."""
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        os.chown(path, owner, owner)
        return path


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


# ---------------------------------------------------------------------------- helpers


class AgentError(RuntimeError):
    pass


class Agent:
    """bench/agent.py in its own mount namespace; see its docstring."""

    def __init__(self, env: Env, name: str, **config: Any) -> None:
        self.name = name
        self.log_path = env.workdir / f"agent-{name}.log"
        scratch = env.dir(f"agent-{name}-scratch")
        self.config = {"scratch": str(scratch), "log": str(self.log_path), **config}
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Agent:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "slave",
                    sys.executable,
                    "-I",
                    "-S",
                    str(AGENT),
                    json.dumps(self.config),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            self.proc.wait()
            raise AgentError(f"agent {self.name} did not start:\n{self.log_tail()}")
        return self

    def call(self, op: str, **kwargs: Any) -> Any:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise AgentError(f"agent {self.name} died:\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(f"agent {self.name}: {op}: {reply['error']}\n{self.log_tail()}")
        return reply["result"]

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.close()
            proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


class MountWatcher:
    """Polls mountinfo and records when FUSE mounts appear on watched paths."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="mount-watcher", daemon=True)

    def watch(self, path: str) -> None:
        with self._lock:
            self._watched.add(path)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            with open("/proc/self/mountinfo", "rb") as f:
                data = f.read()
            # Cheap on purpose (the table has thousands of lines in P4/P6 and
            # this shares two cores with the driver): FUSE lines only, and
            # only the mount point field of those.
            points = [
                os.fsdecode(line.split(b" ", 5)[4])
                for line in data.split(b"\n")
                if b" - fuse" in line
            ]
            with self._lock:
                for point in points:
                    if point in self._watched and point not in self.seen:
                        self.seen[point] = now
                        self._changed.notify_all()
            self._stop.wait(self.interval)

    def wait_for(self, paths: set[str], timeout: float, give_up: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not paths <= self.seen.keys():
                if time.monotonic() > deadline or give_up():
                    return False
                self._changed.wait(0.1)
        return True

    def __enter__(self) -> MountWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def simulated_node(env: Env, name: str, **node_args: Any) -> Iterator[Node]:
    workdir = env.dir(f"node-{name}")
    with Node(workdir, env.zipapp, driver_args=DRIVER_ARGS, **node_args) as node:
        env.kubelet_roots.append(node.root.path)
        yield node


def socket_dir(node: Node, volume: FuseVolume) -> Path:
    """The native-mode broker socket directory of a FUSE volume, on the host."""
    path = node.driver.state_dir / "sockets" / volume.pod.uid / volume.name
    assert (path / NATIVE_SOCKET_NAME).exists(), path
    return path


def pod_cgroup_procs(node: Node, pod: Pod) -> str:
    """The cgroup.procs file of a pod's cgroup, if the node checks broker peers by cgroup.

    kubelet runs a pod's containers in a cgroup named after the pod UID and
    the driver's broker (--peer-check cgroup) serves only processes in it;
    programs started for a volume join its pod's cgroup like a container would.
    """
    if not getattr(node, "pod_cgroups", False):
        return ""
    from e2e.podcgroup import pod_cgroup  # noqa: PLC0415

    return str(pod_cgroup(pod.uid))


def driver_log_durations(node: Node, msg: str) -> list[float]:
    """duration_ms of the driver's log lines with this message (RPCs and broker audit lines)."""
    return [
        float(str(e["duration_ms"]))
        for e in node.driver.log_entries()
        if e.get("msg") == msg and "duration_ms" in e
    ]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB), Threads and open fds of a process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def sample_rss(
    pid: int, count: int = 5, interval: float = 0.2
) -> tuple[list[float], dict[str, int]]:
    """VmRSS samples in MiB, and the last full status."""
    samples, status = [], {}
    for _ in range(count):
        status = proc_status(pid)
        samples.append(status["VmRSS"] / 1024)
        time.sleep(interval)
    return samples, status


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


# ---------------------------------------------------------------------------- P1


def bench_p1(env: Env) -> list[Row]:
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
    floor = Row(
        "P1", "P1.floor", "interpreter floor: python3 -I -S -c pass, spawn→exit", "ms", raw["floor"]
    )
    floor_p50 = floor.median
    limit = floor_p50 + 1.5
    goal = f"≤ floor+1.5 = {limit:.2f}"
    ours_exit = Row(
        "P1",
        "P1.zipapp_exit",
        "zipapp+broker: spawn→fd received→helper reaped (libfuse's fuse_mount)",
        "ms",
        raw["ours_exit"],
        goal,
    )
    ours_exit.passed = ours_exit.median <= limit
    ours_fd = Row(
        "P1",
        "P1.zipapp_fd",
        "zipapp+broker: spawn→fd received (mount exists)",
        "ms",
        raw["ours_fd"],
        goal,
    )
    ours_fd.passed = ours_fd.median <= limit
    overhead = ours_exit.median - floor_p50
    ours_exit.extra["p50_over_floor_ms"] = round(overhead, 3)
    rows = [
        floor,
        ours_fd,
        ours_exit,
        Row(
            "P1",
            "P1.broker",
            "  of which broker-side handling (driver log duration_ms)",
            "ms",
            broker,
        ),
        Row(
            "P1",
            "P1.native_fd",
            "native setuid fusermount3: spawn→fd received",
            "ms",
            raw["native_fd"],
        ),
        Row(
            "P1",
            "P1.native_exit",
            "native setuid fusermount3: spawn→fd→helper reaped",
            "ms",
            raw["native_exit"],
        ),
    ]
    return rows


# ---------------------------------------------------------------------------- P2


def bench_p2(env: Env) -> list[Row]:
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
                samples[f"pub_{mode}"].append((t1 - t0) * 1000)
                samples[f"unpub_{mode}"].append((t2 - t1) * 1000)
                samples[f"probe_{mode}"].append((t4 - t3) * 1000)

        with profiled(env, node, "P2"):
            for i in range(warmup + n):
                for mode in ("new", "reused") if i % 2 else ("reused", "new"):
                    one(i, mode)
        channel.close()
        server_pub = driver_log_durations(node, "NodePublishVolume OK")
        server_unpub = driver_log_durations(node, "NodeUnpublishVolume OK")
    goal = "p50 ≤ 3"
    rows = [
        Row(
            "P2",
            "P2.publish_new",
            "NodePublishVolume, new channel per call (kubelet)",
            "ms",
            samples["pub_new"],
            goal,
        ),
        Row(
            "P2",
            "P2.unpublish_new",
            "NodeUnpublishVolume, new channel per call (kubelet)",
            "ms",
            samples["unpub_new"],
            goal,
        ),
        Row(
            "P2",
            "P2.publish_reused",
            "NodePublishVolume, reused channel",
            "ms",
            samples["pub_reused"],
            goal,
        ),
        Row(
            "P2",
            "P2.unpublish_reused",
            "NodeUnpublishVolume, reused channel",
            "ms",
            samples["unpub_reused"],
            goal,
        ),
        Row(
            "P2",
            "P2.publish_server",
            "  NodePublishVolume handler (driver log duration_ms)",
            "ms",
            server_pub[-2 * n :],
        ),
        Row(
            "P2",
            "P2.unpublish_server",
            "  NodeUnpublishVolume handler (driver log duration_ms)",
            "ms",
            server_unpub[-2 * n :],
        ),
    ]
    rows += [
        Row("P2", "P2.probe_new", "  Probe (no-op RPC: the gRPC floor), new channel", "ms",
            samples["probe_new"]),
        Row("P2", "P2.probe_reused", "  Probe (no-op RPC: the gRPC floor), reused channel", "ms",
            samples["probe_reused"]),
    ]  # fmt: skip
    for row in rows[:4]:
        row.passed = row.median <= 3.0
    return rows


# ---------------------------------------------------------------------------- P3


def read_hello(target: Path) -> bool:
    try:
        return (target / "hello").read_bytes() == HELLO_TEXT
    except OSError:
        return False


def bench_p3(env: Env) -> list[Row]:
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
                publish_ms.append((published - started) * 1000)
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
                targets, timeout=120, give_up=lambda: bool(agent.call("exited"))
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
        to_mounted = [(watcher.seen[t] - t0) * 1000 for t in mounted]
        spawn_to_mounted = [(watcher.seen[t] - spawned_at[t]) * 1000 for t in mounted]
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
    wall_row = Row(
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
        Row("P3", "P3.to_mounted", "  per volume: burst start→mounted", "ms", to_mounted),
        Row(
            "P3",
            "P3.publish",
            "  per volume: publish (FUSE + socket volume, 6 RPCs)",
            "ms",
            publish_ms,
        ),
        Row(
            "P3",
            "P3.spawn_to_mounted",
            "  per volume: hello started→mounted",
            "ms",
            spawn_to_mounted,
        ),
    ]


def unpublish_all(node: Node, workers: int = 8) -> None:
    """Unpublish every volume of the node in parallel (Node.__exit__ does it serially)."""
    published = list(node._published)

    def one(item: tuple[Pod, str]) -> None:
        node.kubelet.unpublish(*item, strict=False)
        with contextlib.suppress(ValueError):
            node._published.remove(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, published))


# ---------------------------------------------------------------------------- P4 + P6


def bench_p46(env: Env, which: set[str]) -> list[Row]:
    count = env.sizes.p46_volumes
    mnt = env.dir("p46/mnt", NOBODY)
    rows: list[Row] = []
    with simulated_node(env, "p46") as node:
        assert node.driver.process is not None
        pid = node.driver.process.pid
        time.sleep(1.0)
        idle, idle_status = sample_rss(pid)
        volumes: list[FuseVolume] = []
        lock = threading.Lock()

        def publish(i: int) -> None:
            volume = node.publish_fuse_volume(Pod(f"many-{i}"), "data")
            with lock:
                volumes.append(volume)

        with profiled(env, node, "P4-publish"):
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(publish, range(count)))
            publish_s = time.perf_counter() - started
        time.sleep(1.0)
        published, published_status = sample_rss(pid)

        spawn_to_mounted: list[float] = []
        read_ms: list[float] = []
        failures: list[str] = []
        restarts: list[str] = []
        with (
            MountWatcher(interval=0.02) as watcher,
            Agent(env, "p46", zipapp=str(env.zipapp), dev_fuse="null") as agent,
        ):
            slots = threading.Semaphore(env.sizes.p46_in_flight)

            def mount(i: int) -> None:
                """Start hello for volume i; restart it if it fails, as kubelet would."""
                volume = volumes[i]
                target = str(volume.target)
                watcher.watch(target)
                with slots:
                    for attempt in range(P6_ATTEMPTS):
                        key = f"hello-{i}-{attempt}"
                        t = time.perf_counter()
                        agent.call(
                            "spawn",
                            key=key,
                            argv=[str(env.hello), "-f", str(mnt)],
                            socket_dir=str(socket_dir(node, volume)),
                            cgroup_procs=pod_cgroup_procs(node, volume.pod),
                        )

                        def exited(key: str = key) -> bool:
                            return agent.call("poll", key=key) is not None

                        if watcher.wait_for({target}, timeout=60, give_up=exited):
                            spawn_to_mounted.append((watcher.seen[target] - t) * 1000)
                            return
                        code = agent.call("wait", key=key, timeout=10)["returncode"]
                        restarts.append(f"{key} exited with {code}")
                    failures.append(f"{target}: not mounted after {P6_ATTEMPTS} attempts")

            with profiled(env, node, "P6-mount"):
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=env.sizes.p46_in_flight) as pool:
                    list(pool.map(mount, range(count)))
                mount_s = time.perf_counter() - started
            time.sleep(1.0)
            live, live_status = sample_rss(pid)
            started = time.perf_counter()
            ok = 0
            for volume in volumes:
                t = time.perf_counter()
                if read_hello(volume.target):
                    ok += 1
                    read_ms.append((time.perf_counter() - t) * 1000)
            read_s = time.perf_counter() - started
            exited = agent.call("exited")
            failures += [f"{k} exited with {c} after mounting" for k, c in exited.items()]
            final = proc_status(pid)
            agent.call("kill_all")
        with profiled(env, node, "P6-unpublish"):
            started = time.perf_counter()
            unpublish_all(node)
            unpublish_s = time.perf_counter() - started

    def status_extra(status: dict[str, int]) -> dict[str, Any]:
        return {
            "VmRSS_MiB": round(status["VmRSS"] / 1024, 1),
            "VmHWM_MiB": round(status["VmHWM"] / 1024, 1),
            "threads": status["Threads"],
            "fds": status["fds"],
        }

    if "P4" in which:
        rows += [
            Row(
                "P4",
                "P4.idle",
                "driver VmRSS, idle",
                "MiB",
                idle,
                "≤ 40",
                max(idle) <= 40,
                extra=status_extra(idle_status),
            ),
            Row(
                "P4",
                "P4.published",
                f"driver VmRSS, {count} FUSE volumes published (+{count} socket volumes)",
                "MiB",
                published,
                "≤ 64",
                max(published) <= 64,
                extra={**status_extra(published_status), "publish_s": round(publish_s, 2)},
            ),
            Row(
                "P4",
                "P4.live",
                f"driver VmRSS, {count} live mounts (hello)",
                "MiB",
                live,
                "≤ 64",
                max(live) <= 64,
                extra=status_extra(live_status),
            ),
            Row(
                "P4",
                "P4.hwm",
                "driver VmHWM at the end (peak RSS)",
                "MiB",
                [final["VmHWM"] / 1024],
                "≤ 64",
                final["VmHWM"] / 1024 <= 64,
                extra=status_extra(final),
            ),
        ]
    if "P6" in which:
        served = ok == count and not failures
        extra = {
            "volumes": count,
            "mounted": len(spawn_to_mounted),
            "readable": ok,
            "mount_all_s": round(mount_s, 2),
            "read_all_s": round(read_s, 3),
            "unpublish_all_s": round(unpublish_s, 2),
            "failures": failures[:20],
            "restarts": len(restarts),
            "restart_reasons": restarts[:20],
            "in_flight": env.sizes.p46_in_flight,
        }
        rows += [
            Row(
                "P6",
                "P6.mount",
                f"{count} hello mounts, {env.sizes.p46_in_flight} in flight: started→mounted",
                "ms",
                spawn_to_mounted,
                "all served",
                served,
                note=f"{ok}/{count} readable; all mounted in {mount_s:.1f} s; "
                f"{len(restarts)} program restarts (a failed first try is restarted, "
                f"up to {P6_ATTEMPTS} attempts)",
                extra=extra,
            ),
            Row(
                "P6",
                "P6.read",
                f"read hello through each of the {count} mounts",
                "ms",
                read_ms,
                "all served",
                served,
                note=f"{ok}/{count} in {read_s:.2f} s",
            ),
        ]
    return rows


# ---------------------------------------------------------------------------- P5


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


def bench_p5(env: Env) -> list[Row]:
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
                    order = ("ours", "native") if rep % 2 else ("native", "ours")
                    for which in order:
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
    ours_row = Row(
        "P5",
        "P5.broker",
        f"passthrough via broker: sequential read of {env.sizes.p5_mib} MiB from tmpfs",
        "MB/s",
        mb_s["ours"],
        extra={"mountinfo": line_ours},
    )
    native_row = Row(
        "P5",
        "P5.native",
        "passthrough via native fusermount3: same read",
        "MB/s",
        mb_s["native"],
        extra={"mountinfo": line_native},
    )
    # Paired: the two reads of a round run back to back, under the same
    # background load, so their ratio is steadier than either throughput.
    ratios = [o / n for o, n in zip(mb_s["ours"], mb_s["native"], strict=True)]
    of_medians = ours_row.median / native_row.median
    ratio_row = Row(
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


# ---------------------------------------------------------------------------- pod start


def bench_pod_start(env: Env) -> list[Row]:
    """pod_start_to_first_read: see bench/pod_start.py and docs/performance.md."""
    name = pod_start.NAME
    binds = pod_start.examples_bind(EXAMPLES)
    with (
        simulated_node(env, "pod-start", shared_binds=binds) as node,
        profiled(env, node, name),
    ):
        runs = pod_start.measure(node, env.sizes.pod_start_rounds, env.sizes.pod_start_warmup)
    timed = [r for r in runs if not r.warmup]
    fuse = [r for r in timed if r.kind == pod_start.FUSE]
    empty = [r for r in timed if r.kind == pod_start.EMPTY_DIR]
    a = Row(
        name,
        f"{name}.fuse",
        "pod A, FUSE volume (hello sidecar, zipapp+broker, fusermount3 --wait probe): "
        "pod start→app's first read",
        "ms",
        [r.first_read_ms for r in fuse],
    )
    b = Row(
        name,
        f"{name}.empty_dir",
        "pod B, same pod on a pre-filled emptyDir (probe `true`): pod start→app's first read",
        "ms",
        [r.first_read_ms for r in empty],
    )
    ratio = a.median / b.median

    def median(values: list[float]) -> float:
        return percentile(sorted(values), 0.5)

    # The same ratio with the clock started at the first container's creation
    # (leaves out the volume setup: the publish RPCs, or the emptyDir).
    from_container = median([r.first_read_ms - r.sidecar_created_ms for r in fuse]) / median(
        [r.first_read_ms - r.sidecar_created_ms for r in empty]
    )
    paired = [(x, y) for x in fuse for y in empty if x.round == y.round]
    per_round = [x.first_read_ms / y.first_read_ms for x, y in paired]
    retried = [f"{r.kind} round {r.round}: {r.failed_reads}" for r in timed if r.failed_reads]
    ratio_row = Row(
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
        Row(
            name,
            f"{name}.difference",
            "  A - B, per round (paired)",
            "ms",
            [x.first_read_ms - y.first_read_ms for x, y in paired],
        ),
    ]
    # "running": the runtime has created and started the container (its
    # program is about to run); a sidecar is "started" once its probe passed.
    stages: list[tuple[str, str, Callable[[pod_start.PodRun], float]]] = [
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
                Row(name, f"{name}.{kind}.{key}", f"  {label}: {what}", "ms",
                    [stage(r) for r in pod_runs])
            )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- main


def fuse_mounts_below(*tops: Path) -> list[str]:
    prefixes = tuple(str(t).rstrip("/") + "/" for t in tops)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4].startswith(prefixes) or fields[4] in {str(t) for t in tops}:
                found.append(f"{fields[4]} ({fields[fields.index('-') + 1]})")
    return found


def prepare(workdir: Path) -> Path:
    zipapp = workdir / "fusermount3"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zipapp.py"), "-o", str(zipapp)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build_fuse_examples.sh"), str(EXAMPLES)],
        check=True,
        capture_output=True,
    )
    return zipapp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller N everywhere (~2 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny N, for the test suite")
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"comma-separated measurements to run, of {', '.join(MEASUREMENTS)} (default: all)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default: bench/results/<date>.json)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the driver with py-spy during each measurement "
        "(timings then include its overhead)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs for debugging")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=N",
        help="override one size of the chosen mode, e.g. --set p46_volumes=300 "
        f"(fields: {', '.join(f.name for f in dataclasses.fields(Sizes) if f.name != 'mode')})",
    )
    args = parser.parse_args(argv)
    canonical = {m.lower(): m for m in MEASUREMENTS}
    requested = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in requested if p.lower() not in canonical]
    if unknown:
        parser.error(
            f"unknown measurement(s): {', '.join(unknown)} (known: {', '.join(MEASUREMENTS)})"
        )
    args.only = [canonical[p.lower()] for p in requested]
    overrides: dict[str, int] = {}
    names = {f.name for f in dataclasses.fields(Sizes)} - {"mode"}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            parser.error(f"--set {item}: expected FIELD=N with FIELD one of {sorted(names)}")
        overrides[name] = int(value)
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        sys.stderr.write("bench/run.py: --profile needs py-spy: .venv/bin/pip install py-spy\n")
        return 2
    if os.geteuid() != 0:
        sys.stderr.write("bench/run.py: run as root (it makes real FUSE mounts)\n")
        return 2
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    sizes = dataclasses.replace(sizes, **args.overrides)
    started = time.time()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    json_path = args.json or RESULTS_DIR / f"{stamp}.json"
    nofile = raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-bench-"))
    workdir.chmod(0o755)
    profile_dir = None
    if args.profile:
        profile_dir = json_path.parent / f"{json_path.stem}-profiles"
        profile_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    env = Env(workdir, prepare(workdir), sizes, profile_dir)
    machine = machine_info()
    print(
        f"csi-async bench ({sizes.mode}): {machine['cpus']} CPUs {machine['cpu_model']}, "
        f"kernel {machine['kernel']}, Python {machine['driver_python']} (driver) / "
        f"{machine['helper_python']} (helper), RLIMIT_NOFILE {nofile[0]}",
        flush=True,
    )
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("P1", lambda: bench_p1(env)),
        ("P2", lambda: bench_p2(env)),
        ("P3", lambda: bench_p3(env)),
    ]
    if {"P4", "P6"} & set(args.only):
        which = {"P4", "P6"} & set(args.only)
        steps.append(("+".join(sorted(which)), lambda: bench_p46(env, which)))
    steps.append(("P5", lambda: bench_p5(env)))
    steps.append((pod_start.NAME, lambda: bench_pod_start(env)))
    try:
        for label, step in steps:
            if not set(label.split("+")) & set(args.only):
                continue
            t = time.perf_counter()
            load_before = loadavg()
            print(f"{label} ...", end=" ", flush=True)
            try:
                new_rows = step()
                load = {
                    "before": load_before,
                    "after": loadavg(),
                    "seconds": round(time.perf_counter() - t, 1),
                }
                for row in new_rows:
                    row.extra.setdefault("loadavg_1m", load)
                rows += new_rows
                print(
                    f"{load['seconds']} s (load average {load_before} -> {load['after']})",
                    flush=True,
                )
            except Exception as err:
                errors[label] = (
                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
                print(f"failed after {time.perf_counter() - t:.1f} s", flush=True)
                traceback.print_exc()
    finally:
        own = fuse_mounts_below(workdir, *env.kubelet_roots)
        if not own and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    cleanup = {
        "mounts_left": own,
        "workdir_removed": not workdir.exists(),
        "kubelet_roots_removed": not any(r.exists() for r in env.kubelet_roots),
    }
    table = render_table(rows, errors)
    print()
    print(table)
    for row in rows:
        if row.note:
            print(f"  {row.key}: {row.note}")
    for label, summary in env.profiles.items():
        if "self_ms_beyond_floor" in summary:
            print(
                f"\n{label}: {summary['modules_beyond_floor']} modules beyond the bare "
                f"interpreter's, {summary['self_ms_beyond_floor']} ms self time under "
                f"-X importtime ({summary['zipapp_own_self_ms']} ms in fusermount3_proxy.*, "
                "compiled from source by zipimport); top (ms self / cumulative):"
            )
            for name, self_ms, cumulative_ms in summary["self_ms"][:12]:
                print(f"  {self_ms:6.2f} {cumulative_ms:7.2f}  {name}")
            continue
        print(
            f"\npy-spy, driver, {label}: {summary['busy_samples']} busy samples "
            f"(+{summary['idle_samples']} waiting); top frames by self / by inclusive share:"
        )
        for name, _n, pct in summary["self"][:6]:
            print(f"  self {pct:5.1f}%  {name}")
        for name, _n, pct in summary["inclusive"][:8]:
            print(f"  incl {pct:5.1f}%  {name}")
    report = {
        "schema": 1,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "mode": sizes.mode,
        "sizes": sizes.__dict__,
        "only": args.only,
        "machine": machine,
        "rlimit_nofile": list(nofile),
        "results": [row.to_json() for row in rows],
        "errors": errors,
        "profiles": env.profiles,
        "cleanup": cleanup,
        "table": table,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"\nresults: {json_path}   ({report['duration_s']} s)")
    if own:
        print(f"WARNING: mounts left behind: {own}", file=sys.stderr)
    return 1 if errors or own else 0


if __name__ == "__main__":
    sys.exit(main())
