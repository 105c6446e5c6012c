"""Reading and writing protocol frames on non-blocking sockets, on the event loop.

Requests never carry file descriptors, and the driver must never hold one a
pod sent: closing a file that lives on the pod's own FUSE mount sends
FUSE_FLUSH to the pod's daemon, which may never answer, and that close would
run on the event loop every tenant shares. So fds are kept out twice:

- listening sockets turn SO_PASSRIGHTS off (Linux 6.16+; accepted sockets
  inherit it), so the kernel refuses the pod's sendmsg() with EPERM and no
  fd ever reaches our queue;
- on older kernels, requests are read with recvmsg() and no control buffer:
  the kernel then drops any attached fds itself (a reference drop, no flush)
  and flags MSG_CTRUNC, which we treat as "fds were attached" and refuse.
"""

from __future__ import annotations

import array
import socket

import anyio

from fusermount3_proxy import protocol

# Not in Python's socket module yet (Linux 6.16, include/uapi/asm-generic/socket.h).
SO_PASSRIGHTS = 83


class FramingError(Exception):
    """The peer broke the framing rules; answer (if possible) and hang up."""


def refuse_passed_fds(sock: socket.socket) -> bool:
    """Make the kernel refuse SCM_RIGHTS sent to this socket; False if it cannot.

    On a listening socket it applies to every connection accepted from it,
    including those whose data arrived before accept().
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False  # ENOPROTOOPT: an older kernel; recvmsg's MSG_CTRUNC still guards
    return True


async def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        try:
            # No control buffer: attached fds are never installed in our fd
            # table (see the module docstring). MSG_DONTWAIT whatever the
            # socket's mode (accept() hands out blocking sockets): a pod that
            # connects and sends nothing must never block the event loop.
            data, _, flags, _ = sock.recvmsg(size - len(chunks), 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            # Read first, wait only if nothing is there: the helper sends its
            # whole request right after connect(), so it has usually arrived
            # by now, and each wait costs an event-loop round trip
            # (add_reader, a poll, remove_reader) inside P1's mount time.
            await anyio.wait_readable(sock)
            continue
        if flags & socket.MSG_CTRUNC:
            raise FramingError("requests must not carry file descriptors")
        if not data:
            raise FramingError("connection closed in the middle of a frame")
        chunks += data
    return bytes(chunks)


async def read_request_body(sock: socket.socket, timeout: float) -> bytes:
    """One request frame's body, within `timeout` seconds for the whole frame."""
    try:
        with anyio.fail_after(timeout):
            header = await _recv_exact(sock, protocol.HEADER_SIZE)
            length = protocol.decode_header(header, protocol.KIND_REQUEST)
            return await _recv_exact(sock, length)
    except TimeoutError:
        raise FramingError(f"no complete request within {timeout:g} s") from None
    except protocol.ProtocolError as err:
        raise FramingError(str(err)) from None


async def send_frame(sock: socket.socket, frame: bytes, fd: int | None, timeout: float) -> None:
    """Send a response frame, with `fd` attached to its first byte if given."""
    ancillary = (
        [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    )
    view = memoryview(frame)
    with anyio.fail_after(timeout):
        while view:
            try:
                # MSG_DONTWAIT: a peer that does not read must not block the loop.
                sent = sock.sendmsg([view], ancillary, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                # Nothing was sent (nor the fd): wait for room. A response
                # fits an empty socket buffer, so this is the rare path.
                await anyio.wait_writable(sock)
                continue
            # The fd travels with the first chunk; never send it twice.
            ancillary = []
            view = view[sent:]
