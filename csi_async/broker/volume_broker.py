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
from csi_async.broker import framing, sockets, wire
from csi_async.broker.identity import Peer, peer_of
from csi_async.broker.policy import NodePolicy, OptionRefused, plan_mount
from csi_async.mount import fuse
from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import PinnedRoot
from fusermount3_proxy import protocol
from fusermount3_proxy.protocol import MountRequest, UnmountRequest

log = logging.getLogger("csi_async.broker")
# One line per privileged request: its own logger, so it can go to its own file.
audit_log = logging.getLogger("csi_async.audit")
T = TypeVar("T")

# Ids handed to clients for the mounts we make. Kernel mount ids are reused
# as soon as a mount is gone, so a stale auto-unmount watcher could name a
# fresh mount; these never repeat (seeded from the clock across restarts).
_mount_tokens = itertools.count(time.time_ns() // 1000)

# How long a liveness probe of an existing mount may take before a hung
# daemon is taken to be alive.
PROBE_TIMEOUT = 2.0
# Probes to try after the daemon's process exited before deciding it lives on.
PATIENT_PROBES = 5


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


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Bounds on what pods can make the broker do at once."""

    # Connections being handled across every volume of the node.
    node_wide: anyio.CapacityLimiter
    # Connections open at once on one volume's socket.
    per_volume: int = 8


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


class VolumeBroker:
    def __init__(
        self,
        *,
        target: VolumeTarget,
        kubelet_root: PinnedRoot,
        bound: sockets.BoundSocket,
        policy: NodePolicy,
        limits: BrokerLimits,
    ) -> None:
        self.target = target
        self._limits = limits
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
        its owner comes from the kernel's mount options. Its daemon's process
        is unknown now, so only a later MOUNT or unpublish cleans it if dead.
        """
        parent, _, name = self.target.relative.rpartition("/")
        parent_fd = self._root.open_dir(parent)
        try:
            mount_fd = sc.open_mount_root(parent_fd, name)
        finally:
            os.close(parent_fd)
        owner = dict(o.partition("=")[::2] for o in entry.super_options if "=" in o)
        self._active = ActiveMount(
            mount_fd,
            next(_mount_tokens),
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
                        conn.setblocking(False)
                        tg.start_soon(self._handle, conn)
        finally:
            self._done.set()

    async def _stop_serving(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
            await self._done.wait()

    async def stop_listening(self) -> None:
        """Driver shutdown: stop accepting; mounts stay with their daemons."""
        await self._stop_serving()
        sockets.close(self._bound)

    async def close(self) -> None:
        """Unpublish: stop listening, remove the socket, unmount what we mounted."""
        # Taking the lock first lets a mount in progress finish (and be
        # recorded) instead of landing after we have cleaned up.
        async with self._lock:
            await self._stop_serving()
            sockets.remove(self._bound)
            await self._detach_all()

    # ------------------------------------------------------------------ one connection

    async def _handle(self, conn: socket.socket) -> None:
        with conn:
            started = time.monotonic()
            peer = peer_of(conn)
            audit = _Audit(op="?", started=started)
            self._connections += 1
            try:
                await self._handle_checked(conn, peer, audit)
            except (framing.FramingError, wire.BadRequest, protocol.ProtocolError) as err:
                await self._answer_refusal(conn, audit, errno.EPROTO, str(err), "protocol")
            except BrokerError as err:
                await self._answer_refusal(conn, audit, err.errno, err.message, err.reason)
            except OSError as err:
                # Unexpected kernel errors are reported, never swallowed: the
                # FUSE program shows the message to its user.
                code = err.errno or errno.EIO
                message = f"mount failed: {os.strerror(code)}"
                await self._answer_refusal(conn, audit, code, message, "kernel", "failed")
            except Exception as err:
                # A bug must cost one request, never the driver: an exception
                # escaping here would end the task group every volume runs in.
                log.error("broker request failed unexpectedly", exc_info=True)
                message = f"internal error in the csi-async broker: {type(err).__name__}"
                await self._answer_refusal(conn, audit, errno.EIO, message, "internal", "failed")
            finally:
                self._connections -= 1
                self._audit(peer, audit)

    async def _handle_checked(self, conn: socket.socket, peer: Peer, audit: _Audit) -> None:
        if self._connections > self._limits.per_volume:
            raise BrokerError(errno.EBUSY, "too many connections to this volume's broker", "limit")
        if self._limits.node_wide.available_tokens == 0:
            raise BrokerError(errno.EAGAIN, "the broker is busy; try again", "limit")
        async with self._limits.node_wide:
            body = await framing.read_request_body(conn, protocol.READ_TIMEOUT)
            request = wire.parse_request(body)
            audit.op = request["op"]
            self._check_peer(peer)
            async with self._lock:
                if request["op"] == "mount":
                    audit.spec = await self._mount(conn, request, peer)
                else:
                    await self._unmount(conn, request)

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

    async def _answer_refusal(
        self, conn: socket.socket, audit: _Audit, err: int, message: str, reason: str,
        decision: str = "refused",
    ) -> None:  # fmt: skip
        audit.decision, audit.errno, audit.detail = decision, err, message
        metrics.BROKER_REFUSALS.labels(reason).inc()
        await self._refuse(conn, err, message)

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
        logs.log(
            audit_log,
            logging.INFO if audit.decision == "allowed" else logging.WARNING,
            f"broker {audit.op} {audit.decision}",
            op=audit.op,
            decision=audit.decision,
            errno=audit.errno,
            detail=audit.detail,
            effective=effective,
            **{
                logs.VOLUME_ID: self.target.volume_id,
                logs.TARGET: self.target.absolute,
                logs.POD_UID: self.target.pod_uid,
                logs.POD_NAMESPACE: self.target.pod_namespace,
                logs.POD_NAME: self.target.pod_name,
                logs.PEER_PID: peer.pid,
                logs.PEER_UID: peer.uid,
                logs.PEER_GID: peer.gid,
                "peer_pod_uid": peer.cgroup_pod_uid,
                logs.DURATION_MS: round(elapsed * 1000, 3),
            },
        )

    # ------------------------------------------------------------------ MOUNT

    async def _mount(
        self, conn: socket.socket, request: MountRequest, peer: Peer
    ) -> fuse.FuseMountSpec:
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
        made = await _blocking(lambda: self._mount_on_target(spec))
        token = next(_mount_tokens)
        # Taken while the helper still waits for our answer: once answered it
        # may exit and be reaped before a watcher could open its pid.
        pidfds = _pidfds_of(peer.pid)
        try:
            frame = wire.response_frame(ok=True, mount_id=token)
            await framing.send_frame(conn, frame, made.fuse_fd, protocol.READ_TIMEOUT)
        except (OSError, TimeoutError):
            # The program never got the fd: a mount nobody serves would hang
            # every reader, so take it down again.
            for fd in pidfds:
                os.close(fd)
            await _blocking(lambda: _detach_and_close(made.mount_fd))
            raise
        finally:
            os.close(made.fuse_fd)
        watch = anyio.CancelScope()
        self._active = ActiveMount(
            made.mount_fd, token, made.mount_id, made.minor, peer.uid, peer.gid, watch
        )
        metrics.LIVE_MOUNTS.inc()
        if self._tasks is not None:
            self._tasks.start_soon(self._watch_daemon, token, pidfds, watch)
        else:
            for fd in pidfds:
                os.close(fd)
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
        if not await self._is_dead(active):
            raise BrokerError(
                errno.EBUSY,
                "the volume is already mounted and its FUSE daemon is still running "
                "(unmount it first with fusermount3 -u)",
                "busy",
            )
        # The daemon died: clean its dead mount and let this request mount anew.
        await self._forget(active)
        metrics.DEAD_MOUNTS_DETACHED.inc()

    async def _is_dead(self, active: ActiveMount, *, patient: bool = False) -> bool:
        """Probe the daemon; no answer counts as alive (a hung daemon is alive).

        patient: the daemon's process just exited, so a dead connection is
        likely and a missing answer more probably means a loaded node than a
        hung daemon: ask a few more times before giving up.
        """
        for _ in range(PATIENT_PROBES if patient else 1):
            dead = await anyio.to_thread.run_sync(
                lambda: fuse.connection_is_dead(
                    active.mount_fd, active.uid, active.gid, not self._policy.allow_other,
                    PROBE_TIMEOUT,
                )
            )  # fmt: skip
            if dead is not None:
                return dead
        return False

    async def _forget(self, active: ActiveMount, *, abort: bool = False) -> None:
        """Detach our mount and drop it (caller holds the lock).

        With abort, the FUSE connection is aborted first, so that processes
        stuck on a hung daemon get an error instead of waiting forever.
        """
        if active.watch is not None:
            active.watch.cancel()
        self._active = None
        metrics.LIVE_MOUNTS.dec()
        if abort:
            await _blocking(lambda: fuse.abort_connection(active.minor))
        await _blocking(lambda: _detach_and_close(active.mount_fd))

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
                        if await self._is_dead(active, patient=True):
                            active_watch, active.watch = active.watch, None
                            await self._forget(active)
                            metrics.DEAD_MOUNTS_DETACHED.inc()
                            logs.log(
                                log,
                                logging.INFO,
                                "FUSE daemon exited; detached its dead mount",
                                **{logs.TARGET: self.target.absolute,
                                   logs.VOLUME_ID: self.target.volume_id},
                            )  # fmt: skip
                            del active_watch
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
        await self._forget(active)
        await _answer_ok(conn, active.token)

    async def _detach_all(self) -> None:
        if self._active is not None:
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
    The one call that does reach a daemon, the liveness probe, runs in its
    own thread with a timeout (fuse.connection_is_dead).
    """
    return await anyio.to_thread.run_sync(fn)


def _pidfds_of(peer_pid: int) -> list[int]:
    """pidfds of the peer and of its parent, opened race-free.

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
    fds = [peer_fd]
    parent = _parent_of(peer_pid)
    if parent is not None and parent > 1:
        try:
            parent_fd = os.pidfd_open(parent)
        except OSError:
            return fds
        if _parent_of(peer_pid) == parent:
            fds.append(parent_fd)
        else:
            os.close(parent_fd)
    return fds


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    return int(stat_line.rpartition(")")[2].split()[1])


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


def _detach_and_close(mount_fd: int) -> None:
    try:
        fuse.detach_mount(mount_fd)
    except OSError as err:
        # EINVAL: already detached (e.g. by a lazy unmount from elsewhere).
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(mount_fd)
