"""What a MOUNT on a volume whose FUSE mount is still served is told.

A volume holds one FUSE mount, on its root (the kubelet target), and every
MOUNT through its socket lands there, whatever mountpoint the program
named. So a second MOUNT while the first daemon lives is refused, and the
message says which of the usual cases it is, from the mountpoints the two
programs named (each in its own container's mount namespace, so only
compared as strings; they are what the programs asked for, not where the
broker mounted):

- the same path: the program (or another copy of it) was started again
  while the first one still serves the volume;
- a path below the first mount: an automounter such as afuse, or a program
  given a directory inside the mounted filesystem;
- any other path (an automounter's private directory, another container's
  path, the starter's /dev/fd/N): it still maps onto this volume's root.

The paths come from the pod and are only quoted, shortened to keep the
advice within the response's length limit.
"""

from __future__ import annotations

# Enough to recognise a path; the response message is capped at 2048 bytes.
_MAX_PATH_CHARS = 160
_ONE_MOUNT = "a volume holds one FUSE mount, on its root, whatever mountpoint is asked for"
_OWN_VOLUME = "give the second filesystem a csi-async volume (and broker socket) of its own"


def second_mount_message(requested: str, current: str | None) -> str:
    """The EBUSY message for a MOUNT of `requested` while `current` is mounted and served.

    `current` is the mountpoint the program that made the live mount named,
    or None when it is not known (a mount adopted after a driver restart).
    """
    asked = _quote(requested)
    if current is None or not _is_path(current):
        return (
            f"the volume is already mounted and its FUSE daemon is still running; "
            f"{_ONE_MOUNT} (this request named {asked}): unmount it first with "
            f"fusermount3 -u, or {_OWN_VOLUME}"
        )
    mounted = _quote(current)
    if _is_path(requested) and _normal(requested) == _normal(current):
        return (
            f"{asked} is already mounted: the volume's FUSE filesystem is there and its "
            f"daemon is still running; stop that program or unmount it first with "
            f"fusermount3 -u {asked}"
        )
    if _is_path(requested) and _normal(requested).startswith(_normal(current).rstrip("/") + "/"):
        return (
            f"{asked} is inside the volume's FUSE filesystem, which is already mounted at "
            f"{mounted} and still served: {_ONE_MOUNT}, so nothing can be mounted below "
            f"it (an automounter such as afuse included); {_OWN_VOLUME}"
        )
    return (
        f"the volume is already mounted (at {mounted}) and its FUSE daemon is still running: "
        f"{asked} would land on the same volume, since {_ONE_MOUNT}; {_OWN_VOLUME}, or "
        f"unmount the first with fusermount3 -u {mounted}"
    )


def _is_path(mountpoint: str) -> bool:
    # The starter names "/dev/fd/N": not a place in the container.
    return mountpoint.startswith("/") and not mountpoint.startswith("/dev/fd/")


def _normal(path: str) -> str:
    """Repeated and trailing slashes removed; the zipapp already made the path absolute."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return "/" + "/".join(parts)


def _quote(mountpoint: str) -> str:
    if len(mountpoint) <= _MAX_PATH_CHARS:
        return mountpoint
    return mountpoint[: _MAX_PATH_CHARS - 3] + "..."
