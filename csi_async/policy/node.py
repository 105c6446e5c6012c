"""The node's policy: what the operator decided pods may do, as data.

It comes from the driver's configuration (flags or environment), never from
a pod. The rules that read it sit beside it: options.py (which mount
options a pod may use) and peer.py (who may use a volume's broker socket).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class NodePolicy:
    """Node-wide settings, from the driver's configuration (never from pods)."""

    # Mount with allow_other, so that other uids in the pod can reach the
    # mount (the daemon, or default_permissions if it asks, decides the rest).
    allow_other: bool = True
    # The connecting process must run in the volume's pod (its cgroup).
    require_pod_cgroup: bool = True
    # Options this node refuses from pods (inline volumeAttributes, a FUSE
    # program's -o) that a PersistentVolume's own options may still set: an
    # administrator wrote those once, for every pod that binds the PV.
    # allow_other matters only where allow_other above is off.
    persistent_volume_options: frozenset[str] = field(
        default_factory=lambda: frozenset({"allow_other"})
    )
