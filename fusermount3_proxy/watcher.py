"""The auto-unmount watcher: outlive the FUSE program, then ask for its mount to go.

With auto_unmount (or --auto-unmount alone) fusermount3 stays alive after the
fd hand-over, holding the comm socket whose other end the FUSE program keeps
open for as long as it lives. When that end closes, however the program
ended, the watcher asks the broker to detach the mount, naming the mount id
it got when it has one: a watcher left over from an earlier run of the
program then never detaches the fresh mount of a later one.
"""

# Imports are deferred on purpose (os is loaded at interpreter startup
# anyway), as in the rest of the zipapp: zipimport compiles every module
# from source on each run.
# ruff: noqa: PLC0415

from __future__ import annotations

import os


def watch(cfd: int, mnt: str, mount_id: int | None) -> int:
    """Stay alive until the FUSE program goes away, then ask for an unmount.

    Like fusermount3 >= 3.17.1: every other fd is closed and 0-2 point to
    /dev/null, so callers that read our stdout/stderr to EOF (bazil, Go's
    exec) are not held up; a new session and a full signal mask mean only
    SIGKILL stops the watcher before it has done its job.
    """
    import signal
    import socket

    from fusermount3_proxy import client

    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    path = client.socket_path()
    try:
        path = os.path.abspath(path)
        os.chdir("/")
    except OSError:
        pass
    cfd = _close_inherited_fds(cfd)
    try:
        os.setsid()
    except OSError:
        pass

    sock = socket.socket(fileno=cfd)
    sock.setblocking(True)
    while True:
        try:
            data = sock.recv(16)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
    sock.close()

    try:
        client.unmount(mnt, mount_id=mount_id, path=path)
    except client.BrokerError:
        # stderr is /dev/null by now and the exit status is not looked at:
        # there is nobody left to tell.
        pass
    return 0


def _close_inherited_fds(cfd: int) -> int:
    """Close everything but 0-2 and the comm fd; return the comm fd's number."""
    if cfd <= 2:
        import fcntl

        cfd = fcntl.fcntl(cfd, fcntl.F_DUPFD, 3)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if devnull != std:
            os.dup2(devnull, std)
    keep = {0, 1, 2, cfd}
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        # Without /proc, fall back to the range; closerange may then loop
        # over every possible fd, which is slow but correct.
        limit = os.sysconf("SC_OPEN_MAX")
        os.closerange(3, cfd)
        os.closerange(cfd + 1, limit)
        return cfd
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue
    return cfd
