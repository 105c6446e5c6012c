"""A minimal FUSE server on a /dev/fuse fd, standard library only.

Enough of the kernel protocol for the benchmarks' own mounts: it answers
INIT, STATFS (the broker's liveness probe), GETATTR of the root directory and
DESTROY, and ENOSYS to everything else. It is what the P1 loop uses after the
timed part, so that the broker's probe of the fresh mount is answered and the
unmount through the broker is not held up by an unserved connection.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_out_header: len, error, unique
OUT_HEADER = struct.Struct("<IiQ")
# struct fuse_init_in (the first four fields are all that every kernel sends)
INIT_IN = struct.Struct("<IIII")
# struct fuse_init_out (64 bytes): major, minor, max_readahead, flags,
# max_background, congestion_threshold, max_write, time_gran, max_pages,
# map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# struct fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize,
# padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
# struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then struct fuse_attr
ATTR_OUT = struct.Struct("<QII" + "QQQQQQ" + "III" + "IIIIIII")

FUSE_GETATTR = 3
FUSE_FORGET = 2
FUSE_STATFS = 17
FUSE_INIT = 26
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
NO_REPLY = frozenset({FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET})

KERNEL_MAJOR = 7
OUR_MINOR = 31
MAX_WRITE = 128 * 1024
# Reads must offer room for a whole WRITE request; before INIT the kernel
# does not know max_write yet, so offer plenty.
READ_BUFFER = 1024 * 1024 + 4096
ROOT_MODE = 0o040755


def _reply(fd: int, unique: int, error: int = 0, payload: bytes = b"") -> None:
    header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique)
    try:
        os.write(fd, header + payload)
    except OSError as err:
        # ENOENT: the request was interrupted meanwhile; nothing to do.
        if err.errno != errno.ENOENT:
            raise


def _init_reply(body: bytes) -> bytes:
    major, minor, max_readahead, _flags = INIT_IN.unpack_from(body)
    if major != KERNEL_MAJOR:
        raise OSError(errno.EPROTO, f"kernel speaks FUSE {major}.{minor}")
    return INIT_OUT.pack(
        KERNEL_MAJOR, min(minor, OUR_MINOR), max_readahead, 0, 16, 12, MAX_WRITE, 1, 0, 0, 0, 0
    )


def _root_attr(uid: int, gid: int) -> bytes:
    return ATTR_OUT.pack(
        1,
        0,
        0,  # valid for one second
        1,
        0,
        0,
        0,
        0,
        0,  # ino, size, blocks, atime, mtime, ctime
        0,
        0,
        0,  # nsecs
        ROOT_MODE,
        2,
        uid,
        gid,
        0,
        4096,
        0,  # mode, nlink, uid, gid, rdev, blksize, flags
    )


def handle(fd: int, request: bytes) -> bool:
    """Answer one request; False once the filesystem is being destroyed."""
    _length, opcode, unique, nodeid, uid, gid, _pid, _ext, _pad = IN_HEADER.unpack_from(request)
    body = request[IN_HEADER.size :]
    if opcode in NO_REPLY:
        return True
    if opcode == FUSE_INIT:
        _reply(fd, unique, 0, _init_reply(body))
    elif opcode == FUSE_STATFS:
        _reply(fd, unique, 0, STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0))
    elif opcode == FUSE_GETATTR and nodeid == 1:
        _reply(fd, unique, 0, _root_attr(uid, gid))
    elif opcode == FUSE_DESTROY:
        _reply(fd, unique)
        return False
    else:
        _reply(fd, unique, errno.ENOSYS)
    return True


def serve(fd: int) -> None:
    """Serve the connection until it goes away (ENODEV after the unmount)."""
    while True:
        try:
            request = os.read(fd, READ_BUFFER)
        except InterruptedError:
            continue
        except OSError as err:
            if err.errno == errno.ENOENT:  # an interrupted request vanished
                continue
            if err.errno in (errno.ENODEV, errno.ECONNABORTED):
                return
            raise
        if not request:
            return
        if not handle(fd, request):
            return


def serve_in_thread(fd: int) -> threading.Thread:
    thread = threading.Thread(target=serve, args=(fd,), name=f"minifuse-{fd}", daemon=True)
    thread.start()
    return thread
