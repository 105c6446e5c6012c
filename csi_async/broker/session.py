"""One broker connection, from accept to close.

framing → wire → peer check → dispatch: read one frame (framing.py), parse
it as a request (wire.py), check that the caller runs in the volume's pod
(csi_async.policy.peer), take the volume's lock and hand the request to the
mount lifecycle (lifecycle.py). Whatever happens, the connection is counted
against its budget while it is open, a refusal is answered with an errno
and a message for the FUSE program's user, and one audit line is written.

Requests from the socket are hostile input; see docs/security.md.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

import anyio

from csi_async import logs, metrics
from csi_async.broker import framing, wire
from csi_async.broker.audit import record
from csi_async.broker.errors import BrokerError
from csi_async.broker.identity import Peer, peer_of
from csi_async.broker.lifecycle import MountLifecycle
from csi_async.broker.target import VolumeTarget
from csi_async.mount import fuse
from csi_async.policy.node import NodePolicy
from csi_async.policy.peer import PeerRefused, check_peer
from fusermount3_proxy import protocol

log = logging.getLogger("csi_async.broker")

# How long a request waits for its volume's lock (another request on the
# same volume) before it is told to try again.
LOCK_WAIT = 5.0

# Reported when the peer could not be looked up at all.
_UNKNOWN_PEER = Peer(0, -1, -1)


class ConnectionBudget(Protocol):
    """Counts open connections (the listener's, see listener.py)."""

    def admit(self) -> None:
        """Count one more, or raise BrokerError if over budget."""

    def release(self) -> None:
        """Count one fewer (only after an admit that returned)."""


@dataclass(slots=True)
class AuditRecord:
    """What one request did, filled in as it goes; written once at the end."""

    op: str
    started: float
    decision: str = "allowed"
    errno: int = 0
    detail: str = ""
    spec: fuse.FuseMountSpec | None = None


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


class Session:
    def __init__(
        self,
        conn: socket.socket,
        *,
        target: VolumeTarget,
        policy: NodePolicy,
        budget: ConnectionBudget,
        mounts: MountLifecycle,
    ) -> None:
        self._conn = conn
        self._target = target
        self._policy = policy
        self._budget = budget
        self._mounts = mounts

    async def run(self) -> None:
        """One connection from accept to close: a hard boundary.

        Whatever fails in any step (the budget, the peer lookup, framing,
        validation, the work, the refusal, the audit line) costs this one
        connection and is logged; it never reaches the task group that
        every volume of the node runs in.
        """
        audit = AuditRecord(op="?", started=time.monotonic())
        peer = _UNKNOWN_PEER
        counted = False
        try:
            try:
                self._budget.admit()
                counted = True
                peer = peer_of(self._conn)
                await self._serve_request(peer, audit)
            except anyio.get_cancelled_exc_class():
                audit.decision = "cancelled"
                raise
            except Exception as err:
                code, message, reason, decision = _refusal_of(err)
                if reason == "internal":
                    log.error("broker request failed unexpectedly", exc_info=True)
                audit.decision, audit.errno, audit.detail = decision, code, message
                metrics.BROKER_REFUSALS.labels(reason).inc()
                await self._refuse(code, message)
            finally:
                if counted:
                    self._budget.release()
                # With SO_PASSRIGHTS off no fd can be queued on it, so this
                # close reaches no FUSE daemon (older kernels: framing.py).
                self._conn.close()
                self._audit(peer, audit)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.error("broker connection handling failed", exc_info=True)

    async def _serve_request(self, peer: Peer, audit: AuditRecord) -> None:
        body = await framing.read_request_body(self._conn, protocol.READ_TIMEOUT)
        request = wire.parse_request(body)
        audit.op = request["op"]
        self._check_peer(peer)
        # No node-wide slot is held while waiting here, nor during a probe:
        # those are taken only around the mount syscalls (see lifecycle.py).
        lock = self._mounts.lock
        locked = False
        try:
            # A free lock is taken without the event-loop round that
            # acquire() spends on a checkpoint: this is inside P1's mount time.
            lock.acquire_nowait()
            locked = True
        except anyio.WouldBlock:
            with anyio.move_on_after(LOCK_WAIT):
                await lock.acquire()
                locked = True  # no await in between: a deadline cannot split the two
        if not locked:
            raise BrokerError(
                errno.EAGAIN, "another request on this volume is still in progress; try again",
                "busy",
            )  # fmt: skip
        try:
            if request["op"] == "mount":
                audit.spec = await self._mounts.mount(self._conn, request, peer)
            else:
                await self._mounts.unmount(self._conn, request)
        finally:
            lock.release()

    def _check_peer(self, peer: Peer) -> None:
        """The caller must run in this volume's pod (see identity.py)."""
        try:
            check_peer(
                self._policy,
                caller_pod_uid=peer.cgroup_pod_uid,
                volume_pod_uid=self._target.pod_uid,
            )
        except PeerRefused as err:
            raise BrokerError(err.errno, err.message, "peer") from None

    async def _refuse(self, err: int, message: str) -> None:
        try:
            await framing.send_frame(
                self._conn, wire.response_frame(ok=False, errno=err, message=message), None, 1.0
            )
        except (OSError, TimeoutError):
            pass  # the peer is gone; nothing left to tell it

    def _audit(self, peer: Peer, audit: AuditRecord) -> None:
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
            **self._target.log_fields(),
            **{
                logs.PEER_PID: peer.pid,
                logs.PEER_UID: peer.uid,
                logs.PEER_GID: peer.gid,
                "peer_pod_uid": peer.cgroup_pod_uid,
                logs.DURATION_MS: round(elapsed * 1000, 3),
            },
        )
