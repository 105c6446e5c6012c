"""Whether this node's /dev/fuse can be handed to containers."""

from __future__ import annotations

import os
import stat

import anyio

DEV_FUSE = "/dev/fuse"
# The FUSE device's number, fixed by the kernel (Documentation/admin-guide/devices.txt).
FUSE_MAJOR = 10
FUSE_MINOR = 229


def dev_fuse_healthy(path: str = DEV_FUSE) -> bool:
    """True if `path` is the FUSE character device, 10:229.

    A stat of a devtmpfs node never waits on anything, so it may run on the event loop.
    A missing node, or anything else at that path (a regular file, another device),
    is unhealthy: a container given it could not open a FUSE connection.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (
        stat.S_ISCHR(st.st_mode)
        and os.major(st.st_rdev) == FUSE_MAJOR
        and os.minor(st.st_rdev) == FUSE_MINOR
    )


class DeviceHealth:
    """The last health seen, and an event that fires when it changes (ListAndWatch waits on it)."""

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self._changed = anyio.Event()

    def update(self, healthy: bool) -> bool:
        """Record the health now seen; True (and wake the watchers) if it changed."""
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return True

    def next_change(self) -> anyio.Event:
        """The event the next change sets: take it before reading `healthy`, so none is missed."""
        return self._changed
