"""Swap a dead FUSE mount's copies in other mount namespaces for clones of a live one.

Why: a container runtime binds the topmost mount at a volume's host path when
a container starts. An app container started after the FUSE mount existed
therefore holds a copy of that very FUSE mount, tied to nothing on the host.
When the FUSE daemon dies and its sidecar mounts the volume again, the host
target gets a new superblock while the app keeps the dead one (ENOTCONN
forever, whatever its mountPropagation). So the broker puts a clone of the
new mount in place of each dead copy, inside the app's own namespace.

Mechanism only. The caller decides which namespaces (the pod's processes)
and which superblocks (the volume's dead ones). Joining a mount namespace
needs a single-threaded process, so the swap runs in a short-lived child
(`python -m csi_async.mount.nsswap`) that gets the namespace fd and the
clones as inherited fds and never trusts a path: each mount point is
resolved from the namespace's root with no symlinks or magic links, and a
copy is replaced only if the topmost mount there is exactly the dead copy
(same mount id) of a dead superblock (same device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import MountEntry, parse_line

# A child that cannot finish its swaps in this time is killed: it may be
# stuck walking into a path of the pod's (a nested FUSE mount whose daemon
# hangs); FUSE requests wait killably, so the kill always works.
SWAP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class DeadCopy:
    """One copy of a dead superblock, as its namespace's mountinfo shows it."""

    mount_id: int
    minor: int
    mount_point: str
    # Per-mount attributes to give the clone (MOUNT_ATTR_*), and whether the
    # copy received propagation from the host (HostToContainer: rslave).
    attrs: int
    slave: bool


_PER_MOUNT_ATTRS = {
    "ro": sc.MOUNT_ATTR_RDONLY,
    "nosuid": sc.MOUNT_ATTR_NOSUID,
    "nodev": sc.MOUNT_ATTR_NODEV,
    "noexec": sc.MOUNT_ATTR_NOEXEC,
}


def dead_copies(entries: Iterable[MountEntry], dead_minors: set[int]) -> list[DeadCopy]:
    """The FUSE mounts in a namespace's table whose superblock is one of the dead ones.

    FUSE superblocks get anonymous device numbers (major 0), unique while the
    superblock lives, which every copy keeps alive: so the number names it.
    """
    copies = []
    for entry in entries:
        if entry.is_fuse and entry.major == 0 and entry.minor in dead_minors:
            attrs = 0
            for option in entry.mount_options:
                attrs |= _PER_MOUNT_ATTRS.get(option, 0)
            copies.append(
                DeadCopy(entry.mount_id, entry.minor, entry.mount_point, attrs, entry.slave)
            )
    return copies


def swap(ns_fd: int, copies: list[DeadCopy], live_mount_fd: int) -> list[str]:
    """Replace each copy inside the namespace `ns_fd` with a clone of the live mount.

    Returns one line per copy saying what happened. Blocks for up to
    SWAP_TIMEOUT: run it off the event loop.
    """
    clones: list[int] = []
    try:
        for copy in copies:
            clone = sc.open_tree_clone(live_mount_fd)
            clones.append(clone)
            # The clone takes the copy's own per-mount flags and propagation:
            # a slave of the host's mount for HostToContainer, private for None.
            sc.mount_setattr(
                clone,
                copy.attrs | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV,
                sc.MS_SLAVE if copy.slave else sc.MS_PRIVATE,
            )
        plan = {
            "ns_fd": ns_fd,
            "swaps": [
                {"clone_fd": clone, "mount_id": c.mount_id, "minor": c.minor,
                 "mount_point": c.mount_point}
                for clone, c in zip(clones, copies, strict=True)
            ],
        }  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-I", "-m", "csi_async.mount.nsswap", json.dumps(plan)],
            pass_fds=(ns_fd, *clones),
            capture_output=True,
            timeout=SWAP_TIMEOUT,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
        lines = done.stdout.decode(errors="replace").splitlines()
        if done.returncode != 0:
            lines.append(f"swap helper exited {done.returncode}: {done.stderr[-300:]!r}")
        return lines
    except subprocess.TimeoutExpired:
        return [f"swap helper did not finish within {SWAP_TIMEOUT:g} s and was killed"]
    finally:
        for clone in clones:
            os.close(clone)


# ---------------------------------------------------------------- the child


def _mount_id_of(proc_fd: int, fd: int) -> int | None:
    with open(f"self/fdinfo/{fd}", opener=lambda p, f: os.open(p, f, dir_fd=proc_fd)) as info:
        for line in info:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _swap_one(proc_fd: int, root_fd: int, item: dict[str, object]) -> str:
    mount_point = str(item["mount_point"])
    clone_fd, mount_id, minor = int(item["clone_fd"]), int(item["mount_id"]), int(item["minor"])  # type: ignore[call-overload]
    with open("self/mountinfo", opener=lambda p, f: os.open(p, f, dir_fd=proc_fd)) as table:
        entries = [parse_line(line) for line in table if line.strip()]
    if not any(e.mount_id == mount_id and e.minor == minor and e.is_fuse for e in entries):
        return f"skip {mount_point}: the dead copy is gone"
    parent, _, name = mount_point.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        return f"skip {mount_point}: not a plain path"
    # The namespace's paths are the pod's to shape: no symlink, no magic link,
    # nothing above the namespace's root.
    parent_fd = sc.openat2(
        root_fd,
        parent.lstrip("/") or ".",
        os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
        sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS,
    )
    try:
        top = sc.open_mount_root(parent_fd, name)
        try:
            if _mount_id_of(proc_fd, top) != mount_id:
                return f"skip {mount_point}: something else is mounted on top of the dead copy"
        finally:
            os.close(top)
        # Relative to the pinned parent: the namespace's own /proc is of
        # another pid namespace, so no /proc/self path works in here.
        os.fchdir(parent_fd)
        sc.umount2(name, sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)
        sc.move_mount_into(clone_fd, parent_fd, name)
    finally:
        os.close(parent_fd)
    return f"swapped {mount_point}"


def _child(plan: dict[str, object]) -> int:
    # Opened before joining: "self" in this procfs is this process.
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sc.setns(int(plan["ns_fd"]), sc.CLONE_NEWNS)  # type: ignore[call-overload]
    # setns put our root and cwd at the namespace's root.
    root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    failed = 0
    for item in plan["swaps"]:  # type: ignore[attr-defined]
        try:
            print(_swap_one(proc_fd, root_fd, item), flush=True)
        except OSError as err:
            failed += 1
            print(f"failed {item.get('mount_point')}: {err}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
