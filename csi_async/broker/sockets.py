"""Creating and removing a volume's listening socket inside a pinned directory.

The directory may be writable by the pod (meta-fuse mode puts the socket in
the pod's emptyDir), so nothing here follows a symlink or trusts a name:
bind() goes through /proc/self/fd/<dirfd>/<name> (which also keeps the path
short of the 108-byte sun_path limit), permissions are set through an
O_PATH|O_NOFOLLOW fd of what we just created, and removal checks that the
entry is still our own socket inode.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from csi_async.broker.framing import refuse_passed_fds
from csi_async.mount.paths import entry_kind

# Small on purpose: a volume has one FUSE program and connections are brief.
LISTEN_BACKLOG = 16
# A pod racing unlink/bind on the name in its own emptyDir can make one
# attempt fail; it cannot make this many fail in a row by accident.
BIND_ATTEMPTS = 8


class SocketRaced(OSError):
    """Something kept replacing the socket's name while we created it."""


@dataclass(slots=True)
class BoundSocket:
    sock: socket.socket
    dir_fd: int
    name: str
    device: int
    inode: int


class _Replaced(Exception):
    """Our freshly bound name no longer is a socket."""


def listen_in(dir_fd: int, name: str) -> BoundSocket:
    """Listen on a Unix socket called `name` in the directory `dir_fd`.

    A stale socket (from a driver that died) or a symlink planted under the
    name is removed first; any other kind of entry is left alone and refused.
    In a pod-writable directory the pod may race us on the name (unlink,
    bind, swap); that is retried a bounded number of times, then SocketRaced.
    """
    for _ in range(BIND_ATTEMPTS):
        try:
            return _listen_once(dir_fd, name)
        except (FileNotFoundError, _Replaced):
            continue  # our entry vanished or was swapped under us
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            continue  # something appeared on the name between unlink and bind
    raise SocketRaced(
        errno.EADDRINUSE, f"the socket name {name!r} kept being replaced while it was created"
    )


def _listen_once(dir_fd: int, name: str) -> BoundSocket:
    kind = entry_kind(dir_fd, name)
    if kind in (stat.S_IFSOCK, stat.S_IFLNK):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass  # gone already
    elif kind is not None:
        raise FileExistsError(f"{name!r} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{name}")
        pinned = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(pinned)
            if not stat.S_ISSOCK(st.st_mode):
                raise _Replaced(name)
            # Any uid in the pod may run the FUSE program; reach is limited by
            # where the socket is visible (only that pod), not by its mode.
            os.chmod(f"/proc/self/fd/{pinned}", 0o666)  # noqa: S103
        finally:
            os.close(pinned)
        # Requests never carry fds; with this the kernel refuses them outright
        # (accepted connections inherit it). See framing.py for why.
        refuse_passed_fds(sock)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return BoundSocket(sock, dir_fd, name, st.st_dev, st.st_ino)


def close(bound: BoundSocket) -> None:
    """Stop listening but leave the file (a restarted driver binds it again)."""
    bound.sock.close()
    if bound.dir_fd >= 0:
        os.close(bound.dir_fd)
        bound.dir_fd = -1


def remove(bound: BoundSocket) -> None:
    """Close the listener and unlink its file if the name is still ours.

    Blocking (a stat in a directory the pod may control): run it off the loop.
    """
    if bound.dir_fd >= 0:
        try:
            st = os.stat(bound.name, dir_fd=bound.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if (st.st_dev, st.st_ino) == (bound.device, bound.inode):
                os.unlink(bound.name, dir_fd=bound.dir_fd)
    close(bound)
