"""A hostile pod attacks the node for 30 s; its neighbour must not notice.

The issue's requirement: one hostile pod runs every class of attack at once,
in a loop, for 30 s (FUSE-file fds, non-encodable strings, silent-connection
floods across its volumes, MOUNT storms on hung daemons, socket races in its
emptyDir across driver restarts; e2e/hostile.py), while a neighbour pod
publishes, mounts, reads and unpublishes in a loop. The real driver, real
sandboxes in real pod cgroups, the real peer check.

Rules, each reported by name when broken (all are checked, then reported
together):

  R1 the neighbour's NodePublishVolume p99 stays under 1 s;
  R2 every one of the neighbour's mounts succeeds (and its cycles complete);
  R3 the driver never exits, except for the two deliberate restarts, which
     stop promptly and start again;
  R4 the driver's thread count stays under a fixed bound;
  R5 the driver's fd count stays under a fixed bound;
  R6 nothing the hostile pod sends is ever served or installed (no FUSE-file
     fd is ever closed by anyone but the hostile pod, no MOUNT with a
     non-encodable string or an fd succeeds, no planted symlink is followed);
  R7 afterwards nothing is left: mounts below the kubelet root, sockets,
     socket directories and volume records in the state dir, pod
     directories, pod cgroups, and the driver's threads are back at idle;
  R8 the device plugin's socket (e2e/device_manager.py calling
     GetDevicePluginOptions and Allocate as kubelet would) answers every
     call within 3 s throughout, the CSI socket (R1) and the brokers beside it
     on the same event loop.

Deliberate restarts pause the neighbour between its steps (it is not the
neighbour's business that the operator restarts the driver); the hostile
pod keeps going through them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_async._proto import v1beta1 as dp
from csi_async.config import DEFAULT_DEVICE_RESOURCE
from csi_async.mount.mountinfo import mounts_at
from e2e.device_manager import DeviceManager
from e2e.hostile import EXCHANGE_TIMEOUT, HostileError, HostilePod
from e2e.kubelet import CsiError, Pod
from e2e.node import NATIVE_SOCKET_DIR, Node
from e2e.podcgroup import TOP, cgroup2_root
from e2e.sandbox import Container

DURATION = 30.0
# (seconds into the attack, signal): one graceful and one hard restart.
RESTARTS = ((6.0, signal.SIGTERM), (12.0, signal.SIGKILL))
PUBLISH_P99 = 1.0
DATA = "/run/data"
HELLO_TEXT = "Hello World!\n"
EXAMPLES = "/run/examples"
# The neighbour must get somewhere: undisturbed, a cycle takes well under 1 s.
MIN_NEIGHBOUR_CYCLES = 5
MOUNT_TIMEOUT = 20.0  # the zipapp retries a busy broker for about 10 s
STEP_TIMEOUT = 30.0
SAMPLE_EVERY = 0.1
STOP_TIMEOUT = 10.0
# anyio stops a worker thread idle for 10 s when it next hands out a job.
IDLE_THREAD_EXPIRY = 10.0

# The hostile pod's shape (see e2e/hostile.py).
FLOOD_VOLUMES = 8
FLOOD_CONNECTIONS = 12  # per volume: more than the broker's 8 per volume
HUNG_VOLUMES = 4
FD_VOLUMES = 2
STRING_VOLUMES = 2
# own + fd + str + flood + hung + meta
HOSTILE_FUSE_VOLUMES = 1 + FD_VOLUMES + STRING_VOLUMES + FLOOD_VOLUMES + HUNG_VOLUMES + 1
HOSTILE_MOUNTS = 1 + HUNG_VOLUMES
# The neighbour has one FUSE volume and one mount at a time.
FUSE_VOLUMES = HOSTILE_FUSE_VOLUMES + 1
LIVE_MOUNTS = HOSTILE_MOUNTS + 1

# R4. Threads a sound driver needs, whatever the attack does:
# - the event loop's thread;
# - worker threads for mount-table work: each volume's broker does one such
#   job at a time (they run under the volume's lock), CSI calls come one at
#   a time here (one kubelet), plus one for a restore or the CSI call of the
#   moment: one per FUSE volume on the node, plus one;
# - calls stuck on a daemon that never answers (liveness probes): at most
#   one per live mount; a second MOUNT must not start a second probe of a
#   hung daemon while the first is still stuck (a per-pod cap is tighter).
# Threads that grow with the number of MOUNTs on a hung daemon break this:
# with 4 hung volumes, each probed every 2 s by a driver that abandons its
# probes, a driver process crosses it about 12 s after it started, and the
# last restart leaves 18 s.
THREAD_BOUND = 1 + (FUSE_VOLUMES + 1) + LIVE_MOUNTS
# R5. File descriptors a sound driver needs at once:
# - 32 for the process itself: stdio, the log, the CSI socket and its gRPC
#   connections, epoll and the loop's wake-up fds, the pinned kubelet root,
#   the fusectl instance, interpreter internals (an idle driver has ~12);
# - 2 per FUSE volume: its listening socket and the socket directory's fd;
# - 4 per live mount: its mount fd, pidfds of the daemon and its parent,
#   and the dup a running liveness probe holds;
# - the connections being served: the node-wide limit (64), plus one being
#   accepted and refused per listening socket.
FD_BOUND = 32 + 2 * FUSE_VOLUMES + 4 * LIVE_MOUNTS + 64 + FUSE_VOLUMES


# ---------------------------------------------------------------- the driver, watched


@dataclass
class Sample:
    at: float
    pid: int
    threads: int
    fds: int


def _count(path: str) -> int | None:
    try:
        return len(os.listdir(path))
    except OSError:
        return None  # it exited meanwhile


def _threads_of(pid: int) -> str:
    """Each thread's state and kernel wait channel: what a leftover thread waits for."""
    described = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError:
        return "(gone)"
    for tid in tids:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[0]
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        described.append(f"{tid} {state} {wchan}")
    return ", ".join(described)


def _tail(path: Path, size: int = 65536) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def _crash_summary(node: Node) -> str:
    """What the driver said last: a traceback, or its last error lines."""
    lines = _tail(node.driver.log_path).splitlines()
    traceback = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if traceback:
        return "\n".join(lines[traceback[-1] :])[-1500:]
    errors = [line for line in lines if '"level": "error"' in line or '"critical"' in line]
    return "\n".join(errors[-3:])[-1500:] or "\n".join(lines[-5:])[-1500:]


class Supervisor:
    """Samples the driver's threads and fds, restarts it on purpose, and
    starts it again after an unexpected exit (recording it), so that one
    broken rule does not hide the others."""

    def __init__(self, node: Node, started: float) -> None:
        self.node = node
        self.started = started
        self.samples: list[Sample] = []
        self.unexpected_exits: list[str] = []
        self.restart_problems: list[str] = []
        self.restarts_done = 0
        # Processes that died while starting: reported as restart problems.
        self._failed_starts: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            with self._lock:
                process = self.node.driver.process
                assert process is not None
                if process.poll() is not None:
                    if process.pid not in self._failed_starts:
                        self.unexpected_exits.append(
                            f"at {self._now():.1f} s the driver (pid {process.pid}) exited with "
                            f"{process.returncode}:\n{_crash_summary(self.node)}"
                        )
                    self._start_again("after it exited")
                    continue
                threads = _count(f"/proc/{process.pid}/task")
                fds = _count(f"/proc/{process.pid}/fd")
                if threads is not None and fds is not None:
                    self.samples.append(Sample(self._now(), process.pid, threads, fds))

    def restart(self, sig: signal.Signals) -> None:
        """A deliberate restart: stop with `sig`, start again."""
        with self._lock:
            process = self.node.driver.process
            assert process is not None
            began = time.monotonic()
            process.send_signal(sig)
            try:
                code = process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stuck = _threads_of(process.pid)
                code = self.node.driver.stop(signal.SIGKILL)
                self.restart_problems.append(
                    f"at {self._now():.1f} s the driver had not stopped {STOP_TIMEOUT:.0f} s "
                    f"after {sig.name}; its threads then (tid, state, wait channel): {stuck}; "
                    f"it exited with {code} {time.monotonic() - began:.1f} s after the signal"
                )
            else:
                if sig == signal.SIGTERM and code != 0:
                    self.restart_problems.append(
                        f"at {self._now():.1f} s the driver exited with {code} on SIGTERM "
                        f"(expected 0):\n{_crash_summary(self.node)}"
                    )
            self._start_again(f"after {sig.name}")
            self.restarts_done += 1

    def _start_again(self, why: str) -> bool:
        for attempt in range(3):
            try:
                self.node.driver.start()
                return True
            except (RuntimeError, TimeoutError) as err:
                self.restart_problems.append(
                    f"at {self._now():.1f} s the driver did not start again {why} "
                    f"(attempt {attempt + 1}): {str(err)[-1500:]}"
                )
                self.node.driver.stop(signal.SIGKILL)
                if self.node.driver.process is not None:
                    self._failed_starts.add(self.node.driver.process.pid)
        return False

    def ensure_running(self) -> None:
        with self._lock:
            process = self.node.driver.process
            if process is None or process.poll() is not None:
                self._start_again("for the clean-up")


class Gate:
    """Deliberate restarts wait for the neighbour's step in flight, and hold
    its next step back until the driver is up again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._busy = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self._cond:
            self._paused = True
            while self._busy:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()


# ---------------------------------------------------------------- the neighbour


# R8: kubelet's calls to the device plugin, on the same event loop as the
# brokers under attack, are answered: each within this long (retries
# included, as kubelet retries), however busy the brokers are.
PLUGIN_ANSWER = 3.0
PLUGIN_PERIOD = 0.2
MIN_PLUGIN_CALLS = 20


@dataclass
class PluginCaller:
    """kubelet's device manager, calling GetDevicePluginOptions and Allocate in a loop."""

    manager: DeviceManager
    gate: Gate
    answered: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def _one(self, index: int) -> None:
        began = time.monotonic()
        while True:
            try:
                if index % 2:
                    self.manager.allocate_raw(
                        DEFAULT_DEVICE_RESOURCE,
                        dp.AllocateRequest(
                            container_requests=[dp.ContainerAllocateRequest(devices_ids=["fuse-0"])]
                        ),
                    )
                else:
                    self.manager.call(
                        DEFAULT_DEVICE_RESOURCE, "GetDevicePluginOptions", dp.Empty(),
                        dp.DevicePluginOptions,
                    )  # fmt: skip
            except Exception as err:  # a restart's old channel, UNAVAILABLE, ...
                if time.monotonic() - began > PLUGIN_ANSWER:
                    self.failures.append(f"{type(err).__name__}: {err}")
                    return
                time.sleep(0.05)
                continue
            self.answered.append(time.monotonic() - began)
            return

    def run(self, deadline: float) -> None:
        index = 0
        while time.monotonic() < deadline:
            with self.gate.step():
                self._one(index)
            index += 1
            time.sleep(PLUGIN_PERIOD)


@dataclass
class Neighbour:
    """Publishes, mounts libfuse's hello through the zipapp, reads, unmounts
    and unpublishes, in a loop; records every publish latency and mount."""

    node: Node
    pod: Pod
    gate: Gate
    publishes: list[tuple[str, float]] = field(default_factory=list)
    mounts: list[tuple[str, str | None]] = field(default_factory=list)  # (volume, error)
    mount_times: list[float] = field(default_factory=list)  # program start to mounted
    failures: list[str] = field(default_factory=list)
    cycles: int = 0

    def run(self, deadline: float) -> None:
        number = 0
        while time.monotonic() < deadline:
            try:
                self._cycle(f"data-{number}")
            except Exception as err:
                self.failures.append(f"cycle {number}: {type(err).__name__}: {err}")
            else:
                self.cycles += 1
            number += 1

    def _publish(
        self, name: str, attributes: dict[str, str], readonly: bool, published: list[str],
        uncertain: list[str],
    ) -> Path:  # fmt: skip
        began = time.monotonic()
        try:
            target = self.node.publish(self.pod, name, attributes, readonly)
        except CsiError as err:
            if not err.final:
                uncertain.append(name)  # kubelet tears an uncertain volume down too
            raise
        finally:
            self.publishes.append((name, time.monotonic() - began))
        published.append(name)
        return target

    def _cycle(self, name: str) -> None:
        published: list[str] = []
        uncertain: list[str] = []
        sandbox = None
        try:
            with self.gate.step():
                target = self._publish(name, {}, False, published, uncertain)
                sockets = self._publish(
                    f"{name}-broker", {"socketFor": name}, True, published, uncertain
                )
            with self.gate.step():
                sandbox = self.node.sandbox({DATA: target, NATIVE_SOCKET_DIR: sockets})
                began = time.monotonic()
                hello = sandbox.spawn(
                    [f"{EXAMPLES}/hello", "-f", DATA],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                error = _wait_mounted(target, hello)
                self.mounts.append((name, error))
                if error is not None:
                    return
                self.mount_times.append(time.monotonic() - began)
            text = (target / "hello").read_text()
            if text != HELLO_TEXT:
                raise AssertionError(f"read {text!r} through {name}")
            with self.gate.step():
                result = sandbox.run(["fusermount3", "-u", DATA], capture_output=True,
                                     timeout=STEP_TIMEOUT)  # fmt: skip
                if result.returncode != 0:
                    raise AssertionError(f"fusermount3 -u: {result.stderr.decode().strip()}")
                Node.wait_unmounted(target, STEP_TIMEOUT)
            code = hello.wait(STEP_TIMEOUT)
            if code != 0:
                raise AssertionError(f"hello exited with {code} after fusermount3 -u")
        finally:
            if sandbox is not None:
                sandbox.kill_all()
            with self.gate.step():
                self._tear_down(published, uncertain)
            self.node.kubelet.calls.clear()  # the emulator's call log only grows

    def _tear_down(self, published: list[str], uncertain: list[str]) -> None:
        for volume in [*reversed(published), *uncertain]:
            try:
                if volume in published:
                    self.node.unpublish(self.pod, volume)
                else:
                    self.node.kubelet.unpublish(self.pod, volume, strict=False)
            except Exception as err:
                self.failures.append(f"unpublish {volume}: {type(err).__name__}: {err}")

    def p99(self) -> float:
        return _p99([seconds for _name, seconds in self.publishes])


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def _wait_mounted(target: Path, program: Container) -> str | None:
    """None once a FUSE mount is on target (from mountinfo); else why not."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not [m for m in mounts_at(os.fspath(target)) if m.is_fuse]:
        if program.poll() is not None:
            assert program.stderr is not None
            said = program.stderr.read().decode(errors="replace").strip()
            return f"hello exited with {program.returncode}: {said}"
        if time.monotonic() > deadline:
            program.kill()
            return f"nothing mounted within {MOUNT_TIMEOUT:.0f} s"
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- afterwards


def _leftovers(node: Node, pods: list[Pod], empty_dir: Path | None) -> list[str]:
    found: list[str] = []
    root = node.root.path
    mounts = [m.mount_point for m in node.root.mounts() if m.mount_point != str(root)]
    if mounts:
        found.append(f"{len(mounts)} mounts below the kubelet root: {mounts[:5]}")
    if empty_dir is not None:
        # kubelet deletes the emptyDir with the pod; the driver's socket must
        # be gone from it already.
        left = [p.name for p in empty_dir.iterdir()]
        if left:
            found.append(f"left in the hostile pod's emptyDir: {left}")
        else:
            empty_dir.rmdir()
            empty_dir.parent.rmdir()
    state = node.driver.state_dir
    sockets = [
        str(Path(d) / n) for d, _, names in os.walk(state) for n in names
        if stat.S_ISSOCK(os.lstat(Path(d) / n).st_mode)
    ]  # fmt: skip
    if sockets:
        found.append(f"{len(sockets)} sockets in the state dir: {sockets[:5]}")
    for what, directory in (("socket dirs", "sockets"), ("volume records", "volumes")):
        entries = list((state / directory).glob("*")) if (state / directory).exists() else []
        if entries:
            found.append(f"{len(entries)} {what} in the state dir: {entries[:5]}")
    for pod in pods:
        if not node.kubelet.cleanup_pod_dirs(pod):
            found.append(f"pod directory of {pod.name} left: {node.kubelet.pod_dir(pod)}")
    return found


def _poke(node: Node) -> int:
    """Publish and unpublish one volume, one call after the other, and return
    the driver's thread count. The driver runs worker jobs for both, and
    anyio stops the workers that have been idle for 10 s whenever it hands
    out a job; sequential calls reuse a single worker."""
    pod = Pod("quiesce")
    node.publish(pod, "data")
    node.unpublish(pod, "data")
    node.kubelet.cleanup_pod_dirs(pod)
    assert node.driver.process is not None
    return _count(f"/proc/{node.driver.process.pid}/task") or 0


def _quiesce_threads(node: Node, idle: int) -> int:
    """The driver's thread count once idle workers have expired: poke it until
    it is at `idle` or IDLE_THREAD_EXPIRY + 5 s have passed."""
    deadline = time.monotonic() + IDLE_THREAD_EXPIRY + 5.0
    while (threads := _poke(node)) > idle and time.monotonic() < deadline:
        time.sleep(1.0)  # poke at most once a second; the expiry takes 10 s
    return threads


def _pod_cgroups_left(pods: list[Pod]) -> list[str]:
    root = cgroup2_root()
    if root is None:
        return []
    parent = root / TOP / "kubepods"
    return [str(parent / f"pod{p.uid}") for p in pods if (parent / f"pod{p.uid}").exists()]


# ---------------------------------------------------------------- the test


def _describe_samples(samples: list[Sample], over: int, what: str) -> str:
    worst = max(samples, key=lambda s: getattr(s, what))
    first = next(s for s in samples if getattr(s, what) > over)
    every_second = samples[:: max(1, round(1 / SAMPLE_EVERY))]
    return (
        f"peak {getattr(worst, what)} at {worst.at:.1f} s (pid {worst.pid}), first over at "
        f"{first.at:.1f} s; once a second: " + " ".join(str(getattr(s, what)) for s in every_second)
    )


class Run:
    """One noisy-neighbour run; collects every broken rule in `broken`."""

    def __init__(self, tmp_path: Path) -> None:
        self.victim = tmp_path / "victim"
        self.victim.write_text("keep")
        self.victim.chmod(0o600)
        self.hostile_pod, self.neighbour_pod = Pod("hostile"), Pod("neighbour")
        self.pods = [self.hostile_pod, self.neighbour_pod]
        self.broken: list[str] = []
        self.summary: list[str] = []
        self.reports: dict[str, dict[str, Any]] = {}

    def execute(self, node: Node) -> None:
        # The idle level: a fresh driver's threads after one sequential
        # publish and unpublish, the same measure as at the end.
        idle_threads = _poke(node)
        hostile = HostilePod(
            node, self.hostile_pod, self.victim,
            flood_volumes=FLOOD_VOLUMES, flood_connections=FLOOD_CONNECTIONS,
            hung_volumes=HUNG_VOLUMES, fd_volumes=FD_VOLUMES, string_volumes=STRING_VOLUMES,
        )  # fmt: skip
        hostile.publish()
        hostile.start()
        gate = Gate()
        neighbour = Neighbour(node, self.neighbour_pod, gate)
        manager = DeviceManager(node.driver.device_plugin_dir).start()
        manager.wait_registered(DEFAULT_DEVICE_RESOURCE)
        caller = PluginCaller(manager, gate)
        started = time.monotonic()
        deadline = started + DURATION
        with Supervisor(node, started) as supervisor, contextlib.closing(manager):
            try:
                hostile.go(deadline)
                worker = threading.Thread(target=neighbour.run, args=(deadline,),
                                          name="neighbour", daemon=True)  # fmt: skip
                worker.start()
                plugin_worker = threading.Thread(
                    target=caller.run, args=(deadline,), name="device-plugin", daemon=True
                )
                plugin_worker.start()
                for at, sig in RESTARTS:
                    time.sleep(max(0.0, started + at - time.monotonic()))  # the schedule
                    with gate.pause():
                        supervisor.restart(sig)
                worker.join(max(0.0, deadline - time.monotonic()) + 3 * STEP_TIMEOUT)
                if worker.is_alive():
                    self.broken.append("R2 the neighbour's last cycle did not finish")
                plugin_worker.join(max(0.0, deadline - time.monotonic()) + 2 * PLUGIN_ANSWER)
                try:
                    self.reports = hostile.wait(EXCHANGE_TIMEOUT + 20.0)
                except HostileError as err:
                    self.broken.append(f"the hostile pod did not finish its run: {err}")
            finally:
                hostile.kill()
        supervisor.ensure_running()
        self._check_neighbour(neighbour, time.monotonic() - started)
        self._check_plugin(caller)
        self._check_driver(supervisor, idle_threads)
        self._check_hostile(hostile, supervisor)
        leftovers: list[str] = []
        empty_dir = hostile.empty_dir
        try:
            hostile.unpublish()
        except Exception as err:
            leftovers.append(f"unpublishing the hostile pod failed: {type(err).__name__}: {err}")
        leftovers += _leftovers(node, [self.hostile_pod, self.neighbour_pod], empty_dir)
        threads = _quiesce_threads(node, idle_threads)
        if threads > idle_threads:
            assert node.driver.process is not None
            leftovers.append(
                f"driver threads {threads}, idle level {idle_threads} (tid, state, wait "
                f"channel: {_threads_of(node.driver.process.pid)})"
            )
        if leftovers:
            self.broken.append("R7 left after the run: " + "; ".join(leftovers))

    def _check_neighbour(self, neighbour: Neighbour, elapsed: float) -> None:
        p99 = neighbour.p99()
        slow = [(n, round(s, 3)) for n, s in sorted(neighbour.publishes, key=lambda p: -p[1])[:5]]
        self.summary.append(
            f"neighbour: {neighbour.cycles} cycles, {len(neighbour.publishes)} publishes, "
            f"publish p99 {p99:.3f} s, slowest {slow}; {len(neighbour.mounts)} mounts, "
            f"start to mounted p99 {_p99(neighbour.mount_times):.2f} s"
        )
        if p99 >= PUBLISH_P99:
            self.broken.append(
                f"R1 neighbour NodePublishVolume p99 {p99:.2f} s >= {PUBLISH_P99} s "
                f"(slowest: {slow})"
            )
        failed = [(n, e) for n, e in neighbour.mounts if e is not None]
        if failed:
            self.broken.append(
                f"R2 {len(failed)} of {len(neighbour.mounts)} neighbour mounts failed: {failed[:3]}"
            )
        if neighbour.failures:
            self.broken.append(
                f"R2 {len(neighbour.failures)} neighbour cycles failed: {neighbour.failures[:3]}"
            )
        if neighbour.cycles < MIN_NEIGHBOUR_CYCLES:
            self.broken.append(
                f"R2 the neighbour completed only {neighbour.cycles} cycles in {elapsed:.0f} s "
                f"(at least {MIN_NEIGHBOUR_CYCLES})"
            )

    def _check_plugin(self, caller: PluginCaller) -> None:
        slowest = max(caller.answered, default=0.0)
        self.summary.append(
            f"device plugin: {len(caller.answered)} calls answered, slowest {slowest:.3f} s, "
            f"{len(caller.failures)} unanswered"
        )
        if caller.failures:
            self.broken.append(
                f"R8 {len(caller.failures)} device plugin calls were not answered within "
                f"{PLUGIN_ANSWER} s: {caller.failures[:3]}"
            )
        if len(caller.answered) < MIN_PLUGIN_CALLS:
            self.broken.append(
                f"R8 only {len(caller.answered)} device plugin calls were answered "
                f"(at least {MIN_PLUGIN_CALLS})"
            )

    def _check_driver(self, supervisor: Supervisor, idle_threads: int) -> None:
        if supervisor.unexpected_exits:
            self.broken.append(
                f"R3 the driver exited {len(supervisor.unexpected_exits)} times on its own: "
                + "\n".join(supervisor.unexpected_exits[:2])
            )
        if supervisor.restart_problems:
            self.broken.append(
                f"R3 {len(supervisor.restart_problems)} problems restarting the driver: "
                + "\n".join(supervisor.restart_problems[:2])
            )
        if supervisor.restarts_done != len(RESTARTS):
            self.broken.append(
                f"R3 only {supervisor.restarts_done} of {len(RESTARTS)} restarts ran"
            )
        samples = supervisor.samples
        peak_threads = max((s.threads for s in samples), default=0)
        peak_fds = max((s.fds for s in samples), default=0)
        self.summary.append(
            f"driver: {len(samples)} samples over {len({s.pid for s in samples})} processes, "
            f"threads idle {idle_threads} peak {peak_threads} (bound {THREAD_BOUND}), "
            f"fds peak {peak_fds} (bound {FD_BOUND}), {len(supervisor.unexpected_exits)} "
            f"unexpected exits"
        )
        if peak_threads > THREAD_BOUND:
            self.broken.append(
                f"R4 driver threads exceeded {THREAD_BOUND}: "
                + _describe_samples(samples, THREAD_BOUND, "threads")
            )
        if peak_fds > FD_BOUND:
            self.broken.append(
                f"R5 driver fds exceeded {FD_BOUND}: " + _describe_samples(samples, FD_BOUND, "fds")
            )

    def _check_hostile(self, hostile: HostilePod, supervisor: Supervisor) -> None:
        for behaviour, report in self.reports.items():
            flushes = report.get("flushes")
            self.summary.append(
                f"hostile {behaviour}: {report['ops']} ops, {report['counts']}"
                + (f", FLUSHes held: {len(flushes)}" if flushes is not None else "")
            )
            if report["anomalies"]:
                self.broken.append(
                    f"R6 hostile {behaviour}: requests that must be refused were served: "
                    f"{report['anomalies'][:3]}"
                )
            if flushes:
                pids = sorted({s.pid for s in supervisor.samples})
                self.broken.append(
                    f"R6 the driver installed FUSE-file fds sent with requests and closed them: "
                    f"{len(flushes)} FLUSH requests held, from (pid, uid) {flushes[:5]} "
                    f"(driver pids {pids})"
                )
        if self.victim.read_text() != "keep" or stat.S_IMODE(self.victim.stat().st_mode) != 0o600:
            self.broken.append(
                f"R6 a symlink planted at the meta-fuse socket name was followed: {self.victim} "
                "changed"
            )
        idle_agents = [b for b, r in self.reports.items() if not r["ops"]]
        if idle_agents or len(self.reports) != len(hostile.agents):
            self.broken.append(f"the attack did not run: {idle_agents or sorted(self.reports)}")


def test_a_hostile_pod_cannot_hurt_its_neighbour(
    tmp_path: Path, zipapp: Path, fuse_examples_on_host: Path
) -> None:
    run = Run(tmp_path)
    failed: BaseException | None = None
    binds = {EXAMPLES: fuse_examples_on_host}
    try:
        # info, not debug: tens of thousands of requests; the audit lines stay.
        with Node(tmp_path, zipapp, shared_binds=binds,
                  driver_args=["--log-level", "info"]) as node:  # fmt: skip
            try:
                run.execute(node)
            except BaseException as err:
                failed = err
                raise
    except Exception as teardown:
        if failed is None:  # only the node's teardown failed: that is R7
            run.broken.append(f"R7 tearing the node down: {type(teardown).__name__}: {teardown}")
        elif teardown is not failed:
            raise failed from teardown
        else:
            raise
    cgroups = _pod_cgroups_left(run.pods)
    if cgroups:
        run.broken.append(f"R7 pod cgroups left: {cgroups}")
    print("\n".join(run.summary))
    assert not run.broken, "\n".join(["broken rules:", *run.broken, "", *run.summary])
