"""The fd broker for one published volume: its listening socket.

It listens on the volume's socket for as long as the volume is published
and answers one request per connection (session.py): MOUNT, which mounts
FUSE on the volume's target and passes the fd back, or UNMOUNT
(lifecycle.py). Each connection counts against the volume's and the pod's
budget (limits.py) from accept() until it is closed.

Requests from the socket are hostile input; see docs/security.md.
"""

from __future__ import annotations

import errno
import logging

import anyio
import anyio.abc
import anyio.to_thread

from csi_async.broker import sockets
from csi_async.broker.errors import BrokerError
from csi_async.broker.lifecycle import ActiveMount, MountLifecycle
from csi_async.broker.limits import BrokerLimits
from csi_async.broker.mount_records import MountRecords
from csi_async.broker.session import Session
from csi_async.broker.target import VolumeTarget
from csi_async.mount.mountinfo import MountEntry
from csi_async.mount.paths import PinnedRoot
from csi_async.policy.node import NodePolicy

log = logging.getLogger("csi_async.broker")


class VolumeBroker:
    # One per published FUSE volume: no per-instance dict (docs/performance.md, P4).
    __slots__ = (
        "_bound", "_cancel_scope", "_connections", "_done", "_limits", "_mounts", "_policy",
        "target",
    )  # fmt: skip

    def __init__(
        self,
        *,
        target: VolumeTarget,
        kubelet_root: PinnedRoot,
        bound: sockets.BoundSocket,
        policy: NodePolicy,
        limits: BrokerLimits,
        mount_records: MountRecords,
    ) -> None:
        self.target = target
        self._limits = limits
        self._connections = 0
        self._bound = bound
        self._policy = policy
        self._mounts = MountLifecycle(
            target=target,
            kubelet_root=kubelet_root,
            policy=policy,
            limits=limits,
            mount_records=mount_records,
        )
        self._cancel_scope: anyio.CancelScope | None = None
        self._done = anyio.Event()

    @property
    def mounted(self) -> ActiveMount | None:
        return self._mounts.active

    def adopt(self, entry: MountEntry) -> None:
        """Take charge of a FUSE mount made before a driver restart (blocking)."""
        self._mounts.adopt(entry)

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
                    self._mounts.start(tg)
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
                        session = Session(
                            conn,
                            target=self.target,
                            policy=self._policy,
                            budget=self,
                            mounts=self._mounts,
                        )
                        tg.start_soon(session.run)
        finally:
            self._done.set()

    # The connection budget (session.ConnectionBudget), counted per volume
    # here and per pod in the shared limits.

    def admit(self) -> None:
        over = self._limits.open_connection(self.target.pod_uid, self._connections)
        if over is not None:
            raise BrokerError(errno.EAGAIN, over, "limit")
        self._connections += 1

    def release(self) -> None:
        self._connections -= 1
        self._limits.close_connection(self.target.pod_uid)

    # ------------------------------------------------------------------ stopping

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
        self._mounts.let_go()
        sockets.remove(self._bound)

    async def stop_listening(self) -> None:
        """Driver shutdown: stop accepting; mounts stay with their daemons."""
        await self._stop_serving()
        sockets.close(self._bound)

    async def close(self) -> None:
        """Unpublish: stop listening, remove the socket, unmount what we mounted."""
        await self._stop_serving()
        # The socket may sit in the pod's own emptyDir: no stat of it on the loop.
        await anyio.to_thread.run_sync(self.remove_socket)
        await self._mounts.detach_all()

    async def stop(self) -> None:
        """Unpublish, the event loop's part: stop serving, detach the mount we made.

        What is left blocks, and is the caller's to run in a worker thread
        with the rest of its unpublish (one hop per RPC): remove_socket(),
        and the detach of any other mount left on the target.
        """
        await self._stop_serving()
        if self._mounts.active is None:
            # Nothing to detach, and nobody left to hold the mount's lock:
            # every session, daemon watch and swap ran in serve's task group,
            # which has ended. Skips the lock's checkpoint on the common path.
            self._limits.claim_gone(self.target.absolute)  # nothing left to heal
            return
        await self._mounts.detach_all(leftovers=False)

    def remove_socket(self) -> None:
        """Close the listener and unlink its socket file if it is still ours.

        Blocking (a stat in a directory the pod may control): run it off the loop.
        """
        sockets.remove(self._bound)
