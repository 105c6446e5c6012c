"""Kernel-side FUSE and bind mounts, done with the new mount API.

Mechanism only: callers (the broker) decide what is allowed and hand over a
fully-built FuseMountSpec. Everything here blocks and may touch a FUSE
connection, so it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass, field

from csi_async.mount import syscalls as sc
from csi_async.mount.mountinfo import mounts_at

FUSE_DEVICE = "/dev/fuse"
# The misc-device number of /dev/fuse. Checked so that a replaced device node
# cannot make us hand out (and mount with) some other character device.
FUSE_DEVICE_NUMBER = os.makedev(10, 229)


@dataclass(frozen=True, slots=True)
class FuseMountSpec:
    """Everything the kernel is told about one FUSE mount."""

    source: str
    subtype: str | None
    user_id: int
    group_id: int
    read_only: bool
    # MOUNT_ATTR_* bits on top of the always-on NOSUID|NODEV.
    mount_attrs: int = 0
    # fsconfig(FSCONFIG_SET_FLAG) keys, e.g. allow_other, default_permissions.
    flags: tuple[str, ...] = ()
    # fsconfig(FSCONFIG_SET_STRING) pairs, e.g. ("max_read", "131072").
    strings: tuple[tuple[str, str], ...] = field(default=())

    @property
    def fstype(self) -> str:
        return f"fuse.{self.subtype}" if self.subtype else "fuse"


@dataclass(slots=True)
class FuseMount:
    """A FUSE mount made by mount_fuse.

    fuse_fd is the caller's to deliver and close; mount_fd pins the mount so
    liveness probes and unmounts address exactly this mount.
    """

    fuse_fd: int
    mount_fd: int
    # The FUSE superblock's device minor (its /sys/fs/fuse/connections entry).
    minor: int


def open_fuse_device() -> int:
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE_NUMBER:
        os.close(fd)
        raise OSError(errno.ENODEV, f"{FUSE_DEVICE} is not the FUSE device")
    return fd


def mount_fuse(target_fd: int, target_path: str, spec: FuseMountSpec) -> FuseMount:
    """Open /dev/fuse and mount a new FUSE filesystem onto a pinned directory.

    target_fd must be an O_PATH directory fd obtained by a no-symlink walk;
    the mount lands on that inode whatever happens to the path meanwhile.
    target_path is only used to find the new mount's device minor in mountinfo.
    """
    fuse_fd = open_fuse_device()
    fs_fd = mount_fd = -1
    try:
        fs_fd = sc.fsopen("fuse")
        # Each key goes in separately: no option string is ever assembled, so
        # no value can smuggle a second "fd=" (or anything else) past policy.
        sc.fsconfig_set_string(fs_fd, "source", spec.source)
        if spec.subtype:
            sc.fsconfig_set_string(fs_fd, "subtype", spec.subtype)
        sc.fsconfig_set_string(fs_fd, "fd", str(fuse_fd))
        sc.fsconfig_set_string(fs_fd, "rootmode", "40000")
        sc.fsconfig_set_string(fs_fd, "user_id", str(spec.user_id))
        sc.fsconfig_set_string(fs_fd, "group_id", str(spec.group_id))
        for key in spec.flags:
            sc.fsconfig_set_flag(fs_fd, key)
        for key, value in spec.strings:
            sc.fsconfig_set_string(fs_fd, key, value)
        if spec.read_only:
            sc.fsconfig_set_flag(fs_fd, "ro")
        sc.fsconfig_create(fs_fd)
        attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | spec.mount_attrs
        if spec.read_only:
            attrs |= sc.MOUNT_ATTR_RDONLY
        mount_fd = sc.fsmount(fs_fd, attrs)
        sc.move_mount_onto_fd(mount_fd, target_fd)
        return FuseMount(fuse_fd, mount_fd, _topmost_minor(target_path))
    except BaseException:
        if mount_fd >= 0:
            _detach_fd(mount_fd)
            os.close(mount_fd)
        os.close(fuse_fd)
        raise
    finally:
        if fs_fd >= 0:
            os.close(fs_fd)


def _topmost_minor(path: str) -> int:
    # From mountinfo, not an fstat of the new root: that could be a FUSE
    # request, and no daemon serves this mount yet.
    stacked = mounts_at(path)
    if not stacked:
        raise OSError(errno.EIO, f"mount at {path} vanished right after it was made")
    return stacked[-1].minor


def _detach_fd(mount_fd: int) -> None:
    try:
        sc.umount2(f"/proc/self/fd/{mount_fd}", sc.MNT_DETACH)
    except OSError:
        pass  # not attached yet: closing the fd releases a detached mount


def detach_mount_quietly(mount_fd: int) -> None:
    """Lazily unmount exactly the mount a pinned mount fd refers to.

    Going through the fd (not the path) means a mount stacked on top, or a
    path swapped meanwhile, can never redirect the unmount elsewhere.
    "Already detached" (EINVAL) is not an error: a lazy unmount from
    elsewhere, or a mount never attached because move_mount failed.
    """
    try:
        sc.umount2(f"/proc/self/fd/{mount_fd}", sc.MNT_DETACH)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise


def detach_path(parent_fd: int, name: str) -> None:
    """Lazily unmount whatever is mounted on name inside a pinned directory.

    UMOUNT_NOFOLLOW keeps a symlink planted at `name` from redirecting us.
    """
    sc.umount2(f"/proc/self/fd/{parent_fd}/{name}", sc.MNT_DETACH | sc.UMOUNT_NOFOLLOW)


def bind_read_only(source_dir_fd: int, target_fd: int) -> None:
    """Bind a directory read-only (and nosuid,nodev,noexec) onto a pinned target."""
    clone_fd = sc.open_tree_clone(source_dir_fd)
    try:
        sc.mount_setattr(
            clone_fd,
            sc.MOUNT_ATTR_RDONLY
            | sc.MOUNT_ATTR_NOSUID
            | sc.MOUNT_ATTR_NODEV
            | sc.MOUNT_ATTR_NOEXEC,
        )
        sc.move_mount_onto_fd(clone_fd, target_fd)
    finally:
        os.close(clone_fd)


def connection_is_dead(probe_fd: int, uid: int, gid: int, as_owner: bool) -> bool:
    """Whether the FUSE daemon behind a mount is gone (ENOTCONN). Blocks; closes probe_fd.

    A statfs on a dead connection fails at once with ENOTCONN. On a live one
    it is a request to the daemon, which may never answer: run this only in a
    thread of its own (csi_async.broker.fuse_waits), on a duplicate of the
    mount fd, so that closing the original cannot leave the thread holding a
    recycled fd number. Without allow_other the kernel answers only the mount
    owner, so the thread first takes the owner's uid/gid (the thread's own
    credentials, not the process's).
    """
    try:
        if as_owner:
            sc.thread_setresids(uid, gid)
        os.fstatvfs(probe_fd)
    except OSError as err:
        return err.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    finally:
        os.close(probe_fd)
    return False


class _FuseControl:
    """A private, detached instance of the fusectl filesystem, made on first use.

    It works whether or not the host mounted fusectl at
    /sys/fs/fuse/connections, and it changes no mount table.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fd(self) -> int:
        with self._lock:
            if self._fd is None:
                fs_fd = sc.fsopen("fusectl")
                try:
                    sc.fsconfig_create(fs_fd)
                    attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
                    self._fd = sc.fsmount(fs_fd, attrs)
                finally:
                    os.close(fs_fd)
            return self._fd


_fuse_control = _FuseControl()


def abort_connection(minor: int) -> None:
    """Abort a FUSE connection, as writing to /sys/fs/fuse/connections/N/abort does.

    Every request waiting on the daemon fails at once; a connection that is
    already gone is not an error.
    """
    try:
        fd = os.open(f"{minor}/abort", os.O_WRONLY | os.O_CLOEXEC, dir_fd=_fuse_control.fd())
    except FileNotFoundError:
        return
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
