"""Published volumes: what NodePublishVolume / NodeUnpublishVolume set up and tear down.

Two kinds of volume:
- a FUSE volume: the target directory the FUSE filesystem will be mounted
  on, plus a broker socket where the pod's FUSE program asks for the mount;
- a socket volume (native mode, volumeAttributes.socketFor): a read-only
  bind of the broker-owned directory holding that FUSE volume's socket.

The socket lives either in that broker-owned directory (native mode, the
default) or in the pod's emptyDir (meta-fuse-csi-plugin compatibility);
socket_dirs.py says where, targets.py makes and removes target directories,
state.py keeps the records. This module is the table of what is published
and the order in which each publish, unpublish and restore happens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import anyio.to_thread

from csi_async import logs, metrics
from csi_async.broker import audit, sockets
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.listener import VolumeBroker
from csi_async.broker.target import VolumeTarget
from csi_async.kubelet.errors import InvalidRequest
from csi_async.kubelet.target_path import TargetPath
from csi_async.mount.paths import PinnedRoot
from csi_async.policy.node import NodePolicy
from csi_async.volumes import targets
from csi_async.volumes.errors import PublishFailed, VolumeBusy, VolumeConflict
from csi_async.volumes.socket_dirs import (
    SocketDirs,
    native_dir_owner,
    remove_empty_dirs,
    socket_name,
    uses_native_dir,
)
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.state import StateStore, VolumeRecord

# The registry's logger: operators filter on it (docs/operations.md).
log = logging.getLogger("csi_async.volumes")


class ValidatesRecords(Protocol):
    """Checks a volume record from before a restart exactly like a new request.

    Returns what to publish, or raises InvalidRequest when the record no
    longer passes validation or the node's policy.
    """

    def __call__(self, record: VolumeRecord) -> PublishSpec: ...


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
        self._sockets = SocketDirs(state_dir / "sockets", self._root)
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

    async def restore(self, validate: ValidatesRecords) -> int:
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
            targets.make_target, self._root, spec.target, restoring
        )
        try:
            if spec.kind == "socket":
                if not existing:
                    assert spec.attributes.socket_for is not None
                    await anyio.to_thread.run_sync(
                        self._sockets.bind_onto, spec.target, spec.attributes.socket_for
                    )
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
                await anyio.to_thread.run_sync(targets.remove_target, self._root, spec.target)
            raise

    async def _new_broker(self, spec: PublishSpec) -> VolumeBroker:
        """A broker listening on the volume's socket, not serving yet."""

        def bind() -> sockets.BoundSocket:
            dir_fd = self._sockets.open_for(spec)
            name = socket_name(spec)
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
            mount_records=self._store.mounts,
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
                await anyio.to_thread.run_sync(remove_empty_dirs, unused)
        await anyio.to_thread.run_sync(targets.detach_any_and_remove_target, self._root, target)

    def _unused_native_dir(self, spec: PublishSpec) -> Path | None:
        """The native socket dir of this volume, if neither of its two volumes needs it.

        Runs on the event loop: the volume table is only read there.
        """
        if not uses_native_dir(spec):
            return None
        owner = native_dir_owner(spec)
        for other in self._volumes.values():
            o = other.spec
            if o is spec or o.target.pod_uid != spec.target.pod_uid or not uses_native_dir(o):
                continue
            if native_dir_owner(o) == owner:
                return None  # the other half is still published
        return self._sockets.native(spec.target.pod_uid, owner)

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
