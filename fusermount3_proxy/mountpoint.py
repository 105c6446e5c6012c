"""The mountpoint argument made absolute, as fusermount3 does it (fuse_mnt_resolve_path)."""

from __future__ import annotations

import os


class MountpointError(Exception):
    """The mountpoint cannot be resolved; str() is fusermount3's message."""


def resolve_mountpoint(orig: str) -> str:
    """fuse_mnt_resolve_path: make the path absolute without following its last component.

    Only the parent goes through realpath, so a symlink as the last component
    is kept as given, exactly as fusermount3 reports and unmounts it.
    """
    if not orig:
        raise MountpointError(f"invalid mountpoint '{orig}'")
    end = len(orig)
    while end > 1 and orig[end - 1] == "/":
        end -= 1
    copy = orig[:end]
    to_resolve = copy
    last: str | None = None
    if not copy.endswith("/"):
        slash = copy.rfind("/")
        if slash < 0:
            last = copy
            to_resolve = "."
        else:
            last = copy[slash + 1 :]
            to_resolve = copy[:slash] or "/"
        if last in (".", ".."):
            last = None
            to_resolve = copy
    try:
        resolved = os.path.realpath(to_resolve, strict=True)
    except OSError as err:
        raise MountpointError(f"bad mount point {orig}: {err.strerror or err}") from None
    if last is None:
        return resolved
    return resolved + last if resolved.endswith("/") else f"{resolved}/{last}"
