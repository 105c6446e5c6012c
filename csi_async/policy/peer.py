"""Who may use a volume's broker socket: the peer-identity rule.

The socket's placement already limits who can reach it (only the pod it was
made for sees it). This rule is the second line: the connecting process
must run in that pod. Which pod a process runs in is read from its cgroup
by csi_async.broker.identity; this module only decides.
"""

from __future__ import annotations

import errno

from csi_async.policy.node import NodePolicy


class PeerRefused(Exception):
    """The caller may not use this broker socket; the message is for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.EACCES
        self.message = message


def check_peer(policy: NodePolicy, *, caller_pod_uid: str | None, volume_pod_uid: str) -> None:
    """Refuse a caller whose cgroup does not name the volume's pod.

    caller_pod_uid is None when the caller's cgroups name no pod (or
    disagree on one): refused too, unless the node turned the check off.
    """
    if not policy.require_pod_cgroup:
        return
    if caller_pod_uid != volume_pod_uid:
        raise PeerRefused(
            f"this broker socket belongs to pod {volume_pod_uid}; the calling "
            "process does not run in that pod"
        )
