#!/usr/bin/python3
"""memfs: a tiny in-memory filesystem on pyfuse3, for the compatibility matrix.

    /usr/bin/python3 memfs.py [-o OPTION[,OPTION...]] MOUNTPOINT

The root directory holds one file, "hello"; files can be created, written,
read, truncated and removed, all in memory. MOUNTPOINT may be /dev/fd/N (an
fd of /dev/fuse that is already mounted, libfuse >= 3.3). It runs in the
foreground with Debian's python3-pyfuse3 (/usr/bin/python3, not the venv),
exits 0 once the filesystem is unmounted, and unmounts on SIGTERM or SIGINT
(it handles them, so that it also stops when it is a container's PID 1).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from typing import Any

import pyfuse3  # type: ignore[import-not-found]
import trio  # type: ignore[import-not-found]

HELLO = b"Hello from pyfuse3!\n"
ROOT = 1  # pyfuse3.ROOT_INODE


class MemFS(pyfuse3.Operations):  # type: ignore[misc]
    """One flat directory of in-memory files, owned by whoever runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.names: dict[bytes, int] = {b"hello": 2}
        self.data: dict[int, bytearray] = {2: bytearray(HELLO)}
        self.next_inode = 3
        self.started = time.time_ns()

    def _attrs(self, inode: int) -> Any:
        entry = pyfuse3.EntryAttributes()
        if inode == ROOT:
            entry.st_mode = stat.S_IFDIR | 0o777
            entry.st_nlink = 2
            entry.st_size = 0
        elif inode in self.data:
            entry.st_mode = stat.S_IFREG | 0o666
            entry.st_nlink = 1
            entry.st_size = len(self.data[inode])
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.started
        entry.entry_timeout = entry.attr_timeout = 0
        return entry

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.names[name])

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(self.names.items(), key=lambda item: item[1])
        for name, inode in entries:
            if inode > start_id and not pyfuse3.readdir_reply(
                token, name, self._attrs(inode), inode
            ):
                return

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode not in self.data:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        if flags & os.O_TRUNC:
            self.data[inode].clear()
        return pyfuse3.FileInfo(fh=inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[Any, Any]:  # fmt: skip
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = self.names.get(name)
        if inode is None:
            inode = self.names[name] = self.next_inode
            self.next_inode += 1
            self.data[inode] = bytearray()
        return pyfuse3.FileInfo(fh=inode), self._attrs(inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.data[fh][off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.data[fh]
        if len(data) < off:
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        return len(buf)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size and inode in self.data:
            del self.data[inode][attr.st_size :]
        return self._attrs(inode)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        inode = self.names.pop(name, None) if parent_inode == ROOT else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        del self.data[inode]


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    options = set(pyfuse3.default_options) | {"fsname=memfs", "subtype=memfs"}
    args = argv[1:]
    while len(args) > 1 and args[0] == "-o":
        options |= set(filter(None, args[1].split(",")))
        args = args[2:]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    pyfuse3.init(MemFS(), args[0], options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
