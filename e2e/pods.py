"""Pods on the emulated node, run the way kubelet v1.36 runs them on containerd + runc.

A `PodSpec` (init containers, native sidecars, containers, volumes) is run by
a `RunningPod`: a pod worker thread that does what kubelet's SyncPod does for
it (pkg/kubelet/kuberuntime, computeInitContainerActions and
computePodActions), on a 1 s relist like the generic PLEG:

* init containers start one at a time, in order. A native sidecar (an init
  container with restartPolicy Always) counts as started once its
  startupProbe has succeeded (at once if it has none), and only then does the
  next container start; a regular init container must exit 0 first. App
  containers start once every init container is done;
* a container that exits is restarted (sidecars always; app containers per
  the pod's restartPolicy) with kubelet's CrashLoopBackOff
  (flowcontrol.Backoff, keyed by container, measured from the exited
  container's finish time): the first restart at once, then after 10 s,
  20 s, 40 s ... up to 300 s (backOffPeriod, maxContainerBackOff). A startup
  probe that fails failureThreshold times in a row kills the container,
  which then restarts the same way;
* every start, first or restart, creates a new container: kubelet's
  makeMounts turns the volumeMounts into CRI mounts (the volume's host path,
  readOnly from the mount or the volume, mountPropagation None unless set),
  and the runtime (e2e.sandbox) stats each source and binds it as it is at
  that moment. A failed creation ("failed to stat ...: transport endpoint is
  not connected") leaves the container waiting with reason
  CreateContainerError, records a Warning event, and is retried with the
  same backoff (CrashLoopBackOff);
* exec (kubelet's ExecSync, also used for exec probes) runs a command in the
  container's mount and PID namespaces as the container's user (unlike runc
  exec it does not join the pod's cgroup);
* a startupProbe is run by a probe worker as kubelet's (pkg/kubelet/prober,
  worker.go): one per container name that has one, started when the pod is
  first synced, before its first container (probeManager.AddPod), and kept
  for the pod's lifetime. It probes at once, then on a ticker of
  periodSeconds from its own start (a Go time.Ticker: a tick missed while a
  probe ran is delivered at once, later ones are dropped). A tick probes only
  if the current container runs, int(seconds since it started) >=
  initialDelaySeconds and it has not started yet; so the first probe of a
  container comes at the first tick after both, not at its start. A success
  marks it started and syncs the pod at once (the syncLoop's startupManager
  update), which starts the next container; failureThreshold failures in a
  row kill it, and the worker holds off until a new container of that name
  exists. Not modelled: the status manager's lag (kubelet's worker sees a new
  container only once a later sync has put it in the pod status, after the
  PLEG's relist), the random initial delay of workers created within a
  period of kubelet's own start, and successThreshold (1 for startup probes);
* delete(): SIGTERM to the app containers, then to the sidecars in reverse
  order once the apps are gone, SIGKILL after the grace period.

The pod's volumes are set up before its containers start, concurrently and in
a random order (e2e.kubelet.KubeletEmulator.publish_volumes); e2e.node.Node
.run_pod does that and hands the host paths to RunningPod.

Container output goes to <log dir>/<container>/<restart count>.log, like
/var/log/pods.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e2e.kubelet import PersistentVolume, Pod
from e2e.sandbox import (
    HOST_TO_CONTAINER,
    NOBODY,
    Container,
    ContainerCreateError,
    Mount,
    PodSandbox,
)

ALWAYS = "Always"
ON_FAILURE = "OnFailure"
NEVER = "Never"

# Container states and the reasons kubelet reports with them.
WAITING = "waiting"
RUNNING = "running"
TERMINATED = "terminated"
CONTAINER_CREATING = "ContainerCreating"
POD_INITIALIZING = "PodInitializing"
CREATE_CONTAINER_ERROR = "CreateContainerError"
CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
COMPLETED = "Completed"
ERROR = "Error"

# kubelet's constants (pkg/kubelet/kubelet.go).
BACKOFF_INITIAL = 10.0  # backOffPeriod
BACKOFF_MAX = 300.0  # maxContainerBackOff
RELIST_PERIOD = 1.0  # plegRelistPeriod

# Where the native-mode socket directory is mounted in FUSE containers; the
# zipapp's default socket path (/run/csi-async/fuse.sock) is inside it.
NATIVE_SOCKET_DIR = "/run/csi-async"
META_FUSE_SOCKET_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"
META_FUSE_EMPTY_DIR = "fuse-fd-passing"
META_FUSE_SOCKET_NAME = "fuse-csi-ephemeral.sock"
META_FUSE_SOCKET_DIR = "/run/fusermount3-proxy"


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class VolumeMount:
    """containers[].volumeMounts[]."""

    name: str
    mount_path: str
    read_only: bool = False
    # None (unset) means "None": rprivate, as kubelet's translateMountPropagation.
    mount_propagation: str | None = None


@dataclass(frozen=True)
class ExecProbe:
    """A probe with an exec handler (only startupProbe is modelled); the API's defaults."""

    command: Sequence[str]
    initial_delay_seconds: float = 0.0
    period_seconds: float = 10.0
    timeout_seconds: float = 1.0
    failure_threshold: int = 3


@dataclass(frozen=True)
class ContainerSpec:
    """containers[] / initContainers[]."""

    name: str
    command: Sequence[str]
    volume_mounts: Sequence[VolumeMount] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # On an init container, Always makes it a native sidecar.
    restart_policy: str | None = None
    startup_probe: ExecProbe | None = None
    run_as_user: int = NOBODY
    run_as_group: int = NOBODY


@dataclass(frozen=True)
class CsiVolume:
    """volumes[].csi of this node's driver."""

    volume_attributes: Mapping[str, str] = field(default_factory=dict)
    read_only: bool = False


@dataclass(frozen=True)
class EmptyDirVolume:
    """volumes[].emptyDir."""


@dataclass(frozen=True)
class ClaimVolume:
    """volumes[].persistentVolumeClaim, with the driver's PV that the claim is bound to."""

    pv: PersistentVolume
    read_only: bool = False


PodVolume = CsiVolume | EmptyDirVolume | ClaimVolume


@dataclass(frozen=True)
class PodSpec:
    containers: Sequence[ContainerSpec]
    init_containers: Sequence[ContainerSpec] = ()
    volumes: Mapping[str, PodVolume] = field(default_factory=dict)
    restart_policy: str = ALWAYS
    termination_grace_period_seconds: float = 30.0

    def container(self, name: str) -> ContainerSpec:
        for spec in [*self.init_containers, *self.containers]:
            if spec.name == name:
                return spec
        raise KeyError(name)


def is_sidecar(spec: ContainerSpec) -> bool:
    return spec.restart_policy == ALWAYS


def fuse_startup_probe(
    mount_path: str, wait_seconds: float = 30.0, failure_threshold: int = 2
) -> ExecProbe:
    """The examples' startupProbe for a FUSE sidecar (examples/*/pod.yaml):
    `fusermount3 --wait <mountPath> --timeout 30`, which returns as soon as a
    FUSE filesystem is mounted there (from mountinfo only). timeoutSeconds is
    above --timeout, so the zipapp's own message ends a failed try."""
    return ExecProbe(
        ["fusermount3", "--wait", mount_path, "--timeout", f"{wait_seconds:g}"],
        initial_delay_seconds=0,
        period_seconds=1,
        timeout_seconds=wait_seconds + 5,
        failure_threshold=failure_threshold,
    )


@dataclass(frozen=True)
class FuseVolumeSpec:
    """The pod-spec pieces of one FUSE volume of this driver, in native or meta-fuse mode."""

    name: str
    mode: str
    volumes: Mapping[str, PodVolume]
    # What the FUSE container mounts besides the volume itself, and its env.
    socket_mounts: Sequence[VolumeMount]
    env: Mapping[str, str]

    def fuse_container_mounts(
        self, mount_path: str, propagation: str | None = HOST_TO_CONTAINER
    ) -> list[VolumeMount]:
        """The FUSE sidecar's mounts: the volume (HostToContainer, as the docs
        say) and what reaches the socket."""
        return [VolumeMount(self.name, mount_path, mount_propagation=propagation),
                *self.socket_mounts]  # fmt: skip

    def consumer_mount(self, mount_path: str, propagation: str | None = None) -> VolumeMount:
        return VolumeMount(self.name, mount_path, mount_propagation=propagation)


def fuse_volume_spec(
    name: str = "data",
    mode: str = "native",
    *,
    read_only: bool = False,
    attributes: Mapping[str, str] | None = None,
) -> FuseVolumeSpec:
    """native: a second CSI volume "<name>-broker" (socketFor, read-only) at /run/csi-async.
    meta-fuse: an emptyDir holding the socket named in the volume attributes."""
    attrs = dict(attributes or {})
    if mode == "native":
        broker = f"{name}-broker"
        return FuseVolumeSpec(
            name, mode,
            {name: CsiVolume(attrs, read_only),
             broker: CsiVolume({"socketFor": name}, read_only=True)},
            [VolumeMount(broker, NATIVE_SOCKET_DIR)], {},
        )  # fmt: skip
    if mode == "meta-fuse":
        attrs |= {
            "fdPassingEmptyDirName": META_FUSE_EMPTY_DIR,
            "fdPassingSocketName": META_FUSE_SOCKET_NAME,
        }
        return FuseVolumeSpec(
            name, mode,
            {name: CsiVolume(attrs, read_only), META_FUSE_EMPTY_DIR: EmptyDirVolume()},
            [VolumeMount(META_FUSE_EMPTY_DIR, META_FUSE_SOCKET_DIR)],
            {META_FUSE_SOCKET_ENV: f"{META_FUSE_SOCKET_DIR}/{META_FUSE_SOCKET_NAME}"},
        )  # fmt: skip
    raise ValueError(f"unknown mode {mode!r}")


def fuse_claim_volume_spec(
    name: str, pv: PersistentVolume, *, read_only: bool = False
) -> FuseVolumeSpec:
    """A FUSE volume from a claim bound to `pv`, native mode: the socket volume
    "<name>-broker" names it by the PV's name, as the driver knows it."""
    broker = f"{name}-broker"
    return FuseVolumeSpec(
        name, "native",
        {name: ClaimVolume(pv, read_only),
         broker: CsiVolume({"socketFor": pv.name}, read_only=True)},
        [VolumeMount(broker, NATIVE_SOCKET_DIR)], {},
    )  # fmt: skip


# ------------------------------------------------------------------ status


class Backoff:
    """client-go's flowcontrol.Backoff as kubelet uses it for container restarts."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> None:
        self.initial = initial
        self.maximum = maximum
        # id -> (current backoff, last update)
        self._entries: dict[str, tuple[float, float]] = {}

    def _expired(self, event_time: float, last_update: float) -> bool:
        return event_time - last_update > 2 * self.maximum

    def get(self, key: str) -> float:
        entry = self._entries.get(key)
        return 0.0 if entry is None else entry[0]

    def next(self, key: str, event_time: float) -> None:
        entry = self._entries.get(key)
        if entry is None or self._expired(event_time, entry[1]):
            self._entries[key] = (self.initial, event_time)
        else:
            self._entries[key] = (min(entry[0] * 2, self.maximum), event_time)

    def in_backoff_since(self, key: str, event_time: float, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is None or self._expired(event_time, entry[1]):
            return False
        return now - event_time < entry[0]


@dataclass(frozen=True)
class Event:
    """A Kubernetes event about a container of the pod."""

    time: float
    container: str
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class ContainerStatus:
    name: str
    state: str = WAITING
    reason: str = CONTAINER_CREATING
    message: str = ""
    # New containers created after the first, as kubelet counts them.
    restart_count: int = 0
    # The startupProbe has succeeded (or there is none) for the current container.
    started: bool = False
    exit_code: int | None = None
    # monotonic times: the current container started, its startupProbe passed,
    # the last container was seen exited (kubelet: FinishedAt).
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    container: Container | None = None
    # Every container created for this name, oldest first.
    instances: list[Container] = field(default_factory=list)
    # Earliest time for the next creation attempt after one that failed.
    retry_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == RUNNING


class PodFailed(AssertionError):
    """A wait on the pod ran out of time; the message shows the pod's state."""


# ------------------------------------------------------------------ the pod worker


class RunningPod:
    """A pod on the node, kept running by its own pod worker thread."""

    def __init__(
        self,
        pod: Pod,
        spec: PodSpec,
        volume_paths: Mapping[str, Path],
        zipapp: Path,
        *,
        log_dir: Path,
        image_mounts: Mapping[str, Path] | None = None,
        hide_host_paths: Sequence[Path] = (),
        cgroup_procs: str = "",
        relist_period: float = RELIST_PERIOD,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        """volume_paths: each pod volume's host path (a CSI volume's target
        path, an emptyDir's directory). image_mounts: files every container
        has, as if baked into its image (bound read-write, rprivate)."""
        names = [c.name for c in [*spec.init_containers, *spec.containers]]
        if len(set(names)) != len(names):
            raise ValueError(f"container names must be unique: {names}")
        for c in [*spec.init_containers, *spec.containers]:
            for m in c.volume_mounts:
                if m.name not in volume_paths:
                    raise ValueError(f"container {c.name!r} mounts unknown volume {m.name!r}")
        self.pod = pod
        self.spec = spec
        self.volume_paths = {name: Path(path) for name, path in volume_paths.items()}
        self.zipapp = zipapp
        self.log_dir = log_dir
        self.image_mounts = dict(image_mounts or {})
        self.hide_host_paths = list(hide_host_paths)
        self.cgroup_procs = cgroup_procs
        self.relist_period = relist_period
        self.backoff = Backoff(backoff_initial, backoff_max)
        self.statuses = {name: ContainerStatus(name) for name in names}
        self.events: list[Event] = []
        self._sandboxes: list[PodSandbox] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._initialized = False
        self._thread: threading.Thread | None = None
        self._probe_threads: list[threading.Thread] = []
        self._nsenter = shutil.which("nsenter")
        if self._nsenter is None:
            raise FileNotFoundError("nsenter (util-linux) is needed for exec")

    # -------------------------------------------------------------- lifecycle

    def start(self) -> RunningPod:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_probe_workers()
        self._thread = threading.Thread(
            target=self._work, name=f"pod-worker-{self.pod.name}", daemon=True
        )
        self._thread.start()
        return self

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._lock:
                    self._relist()
                    if not self._stopping.is_set():
                        self._sync()
            except Exception as e:  # a bug here must show, not hang the pod
                self._event("", "Warning", "SyncError", f"{type(e).__name__}: {e}")
            self._wake.wait(self.relist_period)
            self._wake.clear()

    def stop_worker(self) -> None:
        """Stop syncing (no more starts or restarts); containers stay as they are."""
        self._stop_syncing()
        self._join_probe_workers()

    def _stop_syncing(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def _join_probe_workers(self, timeout: float = 10.0) -> None:
        # A probe in flight (fusermount3 --wait blocks up to its --timeout)
        # ends with its container at the latest; its result is dropped.
        for thread in self._probe_threads:
            thread.join(timeout)

    def delete(self, grace: float | None = None) -> None:
        """kubelet's pod deletion: apps first, then sidecars in reverse order."""
        self._stop_syncing()
        grace = self.spec.termination_grace_period_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        apps = [self.statuses[c.name] for c in self.spec.containers]
        sidecars = [self.statuses[c.name] for c in reversed(self.spec.init_containers)]
        self._terminate([s for s in apps if s.container is not None], deadline)
        for status in sidecars:
            if status.container is not None:
                self._terminate([status], deadline)
        errors: list[BaseException] = []
        for sandbox in self._sandboxes:
            try:
                sandbox.kill_all()
            except (OSError, TimeoutError, subprocess.TimeoutExpired) as e:
                errors.append(e)
        with self._lock:
            for status in self.statuses.values():
                if status.state == RUNNING:
                    self._mark_exited(status)
        self._join_probe_workers()
        if errors:
            raise errors[0]

    def _terminate(self, statuses: list[ContainerStatus], deadline: float) -> None:
        live = [s for s in statuses if s.container is not None and s.container.poll() is None]
        for status in live:
            assert status.container is not None
            self._event(status.name, "Normal", "Killing", f"Stopping container {status.name}")
            status.container.terminate()
        for status in live:
            assert status.container is not None
            try:
                status.container.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                status.container.kill()
                status.container.wait()

    # -------------------------------------------------------------- what tests look at

    def status(self, name: str) -> ContainerStatus:
        return self.statuses[name]

    def container(self, name: str) -> Container:
        """The current container of that name; fails if it was never created."""
        container = self.statuses[name].container
        if container is None:
            raise LookupError(f"container {name!r} has not been created: {self.describe()}")
        return container

    def warnings(self, name: str | None = None, reason: str | None = None) -> list[Event]:
        return [
            e for e in list(self.events)
            if e.type == "Warning" and (name is None or e.container == name)
            and (reason is None or e.reason == reason)
        ]  # fmt: skip

    def create_errors(self, name: str | None = None) -> list[Event]:
        """The runtime's refusals to create a container (kubelet: CreateContainerError)."""
        return self.warnings(name, "Failed")

    def logs(self, name: str, instance: int = -1) -> str:
        count = len(self.statuses[name].instances)
        if count == 0:
            return ""
        index = instance % count
        try:
            return (self.log_dir / name / f"{index}.log").read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        """Like `kubectl describe pod`: container states, then the events."""
        lines = [f"pod {self.pod.namespace}/{self.pod.name} ({self.pod.uid}):"]
        with self._lock:
            for status in self.statuses.values():
                lines.append(
                    f"  {status.name}: {status.state}"
                    + (f" ({status.reason})" if status.reason else "")
                    + f" restarts={status.restart_count} started={status.started}"
                    + (f" exit={status.exit_code}" if status.exit_code is not None else "")
                    + (f": {status.message}" if status.message else "")
                )
            start = self.events[0].time if self.events else 0.0
            lines.append("  events:")
            lines += [
                f"    {e.time - start:7.2f}s {e.type:7} {e.reason:14} {e.container}: {e.message}"
                for e in self.events[-40:]
            ]
        for name, status in self.statuses.items():
            if status.instances:
                tail = self.logs(name).strip().splitlines()[-5:]
                if tail:
                    lines.append(f"  last log of {name}:")
                    lines += [f"    {line}" for line in tail]
        return "\n".join(lines)

    def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> None:
        """Poll predicate until true; on timeout fail with `what` and the pod's state."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise PodFailed(f"{what} not within {timeout:.0f} s\n{self.describe()}")
            time.sleep(interval)

    def wait_started(self, name: str, timeout: float = 30.0) -> Container:
        """Until the container runs and its startupProbe (if any) has passed."""
        status = self.statuses[name]
        self.wait_for(f"container {name} started", lambda: status.running and status.started,
                      timeout)  # fmt: skip
        assert status.container is not None
        return status.container

    def wait_running(self, timeout: float = 60.0) -> None:
        """Until every app container runs (so every init container has done its part)."""
        names = [c.name for c in self.spec.containers]
        self.wait_for(
            f"pod {self.pod.name} running",
            lambda: all(self.statuses[n].running and self.statuses[n].started for n in names),
            timeout,
        )

    # -------------------------------------------------------------- exec

    def exec(
        self, name: str, argv: Sequence[str], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[bytes]:
        """kubelet's ExecSync: argv in the container's mount and PID namespaces, as its user.

        Raises subprocess.TimeoutExpired after `timeout` (the exec is killed).
        """
        status = self.statuses[name]
        container = status.container
        pid = None if container is None or container.poll() is not None else container.init_pid()
        if pid is None:
            raise LookupError(f"container {name} is not running")
        spec = self.spec.container(name)
        assert self._nsenter is not None
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/", "LANG": "C.UTF-8", **spec.env}  # fmt: skip
        return subprocess.run(
            [self._nsenter, f"--target={pid}", "--mount", "--pid", "--wd=/",
             f"--setuid={spec.run_as_user}", f"--setgid={spec.run_as_group}", "--", *argv],
            env=env, capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip

    def read(self, name: str, path: str, timeout: float = 5.0) -> tuple[bool, str]:
        """`cat path` in the container: (succeeded, stdout or the error)."""
        try:
            result = self.exec(name, ["cat", path], timeout)
        except subprocess.TimeoutExpired:
            return False, f"cat {path}: no answer within {timeout:.0f} s"
        except LookupError as e:
            return False, str(e)
        if result.returncode != 0:
            return False, result.stderr.decode(errors="replace").strip()
        return True, result.stdout.decode(errors="replace")

    # -------------------------------------------------------------- one sync

    def _event(self, container: str, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(time.monotonic(), container, type_, reason, message))

    def _mark_exited(self, status: ContainerStatus) -> None:
        assert status.container is not None
        code = status.container.poll()
        status.state = TERMINATED
        status.exit_code = code
        status.reason = COMPLETED if code == 0 else ERROR
        status.message = ""
        status.started = False
        status.finished_at = time.monotonic()

    def _relist(self) -> None:
        """The PLEG: notice containers that have exited."""
        for status in self.statuses.values():
            container = status.container
            if status.state == RUNNING and container is not None and container.poll() is not None:
                self._mark_exited(status)

    def _sync(self) -> None:
        if not self._sync_init_containers():
            return
        self._initialized = True
        for spec in self.spec.containers:
            status = self.statuses[spec.name]
            if status.state != RUNNING and (not status.instances or self._should_restart(status)):
                self._start(spec)

    def _should_restart(self, status: ContainerStatus) -> bool:
        policy = self.spec.restart_policy
        if status.state == WAITING:  # a creation that failed: try again
            return True
        return policy == ALWAYS or (policy == ON_FAILURE and status.exit_code != 0)

    def _sync_init_containers(self) -> bool:
        """computeInitContainerActions: returns whether the pod is initialized."""
        for spec in self.spec.init_containers:
            status = self.statuses[spec.name]
            if is_sidecar(spec):
                if status.state == RUNNING:
                    if not status.started and not self._initialized:
                        return False  # its startupProbe gates the next container
                    continue
                self._start(spec)  # first start, or a restart (with back-off)
                if not self._initialized:
                    return False
                continue
            if self._initialized:
                continue  # after initialization only sidecars are kept running
            if status.state == RUNNING:
                return False
            if status.state == TERMINATED and status.exit_code == 0:
                continue
            if not status.instances or self.spec.restart_policy != NEVER:
                self._start(spec)
            return False
        return True

    def _start(self, spec: ContainerSpec) -> None:
        """kubelet's start(): doBackOff, then create and start the container."""
        status = self.statuses[spec.name]
        now = time.monotonic()
        if now < status.retry_at:
            return
        if status.finished_at is not None:
            if self.backoff.in_backoff_since(spec.name, status.finished_at, now):
                if status.reason != CRASH_LOOP_BACK_OFF:
                    delay = self.backoff.get(spec.name)
                    self._event(spec.name, "Warning", "BackOff",
                                f"Back-off {delay:.0f}s restarting failed container="
                                f"{spec.name} pod={self.pod.name}")  # fmt: skip
                status.state = WAITING
                status.reason = CRASH_LOOP_BACK_OFF
                return
            self.backoff.next(spec.name, status.finished_at)
        try:
            container = self._create(spec, len(status.instances))
        except ContainerCreateError as e:
            status.state = WAITING
            status.reason = CREATE_CONTAINER_ERROR
            status.message = e.message
            self._event(spec.name, "Warning", "Failed", f"Error: {e.message}")
            if status.finished_at is None:
                # No exited container to back off from: the pod worker's
                # requeue after a failed sync (backOffPeriod) paces retries.
                status.retry_at = now + self.backoff.initial
            return
        if status.instances:
            status.restart_count += 1
        status.instances.append(container)
        status.container = container
        status.state = RUNNING
        status.reason = ""
        status.message = ""
        status.exit_code = None
        status.created_at = time.monotonic()
        status.started = spec.startup_probe is None
        status.started_at = status.created_at if status.started else None
        self._event(spec.name, "Normal", "Started", f"Started container {spec.name}")

    def cri_mounts(self, spec: ContainerSpec) -> list[Mount]:
        """kubelet's makeMounts: the CRI mounts of a container."""
        mounts = []
        for vm in spec.volume_mounts:
            volume = self.spec.volumes.get(vm.name)
            must_ro = isinstance(volume, CsiVolume | ClaimVolume) and volume.read_only
            mounts.append(
                Mount(vm.mount_path, self.volume_paths[vm.name], vm.read_only or must_ro,
                      vm.mount_propagation or "None")
            )  # fmt: skip
        return mounts

    def _create(self, spec: ContainerSpec, instance: int) -> Container:
        mounts = [*(Mount(dst, src) for dst, src in self.image_mounts.items()),
                  *self.cri_mounts(spec)]  # fmt: skip
        sandbox = PodSandbox(
            None, self.zipapp, spec.run_as_user, spec.run_as_group, dict(spec.env),
            mounts=mounts, hide_host_paths=self.hide_host_paths,
            cgroup_procs=self.cgroup_procs,
        )  # fmt: skip
        self._sandboxes.append(sandbox)
        log = self.log_dir / spec.name / f"{instance}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            return sandbox.spawn(
                list(spec.command), container_id=uuid.uuid4().hex + uuid.uuid4().hex,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    # -------------------------------------------------------------- startup probes

    def _start_probe_workers(self) -> None:
        """probeManager.AddPod: a startup-probe worker for each app container and
        native sidecar that has a startupProbe, before any container starts."""
        candidates = [*(c for c in self.spec.init_containers if is_sidecar(c)),
                      *self.spec.containers]  # fmt: skip
        for spec in candidates:
            if spec.startup_probe is None:
                continue
            thread = threading.Thread(
                target=self._probe_worker, args=(spec,),
                name=f"startup-probe-{self.pod.name}-{spec.name}", daemon=True,
            )  # fmt: skip
            self._probe_threads.append(thread)
            thread.start()

    def _probe_worker(self, spec: ContainerSpec) -> None:
        """worker.run: doProbe at once, then on every tick of a periodSeconds ticker."""
        probe = spec.startup_probe
        assert probe is not None
        period = max(float(probe.period_seconds), 0.001)
        state = _ProbeState()
        started = time.monotonic()
        consumed = 0  # index of the last tick consumed (0: the worker's start)
        while not self._stopping.is_set() and self._do_startup_probe(spec, state):
            now = time.monotonic()
            due = int((now - started) / period)  # ticks that have fired by now
            if due > consumed:
                consumed = due  # one was kept for us; the rest were dropped
                continue
            next_tick = started + (consumed + 1) * period
            if self._stopping.wait(max(next_tick - time.monotonic(), 0.0)):
                return
            consumed += 1

    def _do_startup_probe(self, spec: ContainerSpec, state: _ProbeState) -> bool:
        """worker.doProbe for a startup probe; returns whether to keep going."""
        probe = spec.startup_probe
        assert probe is not None
        status = self.statuses[spec.name]
        with self._lock:
            container = status.container
            if container is None:
                return True  # not created yet
            if container is not state.container:  # a new container: probe it afresh
                state.container = container
                state.on_hold = False
                state.failures = 0
            if state.on_hold or status.state != RUNNING or container.poll() is not None:
                return True
            assert status.created_at is not None
            if int(time.monotonic() - status.created_at) < probe.initial_delay_seconds:
                return True
            if status.started:
                return True  # done for this container; kept for its successor
        try:
            result = self.exec(spec.name, probe.command, probe.timeout_seconds)
        except subprocess.TimeoutExpired:
            ok, output = False, f"command timed out after {probe.timeout_seconds:g}s"
        except LookupError:
            return True  # gone meanwhile: no result
        else:
            ok = result.returncode == 0
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
        with self._lock:
            if self._stopping.is_set() or status.container is not container:
                return True  # a result for a container that is no longer current
            if ok:
                status.started = True
                status.started_at = time.monotonic()
                state.failures = 0
                self._wake.set()  # handleProbeSync: the pod is synced at once
                return True
            self._event(spec.name, "Warning", "Unhealthy", f"Startup probe failed: {output}")
            state.failures += 1
            if state.failures < probe.failure_threshold:
                return True
            state.on_hold = True
            state.failures = 0
            message = f"Container {spec.name} failed startup probe, will be restarted"
            self._event(spec.name, "Normal", "Killing", message)
        container.stop(self.spec.termination_grace_period_seconds)
        self._wake.set()
        return True


@dataclass
class _ProbeState:
    """What a probe worker remembers: the container it probes, its failures in a row."""

    container: Container | None = None
    failures: int = 0
    on_hold: bool = False


def kill_processes(container: Container, comm: str, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process named `comm` in the container; returns their pids."""
    killed = []
    for pid in container.processes():
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == comm:
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed
