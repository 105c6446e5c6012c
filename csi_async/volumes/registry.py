"""Published volumes: what NodePublishVolume / NodeUnpublishVolume set up and tear down.

Two kinds of volume:
- a FUSE volume: the target directory the FUSE filesystem will be mounted
  on, plus a broker socket where the pod's FUSE program asks for the mount;
- a socket volume (native mode, volumeAttributes.socketFor): a read-only
  bind of the broker-owned directory holding that FUSE volume's socket.

The socket lives either in that broker-owned directory (native mode, the
default) or in the pod's emptyDir (meta-fuse-csi-plugin compatibility);
socket_dirs.py says where, targets.py makes and removes target directories,
state.py keeps the records, and what an unpublish deletes of the state dir
goes to trash.py first. This module is the table of what is published and
the order in which each publish, unpublish and restore happens.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
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
from csi_async.mount.mountinfo import MountEntry
from csi_async.mount.paths import PinnedRoot
from csi_async.policy.node import NodePolicy
from csi_async.volumes import targets
from csi_async.volumes.errors import PublishFailed, VolumeBusy, VolumeConflict, WrongVolume
from csi_async.volumes.socket_dirs import (
    SocketDirs,
    native_dir_owner,
    socket_name,
    uses_native_dir,
)
from csi_async.volumes.spec import PublishSpec
from csi_async.volumes.state import StateStore, VolumeRecord
from csi_async.volumes.trash import Trash

# The registry's logger: operators filter on it (docs/operations.md).
log = logging.getLogger("csi_async.volumes")

# Seconds from an unpublish to the pass that empties the trash (trash.py).
TRASH_DELAY = 0.1


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


@dataclass(slots=True)
class _Prepared:
    """What a publish's thread hop set up on disk, for the event loop to serve."""

    target_created: bool
    # FUSE mounts found on the target (restoring only: the ones to adopt).
    fuse_mounts: list[MountEntry]
    bound: sockets.BoundSocket | None


# A native socket dir, by pod UID and the FUSE volume it belongs to.
_NativeDir = tuple[str, str]


class VolumeManager:
    """The table of published volumes, and the order of each publish and unpublish.

    Each publish and unpublish makes one worker-thread hop that does all of
    its blocking filesystem work (the target, the socket or the bind, the
    record); the event loop keeps the table, the per-target claims and the
    brokers. A failure makes a second hop, to undo.
    """

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
        self._trash = Trash(state_dir)
        self._store = StateStore(state_dir, self._trash)
        self._sockets = SocketDirs(state_dir / "sockets", self._root, self._trash)
        self._policy = policy
        self._limits = limits
        self._tg = task_group
        self._volumes: dict[str, Published] = {}
        self._busy: set[str] = set()
        self._native = _NativeDirUse()
        # One background pass at a time empties the trash.
        self._emptying_trash = False
        self._empty_trash_again = False

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
                native = await self._native.use(spec)
                try:
                    # The record is saved in the same hop, before the volume
                    # counts as published: a publish acknowledged once
                    # survives a driver crash, and a failed save is retried
                    # by kubelet against a clean slate instead of being
                    # answered OK.
                    prepared = await anyio.to_thread.run_sync(self._prepare, spec, record)
                    try:
                        published = await self._serve(spec, prepared)
                    except BaseException:
                        await anyio.to_thread.run_sync(self._discard, spec, prepared, True)
                        raise
                except BaseException:
                    with_pod_dir = self._native.release(native)
                    if with_pod_dir is not None:
                        assert native is not None
                        await self._retire(native, with_pod_dir)
                    self._empty_trash_later()  # a record _discard took back
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
        # What unpublishes before a restart left in the trash.
        self._empty_trash_later()
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
            native = await self._native.use(spec)
            try:
                published = await self._set_up_again(spec)
            except PublishFailed as err:
                self._native.release(native)
                self._restore_failed(f"volume not restored: {err}", fields)
                continue
            except Exception as err:
                self._native.release(native)
                log.error("restoring a volume failed", exc_info=True, extra={"fields": fields})
                self._restore_failed(f"volume not restored: {type(err).__name__}: {err}", fields)
                continue
            self._volumes[spec.target.absolute] = published
            restored += 1
            metrics.PUBLISHED_VOLUMES.set(len(self._volumes))
        self._empty_trash_later()  # the records dropped above
        return restored

    @staticmethod
    def _restore_failed(message: str, fields: dict[str, str], *, forget: bool = False) -> None:
        decision = "dropped" if forget else "skipped"
        logs.log(log, logging.WARNING, message, **fields)
        audit.record(
            f"restore {decision}", allowed=False, op="restore", decision=decision,
            detail=message, **fields,
        )  # fmt: skip

    async def _set_up_again(self, spec: PublishSpec) -> Published:
        """Restore one volume: its record is on disk already, a mount on it is adopted."""
        prepared = await anyio.to_thread.run_sync(self._prepare, spec, None)
        try:
            return await self._serve(spec, prepared)
        except BaseException:
            # Not serving: only the socket is ours to undo; an adopted mount
            # stays with its daemon (unpublish detaches it), and so does
            # the record (kubelet's unpublish still cleans it up).
            await anyio.to_thread.run_sync(self._discard, spec, prepared, False)
            raise

    def _prepare(self, spec: PublishSpec, record: VolumeRecord | None) -> _Prepared:
        """A publish's blocking work, in one worker thread: target, socket or bind, record.

        record is None when restoring: it is on disk already, and a mount
        found on the target is this driver's, to adopt. On failure, whatever
        this made is undone before it raises.
        """
        restoring = record is None
        created, existing = targets.make_target(self._root, spec.target, restoring)
        bound = None
        bind_made = False
        try:
            if spec.kind == "socket":
                if not existing:
                    assert spec.attributes.socket_for is not None
                    self._sockets.bind_onto(spec.target, spec.attributes.socket_for)
                    bind_made = True
            else:
                bound = self._bind_socket(spec)
            if record is not None:
                self._store.save(record)
        except BaseException:
            if bound is not None:
                sockets.remove(bound)
            if bind_made:
                targets.detach_any_and_remove_target(self._root, spec.target)
            elif created or not restoring:
                # A new publish: nobody but us creates the target (kubelet
                # makes its parent). A restore keeps a target it found.
                targets.remove_target(self._root, spec.target)
            raise
        return _Prepared(created, [m for m in existing if m.is_fuse], bound)

    def _bind_socket(self, spec: PublishSpec) -> sockets.BoundSocket:
        """Listen on a FUSE volume's socket (blocking)."""
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

    async def _serve(self, spec: PublishSpec, prepared: _Prepared) -> Published:
        """Start the volume's broker on its bound socket (a socket volume has none)."""
        if prepared.bound is None:
            return Published(spec)
        broker = self._new_broker(spec, prepared.bound)
        prepared.bound = None  # the broker's from now on (broker.discard undoes it)
        try:
            if prepared.fuse_mounts:
                await anyio.to_thread.run_sync(broker.adopt, prepared.fuse_mounts[-1])
            await self._tg.start(broker.serve)
        except BaseException:
            # Not serving yet: only the socket is ours to undo; an adopted
            # mount stays with its daemon (unpublish detaches it).
            await anyio.to_thread.run_sync(broker.discard)
            raise
        return Published(spec, broker)

    def _discard(self, spec: PublishSpec, prepared: _Prepared, forget: bool) -> None:
        """Undo a _prepare whose volume never served (blocking); forget: its record too."""
        if prepared.bound is not None:
            sockets.remove(prepared.bound)
        if spec.kind == "socket" and forget:
            targets.detach_any_and_remove_target(self._root, spec.target)
        elif prepared.target_created or forget:
            targets.remove_target(self._root, spec.target)
        if forget:
            self._store.remove(spec.target.absolute)

    def _new_broker(self, spec: PublishSpec, bound: sockets.BoundSocket) -> VolumeBroker:
        """A broker listening on the volume's socket, not serving yet."""
        return VolumeBroker(
            target=VolumeTarget(
                relative=spec.target.relative,
                absolute=spec.target.absolute,
                pod_uid=spec.target.pod_uid,
                pod_namespace=spec.attributes.pod_namespace or "",
                pod_name=spec.attributes.pod_name or "",
                volume_name=spec.target.volume_name,
                volume_id=spec.volume_id,
                read_only=spec.read_only,
                persistent=spec.persistent,
                options=spec.mount_options,
            ),
            kubelet_root=self._root,
            bound=bound,
            policy=self._policy,
            limits=self._limits,
            mount_records=self._store.mounts,
        )

    # ------------------------------------------------------------------ unpublish

    async def unpublish(self, target: TargetPath, volume_id: str) -> None:
        """Tear down what is published at target, which must be volume_id if anything is.

        An inline volume's id follows from its target, a PV's (its
        volumeHandle) does not: only the table knows which id a target has.
        """
        key = target.absolute
        with self._claim(key), anyio.CancelScope(shield=True):
            published = self._volumes.get(key)
            if published is not None and published.spec.volume_id != volume_id:
                raise WrongVolume(f"volume_id {volume_id!r} is not the volume published at {key}")
            broker = published.broker if published is not None else None
            if broker is not None:
                # Requests in progress roll back; our own mount is aborted
                # and detached while its fd still pins it.
                await broker.stop()
            # Decided with no await before the hop starts: a publish of the
            # other half that came first is counted, one that comes later
            # waits for the retire.
            native = None if published is None else _native_dir_of(published.spec)
            retire: tuple[_NativeDir, bool] | None = None
            if native is not None:
                with_pod_dir = self._native.last_user(native)
                if with_pod_dir is not None:
                    retire = (native, with_pod_dir)
                    self._native.begin_retire(native)
            try:
                # Whatever the table says, the target is cleaned: a volume
                # whose restore was skipped still has its record, maybe a mount.
                await anyio.to_thread.run_sync(self._tear_down, target, broker, retire)
            finally:
                if retire is not None:
                    self._native.end_retire(retire[0])
                self._empty_trash_later()  # the record, and the socket dir if retired
            if published is not None:
                del self._volumes[key]
                self._native.release(native)
                metrics.PUBLISHED_VOLUMES.set(len(self._volumes))

    def _tear_down(
        self,
        target: TargetPath,
        broker: VolumeBroker | None,
        retire: tuple[_NativeDir, bool] | None,
    ) -> None:
        """An unpublish's blocking work, in one worker thread.

        The socket (if it is still ours), anything mounted on the target, the
        target directory, the native socket dir once neither of its two
        volumes uses it (retire: which, and whether its pod dir goes too),
        and last the records: a failure on the way leaves the record, so
        kubelet's retry (or a restart) still knows the volume.
        """
        if broker is not None:
            broker.remove_socket()
        targets.detach_any_and_remove_target(self._root, target)
        if retire is not None:
            (pod_uid, owner), with_pod_dir = retire
            self._sockets.retire(pod_uid, owner, with_pod_dir=with_pod_dir)
        self._store.remove(target.absolute)

    # ------------------------------------------------------------------ native socket dirs

    async def _retire(self, native: _NativeDir, with_pod_dir: bool) -> None:
        """Retire a native socket dir no volume uses (a hop of its own)."""
        self._native.begin_retire(native)
        try:
            await anyio.to_thread.run_sync(
                functools.partial(self._sockets.retire, *native, with_pod_dir=with_pod_dir)
            )
        finally:
            self._native.end_retire(native)
        self._empty_trash_later()

    def _empty_trash_later(self) -> None:
        """Delete what unpublishes moved to the trash, in the background, one pass at a time."""
        if self._emptying_trash:
            self._empty_trash_again = True
            return
        self._emptying_trash = True
        self._tg.start_soon(self._empty_trash)

    async def _empty_trash(self) -> None:
        try:
            while True:
                # A moment later, so that one pass takes what a burst of
                # unpublishes left, and stays out of their way meanwhile.
                await anyio.sleep(TRASH_DELAY)
                self._empty_trash_again = False
                await anyio.to_thread.run_sync(self._trash.empty)
                if not self._empty_trash_again:
                    return
        except Exception:
            # Only what unpublishes moved away is left behind; the next pass retries.
            log.warning("emptying the trash failed", exc_info=True)
        finally:
            self._emptying_trash = False

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


@dataclass(slots=True)
class _Retiring:
    """Retires of one pod's native socket dirs in progress; its publishes wait."""

    count: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)


class _NativeDirUse:
    """Which native socket dirs volumes use; on the event loop only.

    A native dir (sockets/<pod uid>/<volume>) serves a FUSE volume and its
    socketFor volume, and goes with the last of the two. Counted per dir
    and per pod, so that an unpublish never scans the table (thousands of
    volumes), with publishes in progress counted too, so that a dir the
    other half is being published into stays. A retire moves directories a
    publish of the same pod could be creating entries in, so such a publish
    waits for it (a rename or two in a worker thread: a bounded wait).
    """

    def __init__(self) -> None:
        self._users: dict[_NativeDir, int] = {}
        self._by_pod: dict[str, int] = {}
        self._retiring: dict[str, _Retiring] = {}

    async def use(self, spec: PublishSpec) -> _NativeDir | None:
        """Count one more user of the volume's native dir, once no retire of its pod runs."""
        native = _native_dir_of(spec)
        if native is None:
            return None
        pod_uid = native[0]
        self._users[native] = self._users.get(native, 0) + 1
        self._by_pod[pod_uid] = self._by_pod.get(pod_uid, 0) + 1
        while (retiring := self._retiring.get(pod_uid)) is not None:
            await retiring.done.wait()
        return native

    def last_user(self, native: _NativeDir) -> bool | None:
        """If the caller is the dir's only user: whether it is the pod's last too; else None."""
        users = self._users.get(native, 0)
        if users > 1:
            return None
        return self._by_pod.get(native[0], 0) <= users

    def release(self, native: _NativeDir | None) -> bool | None:
        """Count one user fewer; if the dir is now unused: whether its pod's are all, else None."""
        if native is None:
            return None
        pod_uid = native[0]
        users = self._users.pop(native, 0) - 1
        in_pod = self._by_pod.pop(pod_uid, 0) - 1
        if in_pod > 0:
            self._by_pod[pod_uid] = in_pod
        if users > 0:
            self._users[native] = users
            return None
        return in_pod <= 0

    def begin_retire(self, native: _NativeDir) -> None:
        retiring = self._retiring.setdefault(native[0], _Retiring())
        retiring.count += 1

    def end_retire(self, native: _NativeDir) -> None:
        retiring = self._retiring[native[0]]
        retiring.count -= 1
        if retiring.count == 0:
            del self._retiring[native[0]]
            retiring.done.set()


def _native_dir_of(spec: PublishSpec) -> _NativeDir | None:
    """The native socket dir a volume uses (its own, or socketFor's), if any."""
    if not uses_native_dir(spec):
        return None
    return spec.target.pod_uid, native_dir_owner(spec)


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
