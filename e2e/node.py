"""A simulated Kubernetes node: shared kubelet root, the real driver, a kubelet.

with Node(workdir, zipapp) as node:
    pod = Pod("app")
    volume = node.publish_fuse_volume(pod, "data")      # native mode
    with node.sandbox(volume.binds("/run/data")) as sandbox:
        sandbox.spawn(["hello", "-f", "/run/data"])
        node.wait_mounted(volume.target)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from csi_async.config import DEFAULT_DRIVER_NAME
from csi_async.mount.mountinfo import MountEntry, mounts_at
from e2e.driver import DriverProcess
from e2e.hostenv import KubeletRoot
from e2e.kubelet import KubeletEmulator, Pod
from e2e.podcgroup import cgroup2_root, pod_cgroup, remove_pod_cgroups
from e2e.sandbox import Container, PodSandbox

# Where the native-mode socket directory is mounted in FUSE containers; the
# zipapp's default socket path (/run/csi-async/fuse.sock) is inside it.
NATIVE_SOCKET_DIR = "/run/csi-async"
META_FUSE_SOCKET_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"


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
        self._pod_uids: set[str] = set()
        self._sandboxes: list[PodSandbox] = []

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
        self._published.append((pod, name))
        return published.target_path

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
            target = self.publish(pod, name, attrs, readonly)
            socket_dir = self.publish(pod, f"{name}-broker", {"socketFor": name}, readonly=True)
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

    def make_empty_dir(self, pod: Pod, name: str) -> Path:
        """An emptyDir volume as kubelet creates it (mode 0777)."""
        path = self.kubelet.pod_dir(pod) / "volumes" / "kubernetes.io~empty-dir" / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return path

    # ---------------------------------------------------------------- pods

    def sandbox(self, binds: dict[str, Path], **kwargs: Any) -> PodSandbox:
        """A container of the pod whose volumes it binds (it joins that pod's cgroup)."""
        pod_uid = self._pod_of(binds)
        if pod_uid is not None and self.pod_cgroups:
            kwargs.setdefault("cgroup_procs", str(pod_cgroup(pod_uid)))
            self._pod_uids.add(pod_uid)
        sandbox = PodSandbox({**self.shared_binds, **binds}, self.zipapp, **kwargs)
        self._sandboxes.append(sandbox)
        return sandbox

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
