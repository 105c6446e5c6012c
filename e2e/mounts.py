"""Mount-table questions only the emulator and the tests ask.

The driver only ever asks "what is mounted exactly here?"
(csi_async.mount.mountinfo.mounts_at). Tearing an emulated node down and
checking that nothing is left behind needs whole subtrees, and the emulated
kubelet needs a mount-point test; they live here, outside the product.
"""

from __future__ import annotations

import os

from csi_async.mount.mountinfo import MountEntry, mounts_at, read_mountinfo


def mounts_at_or_below(top: str | os.PathLike[str], pid: int | str = "self") -> list[MountEntry]:
    """Mounts whose mount point is `top` (canonical) or lies under it."""
    top_s = os.fspath(top).rstrip("/") or "/"
    prefix = top_s if top_s == "/" else top_s + "/"
    return [
        m for m in read_mountinfo(pid) if m.mount_point == top_s or m.mount_point.startswith(prefix)
    ]


def is_mount_point(path: str | os.PathLike[str], pid: int | str = "self") -> bool:
    """Whether anything is mounted on `path`, decided from mountinfo alone.

    Only the parent is canonicalised: resolving `path` itself would stat the
    root of whatever is mounted there.
    """
    head, tail = os.path.split(os.fspath(path).rstrip("/"))
    canonical = os.path.join(os.path.realpath(head), tail)
    if pid == "self":
        # Parses only the lines that can match: kubelet asks this on every
        # unpublish, and a node with N FUSE volumes has 2N+ mounts.
        return bool(mounts_at(canonical))
    return any(m.mount_point == canonical for m in read_mountinfo(pid))
