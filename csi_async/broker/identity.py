"""Who is on the other end of a broker socket: its credentials and the pod it runs in.

The socket's placement already limits who can reach it (only the pod it was
made for sees it). The second line is the peer rule (csi_async.policy.peer):
the connecting process must run in that pod's cgroup. This module finds
which pod that is.

kubelet (with the default --cgroups-per-qos) puts every container of a pod
below one cgroup per pod, at a fixed depth under its "kubepods" cgroup:

    cgroupfs driver  <prefix>/kubepods[/burstable|/besteffort]/pod<uid>/<container>
    systemd driver   <prefix>/<p>kubepods.slice[/<p>kubepods-<qos>.slice]
                         /<p>kubepods[-<qos>]-pod<uid_with_underscores>.slice/<container>.scope

<prefix> is whatever lies above kubelet's cgroup root (e.g. /kubelet with
kind's --cgroup-root, or a nesting container's cgroup); <p> is the systemd
form of that root ("kubelet-" for kind). Only the pod level counts. Below
the container a pod may own its subtree (cgroup delegation, nsdelegate) and
name directories as it likes, so anything deeper is ignored, and a path that
does not have this shape names no pod.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
from dataclasses import dataclass
from enum import Enum

# SO_PEERPIDFD (Linux 6.5) is not in Python 3.11's socket module.
SO_PEERPIDFD = 77

_HEX_GROUPS = (8, 4, 4, 4, 12)
_UUID = "-".join(f"[0-9a-f]{{{n}}}" for n in _HEX_GROUPS)
# The cgroupfs driver uses the UID as the API spells it.
_CGROUPFS_POD = re.compile(rf"pod({_UUID})")
_CGROUPFS_QOS = ("burstable", "besteffort")
# The systemd driver escapes "-" (its hierarchy separator in slice names) as
# "_", so a pod slice only ever carries the underscore form.
_SYSTEMD_UID = "_".join(f"[0-9a-f]{{{n}}}" for n in _HEX_GROUPS)
_SYSTEMD_QOS = re.compile(r"-(burstable|besteffort)\.slice")
_SYSTEMD_POD = re.compile(rf"-pod({_SYSTEMD_UID})\.slice")

# v1 hierarchies that a pod's container always joins where they exist:
# kubelet refuses to run without the memory controller, it sets pod pid
# limits through pids, and systemd tracks every unit in name=systemd.
# Which one is mounted varies by node; at least one of them (or the v2
# line) has to name the pod, so a pod seen only in some minor hierarchy
# (net_cls, perf_event, ...) that kubelet does not manage is not enough.
_DECISIVE_V1 = frozenset({"pids", "memory", "name=systemd"})


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    # The pod UID at the pod level of the peer's cgroups, if they agree on one.
    cgroup_pod_uid: str | None = None


def peer_of(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connection, plus the pod UID of its cgroup.

    The cgroup is read through the pid number while a pidfd of the peer is
    held, and the pidfd is checked afterwards: if the process exited in
    between, its pid may have been reused, so no pod is reported.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if pid <= 0:
        return Peer(pid, uid, gid)  # in a pid namespace we cannot see
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return Peer(pid, uid, gid)
    try:
        text = read_proc_cgroup(pid)
        pod_uid = proc_cgroup_pod_uid(text) if text is not None else None
        if _exited(pidfd):
            pod_uid = None
    finally:
        os.close(pidfd)
    return Peer(pid, uid, gid, pod_uid)


class _Shape(Enum):
    OUTSIDE = "outside"  # not below a kubepods cgroup at all
    MALFORMED = "malformed"  # below kubepods, but not where kubelet puts a process


def cgroup_pod_uid(cgroup_path: str | None) -> str | None:
    """The pod UID at the pod level of one cgroup path, in the API's dashed form.

    None if the path is not below kubepods in kubelet's layout.
    """
    if not cgroup_path:
        return None
    found = _pod_level(cgroup_path)
    return found if isinstance(found, str) else None


def proc_cgroup_pod_uid(text: str) -> str | None:
    """The pod a process runs in, from the text of its /proc/<pid>/cgroup.

    Every line is a hierarchy: "0::<path>" is cgroup v2, "N:<controllers>:<path>"
    a v1 hierarchy. On a v2 node only the first exists; on a v1 node the
    "0::" line is "/" or the runtime's cgroup and the pod is in the v1 lines;
    on a hybrid node both may name it (the systemd driver does), or only
    v1 (with the cgroupfs driver the v2 line may stay the runtime's). So:

    - a line below kubepods that does not have kubelet's shape refuses the
      lot: no container process lives there;
    - every line that names a pod must name the same one. A process can
      move itself only within a subtree it was delegated, which keeps the
      pod level; a split between hierarchies means something else moved it,
      and we cannot tell which hierarchy tells the truth;
    - that pod must be named by the v2 line or a decisive v1 hierarchy
      (_DECISIVE_V1). Lines that name no pod (a hierarchy kubelet leaves
      alone, or the v2 line of a v1 node) are neither for nor against.
    """
    named: set[str] = set()
    decisive = False
    for line in text.splitlines():
        hierarchy_id, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2):
            continue  # not a hierarchy line; the kernel writes none of these
        found = _pod_level(path)
        if found is _Shape.MALFORMED:
            return None
        if isinstance(found, str):
            named.add(found)
            is_v2 = hierarchy_id == "0" and controllers == ""
            if is_v2 or _DECISIVE_V1.intersection(controllers.split(",")):
                decisive = True
    if len(named) != 1 or not decisive:
        return None
    return named.pop()


def _pod_level(path: str) -> str | _Shape:
    """The pod UID at the pod level of one cgroup path, or why there is none."""
    components = [c for c in path.split("/") if c]
    if ".." in components:
        # The path is relative to our cgroup namespace, whose position in
        # the hierarchy is hidden, so the kubepods level cannot be found
        # (and what is visible may be a pod's own subtree). The driver must
        # run in the host's cgroup namespace: container runtimes give none
        # of their own to privileged containers.
        return _Shape.MALFORMED
    # The first kubepods from the root is kubelet's: everything above a
    # pod's cgroup was made by kubelet, the runtime or the node's init, and
    # a pod can only add components below its container. A kubelet nested
    # in another cluster's pod therefore sees the outer pod, and its pods
    # are refused: its own cgroups are not told apart from a pod's subtree.
    for index, component in enumerate(components):
        below = components[index + 1 :]
        if component == "kubepods":
            return _cgroupfs_pod(below)
        if component.endswith(".slice"):
            stem = component.removesuffix(".slice")
            if stem == "kubepods" or stem.endswith("-kubepods"):
                return _systemd_pod(stem, below)
    return _Shape.OUTSIDE


def _cgroupfs_pod(below: list[str]) -> str | _Shape:
    if below and below[0] in _CGROUPFS_QOS:
        below = below[1:]
    match = _CGROUPFS_POD.fullmatch(below[0]) if below else None
    return match.group(1) if match else _Shape.MALFORMED


def _systemd_pod(stem: str, below: list[str]) -> str | _Shape:
    # Each nested slice repeats its parent's name: kubepods.slice, then
    # kubepods-burstable.slice, then kubepods-burstable-pod<uid>.slice.
    if below and below[0].startswith(stem):
        qos = _SYSTEMD_QOS.fullmatch(below[0], len(stem))
        if qos:
            stem = f"{stem}-{qos.group(1)}"
            below = below[1:]
    if not (below and below[0].startswith(stem)):
        return _Shape.MALFORMED
    match = _SYSTEMD_POD.fullmatch(below[0], len(stem))
    return match.group(1).replace("_", "-") if match else _Shape.MALFORMED


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the connecting process, or None if we cannot be sure of one."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            # The kernel has SO_PEERPIDFD (an unknown SOL_SOCKET option is
            # ENOPROTOOPT on every kernel, never EINVAL) and could not pin
            # the peer: EINVAL when it has already exited, ESRCH or ENODATA
            # (by version) when no peer pid was recorded. Opening its pid by
            # number now might reach whoever got that pid since.
            return None
        return _open_pid_now(pid)
    return int(struct.unpack("i", raw)[0])


def _open_pid_now(pid: int) -> int | None:
    # Kernels before 6.5 only: the pid from SO_PEERCRED is opened by number.
    # This leaves a race: if the peer exits and is reaped, and its pid is
    # reused, between connect() and this pidfd_open, we hold a pidfd of the
    # new process and read its cgroup. The check for exit after the read
    # catches a peer that exits while we read, not one that was already
    # replaced. Winning it takes a pid reused within that window by a
    # process of the victim pod; see docs/security.md.
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def read_proc_cgroup(pid: int) -> str | None:
    """/proc/<pid>/cgroup as text, or None if the process is gone."""
    # os.read rather than open(): no buffered text stream to set up and tear
    # down (a third of the read), on the path of every request.
    try:
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
