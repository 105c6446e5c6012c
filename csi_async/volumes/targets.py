"""A volume's target directory: created at publish, removed at unpublish.

kubelet creates the target's parent and hands us the target path; the one
directory we create is the target itself, through the pinned kubelet root
(no symlink, no '..', no mount crossing on the way). "Is something mounted
here?" comes from mountinfo, never from a stat of the target, and removal
is rmdir only: nothing a user wrote is ever deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from csi_async.kubelet.target_path import TargetPath
from csi_async.mount import fuse
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import (
    PinnedRoot,
    entry_kind,
    make_directory,
    open_child_dir,
    remove_directory,
)
from csi_async.volumes.errors import PublishFailed

# The registry's logger: operators filter on it (docs/operations.md).
log = logging.getLogger("csi_async.volumes")

# World-readable: before the FUSE mount covers it, the pod's FUSE program
# (any uid) must be able to list it (libfuse2 checks that it is empty,
# gocryptfs opens it). The pods directory above it keeps other pods out.
TARGET_MODE = 0o755
# Mounts stacked on one target are detached one pass each, at most this many.
_DETACH_PASSES = 16


def make_target(
    root: PinnedRoot, target: TargetPath, restoring: bool
) -> tuple[bool, list[MountEntry]]:
    """Create the target directory; return (created, mounts already on it).

    A mount already there is refused, except when restoring after a
    restart, where it is the one this driver made.
    """
    try:
        parent_fd = root.open_dir(target.parent_relative)
    except FileNotFoundError:
        raise PublishFailed(
            f"the parent of {target.absolute} does not exist (kubelet creates it)"
        ) from None
    except OSError as err:
        raise PublishFailed(
            f"the parent of {target.absolute} is not a plain directory: "
            f"{os.strerror(err.errno or errno.EIO)}"
        ) from None
    try:
        created = make_directory(parent_fd, target.name, TARGET_MODE)
        existing = mounts_at(target.absolute)
        if existing and not restoring:
            raise PublishFailed(f"{target.absolute} already has a mount this driver did not make")
        if not existing:
            os.close(open_child_dir(parent_fd, target.name))  # a directory, not a symlink
        return created, existing
    except OSError as err:
        raise PublishFailed(
            f"cannot create the target {target.absolute}: {os.strerror(err.errno or errno.EIO)}"
        ) from None
    finally:
        os.close(parent_fd)


def remove_target(root: PinnedRoot, target: TargetPath) -> None:
    if mounts_at(target.absolute):
        return  # never remove a directory something is still mounted on
    try:
        parent_fd = root.open_dir(target.parent_relative)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise
        # A symlink or a mount where kubelet's directories should be:
        # nothing of ours is there, and nothing there is ours to touch.
        log.warning(
            "target's parent is not a plain directory; leaving it",
            extra={"fields": {"target_path": target.absolute}},
        )
        return
    try:
        if entry_kind(parent_fd, target.name) == stat.S_IFLNK:
            log.warning(
                "target is a symlink, not the directory we made; leaving it",
                extra={"fields": {"target_path": target.absolute}},
            )
            return
        if not remove_directory(parent_fd, target.name):
            # Files were written into the bare directory (e.g. while
            # nothing was mounted). Keep them; kubelet reports the leftover.
            log.warning(
                "target directory is not empty; leaving it in place",
                extra={"fields": {"target_path": target.absolute}},
            )
    finally:
        os.close(parent_fd)


def detach_any_and_remove_target(root: PinnedRoot, target: TargetPath) -> None:
    # Whatever is still mounted at the target (a socket-dir bind, or a
    # FUSE mount left from before a restart) is detached, never walked.
    for _ in range(_DETACH_PASSES):
        if not mounts_at(target.absolute):
            break
        parent_fd = root.open_dir(target.parent_relative)
        try:
            fuse.detach_path(parent_fd, target.name)
        finally:
            os.close(parent_fd)
    remove_target(root, target)
