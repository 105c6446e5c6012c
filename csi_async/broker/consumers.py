"""Give a pod's consumers the new FUSE mount after its daemon died and was replaced.

Which namespaces to touch is policy, and lives here: only those of processes
whose cgroup names the volume's own pod (the same rule as the peer check),
and only copies of this volume's own dead superblocks. The swap itself is
csi_async.mount.nsswap. Everything here blocks (it reads other processes'
/proc files and waits for the swap child): run it off the event loop.
"""

from __future__ import annotations

import os

from csi_async.broker.identity import proc_cgroup_pod_uid, read_proc_cgroup
from csi_async.mount import nsswap
from csi_async.mount.mountinfo import read_mountinfo


def pod_namespaces(pod_uid: str) -> dict[int, int]:
    """Mount namespaces of the pod's processes: namespace inode -> one pid in it."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        cgroups = read_proc_cgroup(int(name))
        if cgroups is None or proc_cgroup_pod_uid(cgroups) != pod_uid:
            continue
        try:
            found.setdefault(os.stat(f"/proc/{name}/ns/mnt").st_ino, int(name))
        except OSError:
            continue  # the process exited meanwhile
    return found


def heal(pod_uid: str, dead_minors: set[int], live_mount_fd: int) -> list[str]:
    """Swap every copy of the dead superblocks in the pod's namespaces; one line each."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    results: list[str] = []
    for ns_inode, pid in pod_namespaces(pod_uid).items():
        if ns_inode == own:
            continue
        try:
            copies = nsswap.dead_copies(read_mountinfo(pid), dead_minors)
            if not copies:
                continue
            ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile: nothing left to heal there
        try:
            if os.fstat(ns_fd).st_ino != ns_inode:
                continue  # the pid was reused by a process in another namespace
            results += [f"pid {pid}: {line}" for line in nsswap.swap(ns_fd, copies, live_mount_fd)]
        finally:
            os.close(ns_fd)
    return results
