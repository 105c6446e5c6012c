"""Thin ctypes wrappers for the Linux syscalls Python's os module lacks (and for
two of glibc's malloc controls).

Mechanism only: no policy lives here. Every wrapper raises OSError with the
kernel's errno. Numbers are the unified syscall table (x86_64 and arm64 agree
since Linux 5.1 for everything used here).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# asm-generic numbers, shared by x86_64 and aarch64 for these calls.
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_openat2 = 437
SYS_mount_setattr = 442
# These two differ per architecture.
_SYS_setresuid = {"x86_64": 117, "aarch64": 147}
_SYS_setresgid = {"x86_64": 119, "aarch64": 149}

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# openat2 resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# Everything we resolve under the kubelet root uses this set: stay below the
# base fd, follow no symlink or /proc magic link, do not cross into another
# mount (which would also mean walking into a FUSE mount).
RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR_RELATIME = 0x00000000
MOUNT_ATTR_NOATIME = 0x00000010
MOUNT_ATTR_STRICTATIME = 0x00000020
MOUNT_ATTR_NODIRATIME = 0x00000080
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000

MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Propagation types for mount_setattr (include/uapi/linux/mount.h: the MS_* values).
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

CLONE_NEWNS = 0x00020000

PR_SET_NAME = 15


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _path(path: str) -> bytes:
    return os.fsencode(path)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); returns a new fd. Always add O_CLOEXEC to flags yourself."""
    how = _OpenHow(flags, mode, resolve)
    return _check(
        _syscall(
            SYS_openat2,
            ctypes.c_int(dirfd),
            ctypes.c_char_p(_path(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _check(_syscall(SYS_fsopen, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(flags)))


def fsconfig_set_string(fs_fd: int, key: str, value: str) -> None:
    _check(
        _syscall(
            SYS_fsconfig,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_SET_STRING),
            ctypes.c_char_p(key.encode()),
            ctypes.c_char_p(value.encode()),
            ctypes.c_int(0),
        )
    )


def fsconfig_set_flag(fs_fd: int, key: str) -> None:
    _check(
        _syscall(
            SYS_fsconfig,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_SET_FLAG),
            ctypes.c_char_p(key.encode()),
            ctypes.c_void_p(None),
            ctypes.c_int(0),
        )
    )


def fsconfig_create(fs_fd: int) -> None:
    _check(
        _syscall(
            SYS_fsconfig,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_CMD_CREATE),
            ctypes.c_void_p(None),
            ctypes.c_void_p(None),
            ctypes.c_int(0),
        )
    )


def fsmount(fs_fd: int, attr_flags: int, flags: int = FSMOUNT_CLOEXEC) -> int:
    return _check(
        _syscall(SYS_fsmount, ctypes.c_int(fs_fd), ctypes.c_uint(flags), ctypes.c_uint(attr_flags))
    )


def move_mount_onto_fd(mount_fd: int, target_fd: int) -> None:
    """Attach a detached mount onto the object a pinned O_PATH fd refers to."""
    _check(
        _syscall(
            SYS_move_mount,
            ctypes.c_int(mount_fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(target_fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        )
    )


def open_mount_root(dir_fd: int, name: str) -> int:
    """An O_PATH fd of the topmost mount on `name` in a pinned directory.

    Without OPEN_TREE_CLONE this is a plain lookup that ends on the mount's
    root; crossing into a mount sends nothing to a FUSE daemon. A symlink
    at `name` is not followed.
    """
    return _check(
        _syscall(
            SYS_open_tree,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(_path(name)),
            ctypes.c_uint(OPEN_TREE_CLOEXEC | AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT),
        )
    )


def move_mount_into(mount_fd: int, parent_fd: int, name: str) -> None:
    """Attach a detached mount on `name` inside a pinned directory (no symlink followed)."""
    _check(
        _syscall(
            SYS_move_mount,
            ctypes.c_int(mount_fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(parent_fd),
            ctypes.c_char_p(_path(name)),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
    )


# mallopt(3)'s parameter for the number of malloc arenas (glibc's malloc.h).
M_ARENA_MAX = -8


def limit_malloc_arenas(count: int) -> bool:
    """Let glibc's malloc make at most `count` arenas (mallopt M_ARENA_MAX).

    False where the C library has no mallopt (musl): nothing changes then.
    """
    mallopt = getattr(_libc, "mallopt", None)
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, count))


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the kernel (glibc's malloc_trim).

    A no-op where the C library has no malloc_trim (musl).
    """
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def set_thread_name(name: str) -> None:
    """Name the calling thread (its comm, at most 15 bytes)."""
    _check(_libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0))


def setns(ns_fd: int, kind: int) -> None:
    """Join a namespace (os.setns arrived in Python 3.12)."""
    _check(_libc.setns(ctypes.c_int(ns_fd), ctypes.c_int(kind)))


def open_tree_clone(dir_fd: int) -> int:
    """A detached bind-mount copy of the directory a pinned fd refers to."""
    return _check(
        _syscall(
            SYS_open_tree,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH),
        )
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(mount_fd: int, attr_set: int, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set, 0, propagation, 0)
    _check(
        _syscall(
            SYS_mount_setattr,
            ctypes.c_int(mount_fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    )


def umount2(path: str, flags: int) -> None:
    _check(_libc.umount2(ctypes.c_char_p(_path(path)), ctypes.c_int(flags)))


def thread_setresids(uid: int, gid: int) -> None:
    """Change the credentials of the calling thread only.

    glibc's setresuid() broadcasts to every thread of the process; the raw
    syscall does not. Used by a throw-away probe thread that must act as the
    FUSE mount's owner while the rest of the broker stays root.
    """
    machine = platform.machine()
    if machine not in _SYS_setresuid:
        raise OSError(errno.ENOSYS, f"per-thread credentials not supported on {machine}")
    _check(_syscall(_SYS_setresgid[machine], gid, gid, gid))
    _check(_syscall(_SYS_setresuid[machine], uid, uid, uid))
