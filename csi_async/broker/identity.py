"""Who is on the other end of a broker socket, and may they use it?

The socket's placement already limits who can reach it (only the pod it was
made for sees it). This check is the second line: the connecting process
must run in that pod's cgroup. The kubelet puts every container of a pod
under a cgroup named after the pod's UID ("pod<uid>" with the cgroupfs
driver, "kubepods-...-pod<uid_with_underscores>.slice" with systemd).
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
from dataclasses import dataclass

# SO_PEERPIDFD (Linux 6.5) is not in Python 3.11's socket module.
SO_PEERPIDFD = 77

_POD_IN_CGROUP = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    # The pod UID found in the peer's cgroup v2 path, if any.
    cgroup_pod_uid: str | None = None


def peer_of(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connection, plus the pod UID of its cgroup.

    The cgroup is read through a pidfd taken from the socket (or opened
    right away), and the pidfd is checked afterwards: if the process exited
    in between, its pid may have been reused, so no pod is reported.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if pid <= 0:
        return Peer(pid, uid, gid)  # in a pid namespace we cannot see
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return Peer(pid, uid, gid)
    try:
        pod_uid = cgroup_pod_uid(_read_cgroup(pid))
        if _exited(pidfd):
            pod_uid = None
    finally:
        os.close(pidfd)
    return Peer(pid, uid, gid, pod_uid)


def cgroup_pod_uid(cgroup_path: str | None) -> str | None:
    """The pod UID in a cgroup path, normalised to the API's dashed form."""
    if not cgroup_path:
        return None
    found = _POD_IN_CGROUP.findall(cgroup_path)
    return found[-1].replace("_", "-") if found else None


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
        return int(struct.unpack("i", raw)[0])
    except OSError:
        pass  # older kernel: fall back to opening the pid now
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _read_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
