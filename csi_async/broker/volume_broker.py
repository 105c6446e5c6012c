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
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from csi_async import logs
from csi_async.broker import framing, sockets, wire
from csi_async.broker.policy import NodePolicy, OptionRefused, plan_mount
from csi_async.mount import fuse
from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import PinnedRoot
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


@dataclass(frozen=True, slots=True)
class VolumeTarget:
    """Where this volume's FUSE mount goes, relative to the pinned kubelet root."""

    relative: str
    absolute: str
    pod_uid: str
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
    uid: int
    gid: int
    # Cancels the task that watches the daemon's process (see _watch_daemon).
    watch: anyio.CancelScope | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Peer(pid, uid, gid)


class BrokerError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


class VolumeBroker:
    def __init__(
        self,
        *,
        target: VolumeTarget,
        kubelet_root: PinnedRoot,
        bound: sockets.BoundSocket,
        policy: NodePolicy,
    ) -> None:
        self.target = target
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
            int(owner.get("user_id", "0")),
            int(owner.get("group_id", "0")),
        )

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
                            if err.errno in (errno.EMFILE, errno.ENFILE):
                                # Out of fds: back off instead of spinning.
                                await anyio.sleep(0.1)
                                continue
                            raise
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
            peer = peer_of(conn)
            started = time.monotonic()
            op = "?"
            try:
                body = await framing.read_request_body(conn, protocol.READ_TIMEOUT)
                request = wire.parse_request(body)
                op = request["op"]
                async with self._lock:
                    if request["op"] == "mount":
                        await self._mount(conn, request, peer)
                    else:
                        await self._unmount(conn, request)
                self._audit(op, peer, started, 0, "allowed")
            except (framing.FramingError, wire.BadRequest) as err:
                await self._refuse(conn, errno.EPROTO, str(err))
                self._audit(op, peer, started, errno.EPROTO, "refused", str(err))
            except protocol.ProtocolError as err:
                await self._refuse(conn, errno.EPROTO, str(err))
                self._audit(op, peer, started, errno.EPROTO, "refused", str(err))
            except BrokerError as err:
                await self._refuse(conn, err.errno, err.message)
                self._audit(op, peer, started, err.errno, "refused", err.message)
            except OSError as err:
                # Unexpected kernel errors are reported, never swallowed: the
                # FUSE program shows the message to its user.
                message = f"mount failed: {os.strerror(err.errno or errno.EIO)}"
                await self._refuse(conn, err.errno or errno.EIO, message)
                self._audit(op, peer, started, err.errno or errno.EIO, "failed", message)

    async def _refuse(self, conn: socket.socket, err: int, message: str) -> None:
        try:
            await framing.send_frame(
                conn, wire.response_frame(ok=False, errno=err, message=message), None, 1.0
            )
        except (OSError, TimeoutError):
            pass  # the peer is gone; nothing left to tell it

    def _audit(
        self, op: str, peer: Peer, started: float, err: int, decision: str, detail: str = ""
    ) -> None:
        logs.log(
            log,
            logging.INFO if decision == "allowed" else logging.WARNING,
            f"broker {op} {decision}",
            op=op,
            decision=decision,
            errno=err,
            detail=detail,
            **{
                logs.VOLUME_ID: self.target.volume_id,
                logs.TARGET: self.target.absolute,
                logs.POD_UID: self.target.pod_uid,
                logs.PEER_PID: peer.pid,
                logs.PEER_UID: peer.uid,
                logs.PEER_GID: peer.gid,
                logs.DURATION_MS: round((time.monotonic() - started) * 1000, 3),
            },
        )

    # ------------------------------------------------------------------ MOUNT

    async def _mount(self, conn: socket.socket, request: MountRequest, peer: Peer) -> None:
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
            raise BrokerError(err.errno, err.message) from None
        made = await _blocking(lambda: self._mount_on_target(spec))
        token = next(_mount_tokens)
        try:
            frame = wire.response_frame(ok=True, mount_id=token)
            await framing.send_frame(conn, frame, made.fuse_fd, protocol.READ_TIMEOUT)
        except (OSError, TimeoutError):
            # The program never got the fd: a mount nobody serves would hang
            # every reader, so take it down again.
            await _blocking(lambda: _detach_and_close(made.mount_fd))
            raise
        finally:
            os.close(made.fuse_fd)
        watch = anyio.CancelScope()
        self._active = ActiveMount(made.mount_fd, token, made.mount_id, peer.uid, peer.gid, watch)
        if self._tasks is not None:
            self._tasks.start_soon(self._watch_daemon, token, peer.pid, watch)

    def _mount_on_target(self, spec: fuse.FuseMountSpec) -> fuse.FuseMount:
        if mounts_at(self.target.absolute):
            raise BrokerError(
                errno.EBUSY, f"{self.target.absolute} already has a mount this broker did not make"
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
            )
        # The daemon died: clean its dead mount and let this request mount anew.
        await self._forget(active)

    async def _is_dead(self, active: ActiveMount) -> bool:
        return await anyio.to_thread.run_sync(
            lambda: fuse.connection_is_dead(
                active.mount_fd, active.uid, active.gid, not self._policy.allow_other, PROBE_TIMEOUT
            )
        )

    async def _forget(self, active: ActiveMount) -> None:
        """Detach our mount and drop it (caller holds the lock)."""
        if active.watch is not None:
            active.watch.cancel()
        self._active = None
        await _blocking(lambda: _detach_and_close(active.mount_fd))

    async def _watch_daemon(self, token: int, peer_pid: int, scope: anyio.CancelScope) -> None:
        """Detach the mount soon after its FUSE daemon dies.

        A dead mount answers ENOTCONN to everyone and, in Kubernetes, keeps
        a restarted container from even binding the volume. The daemon is
        the process that ran fusermount3 (the peer's parent), or the peer
        itself (the starter). When one of them exits, the mount is probed;
        only a dead connection is detached, so watching the wrong process
        costs a probe, never a live mount.
        """
        with scope:
            pidfds = _pidfds_of(peer_pid)
            try:
                while pidfds:
                    exited = await _first_readable(pidfds)
                    pidfds.remove(exited)
                    os.close(exited)
                    async with self._lock:
                        active = self._active
                        if active is None or active.token != token:
                            return
                        if await self._is_dead(active):
                            active_watch, active.watch = active.watch, None
                            await self._forget(active)
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
            await self._forget(self._active)
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
