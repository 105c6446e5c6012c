"""Path walking that a pod cannot redirect.

Everything below the kubelet root is resolved from one directory fd opened at
start-up, with openat2(RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV):
a symlink, a '..' escape or a mount (a FUSE mount included) anywhere on the
way makes the walk fail instead of landing somewhere else. Callers then act
on the returned fd, never on the path string again.
"""

from __future__ import annotations

import errno
import os
import stat

from csi_async.mount import syscalls as sc

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PinnedRoot:
    """A directory opened once; relative paths are resolved strictly below it."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/") or "/"
        self.fd = os.open(self.path, _DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, relative: str, *, cross_mounts: bool = False) -> int:
        """An O_PATH fd of a directory below the root.

        cross_mounts allows the walk to enter another mount (an emptyDir may
        be a tmpfs of its own); symlinks and magic links are refused always.
        """
        resolve = sc.RESOLVE_STRICT
        if cross_mounts:
            resolve &= ~sc.RESOLVE_NO_XDEV
        return sc.openat2(self.fd, relative, _DIR_FLAGS, resolve)


def make_directory(parent_fd: int, name: str, mode: int) -> bool:
    """Create one directory entry in a pinned parent; False if it already existed.

    Only the last component is ever created (never makedirs), so a missing
    parent is an error the caller reports rather than a tree we invent.
    """
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        return False
    return True


def open_child_dir(parent_fd: int, name: str) -> int:
    """O_PATH fd of a subdirectory, refusing symlinks and mount crossings."""
    return sc.openat2(parent_fd, name, _DIR_FLAGS, sc.RESOLVE_STRICT)


def remove_directory(parent_fd: int, name: str) -> bool:
    """rmdir only: nothing a user wrote is ever deleted.

    Returns False (and leaves the directory) if it is not empty or still
    busy; True if it is gone.
    """
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EBUSY):
            return False
        raise
    return True


def entry_kind(parent_fd: int, name: str) -> int | None:
    """The S_IFMT of an entry without following symlinks, or None if absent."""
    try:
        return stat.S_IFMT(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None
