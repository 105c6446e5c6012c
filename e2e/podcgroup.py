"""Pod cgroups for sandboxed containers, so the broker's peer check is real.

kubelet runs every container of a pod under a cgroup whose path names the
pod UID (`.../kubepods/besteffort/pod<uid>/<container>` with the cgroupfs
driver). The simulated node does the same under the host's cgroup v2
hierarchy: <cgroup2>/csi-async-e2e/kubepods/pod<uid>.

cgroup v1 nodes keep the pod in the v1 hierarchies instead (pids, memory,
name=systemd, ...). cgroup_v1_mounts() and temporary_cgroup() let tests
build kubelet-shaped cgroups there too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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


def cgroup_v1_mounts() -> dict[str, Path]:
    """Where each cgroup v1 hierarchy is mounted, by controller ("pids", "name=systemd", ...).

    A hierarchy with several controllers (cpu,cpuacct) appears under each.
    Only whole-hierarchy mounts count: a mount of a subdirectory would put
    cgroups made through it at another path than they seem to have.
    """
    with open("/proc/cgroups", encoding="ascii") as f:
        controllers = {line.split()[0] for line in f if not line.startswith("#")}
    found: dict[str, Path] = {}
    for entry in read_mountinfo():
        if entry.fstype != "cgroup" or entry.root != "/":
            continue
        for option in entry.super_options:
            if option in controllers or option.startswith("name="):
                found.setdefault(option, Path(entry.mount_point))
    return found


@contextlib.contextmanager
def temporary_cgroup(mount: Path, *components: str) -> Iterator[Path]:
    """Make the cgroup mount/components... (with its parents), yield its directory.

    On exit, every directory this made is removed again, deepest first, and
    the first failure is raised: EBUSY means a process is still inside, which
    the caller must have moved out or let exit (and reaped) by then. Works
    the same in v1 and v2 hierarchies.
    """
    made: list[Path] = []
    directory = mount
    try:
        for component in components:
            directory = directory / component
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # a parent shared with another user: theirs to remove
            made.append(directory)
        yield directory
    finally:
        errors: list[OSError] = []
        for path in reversed(made):
            try:
                path.rmdir()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]
