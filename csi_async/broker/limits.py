"""What one pod may make the node's brokers hold at once.

Every tenant of a node shares one driver, so each limit here is drawn so that
a pod exhausting its own share costs its neighbours nothing:

- connections are budgeted per pod across all of its volumes (and per
  volume), and counted from accept() on: silent connections that never send
  a byte use up only their own pod's budget;
- the node-wide slots bound privileged work (the mount syscalls in worker
  threads). A request takes one only after its whole frame has arrived and
  its peer is checked, and never while it waits for its volume's lock or a
  liveness probe, so a slow or hostile pod cannot sit on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from csi_async.broker.fuse_waits import FuseWaits

# Defaults, sized for a node of ~100 pods with a few FUSE volumes each.
PER_POD_CONNECTIONS = 16
PER_VOLUME_CONNECTIONS = 8
NODE_MOUNT_SLOTS = 64


@dataclass(slots=True)
class BrokerLimits:
    """Bounds on what pods can make the brokers do at once (shared by every volume)."""

    # Privileged requests (mount syscalls) in progress across the node.
    node_wide: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(NODE_MOUNT_SLOTS)
    )
    per_pod: int = PER_POD_CONNECTIONS
    per_volume: int = PER_VOLUME_CONNECTIONS
    # Threads in calls a FUSE daemon can make wait (probes, last closes).
    fuse_waits: FuseWaits = field(default_factory=FuseWaits)
    # Open connections per pod UID; only touched on the event loop.
    _by_pod: dict[str, int] = field(default_factory=dict)
    # Device minors of FUSE superblocks that brokers let go, by owner (the
    # target path), for healing consumers (see MountLifecycle._heal_consumers).
    _gone: dict[int, str] = field(default_factory=dict)

    def remember_gone(self, minor: int, owner: str) -> None:
        self._gone[minor] = owner

    def minor_reused(self, minor: int) -> None:
        """A new FUSE mount got this minor, so the superblock that had it is freed.

        Anonymous device numbers are reused lowest-first; without this a
        volume could take another volume's live mounts for its dead ones.
        """
        self._gone.pop(minor, None)

    def claim_gone(self, owner: str) -> set[int]:
        """The owner's remembered minors (still naming its old superblocks), forgotten."""
        mine = {minor for minor, who in self._gone.items() if who == owner}
        for minor in mine:
            del self._gone[minor]
        return mine

    def open_connection(self, pod_uid: str, volume_connections: int) -> str | None:
        """Count one more connection for the pod; None if allowed, else why not.

        volume_connections: the connections already open on that volume.
        """
        if volume_connections >= self.per_volume:
            return "too many connections to this volume's broker are open; try again"
        held = self._by_pod.get(pod_uid, 0)
        if held >= self.per_pod:
            return "this pod has too many connections to its brokers open; try again"
        self._by_pod[pod_uid] = held + 1
        return None

    def close_connection(self, pod_uid: str) -> None:
        held = self._by_pod.get(pod_uid, 0) - 1
        if held > 0:
            self._by_pod[pod_uid] = held
        else:
            self._by_pod.pop(pod_uid, None)

    def connections_of(self, pod_uid: str) -> int:
        return self._by_pod.get(pod_uid, 0)
