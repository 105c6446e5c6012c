"""A simulated Kubernetes node: shared kubelet root, the real driver, a kubelet.

with Node(workdir, zipapp) as node:
    pod = Pod("app")
    volume = node.publish_fuse_volume(pod, "data")      # native mode
    with node.sandbox(volume.binds("/run/data")) as sandbox:
        sandbox.spawn(["hello", "-f", "/run/data"])
        node.wait_mounted(volume.target)

or a whole pod, its volumes set up concurrently and its containers run by a
pod worker as kubelet does (e2e.pods):

    fuse = fuse_volume_spec("data")
    spec = PodSpec(
        init_containers=[ContainerSpec("fuse", ["hello", "-f", "/run/data"],
                         fuse.fuse_container_mounts("/run/data"), restart_policy="Always",
                         startup_probe=fuse_startup_probe("/run/data"))],
        containers=[ContainerSpec("app", ["sleep", "600"], [fuse.consumer_mount("/run/data")])],
        volumes=fuse.volumes)
    running = node.run_pod(pod, spec)
    running.wait_running()

Every container (node.sandbox or a pod's) is set up without a copy of the
kubelet root: a runc container has pivot_root'ed away from the host's mounts.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from csi_async.config import DEFAULT_DRIVER_NAME
from csi_async.mount.mountinfo import MountEntry, mounts_at
from e2e.driver import DriverProcess
from e2e.hostenv import KubeletRoot
from e2e.kubelet import KubeletEmulator, PersistentVolume, Pod, PublishedVolume, VolumeRequest
from e2e.podcgroup import cgroup2_root, pod_cgroup, remove_pod_cgroups
from e2e.pods import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    META_FUSE_SOCKET_ENV,
    NATIVE_SOCKET_DIR,
    RELIST_PERIOD,
    ClaimVolume,
    CsiVolume,
    EmptyDirVolume,
    PodSpec,
    RunningPod,
)
from e2e.sandbox import Container, PodSandbox

__all__ = ["META_FUSE_SOCKET_ENV", "NATIVE_SOCKET_DIR", "FuseVolume", "Node"]


@dataclass
class FuseVolume:
    """A published FUSE volume and how a container reaches its broker."""

    pod: Pod
    name: str
    target: Path
    # container path -> host path of what the FUSE container must mount to
    # reach the broker socket, plus the environment it needs.
    socket_binds: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    companion_volumes: list[str] = field(default_factory=list)

    def binds(self, mount_path: str) -> dict[str, Path]:
        """Binds for a FUSE container that mounts this volume at mount_path."""
        return {mount_path: self.target, **self.socket_binds}


class Node:
    def __init__(
        self,
        workdir: Path,
        zipapp: Path,
        *,
        driver_args: list[str] | None = None,
        driver_name: str = DEFAULT_DRIVER_NAME,
        shared_binds: dict[str, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        # Bound into every container, like binaries baked into an image.
        self.shared_binds = dict(shared_binds or {})
        self.zipapp = zipapp
        self.driver_name = driver_name
        self.root = KubeletRoot()
        # Containers join their pod's cgroup and the driver checks callers by
        # it, as on a real node; without cgroup v2 the check is turned off.
        self.pod_cgroups = cgroup2_root() is not None
        peer_check = ["--peer-check", "cgroup" if self.pod_cgroups else "off"]
        self._driver_args = [*peer_check, *(driver_args or [])]
        self.driver: DriverProcess
        self.kubelet: KubeletEmulator
        self._published: list[tuple[Pod, str]] = []
        self._published_lock = threading.Lock()
        self._pod_uids: set[str] = set()
        self._sandboxes: list[PodSandbox] = []
        self._pods: list[RunningPod] = []

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Node:
        self.root.setup()
        try:
            self.driver = DriverProcess(
                self.workdir,
                self.root.path,
                extra_args=["--driver-name", self.driver_name, *self._driver_args],
                socket_path=self.root.csi_socket(self.driver_name),
            ).start()
            self.kubelet = KubeletEmulator(
                self.root.path, self.driver.endpoint, self.driver_name, retry_timeout=10
            )
        except BaseException:
            self.root.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        leftovers: list[str] = []
        try:
            for running in list(self._pods):
                running.delete()
            for sandbox in self._sandboxes:
                sandbox.kill_all()
            for pod, name in reversed(self._published):
                self.kubelet.unpublish(pod, name, strict=False)
            # Unpublishing everything must leave no FUSE mount on the node.
            leftovers = [m.mount_point for m in self.root.mounts() if m.is_fuse]
        finally:
            self.driver.stop()
            self.root.teardown()
            remove_pod_cgroups(self._pod_uids)
        if leftovers and exc_type is None:
            raise AssertionError(f"FUSE mounts left after unpublishing every volume: {leftovers}")

    # ---------------------------------------------------------------- volumes

    def publish(self, pod: Pod, name: str, attributes: dict[str, str] | None = None,
                readonly: bool = False) -> Path:  # fmt: skip
        published = self.kubelet.publish(pod, name, attributes or {}, readonly)
        self._record(published)
        return published.target_path

    def _record(self, published: PublishedVolume) -> None:
        with self._published_lock:
            self._published.append((published.pod, published.volume_name))

    def publish_all(self, pod: Pod, volumes: list[VolumeRequest]) -> dict[str, Path]:
        """Publish several volumes of a pod at once, in a random order, as kubelet does.

        Like publish(): final errors are raised, non-final ones retried.
        """
        published = self.kubelet.publish_volumes(
            pod, volumes, retry_final=False, on_published=self._record
        )
        return {name: p.target_path for name, p in published.items()}

    def unpublish(self, pod: Pod, name: str) -> None:
        self.kubelet.unpublish(pod, name)
        self._published.remove((pod, name))

    def publish_fuse_volume(
        self,
        pod: Pod,
        name: str = "data",
        *,
        readonly: bool = False,
        mode: str = "native",
        attributes: dict[str, str] | None = None,
    ) -> FuseVolume:
        """Publish a FUSE volume and what its FUSE container needs to reach the broker.

        native: a second CSI volume "<name>-broker" with socketFor (read-only
        socket directory, mounted at /run/csi-async). meta-fuse: an emptyDir
        "fuse-fd-passing" with the socket named in the volume attributes.
        """
        attrs = dict(attributes or {})
        if mode == "native":
            paths = self.publish_all(pod, [
                VolumeRequest(name, attrs, readonly),
                VolumeRequest(f"{name}-broker", {"socketFor": name}, readonly=True),
            ])  # fmt: skip
            target, socket_dir = paths[name], paths[f"{name}-broker"]
            return FuseVolume(
                pod, name, target, {NATIVE_SOCKET_DIR: socket_dir},
                companion_volumes=[f"{name}-broker"],
            )  # fmt: skip
        if mode == "meta-fuse":
            empty_dir = self.make_empty_dir(pod, "fuse-fd-passing")
            attrs |= {
                "fdPassingEmptyDirName": "fuse-fd-passing",
                "fdPassingSocketName": "fuse-csi-ephemeral.sock",
            }
            target = self.publish(pod, name, attrs, readonly)
            return FuseVolume(
                pod, name, target, {"/run/fusermount3-proxy": empty_dir},
                env={META_FUSE_SOCKET_ENV: "/run/fusermount3-proxy/fuse-csi-ephemeral.sock"},
            )  # fmt: skip
        raise ValueError(f"unknown mode {mode!r}")

    def publish_pv(self, pod: Pod, pv: PersistentVolume, readonly: bool = False) -> Path:
        """Set up a PV-backed volume of the pod, as kubelet does (final errors raised)."""
        published = self.kubelet.publish_pv(pod, pv, readonly)
        self._record(published)
        return published.target_path

    def publish_pv_fuse_volume(
        self, pod: Pod, pv: PersistentVolume, *, readonly: bool = False,
        socket_volume: str = "fuse-broker",
    ) -> FuseVolume:  # fmt: skip
        """A PV-backed FUSE volume and its socket volume (inline, socketFor: the PV's name).

        The pod names the FUSE volume by the PV's name: that is the name
        kubelet puts in the target path, the only one the driver learns.
        """
        target = self.publish_pv(pod, pv, readonly)
        socket_dir = self.publish(pod, socket_volume, {"socketFor": pv.name}, readonly=True)
        return FuseVolume(
            pod, pv.name, target, {NATIVE_SOCKET_DIR: socket_dir},
            companion_volumes=[socket_volume],
        )  # fmt: skip

    def empty_dir_path(self, pod: Pod, name: str) -> Path:
        return self.kubelet.pod_dir(pod) / "volumes" / "kubernetes.io~empty-dir" / name

    def make_empty_dir(self, pod: Pod, name: str) -> Path:
        """An emptyDir volume as kubelet creates it (mode 0777)."""
        path = self.empty_dir_path(pod, name)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return path

    # ---------------------------------------------------------------- pods

    def sandbox(self, binds: dict[str, Path], **kwargs: Any) -> PodSandbox:
        """A container of the pod whose volumes it binds (it joins that pod's cgroup).

        Its binds are HostToContainer unless `propagation` says otherwise.
        """
        pod_uid = self._pod_of(binds)
        if pod_uid is not None and self.pod_cgroups:
            kwargs.setdefault("cgroup_procs", str(pod_cgroup(pod_uid)))
            self._pod_uids.add(pod_uid)
        kwargs.setdefault("hide_host_paths", [self.root.path])
        sandbox = PodSandbox({**self.shared_binds, **binds}, self.zipapp, **kwargs)
        self._sandboxes.append(sandbox)
        return sandbox

    def run_pod(
        self,
        pod: Pod,
        spec: PodSpec,
        *,
        volume_timeout: float = 60.0,
        relist_period: float = RELIST_PERIOD,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> RunningPod:
        """Start a pod as kubelet does: its volumes (all at once, random order,
        failures retried for up to volume_timeout), then its pod worker."""
        self._pod_uids.add(pod.uid)
        cgroup_procs = str(pod_cgroup(pod.uid)) if self.pod_cgroups else ""
        csi = [
            VolumeRequest(name, dict(v.volume_attributes), v.read_only)
            for name, v in spec.volumes.items() if isinstance(v, CsiVolume)
        ]  # fmt: skip
        csi += [
            VolumeRequest(name, readonly=v.read_only, pv=v.pv)
            for name, v in spec.volumes.items() if isinstance(v, ClaimVolume)
        ]  # fmt: skip
        empty_dirs = [name for name, v in spec.volumes.items() if isinstance(v, EmptyDirVolume)]
        self.kubelet.publish_volumes(
            pod, csi, timeout=volume_timeout, retry_final=True, on_published=self._record,
            before={name: partial(self.make_empty_dir, pod, name) for name in empty_dirs},
        )  # fmt: skip
        # A claim's volume is at its PV's name, as kubelet puts it.
        paths = {v.name: self.kubelet.target_path(pod, v.pv.name if v.pv else v.name) for v in csi}
        paths |= {name: self.empty_dir_path(pod, name) for name in empty_dirs}
        running = RunningPod(
            pod, spec, paths, self.zipapp,
            log_dir=self.workdir / "pod-logs" / f"{pod.namespace}_{pod.name}_{pod.uid}",
            image_mounts=self.shared_binds, hide_host_paths=[self.root.path],
            cgroup_procs=cgroup_procs, relist_period=relist_period,
            backoff_initial=backoff_initial, backoff_max=backoff_max,
        )  # fmt: skip
        self._pods.append(running)
        return running.start()

    def delete_pod(self, running: RunningPod, grace: float | None = None) -> None:
        """Delete a pod: stop its containers, then tear its volumes down."""
        running.delete(grace)
        self._pods.remove(running)
        pod = running.pod
        for name, volume in running.spec.volumes.items():
            # A claim's volume was published under its PV's name, as kubelet does.
            published = volume.pv.name if isinstance(volume, ClaimVolume) else name
            if isinstance(volume, CsiVolume | ClaimVolume) and (pod, published) in self._published:
                self.unpublish(pod, published)
            elif isinstance(volume, EmptyDirVolume):
                shutil.rmtree(self.empty_dir_path(pod, name), ignore_errors=True)

    def _pod_of(self, binds: dict[str, Path]) -> str | None:
        pods = self.root.path / "pods"
        for host_path in binds.values():
            relative = Path(host_path).resolve().relative_to(pods) if Path(
                host_path).resolve().is_relative_to(pods) else None  # fmt: skip
            if relative is not None and relative.parts:
                return relative.parts[0]
        return None

    # ---------------------------------------------------------------- waiting

    @staticmethod
    def wait_mounted(
        target: Path, timeout: float = 15.0, fstype_prefix: str = "fuse"
    ) -> MountEntry:
        """The FUSE mount on target, once it appears (from mountinfo only)."""
        deadline = time.monotonic() + timeout
        while True:
            stacked = [
                m for m in mounts_at(os.fspath(target)) if m.fstype.startswith(fstype_prefix)
            ]
            if stacked:
                return stacked[-1]
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing was mounted on {target} within {timeout} s")
            time.sleep(0.05)

    def wait_mounted_by(
        self, program: Container, target: Path, timeout: float = 15.0
    ) -> MountEntry:
        """Like wait_mounted; on failure, kill the program and show why (its stderr
        if it was started with stderr=PIPE, and the driver's log)."""
        try:
            return self.wait_mounted(target, timeout)
        except TimeoutError:
            program.kill()
            stderr = program.stderr.read().decode(errors="replace") if program.stderr else ""
            raise AssertionError(
                f"nothing mounted on {target}; program stderr:\n{stderr}\n"
                f"driver log:\n{self.driver.log_text()[-3000:]}"
            ) from None

    @staticmethod
    def wait_unmounted(target: Path, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while [m for m in mounts_at(os.fspath(target)) if m.is_fuse]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} is still mounted after {timeout} s")
            time.sleep(0.05)
