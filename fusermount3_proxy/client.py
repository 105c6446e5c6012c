"""The broker client: one request, one response, at most one fd.

Used by the fusermount3 command line and by the starter. Everything that can
go wrong on the way to the broker ends up as a BrokerError whose text is ready
to be printed after "argv[0]: ".
"""

from __future__ import annotations

import array
import errno
import os
import socket
import time

from fusermount3_proxy import protocol
from fusermount3_proxy.protocol import MountRequest, Request, Response, UnmountRequest

# Room for exactly one fd: a broker that attaches more gets MSG_CTRUNC, and the
# kernel discards the fds that did not fit instead of installing them here.
_FD_SIZE = array.array("i").itemsize
_CMSG_BUFSIZE = socket.CMSG_SPACE(_FD_SIZE)

_HINTS = {
    errno.ENOENT: "is the volume's broker socket mounted into this container?",
    errno.ENOTDIR: "is the volume's broker socket mounted into this container?",
    errno.ECONNREFUSED: "is the csi-async node plugin running on this node?",
    errno.ETIMEDOUT: "is the csi-async node plugin running on this node?",
    errno.EAGAIN: "the broker is not accepting connections",
    errno.EACCES: "this user may not connect to the broker socket",
}


class BrokerError(Exception):
    """The exchange with the broker failed; str() is the user-facing message."""


class BrokerUnreachable(BrokerError):
    """Connecting to the broker socket failed."""

    def __init__(self, path: str, err: OSError) -> None:
        code = errno.ETIMEDOUT if isinstance(err, TimeoutError) else err.errno
        hint = _HINTS.get(code) if code is not None else None
        text = f"cannot reach the csi-async broker at {path}: {_reason(err)}"
        super().__init__(f"{text} ({hint})" if hint else text)
        self.errno = code


class Refused(BrokerError):
    """The broker answered, and said no; str() is its reason."""


def socket_path() -> str:
    """Where the broker listens: the environment, else the built-in default."""
    # An empty value is treated as unset: connecting to "" can only fail.
    return os.environ.get(protocol.SOCKET_PATH_ENV) or protocol.DEFAULT_SOCKET_PATH


def describe(response: Response) -> str:
    """The text to show for a refused request."""
    if response["message"]:
        return response["message"]
    if response["errno"]:
        return os.strerror(response["errno"])
    return "the csi-async broker refused the request"


def mount(options: list[str], mountpoint: str, auto_unmount: bool) -> tuple[int | None, int]:
    """Ask for this volume's mount; return (mount id, /dev/fuse fd). The fd is the caller's."""
    request: MountRequest = {
        "op": "mount",
        "options": options,
        "mountpoint": mountpoint,
        "auto_unmount": auto_unmount,
    }
    response, fd = exchange(request)
    if not response["ok"]:
        raise Refused(describe(response))
    if fd is None:
        # A broker that says yes without the fd broke the protocol; undo it.
        unmount(mountpoint, mount_id=response["mount_id"])
        raise BrokerError("the csi-async broker reported a mount but sent no file descriptor")
    return response["mount_id"], fd


def unmount(
    mountpoint: str, *, lazy: bool = True, mount_id: int | None = None, path: str | None = None
) -> None:
    """Ask for this volume's mount to be detached (only mount_id's, if given)."""
    request: UnmountRequest = {
        "op": "unmount",
        "mountpoint": mountpoint,
        "lazy": lazy,
        "mount_id": mount_id,
    }
    response, _ = exchange(request, path=path)
    if not response["ok"]:
        raise Refused(describe(response))


def exchange(
    request: Request,
    path: str | None = None,
    timeout: float = protocol.READ_TIMEOUT,
) -> tuple[Response, int | None]:
    """Send one request and return the response and the fd that came with it.

    The fd is returned only for a successful mount and is then owned by the
    caller. It may be None even then if the broker broke the protocol; the
    caller decides how to roll that back, since only it knows the context.
    Any other fd the broker sent is closed here.
    """
    if path is None:
        path = socket_path()
    try:
        frame = protocol.encode_frame(protocol.KIND_REQUEST, request)
    except (protocol.ProtocolError, UnicodeEncodeError) as err:
        raise BrokerError(f"cannot encode the request for the csi-async broker: {err}") from None

    sock = _connect(path, timeout)
    fds: list[int] = []
    try:
        try:
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                # The broker may answer (a refusal) and hang up before
                # reading everything; its answer is still there to read.
                pass
            header = _recv_exact(sock, protocol.HEADER_SIZE, fds)
            length = protocol.decode_header(header, protocol.KIND_RESPONSE)
            body = _recv_exact(sock, length, fds)
            response = _parse_response(protocol.decode_json_object(body))
        except (OSError, protocol.ProtocolError) as err:
            raise BrokerError(
                f"error talking to the csi-async broker at {path}: {_reason(err)}"
            ) from None
        fd = None
        if request["op"] == "mount" and response["ok"] and fds:
            fd = fds.pop(0)
        return response, fd
    finally:
        sock.close()
        for extra in fds:
            _close_quietly(extra)


def _connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(path)
        except BlockingIOError as err:
            # A full listen backlog gives EAGAIN on a non-blocking AF_UNIX
            # connect instead of waiting, so wait here, within the same budget.
            sock.close()
            if time.monotonic() + delay >= deadline:
                raise BrokerUnreachable(path, err) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            continue
        except OSError as err:
            sock.close()
            raise BrokerUnreachable(path, err) from None
        sock.settimeout(timeout)
        return sock


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    """Read exactly size bytes, collecting any fds into fds as they arrive.

    Every read uses recvmsg with a control buffer, so an fd attached to any
    segment is received (and later closed if unwanted) rather than lost.
    """
    buf = bytearray()
    while len(buf) < size:
        data, ancdata, flags, _ = sock.recvmsg(
            size - len(buf), _CMSG_BUFSIZE, socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % _FD_SIZE]))
        if flags & socket.MSG_CTRUNC:
            raise protocol.ProtocolError("the broker sent more file descriptors than expected")
        if not data:
            raise protocol.ProtocolError("connection closed before the response was complete")
        buf += data
    return bytes(buf)


def _parse_response(obj: dict[str, object]) -> Response:
    for key in ("ok", "errno", "message", "mount_id"):
        if key not in obj:
            raise protocol.ProtocolError(f"response has no {key!r} field")
    ok = obj["ok"]
    code = obj["errno"]
    message = obj["message"]
    mount_id = obj["mount_id"]
    if not isinstance(ok, bool):
        raise protocol.ProtocolError("response field 'ok' is not a boolean")
    if not isinstance(code, int) or isinstance(code, bool):
        raise protocol.ProtocolError("response field 'errno' is not an integer")
    if not isinstance(message, str):
        raise protocol.ProtocolError("response field 'message' is not a string")
    if mount_id is not None and (not isinstance(mount_id, int) or isinstance(mount_id, bool)):
        raise protocol.ProtocolError("response field 'mount_id' is not an integer")
    return {"ok": ok, "errno": code, "message": message, "mount_id": mount_id}


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        return
