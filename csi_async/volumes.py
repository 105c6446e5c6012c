"""Published volumes: what NodePublishVolume / NodeUnpublishVolume set up and tear down.

Two kinds of volume:
- a FUSE volume: the target directory the FUSE filesystem will be mounted
  on, plus a broker socket where the pod's FUSE program asks for the mount;
- a socket volume (native mode, volumeAttributes.socketFor): a read-only
  bind of the broker-owned directory holding that FUSE volume's socket.

The socket lives either in that broker-owned directory (native mode, the
default) or in the pod's emptyDir (meta-fuse-csi-plugin compatibility).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from csi_async import logs, metrics
from csi_async.broker import audit, sockets
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.policy import NodePolicy
from csi_async.broker.volume_broker import VolumeBroker, VolumeTarget
from csi_async.csi.requests import InvalidRequest, PublishSpec, TargetPath
from csi_async.mount import fuse
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import (
    PinnedRoot,
    entry_kind,
    make_directory,
    open_child_dir,
    remove_directory,
)
from csi_async.state import StateStore, VolumeRecord

log = logging.getLogger("csi_async.volumes")

NATIVE_SOCKET_NAME = "fuse.sock"
# World-readable: before the FUSE mount covers it, the pod's FUSE program
# (any uid) must be able to list it (libfuse2 checks that it is empty,
# gocryptfs opens it). The pods directory above it keeps other pods out.
TARGET_MODE = 0o755
SOCKET_DIR_MODE = 0o755


class VolumeBusy(Exception):
    """Another operation on the same target is in progress (ABORTED)."""


class VolumeConflict(Exception):
    """Already published at this target with other arguments (ALREADY_EXISTS)."""


class PublishFailed(Exception):
    """The node cannot set the volume up right now (FAILED_PRECONDITION)."""


@dataclass(slots=True)
class Published:
    spec: PublishSpec
    broker: VolumeBroker | None = None


class VolumeManager:
    def __init__(
        self,
        *,
        kubelet_root: Path,
        state_dir: Path,
        policy: NodePolicy,
        limits: BrokerLimits,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        self._root = PinnedRoot(str(kubelet_root))
        self._store = StateStore(state_dir)
        self._socket_root = state_dir / "sockets"
        self._policy = policy
        self._limits = limits
        self._tg = task_group
        self._volumes: dict[str, Published] = {}
        self._busy: set[str] = set()

    @property
    def kubelet_root(self) -> str:
        return self._root.path

    def published(self) -> dict[str, Published]:
        return dict(self._volumes)

    # ------------------------------------------------------------------ publish

    async def publish(self, spec: PublishSpec, record: VolumeRecord) -> None:
        key = spec.target.absolute
        with self._claim(key):
            existing = self._volumes.get(key)
            if existing is not None:
                if existing.spec.fingerprint != spec.fingerprint:
                    raise VolumeConflict(
                        f"volume is already published at {key} with different arguments"
                    )
                return
            # Shielded: a kubelet deadline must not leave half a volume behind.
            with anyio.CancelScope(shield=True):
                published = await self._set_up(spec, restoring=False)
                try:
                    # The record is on disk before the volume counts as
                    # published: a publish acknowledged once survives a
                    # driver crash, and a failed save is retried by kubelet
                    # against a clean slate instead of being answered OK.
                    await anyio.to_thread.run_sync(self._store.save, record)
                except BaseException:
                    await self._undo(published, spec.target)
                    raise
                self._volumes[key] = published
                metrics.PUBLISHED_VOLUMES.set(len(self._volumes))

    async def restore(self, validate: Callable[[VolumeRecord], PublishSpec]) -> int:
        """Set up again every volume recorded before a restart; returns how many.

        Each record is validated like a new request. The socket is created
        again in the same directory (the pods' bind mounts still show it),
        and a FUSE mount that is still there is adopted, not replaced.

        Nothing one volume does can keep the driver from starting: a record
        that no longer validates is dropped, and a volume that cannot be set
        up (a pod racing its socket name, a vanished directory, anything
        else) is left out with a log line and an audit record. Its record
        stays for the next start; kubelet's unpublish still cleans it up.
        """
        restored = 0
        records, unreadable = await anyio.to_thread.run_sync(self._store.load)
        for name in unreadable:
            # Its volume cannot be set up again: say so where operators look.
            self._restore_failed(
                f"volume record {name} is unreadable; left in place for an operator",
                # The target is inside the record we cannot read.
                {logs.TARGET: "", "record": name},
            )
        for record in records:
            fields = {logs.TARGET: record.target_path, logs.VOLUME_ID: record.volume_id}
            try:
                spec = validate(record)
            except InvalidRequest as err:
                # The record no longer passes validation or policy: forget it.
                self._restore_failed(f"dropping volume record: {err}", fields, forget=True)
                await anyio.to_thread.run_sync(self._store.remove, record.target_path)
                continue
            except Exception as err:
                self._restore_failed(f"cannot validate volume record: {err!r}", fields)
                continue
            try:
                published = await self._set_up(spec, restoring=True)
            except PublishFailed as err:
                self._restore_failed(f"volume not restored: {err}", fields)
                continue
            except Exception as err:
                log.error("restoring a volume failed", exc_info=True, extra={"fields": fields})
                self._restore_failed(f"volume not restored: {type(err).__name__}: {err}", fields)
                continue
            self._volumes[spec.target.absolute] = published
            restored += 1
            metrics.PUBLISHED_VOLUMES.set(len(self._volumes))
        return restored

    @staticmethod
    def _restore_failed(message: str, fields: dict[str, str], *, forget: bool = False) -> None:
        decision = "dropped" if forget else "skipped"
        logs.log(log, logging.WARNING, message, **fields)
        audit.record(
            f"restore {decision}", allowed=False, op="restore", decision=decision,
            detail=message, **fields,
        )  # fmt: skip

    async def _set_up(self, spec: PublishSpec, *, restoring: bool) -> Published:
        target_created, existing = await anyio.to_thread.run_sync(
            self._make_target, spec.target, restoring
        )
        try:
            if spec.kind == "socket":
                if not existing:
                    await anyio.to_thread.run_sync(self._bind_socket_dir, spec)
                return Published(spec)
            broker = await self._new_broker(spec)
            try:
                fuse_mounts = [m for m in existing if m.is_fuse]
                if fuse_mounts:
                    await anyio.to_thread.run_sync(broker.adopt, fuse_mounts[-1])
                await self._tg.start(broker.serve)
            except BaseException:
                # Not serving yet: only the socket is ours to undo; an adopted
                # mount stays with its daemon (unpublish detaches it).
                await anyio.to_thread.run_sync(broker.discard)
                raise
            return Published(spec, broker)
        except BaseException:
            if target_created:
                await anyio.to_thread.run_sync(self._remove_target, spec.target)
            raise

    def _make_target(self, target: TargetPath, restoring: bool) -> tuple[bool, list[MountEntry]]:
        """Create the target directory; return (created, mounts already on it).

        A mount already there is refused, except when restoring after a
        restart, where it is the one this driver made.
        """
        try:
            parent_fd = self._root.open_dir(target.parent_relative)
        except FileNotFoundError:
            raise PublishFailed(
                f"the parent of {target.absolute} does not exist (kubelet creates it)"
            ) from None
        except OSError as err:
            raise PublishFailed(
                f"the parent of {target.absolute} is not a plain directory: "
                f"{os.strerror(err.errno or errno.EIO)}"
            ) from None
        try:
            created = make_directory(parent_fd, "mount", TARGET_MODE)
            existing = mounts_at(target.absolute)
            if existing and not restoring:
                raise PublishFailed(
                    f"{target.absolute} already has a mount this driver did not make"
                )
            if not existing:
                os.close(open_child_dir(parent_fd, "mount"))  # a directory, not a symlink
            return created, existing
        except OSError as err:
            raise PublishFailed(
                f"cannot create the target {target.absolute}: {os.strerror(err.errno or errno.EIO)}"
            ) from None
        finally:
            os.close(parent_fd)

    def _remove_target(self, target: TargetPath) -> None:
        if mounts_at(target.absolute):
            return  # never remove a directory something is still mounted on
        try:
            parent_fd = self._root.open_dir(target.parent_relative)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise
            # A symlink or a mount where kubelet's directories should be:
            # nothing of ours is there, and nothing there is ours to touch.
            log.warning(
                "target's parent is not a plain directory; leaving it",
                extra={"fields": {"target_path": target.absolute}},
            )
            return
        try:
            if entry_kind(parent_fd, "mount") == stat.S_IFLNK:
                log.warning(
                    "target is a symlink, not the directory we made; leaving it",
                    extra={"fields": {"target_path": target.absolute}},
                )
                return
            if not remove_directory(parent_fd, "mount"):
                # Files were written into the bare directory (e.g. while
                # nothing was mounted). Keep them; kubelet reports the leftover.
                log.warning(
                    "target directory is not empty; leaving it in place",
                    extra={"fields": {"target_path": target.absolute}},
                )
        finally:
            os.close(parent_fd)

    # ------------------------------------------------------------------ sockets

    def _native_socket_dir(self, pod_uid: str, volume_name: str) -> Path:
        return self._socket_root / pod_uid / volume_name

    def _ensure_native_socket_dir(self, pod_uid: str, volume_name: str) -> int:
        # The state dir is broker-owned and unreachable from pods (0700), and
        # pod_uid / volume_name are validated as a UUID and a DNS label.
        path = self._native_socket_dir(pod_uid, volume_name)
        path.parent.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.parent.mkdir(mode=0o711, exist_ok=True)
        path.parent.mkdir(mode=0o711, exist_ok=True)
        path.mkdir(mode=SOCKET_DIR_MODE, exist_ok=True)
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _bind_socket_dir(self, spec: PublishSpec) -> None:
        assert spec.attributes.socket_for is not None
        source_fd = self._ensure_native_socket_dir(spec.target.pod_uid, spec.attributes.socket_for)
        try:
            target_fd = self._root.open_dir(spec.target.relative)
            try:
                fuse.bind_read_only(source_fd, target_fd)
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)

    def _open_socket_dir(self, spec: PublishSpec) -> int:
        attrs = spec.attributes
        if attrs.fd_passing_empty_dir_name is None:
            return self._ensure_native_socket_dir(spec.target.pod_uid, spec.target.volume_name)
        # meta-fuse mode: the pod's own emptyDir, which the pod can write to.
        # The walk refuses symlinks anywhere, and the name is a single
        # validated component, so no traversal reaches another pod.
        relative = (
            f"pods/{spec.target.pod_uid}/volumes/kubernetes.io~empty-dir/"
            f"{attrs.fd_passing_empty_dir_name}"
        )
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

    async def _new_broker(self, spec: PublishSpec) -> VolumeBroker:
        """A broker listening on the volume's socket, not serving yet."""

        def bind() -> sockets.BoundSocket:
            dir_fd = self._open_socket_dir(spec)
            name = spec.attributes.fd_passing_socket_name or NATIVE_SOCKET_NAME
            try:
                return sockets.listen_in(dir_fd, name)
            except OSError as err:
                # The socket's directory may be the pod's own emptyDir: whatever
                # the pod did there is its problem, reported, never INTERNAL.
                os.close(dir_fd)
                reason = str(err) if isinstance(err, FileExistsError) else err.strerror or err
                raise PublishFailed(f"cannot create the broker socket {name!r}: {reason}") from None
            except BaseException:
                os.close(dir_fd)
                raise

        bound = await anyio.to_thread.run_sync(bind)
        broker = VolumeBroker(
            target=VolumeTarget(
                relative=spec.target.relative,
                absolute=spec.target.absolute,
                pod_uid=spec.target.pod_uid,
                pod_namespace=spec.attributes.pod_namespace or "",
                pod_name=spec.attributes.pod_name or "",
                volume_name=spec.target.volume_name,
                volume_id=spec.volume_id,
                read_only=spec.read_only,
                options=spec.mount_options,
            ),
            kubelet_root=self._root,
            bound=bound,
            policy=self._policy,
            limits=self._limits,
            store=self._store,
        )
        return broker

    # ------------------------------------------------------------------ unpublish

    async def unpublish(self, target: TargetPath) -> None:
        key = target.absolute
        with self._claim(key), anyio.CancelScope(shield=True):
            published = self._volumes.get(key)
            await self._undo(published, target)
            self._volumes.pop(key, None)
            await anyio.to_thread.run_sync(self._store.remove, key)
            metrics.PUBLISHED_VOLUMES.set(len(self._volumes))

    async def _undo(self, published: Published | None, target: TargetPath) -> None:
        """Take down what publish set up, and whatever is left on the target."""
        if published is not None:
            if published.broker is not None:
                await published.broker.close()
            unused = self._unused_native_dir(published.spec)
            if unused is not None:
                await anyio.to_thread.run_sync(_remove_empty_dirs, unused)
        await anyio.to_thread.run_sync(self._detach_any_and_remove_target, target)

    def _detach_any_and_remove_target(self, target: TargetPath) -> None:
        # Whatever is still mounted at the target (a socket-dir bind, or a
        # FUSE mount left from before a restart) is detached, never walked.
        for _ in range(16):
            if not mounts_at(target.absolute):
                break
            parent_fd = self._root.open_dir(target.parent_relative)
            try:
                fuse.detach_path(parent_fd, "mount")
            finally:
                os.close(parent_fd)
        self._remove_target(target)

    def _unused_native_dir(self, spec: PublishSpec) -> Path | None:
        """The native socket dir of this volume, if neither of its two volumes needs it.

        Runs on the event loop: the volume table is only read there.
        """
        owner = spec.attributes.socket_for or spec.target.volume_name
        if spec.kind == "fuse" and spec.attributes.fd_passing_empty_dir_name is not None:
            return None
        for other in self._volumes.values():
            o = other.spec
            if o is spec or o.target.pod_uid != spec.target.pod_uid:
                continue
            if o.kind == "fuse" and o.attributes.fd_passing_empty_dir_name is not None:
                # A meta-fuse volume keeps its socket in its emptyDir and never
                # uses the native directory, even when a socketFor names it.
                continue
            if (o.attributes.socket_for or o.target.volume_name) == owner:
                return None  # the other half is still published
        return self._native_socket_dir(spec.target.pod_uid, owner)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop every broker listener; mounts stay (their daemons hold them)."""
        for published in self._volumes.values():
            if published.broker is not None:
                await published.broker.stop_listening()
        self._root.close()

    # ------------------------------------------------------------------ helpers

    def _claim(self, key: str) -> _Claim:
        return _Claim(self._busy, key)


class _Claim:
    """A try-lock per target path: CSI expects ABORTED, not queueing."""

    def __init__(self, busy: set[str], key: str) -> None:
        self._busy = busy
        self._key = key

    def __enter__(self) -> None:
        if self._key in self._busy:
            raise VolumeBusy(f"an operation on {self._key} is already in progress")
        self._busy.add(self._key)

    def __exit__(self, *exc: object) -> None:
        self._busy.discard(self._key)


def _remove_empty_dirs(path: Path) -> None:
    """rmdir a socket dir and its pod dir, stopping at the first that is not empty."""
    for directory in (path, path.parent):
        try:
            directory.rmdir()
        except OSError:
            return
