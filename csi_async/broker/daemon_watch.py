"""The processes that serve a FUSE mount, and the moment they exit.

The daemon is the process that ran fusermount3 (the peer's parent), or the
peer itself (the starter). Both are held as pidfds, opened race-free, so
that a recycled pid is never watched in their place; a restarted driver
opens them again by pid and start time (from the mount record). What an
exit means for the mount is the caller's decision (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable


def daemons_of(peer_pid: int) -> list[tuple[int, int, int]]:
    """(pidfd, pid, start time) of the peer and of its parent, opened race-free.

    The parent is read after the peer's pidfd is held, and checked again
    afterwards, so a recycled pid cannot slip in. A peer in a pid namespace
    we cannot see has pid 0: nothing to watch.
    """
    if peer_pid <= 0:
        return []
    try:
        peer_fd = os.pidfd_open(peer_pid)
    except OSError:
        return []
    found = [(peer_fd, peer_pid, _start_time(peer_pid) or 0)]
    parent = _parent_of(peer_pid)
    if parent is not None and parent > 1:
        try:
            parent_fd = os.pidfd_open(parent)
        except OSError:
            return found
        if _parent_of(peer_pid) == parent:
            found.append((parent_fd, parent, _start_time(parent) or 0))
        else:
            os.close(parent_fd)
    return found


def reopen_pid(pid: int, start_time: int) -> int | None:
    """A pidfd of pid if it is still the process that started at start_time."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after the pidfd is held: from here on the pid cannot be reused.
    if start_time == 0 or _start_time(pid) != start_time:
        os.close(fd)
        return None
    return fd


async def watch_until(pidfds: list[int], on_exit: Callable[[], Awaitable[bool]]) -> None:
    """Call on_exit whenever one of the processes exits, until it returns True.

    Also returns once every process has exited. Every pidfd is closed,
    however this ends.
    """
    try:
        while pidfds:
            exited = await _first_readable(pidfds)
            pidfds.remove(exited)
            os.close(exited)
            if await on_exit():
                return
    finally:
        for fd in pidfds:
            os.close(fd)


def _stat_fields(pid: int) -> list[str]:
    # /proc/<pid>/stat takes no lock a FUSE fault could hold (unlike cmdline
    # or environ, which read the process's memory), so it is safe here.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat_line = f.read()
    except OSError:
        return []
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    return stat_line.rpartition(")")[2].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # Field 22 (starttime), the 20th after the command name.
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


async def _first_readable(fds: list[int]) -> int:
    """Wait until one of the fds (pidfds) is readable, i.e. that process exited.

    Every live mount waits here for as long as its daemon runs, so this is
    memory held per mount: one future and a reader callback per fd on the
    event loop. (A task group with an anyio.wait_readable task per fd held
    about 6 KiB more a mount: tasks, cancel scopes, Events.) Cancelling the
    caller cancels the future, and the callbacks go with it.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()

    def readable(fd: int) -> None:
        if not exited.done():
            exited.set_result(fd)

    watched: list[int] = []
    try:
        for fd in fds:
            loop.add_reader(fd, readable, fd)
            watched.append(fd)
        return await exited
    finally:
        for fd in watched:
            loop.remove_reader(fd)
