"""Where a FUSE volume's broker socket lives, and how its pod sees it.

Native mode (the default): in a directory the driver owns,

    <state-dir>/sockets/<pod uid>/<volume name>/fuse.sock

which the pod receives read-only through a second CSI volume of the same
driver (volumeAttributes.socketFor: <volume name>). Nothing the pod can
write is ever touched.

meta-fuse-csi-plugin mode: in the pod's own emptyDir, named by
fdPassingEmptyDirName, reached through the same no-symlink walk as every
path below the kubelet root (csi_async.kubelet.layout says where).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from csi_async.kubelet import layout
from csi_async.kubelet.target_path import TargetPath
from csi_async.mount import fuse
from csi_async.mount.paths import PinnedRoot
from csi_async.volumes.errors import PublishFailed
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.trash import Trash

NATIVE_SOCKET_NAME = "fuse.sock"
# World-readable: the pod sees it through its read-only bind, and its FUSE
# program may run as any uid.
SOCKET_DIR_MODE = 0o755


class SocketDirs:
    """The socket directories of every volume: the native ones and the pods' emptyDirs."""

    def __init__(self, socket_root: Path, kubelet_root: PinnedRoot, trash: Trash) -> None:
        self._socket_root = socket_root
        self._root = kubelet_root
        self._trash = trash

    def native(self, pod_uid: str, volume_name: str) -> Path:
        return self._socket_root / pod_uid / volume_name

    def _open_native(self, pod_uid: str, volume_name: str) -> int:
        # The state dir is broker-owned and unreachable from pods (0700), and
        # pod_uid / volume_name are validated as a UUID and a DNS label.
        path = self.native(pod_uid, volume_name)
        # Deepest first, going up only on ENOENT, then down again: one mkdir
        # when the other half of the pair made the directory, two for a new
        # pod, more only if someone removed the upper levels.
        levels = ((path.parent.parent, 0o711), (path.parent, 0o711), (path, SOCKET_DIR_MODE))
        level = len(levels) - 1
        while True:
            directory, mode = levels[level]
            try:
                os.mkdir(directory, mode)
            except FileExistsError:
                pass
            except FileNotFoundError:
                if level == 0:
                    # The state dir itself is gone: made again, then raise if
                    # the socket root still cannot be.
                    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    directory.mkdir(mode=mode, exist_ok=True)
                else:
                    level -= 1
                    continue
            if level == len(levels) - 1:
                break
            level += 1
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def retire(self, pod_uid: str, volume_name: str, *, with_pod_dir: bool) -> None:
        """Take an unused native socket dir out of sockets/ now, into the trash; blocking.

        with_pod_dir: no other native dir of the pod is in use, so the pod
        dir goes too if it is empty. The caller keeps the pod's publishes
        waiting meanwhile, so nothing is created in a dir while it moves.
        """
        path = self.native(pod_uid, volume_name)
        self._trash.move(path)
        if with_pod_dir:
            try:
                if os.listdir(path.parent):
                    return  # holds a dir this driver does not count: left alone
            except FileNotFoundError:
                return
            self._trash.move(path.parent)

    def bind_onto(self, target: TargetPath, socket_for: str) -> None:
        """Show the native socket dir of the pod's volume `socket_for` read-only on target."""
        source_fd = self._open_native(target.pod_uid, socket_for)
        try:
            target_fd = self._root.open_dir(target.relative)
            try:
                fuse.bind_read_only(source_fd, target_fd)
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)

    def open_for(self, spec: PublishSpec) -> int:
        """An O_PATH fd of the directory a FUSE volume's socket goes into."""
        attrs = spec.attributes
        if attrs.fd_passing_empty_dir_name is None:
            return self._open_native(spec.target.pod_uid, spec.target.volume_name)
        # meta-fuse mode: the pod's own emptyDir, which the pod can write to.
        # The walk refuses symlinks anywhere, and the name is a single
        # validated component, so no traversal reaches another pod.
        relative = layout.empty_dir(spec.target.pod_uid, attrs.fd_passing_empty_dir_name)
        try:
            return self._root.open_dir(relative, cross_mounts=True)
        except FileNotFoundError:
            raise PublishFailed(
                f"emptyDir volume {attrs.fd_passing_empty_dir_name!r} named by "
                "fdPassingEmptyDirName does not exist in this pod"
            ) from None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise PublishFailed(
                    f"emptyDir {attrs.fd_passing_empty_dir_name!r} is not a plain directory"
                ) from None
            raise PublishFailed(
                f"cannot open emptyDir {attrs.fd_passing_empty_dir_name!r}: "
                f"{os.strerror(err.errno or errno.EIO)}"
            ) from None


def socket_name(spec: PublishSpec) -> str:
    """The socket's file name in the directory open_for gives."""
    return spec.attributes.fd_passing_socket_name or NATIVE_SOCKET_NAME


def uses_native_dir(spec: PublishSpec) -> bool:
    """Whether a volume's socket is in (or, for a socket volume, shows) a native dir."""
    # A meta-fuse volume keeps its socket in its emptyDir and never uses the
    # native directory, even when a socketFor names it.
    return not (spec.kind == "fuse" and spec.attributes.fd_passing_empty_dir_name is not None)


def native_dir_owner(spec: PublishSpec) -> str:
    """The FUSE volume whose native socket dir this volume uses (its own, or socketFor's)."""
    return spec.attributes.socket_for or spec.target.volume_name
