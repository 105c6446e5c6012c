"""The fd broker for one published volume.

It listens on the volume's socket for as long as the volume is published and
answers one request per connection:

- MOUNT: open /dev/fuse, mount FUSE on the volume's kubelet target (the only
  place this broker ever mounts), and pass the fd back with SCM_RIGHTS.
  A mount whose daemon died is cleaned away first; a live one answers EBUSY.
- UNMOUNT: detach the mount this broker made, and nothing else.

Requests from the socket are hostile input; see docs/security.md.
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
from csi_async.broker import consumers, framing, sockets, wire
from csi_async.broker.audit import record
from csi_async.broker.fuse_waits import NoSlot
from csi_async.broker.identity import Peer, peer_of
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.policy import NodePolicy, OptionRefused, plan_mount
from csi_async.mount import fuse
from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import PinnedRoot
from csi_async.state import MountRecord, StateStore
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
# How long a request waits for its volume's lock (another request on the
# same volume) or for a node-wide slot before it is told to try again.
LOCK_WAIT = 5.0
SLOT_WAIT = 5.0

# Reported when the peer could not be looked up at all.
_UNKNOWN_PEER = Peer(0, -1, -1)


@dataclass(frozen=True, slots=True)
class VolumeTarget:
    """Where this volume's FUSE mount goes, relative to the pinned kubelet root."""

    relative: str
    absolute: str
    pod_uid: str
    pod_namespace: str
    pod_name: str
    volume_name: str
    volume_id: str
    read_only: bool
    options: tuple[str, ...]


@dataclass(slots=True)
class ActiveMount:
    mount_fd: int
    # What the client knows this mount by (see _mount_tokens).
    token: int
    # The kernel's id, for logs and mountinfo lookups.
    kernel_mount_id: int
    # The minor of the FUSE superblock's device: its /sys/fs/fuse/connections entry.
    minor: int
    uid: int
    gid: int
    # Cancels the task that watches the daemon's process (see _watch_daemon).
    watch: anyio.CancelScope | None = None
    # A liveness probe's thread is still running (answered or not): at most
    # one per mount, so a hung daemon cannot collect threads.
    probing: bool = False


@dataclass(slots=True)
class _Audit:
    """What one request did, filled in as it goes; written once at the end."""

    op: str
    started: float
    decision: str = "allowed"
    errno: int = 0
    detail: str = ""
    spec: fuse.FuseMountSpec | None = None


class BrokerError(Exception):
    def __init__(self, err: int, message: str, reason: str = "policy") -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        # A short label for metrics: policy, peer, busy, limit, kernel.
        self.reason = reason


def _refusal_of(err: Exception) -> tuple[int, str, str, str]:
    """(errno, message for the program's stderr, metrics reason, audit decision)."""
    if isinstance(err, (framing.FramingError, wire.BadRequest, protocol.ProtocolError)):
        return errno.EPROTO, str(err), "protocol", "refused"
    if isinstance(err, BrokerError):
        return err.errno, err.message, err.reason, "refused"
    if isinstance(err, OSError):
        # Unexpected kernel errors are reported, never swallowed: the FUSE
        # program shows the message to its user.
        code = err.errno or errno.EIO
        return code, f"mount failed: {os.strerror(code)}", "kernel", "failed"
    message = f"internal error in the csi-async broker: {type(err).__name__}"
    return errno.EIO, message, "internal", "failed"


class VolumeBroker:
    def __init__(
        self,
        *,
        target: VolumeTarget,
        kubelet_root: PinnedRoot,
        bound: sockets.BoundSocket,
        policy: NodePolicy,
        limits: BrokerLimits,
        store: StateStore,
    ) -> None:
        self.target = target
        self._store = store
        # Daemons of an adopted mount, from its record: (pid, start time).
        self._adopted_daemons: list[tuple[int, int]] = []

        self._limits = limits
        self._waits = limits.fuse_waits
        self._connections = 0
        self._root = kubelet_root
        self._bound = bound
        self._policy = policy
        self._lock = anyio.Lock()
        self._tasks: anyio.abc.TaskGroup | None = None
        self._active: ActiveMount | None = None
        self._cancel_scope: anyio.CancelScope | None = None
        self._done = anyio.Event()

    @property
    def mounted(self) -> ActiveMount | None:
        return self._active

    def adopt(self, entry: MountEntry) -> None:
        """Take charge of a FUSE mount made before a driver restart.

        It is pinned through the target's parent (no stat of the FUSE root);
        its owner comes from the kernel's mount options. Its mount record (if
        it is this very superblock) gives back the token the program's
        watcher knows and the daemons to watch again once serving starts.
        Blocking: run it off the loop.
        """
        saved = self._store.load_mount(self.target.absolute)
        if saved is not None and saved.minor != entry.minor:
            saved = None  # a record of an earlier mount on this target
        parent, _, name = self.target.relative.rpartition("/")
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
            entry.mount_id,
            entry.minor,
            int(owner.get("user_id", "0")),
            int(owner.get("group_id", "0")),
        )
        metrics.LIVE_MOUNTS.inc()

    # ------------------------------------------------------------------ serving

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until close(); each one is handled in its own task."""
        try:
            with anyio.CancelScope() as scope:
                self._cancel_scope = scope
                task_status.started()
                async with anyio.create_task_group() as tg:
                    self._tasks = tg
                    if self._active is not None and self._active.watch is None:
                        # Adopted after a restart: watched like one we made.
                        self._active.watch = anyio.CancelScope()
                        tg.start_soon(self._watch_adopted, self._active, self._adopted_daemons)
                    while True:
                        await anyio.wait_readable(self._bound.sock)
                        try:
                            conn, _ = self._bound.sock.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as err:
                            if err.errno not in (errno.EMFILE, errno.ENFILE):
                                log.error("accept failed: %s", err)
                            # Back off instead of spinning (out of fds, or
                            # something stranger); the volume keeps listening.
                            await anyio.sleep(0.1)
                            continue
                        tg.start_soon(self._handle, conn)
        finally:
            self._done.set()

    async def _stop_serving(self) -> None:
        """Cancel the accept loop, every request in progress and the daemon watch.

        Requests cut off here roll back what they did (under a shield), so
        when this returns no mount is half made.
        """
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
            await self._done.wait()

    def discard(self) -> None:
        """Undo a broker that never served: remove its socket, touch no mount.

        Blocking (the socket may sit in the pod's emptyDir): run it off the loop.
        """
        if self._active is not None:
            os.close(self._active.mount_fd)
            self._active = None
            metrics.LIVE_MOUNTS.dec()
        sockets.remove(self._bound)

    async def stop_listening(self) -> None:
        """Driver shutdown: stop accepting; mounts stay with their daemons."""
        await self._stop_serving()
        sockets.close(self._bound)

    async def close(self) -> None:
        """Unpublish: stop listening, remove the socket, unmount what we mounted."""
        await self._stop_serving()
        # The socket may sit in the pod's own emptyDir: no stat of it on the loop.
        await anyio.to_thread.run_sync(sockets.remove, self._bound)
        async with self._lock:
            await self._detach_all()

    # ------------------------------------------------------------------ one connection

    async def _handle(self, conn: socket.socket) -> None:
        """One connection from accept to close: a hard boundary.

        Whatever fails in any step (the budget, the peer lookup, framing,
        validation, the work, the refusal, the audit line) costs this one
        connection and is logged; it never reaches the task group that
        every volume of the node runs in.
        """
        audit = _Audit(op="?", started=time.monotonic())
        peer = _UNKNOWN_PEER
        counted = False
        try:
            try:
                over = self._limits.open_connection(self.target.pod_uid, self._connections)
                if over is not None:
                    raise BrokerError(errno.EAGAIN, over, "limit")
                counted = True
                self._connections += 1
                peer = peer_of(conn)
                await self._serve_request(conn, peer, audit)
            except anyio.get_cancelled_exc_class():
                audit.decision = "cancelled"
                raise
            except Exception as err:
                code, message, reason, decision = _refusal_of(err)
                if reason == "internal":
                    log.error("broker request failed unexpectedly", exc_info=True)
                audit.decision, audit.errno, audit.detail = decision, code, message
                metrics.BROKER_REFUSALS.labels(reason).inc()
                await self._refuse(conn, code, message)
            finally:
                if counted:
                    self._connections -= 1
                    self._limits.close_connection(self.target.pod_uid)
                # With SO_PASSRIGHTS off no fd can be queued on it, so this
                # close reaches no FUSE daemon (older kernels: framing.py).
                conn.close()
                self._audit(peer, audit)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.error("broker connection handling failed", exc_info=True)

    async def _serve_request(self, conn: socket.socket, peer: Peer, audit: _Audit) -> None:
        body = await framing.read_request_body(conn, protocol.READ_TIMEOUT)
        request = wire.parse_request(body)
        audit.op = request["op"]
        self._check_peer(peer)
        # No node-wide slot is held while waiting here, nor during a probe:
        # those are taken only around the mount syscalls (see _mount).
        locked = False
        with anyio.move_on_after(LOCK_WAIT):
            await self._lock.acquire()
            locked = True  # no await in between: a deadline cannot split the two
        if not locked:
            raise BrokerError(
                errno.EAGAIN, "another request on this volume is still in progress; try again",
                "busy",
            )  # fmt: skip
        try:
            if request["op"] == "mount":
                audit.spec = await self._mount(conn, request, peer)
            else:
                await self._unmount(conn, request)
        finally:
            self._lock.release()

    def _check_peer(self, peer: Peer) -> None:
        """The caller must run in this volume's pod (see identity.py)."""
        if not self._policy.require_pod_cgroup:
            return
        if peer.cgroup_pod_uid != self.target.pod_uid:
            raise BrokerError(
                errno.EACCES,
                f"this broker socket belongs to pod {self.target.pod_uid}; the calling "
                "process does not run in that pod",
                "peer",
            )

    async def _refuse(self, conn: socket.socket, err: int, message: str) -> None:
        try:
            await framing.send_frame(
                conn, wire.response_frame(ok=False, errno=err, message=message), None, 1.0
            )
        except (OSError, TimeoutError):
            pass  # the peer is gone; nothing left to tell it

    def _audit(self, peer: Peer, audit: _Audit) -> None:
        elapsed = time.monotonic() - audit.started
        metrics.BROKER_REQUESTS.labels(audit.op, audit.decision).inc()
        metrics.BROKER_DURATION.labels(audit.op).observe(elapsed)
        effective: dict[str, object] = {}
        if audit.spec is not None:
            spec = audit.spec
            effective = {
                "fstype": spec.fstype,
                "source": spec.source,
                "read_only": spec.read_only,
                "flags": list(spec.flags),
                "mount_attrs": spec.mount_attrs,
                "strings": dict(spec.strings),
                "user_id": spec.user_id,
                "group_id": spec.group_id,
            }
        record(
            f"broker {audit.op} {audit.decision}",
            allowed=audit.decision == "allowed",
            op=audit.op,
            decision=audit.decision,
            errno=audit.errno,
            detail=audit.detail,
            effective=effective,
            **self._fields(),
            **{
                logs.PEER_PID: peer.pid,
                logs.PEER_UID: peer.uid,
                logs.PEER_GID: peer.gid,
                "peer_pod_uid": peer.cgroup_pod_uid,
                logs.DURATION_MS: round(elapsed * 1000, 3),
            },
        )

    def _fields(self) -> dict[str, str]:
        return {
            logs.VOLUME_ID: self.target.volume_id,
            logs.TARGET: self.target.absolute,
            logs.POD_UID: self.target.pod_uid,
            logs.POD_NAMESPACE: self.target.pod_namespace,
            logs.POD_NAME: self.target.pod_name,
        }

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

    async def _mount(
        self, conn: socket.socket, request: MountRequest, peer: Peer
    ) -> fuse.FuseMountSpec:
        self._require_thread_slot()
        await self._clear_dead_mount()
        try:
            spec = plan_mount(
                volume_options=list(self.target.options),
                program_options=request["options"],
                volume_read_only=self.target.read_only,
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
            daemons = _daemons_of(peer.pid)
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
                await _blocking(lambda: self._store.save_mount(record))
                recorded = True
            frame = wire.response_frame(ok=True, mount_id=token)
            await framing.send_frame(conn, frame, made.fuse_fd, protocol.READ_TIMEOUT)
            watch = anyio.CancelScope()
            self._active = ActiveMount(
                made.mount_fd, token, made.mount_id, made.minor, peer.uid, peer.gid, watch
            )
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
            with anyio.CancelScope(shield=True):
                os.close(made.fuse_fd)
                for fd in pidfds:
                    os.close(fd)
                if not delivered:
                    try:
                        if recorded:
                            await _blocking(lambda: self._store.remove_mount(self.target.absolute))
                        await _blocking(lambda: fuse.detach_mount_quietly(made.mount_fd))
                    finally:
                        self._close_later(made.mount_fd)
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

    async def _clear_dead_mount(self) -> None:
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
            raise BrokerError(
                errno.EBUSY,
                "the volume is already mounted and its FUSE daemon is still running "
                "(unmount it first with fusermount3 -u)",
                "busy",
            )
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
            await _blocking(lambda: self._store.remove_mount(self.target.absolute))
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
        completes. Until then it counts against the pod (see _mount).
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
        try:
            await self._watch_daemon_until_gone(token, pidfds, scope)
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
            fd for fd in (_reopen_pid(pid, start) for pid, start in daemons) if fd is not None
        ]
        try:
            if len(pidfds) < len(daemons) or not daemons:
                async with self._lock:
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
        logs.log(log, logging.INFO, message, **self._fields())
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
            logs.log(log, logging.INFO, f"consumer mount: {line}", **self._fields())

    async def _watch_daemon_until_gone(
        self, token: int, pidfds: list[int], scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                while pidfds:
                    exited = await _first_readable(pidfds)
                    pidfds.remove(exited)
                    os.close(exited)
                    async with self._lock:
                        active = self._active
                        if active is None or active.token != token:
                            return
                        if await self._detach_if_dead(
                            active, "FUSE daemon exited; detached its dead mount"
                        ):
                            return
            finally:
                for fd in pidfds:
                    os.close(fd)

    # ------------------------------------------------------------------ UNMOUNT

    async def _unmount(self, conn: socket.socket, request: UnmountRequest) -> None:
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

    async def _detach_all(self) -> None:
        self._limits.claim_gone(self.target.absolute)  # nothing left to heal
        if self._active is not None:
            # Aborted while our fd still pins the mount, so the connection
            # number cannot have been reused by another pod's mount.
            await self._forget(self._active, abort=True)
        await _blocking(self._detach_leftovers)

    def _detach_leftovers(self) -> None:
        """Detach FUSE mounts at the target that no fd of ours pins (e.g. from
        before a driver restart). Bounded: each pass removes the top mount."""
        parent, _, name = self.target.relative.rpartition("/")
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


def _daemons_of(peer_pid: int) -> list[tuple[int, int, int]]:
    """(pidfd, pid, start time) of the peer and of its parent, opened race-free.

    The parent is read after the peer's pidfd is held, and checked again
    afterwards, so a recycled pid cannot slip in. A peer in a pid namespace
    we cannot see has pid 0: nothing to watch.
    """
    if peer_pid <= 0:
        return []
    try:
        peer_fd = os.pidfd_open(peer_pid)
    except OSError:
        return []
    found = [(peer_fd, peer_pid, _start_time(peer_pid) or 0)]
    parent = _parent_of(peer_pid)
    if parent is not None and parent > 1:
        try:
            parent_fd = os.pidfd_open(parent)
        except OSError:
            return found
        if _parent_of(peer_pid) == parent:
            found.append((parent_fd, parent, _start_time(parent) or 0))
        else:
            os.close(parent_fd)
    return found


def _reopen_pid(pid: int, start_time: int) -> int | None:
    """A pidfd of pid if it is still the process that started at start_time."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after the pidfd is held: from here on the pid cannot be reused.
    if start_time == 0 or _start_time(pid) != start_time:
        os.close(fd)
        return None
    return fd


def _stat_fields(pid: int) -> list[str]:
    # /proc/<pid>/stat takes no lock a FUSE fault could hold (unlike cmdline
    # or environ, which read the process's memory), so it is safe here.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat_line = f.read()
    except OSError:
        return []
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    return stat_line.rpartition(")")[2].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # Field 22 (starttime), the 20th after the command name.
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


async def _first_readable(fds: list[int]) -> int:
    """Wait until one of the fds (pidfds) is readable, i.e. that process exited."""
    winner: list[int] = []
    async with anyio.create_task_group() as tg:

        async def wait_for(fd: int) -> None:
            await anyio.wait_readable(fd)
            winner.append(fd)
            tg.cancel_scope.cancel()

        for fd in fds:
            tg.start_soon(wait_for, fd)
    return winner[0]
