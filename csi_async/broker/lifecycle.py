"""A volume's one FUSE mount, from MOUNT to detach.

- MOUNT: open /dev/fuse, mount FUSE on the volume's kubelet target (the only
  place this broker ever mounts), and pass the fd back with SCM_RIGHTS.
  A mount whose daemon died is cleaned away first; a live one answers EBUSY.
- UNMOUNT: detach the mount this broker made, and nothing else.
- A dead mount (its daemon exited, daemon_watch.py) is detached soon after,
  and the pod's copies of it are swapped for the next mount (consumers.py).
- After a driver restart, the mount still on the target is adopted with its
  mount record and watched like one this driver made.

Every method that touches the mount runs with `lock` held (the session
takes it for a request; the daemon watch and close take it themselves).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from csi_async import logs, metrics
from csi_async.broker import consumers, daemon_watch, framing, wire
from csi_async.broker.errors import BrokerError
from csi_async.broker.fuse_waits import NoSlot
from csi_async.broker.identity import Peer
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.mount_records import MountRecord, MountRecords
from csi_async.broker.second_mount import second_mount_message
from csi_async.broker.target import VolumeTarget
from csi_async.mount import fuse
from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import PinnedRoot
from csi_async.policy.node import NodePolicy
from csi_async.policy.options import OptionRefused, plan_mount
from fusermount3_proxy import protocol
from fusermount3_proxy.protocol import MountRequest, UnmountRequest

log = logging.getLogger("csi_async.broker")
T = TypeVar("T")

# Ids handed to clients for the mounts we make. Kernel mount ids are reused
# as soon as a mount is gone, so a stale auto-unmount watcher could name a
# fresh mount; these never repeat (seeded from the clock across restarts).
_mount_tokens = itertools.count(time.time_ns() // 1000)

# How long a liveness probe of an existing mount may take before a hung
# daemon is taken to be alive.
PROBE_TIMEOUT = 2.0
# After the daemon's process exited a dead connection is likely, and a late
# answer more probably means a loaded node than a hung daemon: wait longer.
PATIENT_PROBE_TIMEOUT = 10.0
# How long a MOUNT waits for a node-wide slot before it is told to try again.
SLOT_WAIT = 5.0


@dataclass(slots=True)
class ActiveMount:
    """The mount this broker made (or adopted), pinned by its fsmount fd."""

    mount_fd: int
    # What the client knows this mount by (see _mount_tokens).
    token: int
    # The minor of the FUSE superblock's device: its /sys/fs/fuse/connections entry.
    minor: int
    uid: int
    gid: int
    # Cancels the task that watches the daemon's process (see _watch_daemon).
    watch: anyio.CancelScope | None = None
    # A liveness probe's thread is still running (answered or not): at most
    # one per mount, so a hung daemon cannot collect threads.
    probing: bool = False
    # The mountpoint the program named, in its container (advisory, for the
    # message a second MOUNT gets); None for a mount adopted after a restart.
    mountpoint: str | None = None


class MountLifecycle:
    """A volume's FUSE mount (at most one at a time) and everything done to it."""

    # One per published FUSE volume: no per-instance dict (docs/performance.md, P4).
    __slots__ = (
        "_active", "_adopted_daemons", "_limits", "_policy", "_records", "_root", "_tasks",
        "_waits", "lock", "target",
    )  # fmt: skip

    def __init__(
        self,
        *,
        target: VolumeTarget,
        kubelet_root: PinnedRoot,
        policy: NodePolicy,
        limits: BrokerLimits,
        mount_records: MountRecords,
    ) -> None:
        self.target = target
        # Held by whoever works on the mount: one request at a time per volume.
        self.lock = anyio.Lock()
        self._root = kubelet_root
        self._policy = policy
        self._limits = limits
        self._waits = limits.fuse_waits
        self._records = mount_records
        self._active: ActiveMount | None = None
        # Where daemon watches and consumer swaps run; set once serving starts.
        self._tasks: anyio.abc.TaskGroup | None = None
        # Daemons of an adopted mount, from its record: (pid, start time).
        self._adopted_daemons: list[tuple[int, int]] = []

    @property
    def active(self) -> ActiveMount | None:
        return self._active

    def adopt(self, entry: MountEntry) -> None:
        """Take charge of a FUSE mount made before a driver restart.

        It is pinned through the target's parent (no stat of the FUSE root);
        its owner comes from the kernel's mount options. Its mount record (if
        it is this very superblock) gives back the token the program's
        watcher knows and the daemons to watch again once serving starts.
        Blocking: run it off the loop.
        """
        saved = self._records.load(self.target.absolute)
        if saved is not None and saved.minor != entry.minor:
            saved = None  # a record of an earlier mount on this target
        parent, name = self.target.parent_and_name
        parent_fd = self._root.open_dir(parent)
        try:
            mount_fd = sc.open_mount_root(parent_fd, name)
        finally:
            os.close(parent_fd)
        owner = dict(o.partition("=")[::2] for o in entry.super_options if "=" in o)
        self._adopted_daemons = list(saved.daemons) if saved is not None else []
        self._active = ActiveMount(
            mount_fd,
            saved.token if saved is not None else next(_mount_tokens),
            entry.minor,
            int(owner.get("user_id", "0")),
            int(owner.get("group_id", "0")),
        )
        metrics.LIVE_MOUNTS.inc()

    def start(self, tasks: anyio.abc.TaskGroup) -> None:
        """Serving starts: watches run in `tasks` from now on."""
        self._tasks = tasks
        if self._active is not None and self._active.watch is None:
            # Adopted after a restart: watched like one we made.
            self._active.watch = anyio.CancelScope()
            tasks.start_soon(self._watch_adopted, self._active, self._adopted_daemons)

    def let_go(self) -> None:
        """Close an adopted mount's fd without detaching it (it stays with its daemon)."""
        if self._active is not None:
            os.close(self._active.mount_fd)
            self._active = None
            metrics.LIVE_MOUNTS.dec()

    # ------------------------------------------------------------------ MOUNT

    def _require_thread_slot(self) -> None:
        if not self._waits.has_slot(self.target.pod_uid):
            # Its threads are stuck in calls to unresponsive daemons (probes,
            # last closes); more mounts or unmounts would only stack more.
            raise BrokerError(
                errno.EBUSY,
                "earlier calls to this pod's FUSE daemons have not returned "
                "(a daemon does not answer); try again once they do",
                "busy",
            )

    async def mount(
        self, conn: socket.socket, request: MountRequest, peer: Peer
    ) -> fuse.FuseMountSpec:
        """Mount, answer with the fd, and start watching the daemon (caller holds the lock)."""
        self._require_thread_slot()
        await self._clear_dead_mount(request["mountpoint"])
        try:
            spec = plan_mount(
                volume_options=list(self.target.options),
                program_options=request["options"],
                volume_read_only=self.target.read_only,
                persistent=self.target.persistent,
                user_id=peer.uid,
                group_id=peer.gid,
                default_source=self.target.volume_name,
                policy=self._policy,
            )
        except OptionRefused as err:
            raise BrokerError(err.errno, err.message, "policy") from None
        slot = False
        with anyio.move_on_after(SLOT_WAIT):
            await self._limits.node_wide.acquire()
            slot = True
        if not slot:
            raise BrokerError(errno.EAGAIN, "the node's brokers are busy; try again", "limit")
        try:
            # Shielded: a cancellation landing while the syscalls run would
            # drop their result, and with it the only handle on the new mount.
            with anyio.CancelScope(shield=True):
                made = await _blocking(lambda: self._mount_on_target(spec))
                self._limits.minor_reused(made.minor)
        finally:
            self._limits.node_wide.release()
        delivered = recorded = False
        pidfds: list[int] = []
        try:
            token = next(_mount_tokens)
            # Taken while the helper still waits for our answer: once answered
            # it may exit and be reaped before a watcher could open its pid.
            daemons = daemon_watch.daemons_of(peer.pid)
            pidfds = [fd for fd, _, _ in daemons]
            # Recorded before the program hears of the mount: a driver that
            # crashes from here on still knows the token and the daemons.
            record = MountRecord(
                target_path=self.target.absolute,
                token=token,
                minor=made.minor,
                daemons=[(pid, start) for _, pid, start in daemons],
            )
            with anyio.CancelScope(shield=True):  # saved and known, or neither
                await _blocking(lambda: self._records.save(record))
                recorded = True
            frame = wire.response_frame(ok=True, mount_id=token)
            await framing.send_frame(conn, frame, made.fuse_fd, protocol.READ_TIMEOUT)
            watch = anyio.CancelScope()
            self._active = ActiveMount(
                made.mount_fd, token, made.minor, peer.uid, peer.gid, watch,
                mountpoint=request["mountpoint"],
            )  # fmt: skip
            delivered = True
            metrics.LIVE_MOUNTS.inc()
            if self._tasks is not None:
                self._tasks.start_soon(self._watch_daemon, token, pidfds, watch)
                pidfds = []
                gone = self._limits.claim_gone(self.target.absolute)
                if gone:
                    self._tasks.start_soon(self._heal_consumers, self._active, gone)
        finally:
            # On any failure (the peer went away, a cancellation by unpublish or
            # shutdown, a bug) the program never got the fd: a mount nobody
            # serves would hang every reader, so take it down again.
            # Detached before our fuse fd (then the only one) is closed: closing
            # it aborts the connection, and a reader that came in between
            # would get ENOTCONN from a mount it should never have seen.
            with anyio.CancelScope(shield=True):
                try:
                    for fd in pidfds:
                        os.close(fd)
                    if not delivered:
                        try:
                            if recorded:
                                await _blocking(lambda: self._records.remove(self.target.absolute))
                            await _blocking(lambda: fuse.detach_mount_quietly(made.mount_fd))
                        finally:
                            self._close_later(made.mount_fd)
                finally:
                    os.close(made.fuse_fd)
        return spec

    def _mount_on_target(self, spec: fuse.FuseMountSpec) -> fuse.FuseMount:
        if mounts_at(self.target.absolute):
            raise BrokerError(
                errno.EBUSY,
                f"{self.target.absolute} already has a mount this broker did not make",
                "busy",
            )
        target_fd = self._root.open_dir(self.target.relative)
        try:
            return fuse.mount_fuse(target_fd, self.target.absolute, spec)
        finally:
            os.close(target_fd)

    # ------------------------------------------------------------------ dead mounts

    async def _clear_dead_mount(self, requested: str) -> None:
        active = self._active
        if active is None:
            return
        dead = await self._probe(active, PROBE_TIMEOUT)
        if dead is None:
            raise BrokerError(
                errno.EBUSY,
                "the volume is already mounted and its FUSE daemon does not answer (it "
                "counts as alive until it answers or exits)",
                "busy",
            )
        if not dead:
            message = second_mount_message(requested, active.mountpoint)
            raise BrokerError(errno.EBUSY, message, "busy")
        # The daemon died: clean its dead mount and let this request mount anew.
        await self._forget(active)
        metrics.DEAD_MOUNTS_DETACHED.inc()

    async def _probe(self, active: ActiveMount, timeout: float) -> bool | None:
        """Is the daemon gone? True: dead; False: answered; None: no answer (yet).

        A hung daemon is alive. At most one probe thread per mount runs at a
        time: while one is still waiting for the daemon, the answer is None.
        """
        if active.probing:
            return None
        probe_fd = os.dup(active.mount_fd)
        as_owner = not self._policy.allow_other

        def finished() -> None:
            active.probing = False

        try:
            active.probing = True
            outcome = await self._waits.call(
                self.target.pod_uid,
                lambda: fuse.connection_is_dead(probe_fd, active.uid, active.gid, as_owner),
                timeout,
                name="liveness-probe",
                on_finish=finished,
            )
        except NoSlot:
            active.probing = False
            os.close(probe_fd)
            return None
        return outcome.value if outcome.finished else None

    async def _forget(self, active: ActiveMount, *, abort: bool = False) -> None:
        """Detach our mount and drop it (caller holds the lock).

        With abort, the FUSE connection is aborted first, so that processes
        stuck on a hung daemon get an error instead of waiting forever.
        The pod's other containers may hold copies of it, dead or soon dead
        (its daemon exits after an unmount): the next mount swaps them for
        clones of itself (see _heal_consumers).
        """
        if active.watch is not None:
            active.watch.cancel()
        self._active = None
        metrics.LIVE_MOUNTS.dec()
        if not abort:
            self._limits.remember_gone(active.minor, self.target.absolute)
        with anyio.CancelScope(shield=True):
            await _blocking(lambda: self._records.remove(self.target.absolute))
            if abort:
                await _blocking(lambda: fuse.abort_connection(active.minor))
            try:
                await _blocking(lambda: fuse.detach_mount_quietly(active.mount_fd))
            finally:
                self._close_later(active.mount_fd)

    def _close_later(self, mount_fd: int) -> None:
        """Close a detached mount's fd in a thread of its own.

        If it is the last reference, the close unmounts the superblock, which
        may write dirty pages back through the daemon: a hung daemon could
        keep that close waiting, and the event loop must not be the one. Such
        a thread ends when the daemon answers or dies (at the latest when its
        pod is deleted); it is never aborted by its connection's number,
        which the kernel may give to another pod's mount the moment the close
        completes. Until then it counts against the pod (see mount).
        """
        self._waits.run_detached(self.target.pod_uid, lambda: os.close(mount_fd), name="close")

    async def _watch_daemon(self, token: int, pidfds: list[int], scope: anyio.CancelScope) -> None:
        """Detach the mount soon after its FUSE daemon dies.

        A dead mount answers ENOTCONN to everyone and, in Kubernetes, keeps
        a restarted container from even binding the volume. The daemon is
        the process that ran fusermount3 (the peer's parent), or the peer
        itself (the starter). When one of them exits, the mount is probed;
        only a dead connection is detached, so watching the wrong process
        costs a probe, never a live mount.
        """

        async def on_exit() -> bool:
            async with self.lock:
                active = self._active
                if active is None or active.token != token:
                    return True
                return await self._detach_if_dead(
                    active, "FUSE daemon exited; detached its dead mount"
                )

        try:
            with scope:
                await daemon_watch.watch_until(pidfds, on_exit)
        except Exception:
            # Losing the watch only delays cleanup to the next MOUNT or the
            # unpublish; it must not take the driver down.
            log.error("watching a FUSE daemon failed", exc_info=True)

    async def _watch_adopted(self, active: ActiveMount, daemons: list[tuple[int, int]]) -> None:
        """Watch a mount adopted after a restart as if this driver had made it.

        Its recorded daemons are opened again by pid and start time (a
        recycled pid does not match); a daemon that died while the driver
        was down, or a mount with no record, is probed at once, so a dead
        mount is detached within moments of the driver coming back.
        """
        assert active.watch is not None
        pidfds = [
            fd
            for fd in (daemon_watch.reopen_pid(pid, start) for pid, start in daemons)
            if fd is not None
        ]
        try:
            if len(pidfds) < len(daemons) or not daemons:
                async with self.lock:
                    if self._active is active and await self._detach_if_dead(
                        active, "adopted mount's FUSE daemon is gone; detached it"
                    ):
                        return
        except BaseException:
            for fd in pidfds:
                os.close(fd)
            raise
        await self._watch_daemon(active.token, pidfds, active.watch)

    async def _detach_if_dead(self, active: ActiveMount, message: str) -> bool:
        """From the daemon watch (caller holds the lock): probe, detach if dead."""
        if not await self._probe(active, PATIENT_PROBE_TIMEOUT):
            return False
        active.watch = None  # the calling task itself: do not cancel it
        await self._forget(active)
        metrics.DEAD_MOUNTS_DETACHED.inc()
        logs.log(log, logging.INFO, message, **self.target.log_fields())
        return True

    async def _heal_consumers(self, live: ActiveMount, dead: set[int]) -> None:
        """Swap the pod's copies of this volume's dead mounts for clones of `live`.

        Runs in a thread of the pod's own (fuse_waits): it reads the pod's
        processes' /proc files and waits for the swap child.
        """
        # The thread gets its own duplicate and closes it itself: if the live
        # mount is let go meanwhile, this may be its last reference, whose
        # close can wait on the daemon.
        live_fd = os.dup(live.mount_fd)

        def heal() -> list[str]:
            try:
                return consumers.heal(self.target.pod_uid, dead, live_fd)
            finally:
                os.close(live_fd)

        try:
            outcome = await self._waits.call(self.target.pod_uid, heal, None, name="heal")
        except NoSlot:
            self._waits.run_detached(self.target.pod_uid, lambda: os.close(live_fd), name="close")
            log.warning("no thread left for this pod; its consumers keep the old mount")
            return
        except Exception:
            log.error("healing the pod's consumers failed", exc_info=True)
            return
        for line in outcome.value or []:
            logs.log(log, logging.INFO, f"consumer mount: {line}", **self.target.log_fields())

    # ------------------------------------------------------------------ UNMOUNT

    async def unmount(self, conn: socket.socket, request: UnmountRequest) -> None:
        """Detach this volume's own mount, whatever path is named (caller holds the lock)."""
        active = self._active
        named = request["mount_id"]
        if named is not None and (active is None or named != active.token):
            # The mount it names is already gone (its daemon died and we
            # detached it, or it was unmounted): nothing left to do.
            await _answer_ok(conn, named)
            return
        if active is None:
            raise BrokerError(errno.EINVAL, f"entry for {request['mountpoint']} not found")
        self._require_thread_slot()
        await self._forget(active)
        await _answer_ok(conn, active.token)

    async def detach_all(self, *, leftovers: bool = True) -> None:
        """Unpublish: detach our mount, and any other FUSE mount left on the target.

        leftovers=False leaves the other mounts to the caller (the registry
        detaches whatever is on the target in the one thread hop of its
        unpublish).
        """
        async with self.lock:
            self._limits.claim_gone(self.target.absolute)  # nothing left to heal
            if self._active is not None:
                # Aborted while our fd still pins the mount, so the connection
                # number cannot have been reused by another pod's mount.
                await self._forget(self._active, abort=True)
            if leftovers:
                await _blocking(self._detach_leftovers)

    def _detach_leftovers(self) -> None:
        """Detach FUSE mounts at the target that no fd of ours pins (e.g. from
        before a driver restart). Bounded: each pass removes the top mount."""
        parent, name = self.target.parent_and_name
        for _ in range(16):
            stacked = [m for m in mounts_at(self.target.absolute) if m.is_fuse]
            if not stacked:
                return
            parent_fd = self._root.open_dir(parent)
            try:
                fuse.detach_path(parent_fd, name)
            finally:
                os.close(parent_fd)


async def _answer_ok(conn: socket.socket, mount_id: int) -> None:
    try:
        await framing.send_frame(
            conn, wire.response_frame(ok=True, mount_id=mount_id), None, protocol.READ_TIMEOUT
        )
    except (OSError, TimeoutError):
        pass  # done either way; a watcher may not wait for the answer


async def _blocking(fn: Callable[[], T]) -> T:
    """Run a mount syscall off the event loop.

    Not abandoned on cancellation: these calls never wait for a FUSE daemon
    (a new FUSE superblock sends INIT without waiting; MNT_DETACH does not
    talk to the daemon), and abandoning one half-way could leak a mount.
    The calls that can reach a daemon (the liveness probe, the last close
    of a mount) run in threads of their own (fuse_waits).
    """
    return await anyio.to_thread.run_sync(fn)
