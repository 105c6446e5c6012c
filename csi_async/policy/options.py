"""What a pod may ask of the kernel: the mount option allowlist.

Policy only. Input is hostile: the -o tokens a FUSE program passed to our
fusermount3, and the mountOptions volume attribute written by the pod's
author. A PersistentVolume's options (its mountOptions attribute and
spec.mountOptions) come from the administrator who wrote the PV instead:
they may also use NodePolicy.persistent_volume_options, and they win over
the program's. Output is a FuseMountSpec that the mechanism
(csi_async.mount.fuse) applies key by key. Option names follow fusermount3 so that programs keep
working unchanged; see docs/options.md for the table this code implements.

The mount gets what was asked for and, on top, only what safety requires:
nosuid and nodev always, allow_other when the node's policy says so, ro when
the volume is read-only. Like fusermount3 (util/fusermount.c in libfuse), it
never adds default_permissions: a daemon that does its own permission checks
(fuse-zip, sshfs without -o default_permissions) would have
every write refused by a kernel checking the modes it reports.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from csi_async.mount import syscalls as sc
from csi_async.mount.fuse import FuseMountSpec
from csi_async.policy.node import NodePolicy
from fusermount3_proxy.protocol import split_options

# Per-mount flags a pod may toggle: name -> (bit, set or clear).
_MOUNT_ATTR_OPTIONS: dict[str, tuple[int, bool]] = {
    "noexec": (sc.MOUNT_ATTR_NOEXEC, True),
    "exec": (sc.MOUNT_ATTR_NOEXEC, False),
    "nodiratime": (sc.MOUNT_ATTR_NODIRATIME, True),
    "diratime": (sc.MOUNT_ATTR_NODIRATIME, False),
    "nosymfollow": (sc.MOUNT_ATTR_NOSYMFOLLOW, True),
    "symfollow": (sc.MOUNT_ATTR_NOSYMFOLLOW, False),
}
# The atime modes are one field, the last one given wins.
_ATIME_OPTIONS = {
    "noatime": sc.MOUNT_ATTR_NOATIME,
    "relatime": sc.MOUNT_ATTR_RELATIME,
    "strictatime": sc.MOUNT_ATTR_STRICTATIME,
    "atime": sc.MOUNT_ATTR_RELATIME,
    "norelatime": sc.MOUNT_ATTR_STRICTATIME,
}
# Superblock flags the VFS takes from fsconfig for any filesystem:
# name -> (fsconfig flag to set, or None for "back to the default").
_SUPERBLOCK_OPTIONS: dict[str, str | None] = {
    "sync": "sync",
    "async": None,
    "dirsync": "dirsync",
    "lazytime": "lazytime",
    "nolazytime": None,
}
# Always on; accepted so programs that spell them out keep working.
_ALWAYS_ON = frozenset({"nosuid", "nodev"})
# Computed by the broker (fd, rootmode, user_id, group_id) or meaningless
# here; real fusermount3 drops them without a word, and the fuse3 crate and
# libfuse's newer fallback always send the first four.
_DROPPED_SILENTLY = frozenset({"fd", "rootmode", "user_id", "group_id", "nonempty", "large_read"})
# Refused outright, each with the reason the pod's author will read.
_FORBIDDEN: dict[str, str] = {
    "suid": "csi-async always mounts nosuid; setuid binaries from a pod's filesystem are refused",
    "dev": "csi-async always mounts nodev; device nodes from a pod's filesystem are refused",
    "blkdev": "block-device FUSE (fuseblk) is not available to pods",
    "blksize": "blksize applies only to block-device FUSE, which is not available to pods",
    "allow_root": "allow_root is not supported; allow_other is set by the node's policy",
    "context": "SELinux contexts are set by the kubelet, not by the pod",
    "fscontext": "SELinux contexts are set by the kubelet, not by the pod",
    "defcontext": "SELinux contexts are set by the kubelet, not by the pod",
    "rootcontext": "SELinux contexts are set by the kubelet, not by the pod",
}

_SUBTYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_MAX_FSNAME = 256
_MAX_READ_LIMIT = 1 << 30


class OptionRefused(Exception):
    """A mount option that policy does not allow; the message is for the user."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


@dataclass(slots=True)
class _Draft:
    read_only: bool = False
    # Asked for by the volume or the program; never added otherwise.
    default_permissions: bool = False
    # allow_other granted by a PV's options on a node whose policy is off.
    allow_other: bool = False
    attrs: int = 0
    atime: int | None = None
    sb_flags: dict[str, bool] | None = None
    max_read: str | None = None
    fsname: str | None = None
    subtype: str | None = None


def _apply(token: str, draft: _Draft, policy: NodePolicy, *, administrator: bool) -> None:
    """Apply one option; administrator: it comes from a PV, not from a pod."""
    key, has_value, value = token.partition("=")
    if not key:
        raise OptionRefused(errno.EINVAL, f"malformed mount option {token!r}")
    if any(ch in token for ch in "\0\n"):
        raise OptionRefused(errno.EINVAL, "mount options must not contain NUL or newline")
    if key.startswith("x-") or key in _DROPPED_SILENTLY:
        return
    if key in _FORBIDDEN:
        raise OptionRefused(errno.EPERM, f"option {token!r} refused: {_FORBIDDEN[key]}")
    if key == "fsname" and has_value:
        if not value or len(value) > _MAX_FSNAME or not value.isprintable():
            raise OptionRefused(errno.EINVAL, f"invalid fsname {value!r}")
        draft.fsname = value
        return
    if key == "subtype" and has_value:
        if not _SUBTYPE.match(value):
            raise OptionRefused(errno.EINVAL, f"invalid subtype {value!r}")
        draft.subtype = value
        return
    if key == "max_read" and has_value:
        # isdigit() alone accepts "²" and other non-ASCII digits int() rejects.
        if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= _MAX_READ_LIMIT:
            raise OptionRefused(errno.EINVAL, f"invalid max_read {value!r}")
        draft.max_read = str(int(value))
        return
    if has_value:
        raise OptionRefused(errno.EINVAL, f"unknown mount option {token!r}")
    if key == "ro":
        draft.read_only = True
    elif key == "rw":
        draft.read_only = False
    elif key == "default_permissions":
        draft.default_permissions = True
    elif key in _ALWAYS_ON or key == "auto_unmount":
        # auto_unmount is the helper's job (it stays alive and asks us to unmount).
        return
    elif key == "allow_other":
        if policy.allow_other or draft.allow_other:
            return  # on anyway (the node's policy, or the PV already asked for it)
        if administrator and key in policy.persistent_volume_options:
            draft.allow_other = True
            return
        raise OptionRefused(errno.EPERM, "allow_other is disabled by this node's policy")
    elif key in _MOUNT_ATTR_OPTIONS:
        bit, on = _MOUNT_ATTR_OPTIONS[key]
        draft.attrs = (draft.attrs | bit) if on else (draft.attrs & ~bit)
    elif key in _ATIME_OPTIONS:
        draft.atime = _ATIME_OPTIONS[key]
    elif key in _SUPERBLOCK_OPTIONS:
        flags = draft.sb_flags if draft.sb_flags is not None else {}
        flag = _SUPERBLOCK_OPTIONS[key]
        if key in ("async", "nolazytime"):
            flags.pop("sync" if key == "async" else "lazytime", None)
        elif flag is not None:
            flags[flag] = True
        draft.sb_flags = flags
    else:
        raise OptionRefused(errno.EINVAL, f"unknown mount option {token!r}")


def check_options(tokens: list[str], policy: NodePolicy, *, administrator: bool) -> None:
    """Validate options without building a mount (used for volume attributes)."""
    draft = _Draft()
    for token in tokens:
        _apply(token, draft, policy, administrator=administrator)


def volume_options(
    mount_options: str, mount_flags: list[str], policy: NodePolicy, *, administrator: bool
) -> list[str]:
    """The options a volume asks for, checked; raises OptionRefused.

    mount_options is the mountOptions volume attribute, split exactly as
    fusermount3 splits -o (the same splitter the zipapp uses); mount_flags
    are the CSI capability's flags (a PV's spec.mountOptions), one option
    each. administrator: they come from a PersistentVolume, not a pod spec.
    """
    tokens: list[str] = []
    for item in [*split_options(mount_options), *mount_flags]:
        # meta-fuse writes options as "o=noexec"; plain "noexec" works too.
        tokens.append(item.removeprefix("o="))
    check_options(tokens, policy, administrator=administrator)
    return tokens


def plan_mount(
    *,
    volume_options: list[str],
    program_options: list[str],
    volume_read_only: bool,
    persistent: bool,
    user_id: int,
    group_id: int,
    default_source: str,
    policy: NodePolicy,
) -> FuseMountSpec:
    """Combine the volume's and the program's options into one mount.

    Volume options come first and the program's follow, so the program can
    refine them, except that a read-only volume stays read-only whatever the
    program says. On a PersistentVolume (persistent) the volume's options
    are the administrator's: they are applied once more after the program's,
    so each option the PV sets wins (a program's `exec` does not undo the
    PV's `noexec`), and only they may use the node's persistent-only options.
    One exception: a program that asks for `ro` gets a read-only mount even
    on a PV that says `rw` (a writable mount its daemon did not ask for
    would be the PV widening, not restricting, the program's mount).
    """
    draft = _Draft()
    for token in volume_options:
        _apply(token, draft, policy, administrator=persistent)
    for token in program_options:
        _apply(token, draft, policy, administrator=False)
    program_read_only = draft.read_only
    if persistent:
        for token in volume_options:
            _apply(token, draft, policy, administrator=True)
        draft.read_only = draft.read_only or program_read_only
    flags: list[str] = []
    if policy.allow_other or draft.allow_other:
        # The node's decision (or the PV administrator's), not the pod's:
        # consumers in the pod's other containers usually run as other uids.
        # Who of them may do what is the daemon's business, unless it asked
        # for default_permissions.
        flags.append("allow_other")
    if draft.default_permissions:
        flags.append("default_permissions")
    flags += sorted((draft.sb_flags or {}).keys())
    attrs = draft.attrs
    if draft.atime is not None:
        attrs |= draft.atime
    strings = (("max_read", draft.max_read),) if draft.max_read else ()
    return FuseMountSpec(
        source=draft.fsname or draft.subtype or default_source,
        subtype=draft.subtype,
        user_id=user_id,
        group_id=group_id,
        read_only=volume_read_only or draft.read_only,
        mount_attrs=attrs,
        flags=tuple(flags),
        strings=strings,
    )
