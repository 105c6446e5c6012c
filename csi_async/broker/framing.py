"""Reading and writing protocol frames on non-blocking sockets, on the event loop.

recvmsg is used (not recv) so that file descriptors a client attaches are
seen, closed at once, and turned into a protocol error; MSG_CTRUNC (more fds
than our one-slot control buffer) is an error too.
"""

from __future__ import annotations

import array
import os
import socket

import anyio

from fusermount3_proxy import protocol

_FD_SIZE = array.array("i").itemsize
_CONTROL_SPACE = socket.CMSG_SPACE(_FD_SIZE)


class FramingError(Exception):
    """The peer broke the framing rules; answer (if possible) and hang up."""


def _close_passed_fds(ancillary: list[tuple[int, int, bytes]]) -> int:
    count = 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            for fd in fds:
                os.close(fd)
                count += 1
    return count


async def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        await anyio.wait_readable(sock)
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                size - len(chunks), _CONTROL_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            continue
        passed = _close_passed_fds(ancillary)
        if passed or flags & socket.MSG_CTRUNC:
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
            await anyio.wait_writable(sock)
            try:
                sent = sock.sendmsg([view], ancillary)
            except (BlockingIOError, InterruptedError):
                continue
            # The fd travels with the first chunk; never send it twice.
            ancillary = []
            view = view[sent:]
