"""A volume's target directory: created at publish, removed at unpublish.

kubelet creates the target's parent and hands us the target path; the one
directory we create is the target itself, through the pinned kubelet root
(no symlink, no '..', no mount crossing on the way). Nothing here ever
stats the target or walks into it: a FUSE mount on it would answer for it.
Removal is rmdir only: nothing a user wrote is ever deleted.

None of this reads mountinfo on the common path, whose size grows with
the node's mounts (two per FUSE volume): the kernel answers "is something
mounted on the target?" by itself. openat2 with RESOLVE_NO_XDEV fails with
EXDEV at a mount point, umount2 fails with EINVAL on a directory nothing is
mounted on, and rmdir fails with EBUSY on a mount point of our namespace.
Only a publish that finds a mount (a restore adopting it, or a refusal)
reads mountinfo, to learn what is there.
"""

from __future__ import annotations

import errno
import logging
import os

from csi_async.kubelet.target_path import TargetPath
from csi_async.mount import fuse
from csi_async.mount.mountinfo import MountEntry, mounts_at
from csi_async.mount.paths import PinnedRoot, make_directory, open_child_dir
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
        # A directory we just made is plain and has nothing mounted on it
        # (only root on the host could race us here, and the pod's dirs are
        # kubelet's); one that was there already is checked.
        if created or not _has_mount(parent_fd, target.name):
            return created, []  # a plain directory (the check refuses a symlink too)
        existing = mounts_at(target.absolute)
        if existing and not restoring:
            raise PublishFailed(f"{target.absolute} already has a mount this driver did not make")
        if not existing:  # unmounted since: it must still be a plain directory
            os.close(open_child_dir(parent_fd, target.name))
        return created, existing
    except OSError as err:
        raise PublishFailed(
            f"cannot create the target {target.absolute}: {os.strerror(err.errno or errno.EIO)}"
        ) from None
    finally:
        os.close(parent_fd)


def _has_mount(parent_fd: int, name: str) -> bool:
    """Whether something is mounted on the directory `name`; OSError if it is no directory.

    An O_PATH open with RESOLVE_NO_XDEV stops at the mount point with EXDEV
    before entering the mount, so no FUSE daemon is asked anything.
    """
    try:
        os.close(open_child_dir(parent_fd, name))
    except OSError as err:
        if err.errno == errno.EXDEV:
            return True
        raise
    return False


def remove_target(root: PinnedRoot, target: TargetPath) -> None:
    """rmdir the target, unless something is still mounted on it or it is not our directory."""
    parent_fd = _open_plain_parent(root, target)
    if parent_fd is None:
        return
    try:
        _remove_in(parent_fd, target)
    finally:
        os.close(parent_fd)


def detach_any_and_remove_target(root: PinnedRoot, target: TargetPath) -> None:
    """Detach whatever is mounted on the target, then rmdir it.

    Whatever is still mounted there (a socket-dir bind, or a FUSE mount left
    from before a restart) is detached, never walked: umount2(MNT_DETACH |
    UMOUNT_NOFOLLOW) through the pinned parent takes the topmost mount off
    without a request to its daemon, until the kernel says nothing is
    mounted there (EINVAL) or the target is gone (ENOENT). A symlink planted
    as the target is never followed (EINVAL too: it is no mount point).
    """
    parent_fd = _open_plain_parent(root, target)
    if parent_fd is None:
        return
    try:
        for _ in range(_DETACH_PASSES):
            try:
                fuse.detach_path(parent_fd, target.name)
            except OSError as err:
                if err.errno in (errno.EINVAL, errno.ENOENT):
                    break
                raise
        _remove_in(parent_fd, target)
    finally:
        os.close(parent_fd)


def _open_plain_parent(root: PinnedRoot, target: TargetPath) -> int | None:
    """The target's parent directory, or None if it is gone or not a plain directory."""
    try:
        return root.open_dir(target.parent_relative)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise
        _parent_not_plain(target)
        return None


def _remove_in(parent_fd: int, target: TargetPath) -> None:
    # rmdir never enters a mount: on a mount point of this namespace it
    # fails with EBUSY, and the directory stays.
    try:
        os.rmdir(target.name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        fields = {"fields": {"target_path": target.absolute}}
        if err.errno == errno.EBUSY:
            log.warning("something is still mounted on the target; leaving it", extra=fields)
        elif err.errno == errno.ENOTDIR:
            log.warning(
                "target is a symlink or a file, not the directory we made; leaving it",
                extra=fields,
            )
        elif err.errno == errno.ENOTEMPTY:
            # Files were written into the bare directory (e.g. while
            # nothing was mounted). Keep them; kubelet reports the leftover.
            log.warning("target directory is not empty; leaving it in place", extra=fields)
        else:
            raise


def _parent_not_plain(target: TargetPath) -> None:
    # A symlink or a mount where kubelet's directories should be: nothing
    # of ours is there, and nothing there is ours to touch.
    log.warning(
        "target's parent is not a plain directory; leaving it",
        extra={"fields": {"target_path": target.absolute}},
    )
