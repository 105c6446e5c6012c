"""The node side of the emulated node: a kubelet root directory with real mount propagation.

On a real node /var/lib/kubelet (or at least its pods/ dir) is a shared mount,
so a FUSE mount that the driver makes below it propagates into containers
that bind the volume with HostToContainer (rslave) propagation. These
machines mount / with private propagation, so `KubeletRoot` bind-mounts a
fresh directory onto itself and marks that mount shared.

Teardown detaches everything at or below the root, deepest first, from
mountinfo alone (never by walking the tree, which could stat into a hung
FUSE mount), then removes the directory, and refuses to remove it while
anything is still mounted below.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from csi_async.mount.mountinfo import MountEntry as MountInfo
from e2e.mounts import mounts_at_or_below
from e2e.sandbox_init import MNT_DETACH, MS_BIND, MS_NODEV, MS_NOSUID, MS_SHARED, mount, umount2

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class LeftoverMountsError(RuntimeError):
    """Mounts could not be removed; the directory was left in place."""


def mount_tmpfs(target: Path | str, options: str = "mode=755,size=16m") -> None:
    mount("tmpfs", os.fspath(target), "tmpfs", MS_NOSUID | MS_NODEV, options)


def bind_mount(source: Path | str, target: Path | str) -> None:
    mount(os.fspath(source), os.fspath(target), None, MS_BIND)


def lazy_umount(target: Path | str) -> None:
    umount2(os.fspath(target), MNT_DETACH)


def unmount_all_below(top: Path | str, attempts: int = 10) -> None:
    """Lazily unmount every mount at or below `top` (canonical path), deepest first."""
    top_s = os.fspath(top)
    for _ in range(attempts):
        mounts = mounts_at_or_below(top_s)
        if not mounts:
            return
        # Deeper mount points first; among mounts stacked on one point the
        # later mountinfo line is on top, so it goes first.
        order = sorted(
            enumerate(mounts), key=lambda im: (im[1].mount_point.count("/"), im[0]), reverse=True
        )
        for _, m in order:
            try:
                umount2(m.mount_point, MNT_DETACH)
            except OSError:
                # Already gone with a detached parent, or the path vanished;
                # the next round re-reads mountinfo and decides.
                pass
    left = mounts_at_or_below(top_s)
    if left:
        raise LeftoverMountsError(f"still mounted below {top_s}: {[m.mount_point for m in left]}")


class KubeletRoot:
    """A kubelet root directory (stand-in for /var/lib/kubelet) that is a shared mount.

    Use as a context manager; `path` is canonical (symlinks resolved), which
    is what mountinfo and kubelet's path comparisons need.

    The default location is the system temp dir rather than a pytest tmp_path
    because the CSI socket lives below it and Unix socket paths are limited
    to 107 bytes.
    """

    def __init__(
        self,
        base: Path | str | None = None,
        *,
        prefix: str = "csi-async-kubelet-",
        mode: int = 0o750,
    ) -> None:
        self._base = Path(base) if base is not None else Path(tempfile.gettempdir())
        self._prefix = prefix
        self._mode = mode
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            raise RuntimeError("KubeletRoot is not set up")
        return self._path

    @property
    def pods_dir(self) -> Path:
        return self.path / "pods"

    @property
    def plugins_dir(self) -> Path:
        return self.path / "plugins"

    @property
    def plugins_registry_dir(self) -> Path:
        return self.path / "plugins_registry"

    def plugin_dir(self, driver_name: str) -> Path:
        """<root>/plugins/<driver>, created: where a CSI driver's socket lives on a node."""
        d = self.plugins_dir / driver_name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def csi_socket(self, driver_name: str) -> Path:
        sock = self.plugin_dir(driver_name) / "csi.sock"
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path {sock} is longer than {MAX_SOCKET_PATH} bytes")
        return sock

    def csi_endpoint(self, driver_name: str) -> str:
        return f"unix://{self.csi_socket(driver_name)}"

    def mounts(self) -> list[MountInfo]:
        """Mounts at or below the root, the root's own bind mount first."""
        return mounts_at_or_below(self.path)

    def setup(self) -> KubeletRoot:
        if self._path is not None:
            raise RuntimeError("KubeletRoot is already set up")
        self._base.mkdir(parents=True, exist_ok=True)
        path = Path(os.path.realpath(tempfile.mkdtemp(prefix=self._prefix, dir=self._base)))
        self._path = path
        atexit.register(self.teardown)
        try:
            path.chmod(self._mode)
            bind_mount(path, path)
            mount(None, os.fspath(path), None, MS_SHARED)
            for d in (self.pods_dir, self.plugins_dir, self.plugins_registry_dir):
                d.mkdir(mode=0o750)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Detach all mounts at or below the root and delete it. Idempotent."""
        path = self._path
        if path is None:
            return
        unmount_all_below(path)
        if path.exists():
            shutil.rmtree(path)
        atexit.unregister(self.teardown)
        self._path = None

    def __enter__(self) -> KubeletRoot:
        return self.setup()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()
