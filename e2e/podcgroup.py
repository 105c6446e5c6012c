"""Pod cgroups for sandboxed containers, so the broker's peer check is real.

kubelet runs every container of a pod under a cgroup whose path names the
pod UID (`.../kubepods/besteffort/pod<uid>/<container>` with the cgroupfs
driver). The simulated node does the same under the host's cgroup v2
hierarchy: <cgroup2>/csi-async-e2e/kubepods/pod<uid>.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from csi_async.mount.mountinfo import read_mountinfo

TOP = "csi-async-e2e"


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid), if anywhere."""
    for entry in read_mountinfo():
        if entry.fstype == "cgroup2":
            return Path(entry.mount_point)
    return None


def pod_cgroup(pod_uid: str) -> Path:
    """Create (if needed) the cgroup for a pod; returns its cgroup.procs path."""
    root = cgroup2_root()
    if root is None:
        raise RuntimeError("no cgroup v2 hierarchy is mounted")
    directory = root / TOP / "kubepods" / f"pod{pod_uid}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "cgroup.procs"


def remove_pod_cgroups(pod_uids: Iterable[str]) -> None:
    """Remove these pods' cgroups (once empty), and the parents if nothing else is left.

    Only the given pods: another simulated node on the same machine may be
    using its own pod cgroups right now.
    """
    root = cgroup2_root()
    if root is None:
        return
    top = root / TOP
    for uid in pod_uids:
        with contextlib.suppress(OSError):
            (top / "kubepods" / f"pod{uid}").rmdir()
    for directory in (top / "kubepods", top):
        with contextlib.suppress(OSError):
            directory.rmdir()
