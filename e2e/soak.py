"""Soak: many pods mount, read and unmount FUSE volumes for a while; nothing may leak.

    python -m e2e soak [--duration 600] [--parallel 50] [--zipapp build/fusermount3]
                       [--examples build/fuse-examples]

`parallel` workers share one simulated node (the real driver, cgroup peer
check on). Each loops until the deadline: publish a native-mode FUSE volume
and its socket volume, start libfuse's hello as PID 1 of a sandboxed pod
container, wait for the mount, read /hello through the kubelet target, end
the mount, wait until it is gone, unpublish both volumes. The mount ends in
turn by `fusermount3 -u` from a second container, by SIGTERM (libfuse runs
fusermount3 -u itself), by SIGKILL (the broker's watcher detaches the dead
mount), or by unpublishing while hello still serves (the broker aborts the
connection).

At the end, after every volume is unpublished, nothing may be left: the
driver's fd count and thread count back at their baseline (taken after one
warm-up cycle of each kind), no mount below the kubelet root, no socket or
volume record in the state dir, no pod directory, no process in any pod's
cgroup, no child process of ours but the driver. The driver does not expose
its asyncio task count; leaked tasks show up here only through what they
hold (connection sockets, pidfds of watched daemons: fds) or run in (threads).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from e2e.kubelet import Pod
from e2e.node import Node
from e2e.podcgroup import cgroup2_root
from e2e.sandbox import Container, PodSandbox

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ZIPAPP = REPO / "build" / "fusermount3"
DEFAULT_EXAMPLES = REPO / "build" / "fuse-examples"
DATA = "/run/data"
EXAMPLES_IN_CONTAINERS = "/run/examples"
HELLO_TEXT = "Hello World!\n"
ENDINGS = ("fusermount3 -u", "SIGTERM", "SIGKILL", "unpublish")
# Generous: with 50 pods on 2 cores a step can wait many seconds for a CPU.
STEP_TIMEOUT = 120.0
# Once the mount's end is set off, the mount must be gone within this.
UNMOUNT_TIMEOUT = 30.0
# How long the driver's fd count may take to return to its baseline.
SETTLE_TIMEOUT = 30.0
# anyio keeps idle worker threads and stops those idle for 10 s only when it
# next hands a job to a thread: to compare thread counts, wait that long and
# then make the driver use a thread (see _quiesce).
ANYIO_MAX_IDLE = 10.0
# The driver's threads once quiesced: the event loop's and one idle worker.
QUIESCED_THREADS = 2


class SoakFailure(Exception):
    """One cycle went wrong (the message says which step)."""


@dataclass
class SoakReport:
    duration_s: float
    parallel: int
    cycles: int = 0
    failures: list[str] = field(default_factory=list)
    cycle_times: list[float] = field(default_factory=list)
    endings: Counter[str] = field(default_factory=Counter)
    baseline_fds: int = 0
    final_fds: int = 0
    baseline_threads: int = 0
    final_threads: int = 0
    peak_fds: int = 0
    peak_threads: int = 0
    baseline_rss_kib: int = 0
    final_rss_kib: int = 0
    leftovers: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def succeeded(self, seconds: float, ending: str) -> None:
        with self._lock:
            self.cycles += 1
            self.cycle_times.append(seconds)
            self.endings[ending] += 1

    def failed(self, message: str) -> None:
        with self._lock:
            self.failures.append(message)

    def percentile(self, fraction: float) -> float:
        if not self.cycle_times:
            return 0.0
        ordered = sorted(self.cycle_times)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> str:
        rate = self.cycles / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"soak: {self.cycles} cycles, {len(self.failures)} failures in {self.elapsed_s:.0f} s "
            f"with {self.parallel} parallel pods ({rate:.1f} cycles/s)",
            f"  cycle time p50 {self.percentile(0.5):.2f} s, p99 {self.percentile(0.99):.2f} s, "
            f"max {max(self.cycle_times, default=0.0):.2f} s",
            f"  endings: {dict(self.endings)}",
            f"  driver fds {self.baseline_fds} -> {self.final_fds} (peak {self.peak_fds}), "
            f"threads {self.baseline_threads} -> {self.final_threads} (peak {self.peak_threads}), "
            f"RSS {self.baseline_rss_kib} -> {self.final_rss_kib} KiB",
            f"  leftovers: {self.leftovers or 'none'}",
        ]
        kinds = Counter(_kind(message) for message in self.failures)
        for kind, count in kinds.most_common():
            example = next(m for m in self.failures if _kind(m) == kind)
            lines.append(f"  {count} x failure: {example}")
        return "\n".join(lines)


def _kind(message: str) -> str:
    """A failure message without what differs between cycles (worker, pod, path)."""
    text = re.sub(r"^worker \d+ cycle \d+ ", "", message)
    text = re.sub(r"/\S+", "<path>", text)
    return re.sub(r"\d+", "N", text)


# ---------------------------------------------------------------- the driver from outside


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise KeyError(name)


def driver_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def driver_threads(pid: int) -> int:
    return _status_field(pid, "Threads")


def driver_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(measure: Callable[[], int], target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (value := measure()) > target and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


# ---------------------------------------------------------------- one cycle


class FuseMounts:
    """Which paths have a FUSE mount, from mountinfo re-read by one thread.

    Fifty workers each polling /proc/self/mountinfo would cost whole CPUs
    once the node has a few thousand mounts (the kernel alone takes
    milliseconds to print it), so one thread reads it a few times a second
    and the workers wait on what it saw. Target paths here contain nothing
    that mountinfo escapes.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self._interval = interval
        self._changed = threading.Condition()
        self._points: frozenset[bytes] = frozenset()
        # When the read behind _points started: a wait trusts only reads
        # that started after it did.
        self._taken = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-mountinfo", daemon=True)

    def __enter__(self) -> FuseMounts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            taken = time.monotonic()
            with open("/proc/self/mountinfo", "rb") as f:
                lines = f.read().splitlines()
            points = frozenset(line.split(b" ", 5)[4] for line in lines if b" - fuse" in line)
            with self._changed:
                self._points, self._taken = points, taken
                self._changed.notify_all()
            self._stop.wait(self._interval)

    def wait(
        self, target: Path, mounted: bool, what: str, timeout: float,
        unless: Callable[[], bool] = lambda: False,
    ) -> None:  # fmt: skip
        """Until target is (or is no longer) a FUSE mount point, or `unless()`."""
        key = os.fsencode(target)
        since = time.monotonic()
        deadline = since + timeout
        with self._changed:
            while not (self._taken >= since and (key in self._points) == mounted):
                if unless():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SoakFailure(f"not {what} within {timeout:.0f} s")
                self._changed.wait(min(remaining, 1.0))


def _pod_cgroups() -> Path:
    """This soak's own parent of pod cgroups (the driver finds "pod<uid>"
    anywhere in a cgroup path). Not e2e.podcgroup's: every Node's exit
    removes the empty pod cgroups there, including ones made a moment ago
    by another test session for a container that is still starting."""
    root = cgroup2_root()
    assert root is not None
    return root / f"csi-async-soak-{os.getpid()}" / "kubepods"


def _remove_cgroup(directory: Path) -> None:
    """rmdir a pod's cgroup; EBUSY means a process is still in it."""
    deadline = time.monotonic() + 5
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                procs = (directory / "cgroup.procs").read_text().split()
                raise SoakFailure(
                    f"processes left in pod cgroup {directory.name}: {procs}"
                ) from err
            time.sleep(0.05)


class Cycle:
    """One pod's life: publish, mount, read, end the mount, unpublish."""

    def __init__(self, node: Node, mounts: FuseMounts, name: str, ending: str) -> None:
        self.node = node
        self.mounts = mounts
        self.pod = Pod(name)
        self.ending = ending
        self.cgroup: Path | None = None
        self.sandbox: PodSandbox | None = None
        self.published: list[str] = []

    def _sandbox(self, binds: dict[str, Path]) -> PodSandbox:
        # Like Node.sandbox (the pod's cgroup, the shared binds), without
        # the node keeping every sandbox of the soak until its exit.
        cgroup_procs = ""
        if self.node.pod_cgroups:
            self.cgroup = _pod_cgroups() / f"pod{self.pod.uid}"
            self.cgroup.mkdir()
            cgroup_procs = str(self.cgroup / "cgroup.procs")
        return PodSandbox(
            {**self.node.shared_binds, **binds},
            self.node.zipapp,
            die_with_parent=True,
            cgroup_procs=cgroup_procs,
        )

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:
            try:
                self._clean_up()
            except SoakFailure as cleanup:
                raise SoakFailure(f"{err}; and then: {cleanup}") from err
            raise
        self._clean_up()

    def _run(self) -> None:
        node = self.node
        volume = node.publish_fuse_volume(self.pod)
        self.published = [volume.name, *volume.companion_volumes]
        self.sandbox = sandbox = self._sandbox(volume.binds(DATA))
        hello = sandbox.spawn(
            [f"{EXAMPLES_IN_CONTAINERS}/hello", "-f", DATA],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.mounts.wait(volume.target, True, "mounted", STEP_TIMEOUT, unless=lambda: hello.poll()
                         is not None)  # fmt: skip
        if hello.poll() is not None:
            said = hello.communicate()[1].decode(errors="replace").strip()
            raise SoakFailure(f"hello exited with {hello.returncode} before mounting: {said}")
        text = (volume.target / "hello").read_text()
        if text != HELLO_TEXT:
            raise SoakFailure(f"read {text!r} through the mount")
        if self.ending == "fusermount3 -u":
            result = sandbox.run(["fusermount3", "-u", DATA], capture_output=True,
                                 timeout=STEP_TIMEOUT)  # fmt: skip
            if result.returncode != 0:
                raise SoakFailure(f"fusermount3 -u: {result.stderr.decode().strip()}")
        elif self.ending == "SIGTERM":
            hello.send_signal(signal.SIGTERM)
        elif self.ending == "SIGKILL":
            hello.kill()
        else:
            self._unpublish()
        self.mounts.wait(volume.target, False, "unmounted", UNMOUNT_TIMEOUT)
        _wait_exit(hello, f"hello after {self.ending}")
        if self.ending == "fusermount3 -u" and hello.returncode != 0:
            raise SoakFailure(f"hello exited with {hello.returncode} after fusermount3 -u")

    def _unpublish(self) -> None:
        while self.published:
            self.node.unpublish(self.pod, self.published[0])
            self.published.pop(0)

    def _clean_up(self) -> None:
        """Whatever happened: no container, no volume, no cgroup, no pod dir left."""
        errors: list[str] = []
        if self.sandbox is not None:
            try:
                self.sandbox.kill_all()
            except (OSError, TimeoutError, subprocess.TimeoutExpired) as err:
                errors.append(f"container left: {err}")
        try:
            self._unpublish()
        except Exception as err:
            errors.append(f"unpublish: {type(err).__name__}: {err}")
        if self.cgroup is not None:
            try:
                _remove_cgroup(self.cgroup)
            except SoakFailure as err:
                errors.append(str(err))
        if not errors and not self.node.kubelet.cleanup_pod_dirs(self.pod):
            errors.append(f"pod directory {self.node.kubelet.pod_dir(self.pod)} left")
        if errors:
            raise SoakFailure("; ".join(errors))


def _wait_exit(container: Container, what: str) -> int:
    try:
        return container.wait(UNMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SoakFailure(f"{what}: still running after {UNMOUNT_TIMEOUT:.0f} s") from None


# ---------------------------------------------------------------- the soak


def _worker(
    node: Node, mounts: FuseMounts, index: int, deadline: float, stop: threading.Event,
    report: SoakReport,
) -> None:  # fmt: skip
    number = 0
    while time.monotonic() < deadline and not stop.is_set():
        ending = ENDINGS[(index + number) % len(ENDINGS)]
        started = time.monotonic()
        try:
            Cycle(node, mounts, f"soak-{index}-{number}", ending).run()
        except Exception as err:
            report.failed(f"worker {index} cycle {number} ({ending}): {type(err).__name__}: {err}")
            if node.driver.process is not None and node.driver.process.poll() is not None:
                stop.set()  # the driver is gone: every further cycle would fail
        else:
            report.succeeded(time.monotonic() - started, ending)
        number += 1


def _progress(
    node: Node, pid: int, report: SoakReport, started: float, every: float,
    done: threading.Event, show: Callable[[str], None],
) -> None:  # fmt: skip
    while not done.wait(every):
        try:
            fds, threads = driver_fds(pid), driver_threads(pid)
        except (OSError, KeyError):
            fds = threads = -1
        report.peak_fds = max(report.peak_fds, fds)
        report.peak_threads = max(report.peak_threads, threads)
        node.kubelet.calls.clear()  # the emulator's call log would only grow
        try:
            cpu = f"{driver_cpu_seconds(pid):.0f} s, rss {_status_field(pid, 'VmRSS') // 1024} MiB"
        except (OSError, KeyError):
            cpu = "?"
        show(
            f"soak: {time.monotonic() - started:5.0f} s  cycles {report.cycles}  "
            f"failures {len(report.failures)}  p50 {report.percentile(0.5):.2f} s  "
            f"driver fds {fds} threads {threads} cpu {cpu}"
        )


def _check_leftovers(node: Node, pid: int, report: SoakReport) -> None:
    root = node.root.path
    mounts = [m.mount_point for m in node.root.mounts() if m.mount_point != str(root)]
    if mounts:
        report.leftovers.append(f"{len(mounts)} mounts below the kubelet root: {mounts[:5]}")
    state = node.driver.state_dir
    sockets = [
        str(Path(d) / n) for d, _, names in os.walk(state) for n in names
        if stat.S_ISSOCK(os.lstat(Path(d) / n).st_mode)
    ]  # fmt: skip
    if sockets:
        report.leftovers.append(f"{len(sockets)} sockets in the state dir: {sockets[:5]}")
    socket_dirs = list((state / "sockets").glob("*")) if (state / "sockets").exists() else []
    if socket_dirs:
        report.leftovers.append(f"{len(socket_dirs)} pod socket dirs: {socket_dirs[:5]}")
    records = list((state / "volumes").glob("*")) if (state / "volumes").exists() else []
    if records:
        report.leftovers.append(f"{len(records)} volume records: {records[:5]}")
    cgroups = list(_pod_cgroups().glob("pod*")) if node.pod_cgroups else []
    if cgroups:
        report.leftovers.append(f"{len(cgroups)} pod cgroups: {cgroups[:5]}")
    pods = list((root / "pods").iterdir())
    if pods:
        report.leftovers.append(f"{len(pods)} pod directories: {pods[:5]}")
    strays = [p for p in _descendants(os.getpid()) if p != pid]
    if strays:
        report.leftovers.append(f"{len(strays)} processes besides the driver: {strays[:10]}")
    report.final_fds = _settle(lambda: driver_fds(pid), report.baseline_fds, SETTLE_TIMEOUT)
    if report.final_fds > report.baseline_fds:
        report.leftovers.append(f"driver fds {report.baseline_fds} -> {report.final_fds}")
    _quiesce(node)
    # The workers it pruned take a moment to exit.
    report.final_threads = _settle(lambda: driver_threads(pid), report.baseline_threads, 5.0)
    if report.final_threads > report.baseline_threads:
        report.leftovers.append(
            f"driver threads {report.baseline_threads} -> {report.final_threads}"
        )
    report.final_rss_kib = _status_field(pid, "VmRSS")


def _quiesce(node: Node) -> None:
    """Leave the driver with exactly one idle worker thread, whatever ran before.

    anyio stops a worker idle for ANYIO_MAX_IDLE only when it next hands a job
    to a thread, and keeps as many as ran at once: after a publish and an
    unpublish the registry empties its trash in a thread while the next RPC
    may be in another. So: let every worker expire, then one RPC that makes
    exactly one hop at a time (an unpublish of a target that was never
    published: its tear-down, then the trash pass in the same idle worker).
    """
    time.sleep(ANYIO_MAX_IDLE + 1)
    node.kubelet.unpublish(Pod("soak-quiesce"), "never-published", strict=False)


def run_soak(
    zipapp: Path,
    examples_dir: Path,
    duration_s: float,
    parallel: int = 50,
    *,
    progress_every: float = 10.0,
    show: Callable[[str], None] = lambda line: print(line, flush=True),
) -> SoakReport:
    """Run the soak; raises AssertionError (with the summary) on any failure or leak."""
    if os.geteuid() != 0:
        raise PermissionError("the soak makes real mounts and sandboxes: run it as root")
    if not (examples_dir / "hello").is_file():
        raise FileNotFoundError(
            f"no hello in {examples_dir} (scripts/build_fuse_examples.sh builds it)"
        )
    report = SoakReport(duration_s, parallel)
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-soak-"))
    binds = {EXAMPLES_IN_CONTAINERS: examples_dir.resolve()}
    try:
        _soak(zipapp, binds, workdir, report, progress_every, show)
    finally:
        _remove_empty_cgroups()
    if report.failures or report.leftovers:
        raise AssertionError(f"{report.summary()}\n  (driver log kept in {workdir})")
    shutil.rmtree(workdir)
    return report


def _soak(
    zipapp: Path, binds: dict[str, Path], workdir: Path, report: SoakReport,
    progress_every: float, show: Callable[[str], None],
) -> None:  # fmt: skip
    duration_s, parallel = report.duration_s, report.parallel
    # info, not the e2e default debug: the soak is about the driver, not its log.
    with (
        Node(workdir, zipapp.resolve(), shared_binds=binds,
             driver_args=["--log-level", "info"]) as node,
        FuseMounts() as mounts,
    ):  # fmt: skip
        assert node.driver.process is not None
        pid = node.driver.process.pid
        if node.pod_cgroups:
            _pod_cgroups().mkdir(parents=True, exist_ok=True)
        # Warm-up: one cycle of each kind, so that what the driver opens once
        # (the fusectl instance for aborts, worker threads) is in the baseline.
        for ending in ENDINGS:
            try:
                Cycle(node, mounts, f"soak-warm-up-{ending.split()[0].lower()}", ending).run()
            except Exception as err:
                report.failed(f"warm-up ({ending}): {type(err).__name__}: {err}")
        _quiesce(node)
        report.baseline_fds = report.peak_fds = driver_fds(pid)
        # Waits out the workers the quiesce pruned, down to the main thread
        # and the one worker it leaves (the driver starts no thread of its own).
        baseline_threads = _settle(lambda: driver_threads(pid), QUIESCED_THREADS, 5.0)
        report.baseline_threads = report.peak_threads = baseline_threads
        report.baseline_rss_kib = _status_field(pid, "VmRSS")
        show(
            f"soak: {parallel} parallel pods for {duration_s:.0f} s; driver pid {pid}, "
            f"baseline {report.baseline_fds} fds, {report.baseline_threads} threads"
        )
        started = time.monotonic()
        deadline = started + duration_s
        stop, done = threading.Event(), threading.Event()
        workers = [
            threading.Thread(
                target=_worker, args=(node, mounts, i, deadline, stop, report), name=f"soak-{i}"
            )
            for i in range(parallel)
        ]
        monitor = threading.Thread(
            target=_progress,
            args=(node, pid, report, started, progress_every, done, show),
            name="soak-progress",
            daemon=True,
        )
        monitor.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        done.set()
        report.elapsed_s = time.monotonic() - started
        if node.driver.process.poll() is None:
            _check_leftovers(node, pid, report)
        else:
            report.leftovers.append(f"the driver exited with {node.driver.process.returncode}")
        show(report.summary())


def _remove_empty_cgroups() -> None:
    if cgroup2_root() is None:
        return
    parent = _pod_cgroups()
    for directory in [*parent.glob("pod*"), parent, parent.parent]:
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty (reported as a leftover) or never made
